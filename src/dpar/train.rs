//! Training DPAR on code shards with stored entropies, as a [`crate::train::Task`].
//!
//! Each step draws its images (and flip copies) from `(seed, step)`, turns each image's stored
//! entropies into patch lengths with the configured patcher, and runs the packed forward: one
//! flat sequence per stage, block-diagonal masks, no padding to the longest image.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::model::GlobalLayout;
use super::{Dpar, DparConfig, DparError, Result};
use crate::batch::{batch_tensors, check_flip, noise_rng, step_images, StepImages, TrainNoise};
use crate::data::shards::CodeShard;
use crate::entropy::ShardEntropies;
use crate::params::ParamStore;
use crate::patching::patch_lengths;
use crate::train::{BatchSampler, LoopConfig, Part, StepOutput, Task};

/// The DPAR experiment config, saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DparTrainConfig {
    /// Always `dpar`.
    pub kind: String,
    pub model: DparConfig,
    pub seed: u64,
    pub batch_size: usize,
    pub codes: String,
    pub val_codes: Option<String>,
    pub val_images: usize,
    /// Train on the flip copy of an image with probability ½ (see
    /// [`crate::gpt::train::GptTrainConfig::use_flip`]; off unless asked for).
    #[serde(default)]
    pub use_flip: bool,
    pub tokenizer_id: String,
    /// SHA-256 of the entropy model whose stored entropies define the patches.
    pub entropy_model_id: String,
    pub train: LoopConfig,
}

/// Codes with their entropies, as the task reads them.
#[derive(Debug, Clone)]
pub struct EntropyCodes {
    pub shard: CodeShard,
    pub entropies: ShardEntropies,
}

/// Checks that shards fit the model.
pub fn check_fits(data: &EntropyCodes, model: &DparConfig, what: &str) -> Result<()> {
    let info = &data.shard.info;
    if info.grid_size != model.grid_size
        || info.codebook_size > model.vocab_size
        || info.num_classes > model.num_classes
    {
        return Err(DparError::BadInput(format!(
            "{what}: shards have a {}×{} grid, {} codes and {} classes; the model expects {}×{}, at most {} codes and {} classes",
            info.grid_size, info.grid_size, info.codebook_size, info.num_classes, model.grid_size, model.grid_size, model.vocab_size, model.num_classes
        )));
    }
    Ok(())
}

/// Patch lengths (over all L codes) of the given images.
pub fn batch_lengths(
    data: &EntropyCodes,
    indices: &[usize],
    flips: &[bool],
    config: &DparConfig,
) -> Result<Vec<Vec<usize>>> {
    let l = config.seq_len();
    indices
        .iter()
        .zip(flips)
        .map(|(&i, &f)| Ok(patch_lengths(data.entropies.of(i, l, f), config.grid_size, &config.patch, l)?))
        .collect()
}

/// Mean next-code cross-entropy (and mean patch-transformer positions per image) over the first
/// `max_images` images, packed forward, no dropout.
pub fn eval_loss(model: &Dpar, data: &EntropyCodes, max_images: usize, device: &Device) -> Result<(f64, f64)> {
    let n = data.shard.len().min(max_images);
    let (mut total, mut patches) = (0f64, 0f64);
    for start in (0..n).step_by(32) {
        let idx: Vec<usize> = (start..(start + 32).min(n)).collect();
        let flips = vec![false; idx.len()];
        let (codes, labels) = batch_tensors(&data.shard, &idx, &flips, device)?;
        let layout = model.layout(batch_lengths(data, &idx, &flips, model.config())?, model.config().seq_len())?;
        let loss = model.loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None)?;
        total += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
        patches += layout.packed_len() as f64;
    }
    Ok((total / n.max(1) as f64, patches / n.max(1) as f64))
}

/// The DPAR training task.
pub struct DparTask {
    config: DparTrainConfig,
    store: ParamStore,
    model: Dpar,
    train: EntropyCodes,
    val: Option<EntropyCodes>,
    sampler: BatchSampler,
    device: Device,
}

impl DparTask {
    pub fn new(
        config: DparTrainConfig,
        train: EntropyCodes,
        val: Option<EntropyCodes>,
        device: &Device,
    ) -> Result<Self> {
        check_fits(&train, &config.model, "training shards")?;
        if let Some(v) = &val {
            check_fits(v, &config.model, "validation shards")?;
        }
        if train.entropies.entropy_model_id != config.entropy_model_id {
            return Err(DparError::BadInput(
                "the training entropies come from another entropy model than the config names".into(),
            ));
        }
        if config.batch_size == 0 || train.shard.is_empty() {
            return Err(DparError::BadConfig("batch size and training shards must be non-empty".into()));
        }
        if val.is_some() && config.val_images == 0 {
            return Err(DparError::BadConfig("val_images (--val-images) is 0, so there is no validation loss to report; give at least 1, or no validation codes".into()));
        }
        check_flip(&train.shard, config.use_flip, &config.codes).map_err(DparError::BadConfig)?;
        let m = &config.model;
        let layers = (m.encoder_layers + m.global_layers + m.decoder_layers) as f64;
        let per_code = m.dim as f64 * layers * 16.0 + 3.0 * m.vocab_size as f64;
        crate::util::check_memory(
            &format!("--batch-size {}", config.batch_size),
            4.0 * config.batch_size as f64 * (m.grid_size * m.grid_size) as f64 * per_code,
        )
        .map_err(DparError::BadConfig)?;
        let store = ParamStore::new(config.seed, device);
        let model = Dpar::new(&config.model, &store.root())?;
        let sampler = BatchSampler::new(train.shard.len(), config.batch_size, config.seed);
        Ok(Self { config, store, model, train, val, sampler, device: device.clone() })
    }

    pub fn model(&self) -> &Dpar {
        &self.model
    }

    /// The images (and copies) that step `step` trains on.
    pub fn step_images(&mut self, step: u64) -> StepImages {
        step_images(&mut self.sampler, &self.train.shard, self.config.use_flip, self.config.seed, step)
    }
}

impl Task for DparTask {
    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, crate::train::TaskError> {
        self.part_loss(step, Part { index: 0, count: 1 })
    }

    fn part_loss(&mut self, step: u64, part: Part) -> std::result::Result<StepOutput, crate::train::TaskError> {
        let all = self.step_images(step);
        let indices = part.slice(&all.indices)?.to_vec();
        let flips = part.slice(&all.flips)?.to_vec();
        let run = || -> Result<StepOutput> {
            let (codes, labels) = batch_tensors(&self.train.shard, &indices, &flips, &self.device)?;
            let layout = self.model.layout(
                batch_lengths(&self.train, &indices, &flips, &self.config.model)?,
                self.config.model.seq_len(),
            )?;
            let mut rng = noise_rng(self.config.seed, step, part);
            let loss =
                self.model.loss(&codes, &labels, &layout, GlobalLayout::Packed, Some(TrainNoise { rng: &mut rng }))?;
            // FLOPs per image from its own patch count (attention is quadratic in it).
            let forward: f64 = layout
                .packed_segments
                .iter()
                .map(|&(_, len)| crate::flops::dpar_forward(&self.config.model, len as f64))
                .sum();
            Ok(StepOutput {
                loss,
                metrics: vec![("patches_per_image".to_string(), layout.mean_patches())],
                tokens: indices.len() * self.config.model.seq_len(),
                flops: 3.0 * forward,
            })
        };
        run().map_err(Into::into)
    }

    fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, crate::train::TaskError> {
        let Some(val) = &self.val else { return Ok(Vec::new()) };
        let (loss, patches) = eval_loss(&self.model, val, self.config.val_images, &self.device)?;
        Ok(vec![("loss".to_string(), loss), ("patches_per_image".to_string(), patches)])
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn name(&self) -> String {
        "dpar".to_string()
    }

    fn throughput_unit(&self) -> &'static str {
        "codes/s"
    }

    fn epoch_at(&self, step: u64) -> Option<f64> {
        Some(self.sampler.epoch_at(step))
    }
}

/// Loads a DPAR model from a run folder or weight file written by `dpar train --model dpar`.
pub fn load(path: &Path, device: &Device) -> Result<(Dpar, ParamStore, DparTrainConfig)> {
    if !path.exists() {
        return Err(DparError::BadFile {
            path: path.to_path_buf(),
            reason: "no such model file or run folder (train one with `dpar train --model dpar`)".into(),
        });
    }
    let file = crate::tensor_io::weight_file(path)?;
    let Some((full, source)) = crate::tensor_io::embedded_config(&file)? else {
        return Err(DparError::BadFile {
            path: file,
            reason: "no embedded config and no config.json beside it".into(),
        });
    };
    let bad = |reason: String| DparError::BadFile { path: source.clone(), reason };
    let kind = full.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "dpar" {
        return Err(bad(format!("holds a `{kind}` model, not a DPAR model")));
    }
    let config: DparTrainConfig = crate::util::from_json_strict(full, crate::nn::config::TOLERATED_KEYS)
        .map_err(|e| bad(format!("config: {e}")))?;
    config.model.validate().map_err(|e| bad(format!("config: {e}")))?;
    let store = ParamStore::new(0, device);
    let model = Dpar::new(&config.model, &store.root())?;
    store.load_model_file(&file, None)?;
    Ok((model, store, config))
}

/// Reads a shard set with its entropies (from `expected_model` when given).
pub fn read_entropy_codes(path: &Path, expected_model: Option<&str>) -> Result<EntropyCodes> {
    let (shard, entropies) = crate::entropy::read_set(path, expected_model)?;
    Ok(EntropyCodes { shard, entropies })
}

/// A (B, L) batch of codes and labels with their lengths, for callers outside the task.
pub fn batch(
    data: &EntropyCodes,
    indices: &[usize],
    config: &DparConfig,
    device: &Device,
) -> Result<(Tensor, Tensor, Vec<Vec<usize>>)> {
    let flips = vec![false; indices.len()];
    let (codes, labels) = batch_tensors(&data.shard, indices, &flips, device)?;
    Ok((codes, labels, batch_lengths(data, indices, &flips, config)?))
}
