//! Training a GPT (baseline or entropy model) on code shards, as a [`crate::train::Task`].
//!
//! Each step draws its batch (and, when the shards hold a flip copy, a random choice of copy per
//! image) from `(seed, step)`; class dropout and dropout masks too. Validation is the mean
//! next-code cross-entropy on held-out shards, without dropout.

use candle_core::Device;

use super::{Gpt, GptConfig, GptError, Result, TrainNoise};
use crate::data::shards::CodeShard;
use crate::params::ParamStore;
use crate::train::{BatchSampler, LoopConfig, Part, StepOutput, Task};

/// The GPT experiment config, saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GptTrainConfig {
    /// `gpt` (class-conditional baseline) or `entropy` (unconditional entropy model).
    pub kind: String,
    pub model: GptConfig,
    pub seed: u64,
    pub batch_size: usize,
    /// Training shards (provenance).
    pub codes: String,
    pub val_codes: Option<String>,
    /// Images of the validation split used for the validation loss.
    pub val_images: usize,
    /// Train on the flip copy of an image with probability ½ (the shards must hold one). Off
    /// unless asked for: right for photos of natural scenes, wrong for digits, letters and
    /// anything else with a handedness.
    #[serde(default)]
    pub use_flip: bool,
    /// Identity of the tokenizer that made the codes.
    pub tokenizer_id: String,
    pub train: LoopConfig,
}

/// Checks that shards fit a model: grid size, codebook and classes.
pub fn check_shard_fits(shard: &CodeShard, model: &GptConfig, what: &str) -> Result<()> {
    let info = &shard.info;
    if info.grid_size != model.grid_size {
        return Err(GptError::BadInput(format!(
            "{what}: shards have a {g}×{g} grid, the model expects {m}×{m}",
            g = info.grid_size,
            m = model.grid_size
        )));
    }
    if info.codebook_size > model.vocab_size {
        return Err(GptError::BadInput(format!(
            "{what}: shards use a codebook of {}, the model's vocabulary is {}",
            info.codebook_size, model.vocab_size
        )));
    }
    if model.cls_token_num == 1 && info.num_classes > model.num_classes {
        return Err(GptError::BadInput(format!(
            "{what}: shards have {} classes, the model {}",
            info.num_classes, model.num_classes
        )));
    }
    Ok(())
}

pub use crate::batch::{batch_tensors, check_flip, flip_choices, noise_rng, step_images, StepImages};

/// Mean next-code cross-entropy over the first `max_images` images of a shard (no dropout).
pub fn eval_loss(model: &Gpt, shard: &CodeShard, max_images: usize, device: &Device) -> Result<f64> {
    let n = shard.len().min(max_images);
    let mut total = 0f64;
    for start in (0..n).step_by(50) {
        let idx: Vec<usize> = (start..(start + 50).min(n)).collect();
        let (codes, labels) = batch_tensors(shard, &idx, &vec![false; idx.len()], device)?;
        let labels = (model.config().cls_token_num == 1).then_some(&labels);
        let loss = model.loss::<rand_chacha::ChaCha8Rng>(&codes, labels, None)?;
        total += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
    }
    Ok(total / n.max(1) as f64)
}

/// The GPT training task.
pub struct GptTask {
    config: GptTrainConfig,
    store: ParamStore,
    model: Gpt,
    train: CodeShard,
    val: Option<CodeShard>,
    sampler: BatchSampler,
    device: Device,
}

impl GptTask {
    pub fn new(config: GptTrainConfig, train: CodeShard, val: Option<CodeShard>, device: &Device) -> Result<Self> {
        check_shard_fits(&train, &config.model, "training shards")?;
        if let Some(v) = &val {
            check_shard_fits(v, &config.model, "validation shards")?;
        }
        if config.batch_size == 0 || train.is_empty() {
            return Err(GptError::BadConfig("batch size and training shards must be non-empty".into()));
        }
        if val.is_some() && config.val_images == 0 {
            return Err(GptError::BadConfig("val_images (--val-images) is 0, so there is no validation loss to report; give at least 1, or no validation codes".into()));
        }
        check_flip(&train, config.use_flip, &config.codes).map_err(GptError::BadConfig)?;
        let m = &config.model;
        let per_code = m.dim as f64 * m.n_layer as f64 * 16.0 + 3.0 * m.vocab_size as f64;
        crate::util::check_memory(
            &format!("--batch-size {}", config.batch_size),
            4.0 * config.batch_size as f64 * (m.seq_len() as f64) * per_code,
        )
        .map_err(GptError::BadConfig)?;
        let store = ParamStore::new(config.seed, device);
        let model = Gpt::new(&config.model, &store.root())?;
        let sampler = BatchSampler::new(train.len(), config.batch_size, config.seed);
        Ok(Self { config, store, model, train, val, sampler, device: device.clone() })
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// The images (and copies) that step `step` trains on.
    pub fn step_images(&mut self, step: u64) -> StepImages {
        step_images(&mut self.sampler, &self.train, self.config.use_flip, self.config.seed, step)
    }
}

impl Task for GptTask {
    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, crate::train::TaskError> {
        self.part_loss(step, Part { index: 0, count: 1 })
    }

    fn part_loss(&mut self, step: u64, part: Part) -> std::result::Result<StepOutput, crate::train::TaskError> {
        // The global batch and its flip choices, then this part of them.
        let all = self.step_images(step);
        let indices = part.slice(&all.indices)?.to_vec();
        let flips = part.slice(&all.flips)?.to_vec();
        let run = || -> Result<StepOutput> {
            let (codes, labels) = batch_tensors(&self.train, &indices, &flips, &self.device)?;
            let mut rng = noise_rng(self.config.seed, step, part);
            let labels = (self.config.model.cls_token_num == 1).then_some(&labels);
            let loss = self.model.loss(&codes, labels, Some(TrainNoise { rng: &mut rng }))?;
            Ok(StepOutput {
                loss,
                metrics: Vec::new(),
                tokens: indices.len() * self.config.model.seq_len(),
                flops: 3.0 * crate::flops::gpt_forward(&self.config.model) * indices.len() as f64,
            })
        };
        run().map_err(Into::into)
    }

    fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, crate::train::TaskError> {
        let Some(val) = &self.val else { return Ok(Vec::new()) };
        let loss = eval_loss(&self.model, val, self.config.val_images, &self.device)?;
        Ok(vec![("loss".to_string(), loss)])
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.config.kind.clone()
    }

    fn throughput_unit(&self) -> &'static str {
        "codes/s"
    }

    fn epoch_at(&self, step: u64) -> Option<f64> {
        Some(self.sampler.epoch_at(step))
    }
}
