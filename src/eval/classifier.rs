//! The frozen feature extractor of our quality metrics: a small CNN trained on the dataset's own
//! train split (InceptionV3 weights cannot be had here; design §8).
//!
//! conv(1→32) → ReLU → max-pool ×3 stages (32, 64, 64 channels, 32 → 4 px), then fc 1024 → 128
//! → ReLU (the 128-d *features*) → fc 128 → classes. Inputs are the tokenizer's images:
//! `C × S × S` in [−1, 1].
//!
//! # Shapes
//! images (B, C, S, S) → features (B, 128), logits (B, classes)

use candle_core::{Device, Tensor, D};

use super::{EvalError, Result};
use crate::data::ImageDataset;
use crate::kernels::conv::{conv2d, ConvParams};
use crate::nn::Linear;
use crate::optim::AdamWConfig;
use crate::params::{Init, ParamStore, Pb};
use crate::train::{BatchSampler, LoopConfig, StepOutput, Task};

/// Feature width.
pub const FEATURES: usize = 128;

/// The classifier's architecture.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassifierConfig {
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
}

struct ConvLayer {
    weight: Tensor,
    bias: Tensor,
}

impl ConvLayer {
    fn new(pb: &Pb, cin: usize, cout: usize) -> Result<Self> {
        let bound = 1.0 / ((cin * 9) as f64).sqrt();
        Ok(Self {
            weight: pb.get((cout, cin, 3, 3), "weight", Init::Uniform(bound))?,
            bias: pb.get(cout, "bias", Init::Uniform(bound))?,
        })
    }

    /// conv 3×3 → ReLU → 2×2 max-pool.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, ConvParams::symmetric(1, 1))?.broadcast_add(&self.bias.reshape((
            1,
            (),
            1,
            1,
        ))?)?;
        Ok(y.relu()?.max_pool2d(2)?)
    }
}

/// The CNN.
pub struct Classifier {
    config: ClassifierConfig,
    convs: Vec<ConvLayer>,
    fc1: Linear,
    fc1_bias: Tensor,
    fc2: Linear,
    fc2_bias: Tensor,
}

impl Classifier {
    pub fn new(config: &ClassifierConfig, pb: &Pb) -> Result<Self> {
        if !config.image_size.is_multiple_of(8) || config.num_classes < 2 {
            return Err(EvalError::Bad(format!(
                "classifier needs an image size divisible by 8 and ≥ 2 classes, got {config:?}"
            )));
        }
        let chans = [config.in_channels, 32, 64, 64];
        let convs = (0..3)
            .map(|i| ConvLayer::new(&pb.pp(format!("conv{i}")), chans[i], chans[i + 1]))
            .collect::<Result<_>>()?;
        let flat = 64 * (config.image_size / 8).pow(2);
        let b1 = 1.0 / (flat as f64).sqrt();
        let b2 = 1.0 / (FEATURES as f64).sqrt();
        Ok(Self {
            config: config.clone(),
            convs,
            fc1: Linear::new(&pb.pp("fc1"), flat, FEATURES, Init::Uniform(b1))?,
            fc1_bias: pb.pp("fc1").get(FEATURES, "bias", Init::Uniform(b1))?,
            fc2: Linear::new(&pb.pp("fc2"), FEATURES, config.num_classes, Init::Uniform(b2))?,
            fc2_bias: pb.pp("fc2").get(config.num_classes, "bias", Init::Uniform(b2))?,
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// Penultimate features (B, 128) and logits (B, classes).
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != c.in_channels || dims[2] != c.image_size || dims[3] != c.image_size {
            return Err(EvalError::Bad(format!(
                "classifier expects (B, {}, {}, {}), got {dims:?}",
                c.in_channels, c.image_size, c.image_size
            )));
        }
        let mut h = images.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?;
        }
        let h = h.flatten_from(1)?;
        let features = self.fc1.forward(&h)?.broadcast_add(&self.fc1_bias)?.relu()?;
        let logits = self.fc2.forward(&features)?.broadcast_add(&self.fc2_bias)?;
        Ok((features, logits))
    }

    /// Features (N × 128, row-major) and class probabilities (N × classes) of images, in batches.
    pub fn features_and_probs(&self, images: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = images.dim(0)?;
        let (mut feats, mut probs) =
            (Vec::with_capacity(n * FEATURES), Vec::with_capacity(n * self.config.num_classes));
        for start in (0..n).step_by(500) {
            let len = 500.min(n - start);
            let (f, logits) = self.forward(&images.narrow(0, start, len)?.detach())?;
            feats.extend(f.flatten_all()?.to_vec1::<f32>()?);
            probs.extend(candle_nn::ops::softmax(&logits, D::Minus1)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((feats, probs))
    }
}

/// The classifier experiment config (saved beside the weights).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassifierTrainConfig {
    pub kind: String,
    pub model: ClassifierConfig,
    pub seed: u64,
    pub batch_size: usize,
    pub data: String,
    pub train: LoopConfig,
}

impl ClassifierTrainConfig {
    pub fn mnist(data: &str) -> Self {
        Self {
            kind: "classifier".into(),
            model: ClassifierConfig { in_channels: 1, image_size: 32, num_classes: 10 },
            seed: 0,
            batch_size: 128,
            data: data.into(),
            train: LoopConfig {
                steps: 3000,
                adamw: AdamWConfig { lr: 2e-3, weight_decay: 0.0, ..Default::default() },
                schedule: crate::optim::LrSchedule { warmup_steps: 100, cosine: true, min_lr: 0.0 },
                log_every: 50,
                checkpoint_every: 1000,
                ..Default::default()
            },
        }
    }
}

/// Accuracy of a classifier on a dataset (first `max` images).
pub fn accuracy(model: &Classifier, data: &ImageDataset, max: usize, device: &Device) -> Result<f64> {
    let n = data.len().min(max);
    let mut correct = 0usize;
    for start in (0..n).step_by(500) {
        let idx: Vec<usize> = (start..(start + 500).min(n)).collect();
        let (_, logits) = model.forward(&data.batch_tensor(&idx, false, device)?)?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(&idx).filter(|(p, &i)| **p == data.labels[i]).count();
    }
    Ok(correct as f64 / n.max(1) as f64)
}

/// The test accuracy the classifier recorded when it was trained (`accuracy.json` beside its
/// weights), if any.
pub fn recorded_accuracy(path: &std::path::Path) -> Option<f64> {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent()?.to_path_buf() };
    let text = std::fs::read_to_string(dir.join("accuracy.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("test_accuracy")?.as_f64()
}

/// Checks that reference images are from the dataset the classifier was trained on: the
/// classifier must label at least half as many of them correctly as it did its own test split
/// (`recorded`, or 100% when unknown). Features of another dataset (say Fashion-MNIST against an
/// MNIST classifier, about 10% correct) would make every metric meaningless.
pub fn check_reference_data(
    probs: &[f32],
    labels: &[u32],
    num_classes: usize,
    recorded: Option<f64>,
    source: &str,
) -> Result<f64> {
    let n = labels.len();
    if n == 0 || probs.len() != n * num_classes {
        return Err(EvalError::Bad(format!("{source}: no reference images to compare with")));
    }
    let correct = labels
        .iter()
        .enumerate()
        .filter(|&(i, &y)| {
            let row = &probs[i * num_classes..(i + 1) * num_classes];
            let best = row.iter().enumerate().fold(0, |b, (j, &p)| if p > row[b] { j } else { b });
            best == y as usize
        })
        .count();
    let acc = correct as f64 / n as f64;
    let expected = recorded.unwrap_or(1.0);
    if acc < 0.5 * expected {
        return Err(EvalError::Bad(format!(
            "{source}: the classifier labels only {:.1}% of these {n} reference images correctly (it scored {:.1}% on the test split it was trained with), so this is not its dataset; give the matching --data, or a classifier trained on this data (`dpar eval train-classifier --data …`)",
            100.0 * acc,
            100.0 * expected
        )));
    }
    Ok(acc)
}

/// Training task: cross-entropy on the train split, test accuracy as validation.
pub struct ClassifierTask {
    config: ClassifierTrainConfig,
    store: ParamStore,
    model: Classifier,
    train: ImageDataset,
    test: Option<ImageDataset>,
    sampler: BatchSampler,
    device: Device,
}

impl ClassifierTask {
    pub fn new(
        config: ClassifierTrainConfig,
        train: ImageDataset,
        test: Option<ImageDataset>,
        device: &Device,
    ) -> Result<Self> {
        let store = ParamStore::new(config.seed, device);
        let model = Classifier::new(&config.model, &store.root())?;
        let sampler = BatchSampler::new(train.len(), config.batch_size, config.seed);
        Ok(Self { config, store, model, train, test, sampler, device: device.clone() })
    }

    pub fn model(&self) -> &Classifier {
        &self.model
    }
}

impl Task for ClassifierTask {
    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, crate::train::TaskError> {
        let idx = self.sampler.indices(step);
        let run = || -> Result<StepOutput> {
            let x = self.train.batch_tensor(&idx, false, &self.device)?;
            let y = Tensor::new(idx.iter().map(|&i| self.train.labels[i]).collect::<Vec<_>>(), &self.device)?;
            let (_, logits) = self.model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            Ok(StepOutput { loss, metrics: Vec::new(), tokens: idx.len(), flops: 0.0 })
        };
        run().map_err(Into::into)
    }

    fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, crate::train::TaskError> {
        let Some(test) = &self.test else { return Ok(Vec::new()) };
        let acc = accuracy(&self.model, test, usize::MAX, &self.device)?;
        Ok(vec![("accuracy".to_string(), acc)])
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn name(&self) -> String {
        "classifier".into()
    }

    fn throughput_unit(&self) -> &'static str {
        "img/s"
    }
}

/// Loads a classifier written by `dpar eval train-classifier`; returns it with its weights'
/// SHA-256.
pub fn load(path: &std::path::Path, device: &Device) -> Result<(Classifier, ParamStore, String)> {
    if !path.exists() {
        return Err(EvalError::Bad(format!(
            "{}: no classifier weights (train them with `dpar eval train-classifier`)",
            path.display()
        )));
    }
    let file = crate::tensor_io::weight_file(path)?;
    let Some((full, source)) = crate::tensor_io::embedded_config(&file)? else {
        return Err(EvalError::Bad(format!("{}: not a classifier checkpoint (no config)", file.display())));
    };
    let config: ClassifierTrainConfig = crate::util::from_json_strict(full, &[])
        .map_err(|e| EvalError::Bad(format!("{}: config: {e}", source.display())))?;
    if config.kind != "classifier" {
        return Err(EvalError::Bad(format!("{}: holds a `{}` model, not a classifier", source.display(), config.kind)));
    }
    let store = ParamStore::new(0, device);
    let model = Classifier::new(&config.model, &store.root())?;
    store.load_file(&file, true, None)?;
    let hash = crate::util::sha256_file(&file).map_err(|e| EvalError::Bad(e.to_string()))?;
    Ok((model, store, hash))
}
