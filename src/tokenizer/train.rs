//! Tokenizer training (design §2) as a [`crate::train::Task`], plus loading, evaluation and
//! tokenisation of a trained tokenizer.
//!
//! Loss = MSE(reconstruction, image) + mean(z_q − sg(z))² + β·mean(sg(z_q) − z)², with the
//! straight-through estimator. Codebook usage is counted per step; every `restart_every` steps,
//! codes unused since the last check are restarted on random latents of the current batch
//! (a common fix for codebook collapse; LlamaGen itself relies on its large batch instead).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{Result, TokenizerError, VqConfig, VqModel};
use crate::data::shards::{CodeShard, ShardInfo};
use crate::data::ImageDataset;
use crate::params::ParamStore;
use crate::train::{BatchSampler, LoopConfig, StepOutput, Task};

/// The tokenizer experiment: architecture, data and loop settings. Saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerTrainConfig {
    pub kind: String,
    pub model: VqConfig,
    pub seed: u64,
    pub batch_size: usize,
    /// Restart unused codes every this many steps (0 = never).
    pub restart_every: u64,
    /// Where the training images came from (provenance only).
    pub data: String,
    /// Number of training images used.
    pub train_images: usize,
    pub train: LoopConfig,
}

/// The tokenizer training task.
pub struct TokenizerTask {
    config: TokenizerTrainConfig,
    store: ParamStore,
    model: VqModel,
    train: ImageDataset,
    val: Option<ImageDataset>,
    sampler: BatchSampler,
    device: Device,
    /// Per-code counts since the last restart check.
    usage: Vec<u32>,
    /// Detached latents of the last batch (restart candidates).
    last_latents: Option<Tensor>,
}

impl TokenizerTask {
    pub fn new(
        config: TokenizerTrainConfig,
        train: ImageDataset,
        val: Option<ImageDataset>,
        device: &Device,
    ) -> Result<Self> {
        config.model.validate()?;
        let m = &config.model;
        if train.channels != m.in_channels || train.height != m.image_size || train.width != m.image_size {
            return Err(TokenizerError::BadInput(format!(
                "training images are {}×{}×{}, the tokenizer expects {}×{}×{}",
                train.channels, train.height, train.width, m.in_channels, m.image_size, m.image_size
            )));
        }
        if config.batch_size == 0 || train.is_empty() {
            return Err(TokenizerError::BadConfig("batch size and training set must be non-empty".into()));
        }
        let widest = (m.ch * m.ch_mult.iter().copied().max().unwrap_or(1)) as f64;
        let per_image = (m.image_size * m.image_size) as f64
            * widest
            * (m.num_res_blocks as f64 + 1.0)
            * m.ch_mult.len() as f64
            * 8.0;
        crate::util::check_memory(
            &format!("--batch-size {}", config.batch_size),
            4.0 * config.batch_size as f64 * per_image,
        )
        .map_err(TokenizerError::BadConfig)?;
        let store = ParamStore::new(config.seed, device);
        let model = VqModel::new(m, &store.root())?;
        let sampler = BatchSampler::new(train.len(), config.batch_size, config.seed);
        let usage = vec![0; m.codebook_size];
        Ok(Self { config, store, model, train, val, sampler, device: device.clone(), usage, last_latents: None })
    }

    pub fn model(&self) -> &VqModel {
        &self.model
    }

    fn restart_dead_codes(&mut self, step: u64) -> candle_core::Result<usize> {
        let Some(latents) = &self.last_latents else { return Ok(0) };
        let dead: Vec<usize> = (0..self.usage.len()).filter(|&i| self.usage[i] == 0).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        use rand::Rng;
        let mut rng = crate::util::rng_for(self.config.seed, "code-restart", step);
        let var = self.store.var("quantize.embedding.weight").expect("the VQ model creates its codebook");
        let (v, cd) = var.dims2()?;
        let mut book = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let lat = latents.flatten_all()?.to_vec1::<f32>()?;
        let n = lat.len() / cd;
        for &code in &dead {
            let src = rng.random_range(0..n);
            for j in 0..cd {
                book[code * cd + j] = lat[src * cd + j] + rng.random_range(-0.01..0.01);
            }
        }
        var.set(&Tensor::from_vec(book, (v, cd), &self.device)?)?;
        Ok(dead.len())
    }
}

impl Task for TokenizerTask {
    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, crate::train::TaskError> {
        let indices = self.sampler.indices(step);
        let x = self.train.batch_tensor(&indices, false, &self.device)?;
        let mut run = || -> Result<StepOutput> {
            let (recon, q) = self.model.forward(&x)?;
            let mse = (&recon - &x)?.sqr()?.mean_all()?;
            let loss = ((&mse + &q.codebook_loss)? + &q.commit_loss)?;
            for code in q.codes.flatten_all()?.to_vec1::<u32>()? {
                self.usage[code as usize] += 1;
            }
            self.last_latents = Some(q.latents);
            let scalar = |t: &Tensor| t.to_scalar::<f32>().map(|v| v as f64);
            let metrics = vec![
                ("recon_mse".to_string(), scalar(&mse)?),
                ("codebook".to_string(), scalar(&q.codebook_loss)?),
                ("commit".to_string(), scalar(&q.commit_loss)?),
            ];
            let c = &self.config.model;
            Ok(StepOutput { loss, metrics, tokens: indices.len() * c.image_size * c.image_size, flops: 0.0 })
        };
        run().map_err(Into::into)
    }

    fn after_step(&mut self, step: u64) -> std::result::Result<Vec<(String, f64)>, crate::train::TaskError> {
        let every = self.config.restart_every;
        if every == 0 || !(step + 1).is_multiple_of(every) {
            return Ok(Vec::new());
        }
        let used = self.usage.iter().filter(|&&c| c > 0).count() as f64 / self.usage.len() as f64;
        let restarted = self.restart_dead_codes(step)?;
        self.usage.iter_mut().for_each(|c| *c = 0);
        Ok(vec![("usage".to_string(), used), ("restarted".to_string(), restarted as f64)])
    }

    fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, crate::train::TaskError> {
        let Some(val) = &self.val else { return Ok(Vec::new()) };
        let stats = evaluate(&self.model, val, 2000, &self.device)?;
        Ok(vec![
            ("recon_mse".to_string(), stats.mse),
            ("psnr".to_string(), stats.psnr),
            ("usage".to_string(), stats.usage),
        ])
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        match Tensor::from_slice(&self.usage, self.usage.len(), &Device::Cpu) {
            Ok(t) => vec![("usage".to_string(), t)],
            Err(_) => Vec::new(),
        }
    }

    fn load_extra_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), crate::train::TaskError> {
        if let Some(t) = tensors.get("usage") {
            let usage = t.to_vec1::<u32>()?;
            if usage.len() != self.usage.len() {
                return Err(format!("usage counts for {} codes, model has {}", usage.len(), self.usage.len()).into());
            }
            self.usage = usage;
        }
        Ok(())
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn name(&self) -> String {
        "tokenizer".to_string()
    }

    fn throughput_unit(&self) -> &'static str {
        "px/s"
    }
}

/// Reconstruction quality of a tokenizer on a dataset.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReconStats {
    pub images: usize,
    /// Mean squared error on the [−1, 1] scale.
    pub mse: f64,
    /// PSNR in dB on the [0, 1] scale (peak 1): 10·log10(1 / (mse/4)).
    pub psnr: f64,
    /// Fraction of the codebook used on this data.
    pub usage: f64,
}

/// Images per forward pass of [`evaluate`].
pub const EVAL_BATCH: usize = 100;

/// Reconstructs up to `max_images` images in batches and measures MSE, PSNR and code usage.
pub fn evaluate(model: &VqModel, data: &ImageDataset, max_images: usize, device: &Device) -> Result<ReconStats> {
    let n = data.len().min(max_images);
    let mut sq_sum = 0f64;
    let mut count = 0usize;
    let mut used = vec![false; model.config().codebook_size];
    for start in (0..n).step_by(EVAL_BATCH) {
        let idx: Vec<usize> = (start..(start + EVAL_BATCH).min(n)).collect();
        let x = data.batch_tensor(&idx, false, device)?;
        let codes = model.encode(&x)?;
        for c in codes.flatten_all()?.to_vec1::<u32>()? {
            used[c as usize] = true;
        }
        let recon = model.decode_codes(&codes)?;
        sq_sum += (recon - &x)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += x.elem_count();
    }
    let mse = sq_sum / count.max(1) as f64;
    Ok(ReconStats {
        images: n,
        mse,
        psnr: 10.0 * (4.0 / mse).log10(),
        usage: used.iter().filter(|&&u| u).count() as f64 / used.len() as f64,
    })
}

/// A trained tokenizer ready for use.
pub struct Tokenizer {
    pub model: VqModel,
    pub store: ParamStore,
    pub config: VqConfig,
    /// SHA-256 (hex) of the weight file: the identity recorded in code shards.
    pub id: String,
    pub path: PathBuf,
}

impl Tokenizer {
    /// Loads a tokenizer from a run folder (its `model.safetensors`), a safetensors weight file
    /// written by `dpar tokenizer train`, or a LlamaGen checkpoint (`.pt` with the state dict
    /// under `model`, or `.safetensors`) together with `preset` (e.g. `vq16`).
    pub fn load(path: &Path, preset: Option<&str>, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(TokenizerError::BadFile {
                path: path.to_path_buf(),
                reason: "no such tokenizer folder or weight file (train one with `dpar tokenizer train`)".into(),
            });
        }
        let file = crate::tensor_io::weight_file(path)?;
        let config = match preset {
            Some(p) => VqConfig::preset(p)?,
            None => {
                let Some((full, source)) = crate::tensor_io::embedded_config(&file)? else {
                    return Err(TokenizerError::BadFile {
                        path: file,
                        reason: "the file carries no tokenizer config; pass --tokenizer-preset (e.g. vq16)".into(),
                    });
                };
                let bad = |reason: String| TokenizerError::BadFile { path: source.clone(), reason };
                let kind = full.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                if kind != "tokenizer" {
                    return Err(bad(format!("holds a `{kind}` model, not a tokenizer")));
                }
                let full: TokenizerTrainConfig =
                    crate::util::from_json_strict(full, &[]).map_err(|e| bad(format!("config: {e}")))?;
                full.model.validate().map_err(|e| bad(format!("config: {e}")))?;
                full.model
            }
        };
        let store = ParamStore::new(0, device);
        let model = VqModel::new(&config, &store.root())?;
        store.load_model_file(&file, Some("model"))?;
        let id = crate::util::sha256_file(&file)
            .map_err(|e| TokenizerError::BadFile { path: file.clone(), reason: e.to_string() })?;
        Ok(Self { model, store, config, id, path: file })
    }

    /// Refuses a batch of `batch` images whose encoder and decoder activations would not fit in
    /// the memory budget: at each level of the ladder, a few tensors of its channels at its
    /// resolution. Called before any image is loaded, so an absurd `image_size` or `--batch` is
    /// an error instead of an abort.
    pub fn check_batch_memory(&self, batch: usize) -> Result<()> {
        let c = &self.config;
        let per_image: f64 = c
            .ch_mult
            .iter()
            .enumerate()
            .map(|(level, &m)| {
                let side = c.image_size as f64 / (1u64 << level) as f64;
                (c.ch * m) as f64 * side * side
            })
            .sum::<f64>()
            * 4.0
            * 3.0;
        crate::util::check_memory(
            &format!("a batch of {batch} images at image_size {}", c.image_size),
            per_image * batch as f64,
        )
        .map_err(|m| TokenizerError::BadFile { path: self.path.clone(), reason: format!("{m}; lower the batch size") })
    }

    /// Encodes a dataset into a code shard (with the flip copy when `flip`), `batch` images at a
    /// time. `progress` is called with the number of images done.
    pub fn tokenize(
        &self,
        data: &ImageDataset,
        flip: bool,
        batch: usize,
        device: &Device,
        mut progress: impl FnMut(usize),
    ) -> Result<CodeShard> {
        let c = &self.config;
        if data.channels != c.in_channels || data.height != c.image_size || data.width != c.image_size {
            return Err(TokenizerError::BadInput(format!(
                "images are {}×{}×{}, the tokenizer expects {}×{}×{}",
                data.channels, data.height, data.width, c.in_channels, c.image_size, c.image_size
            )));
        }
        let mut codes = Vec::with_capacity(data.len() * c.seq_len());
        let mut flip_codes = flip.then(|| Vec::with_capacity(data.len() * c.seq_len()));
        for start in (0..data.len()).step_by(batch.max(1)) {
            let idx: Vec<usize> = (start..(start + batch.max(1)).min(data.len())).collect();
            codes.extend(self.model.encode(&data.batch_tensor(&idx, false, device)?)?.flatten_all()?.to_vec1::<u32>()?);
            if let Some(f) = &mut flip_codes {
                f.extend(self.model.encode(&data.batch_tensor(&idx, true, device)?)?.flatten_all()?.to_vec1::<u32>()?);
            }
            progress(idx.len());
        }
        Ok(CodeShard {
            info: ShardInfo {
                grid_size: c.grid_size(),
                codebook_size: c.codebook_size,
                num_classes: data.num_classes(),
                class_names: data.class_names.clone(),
                tokenizer_id: self.id.clone(),
            },
            codes,
            labels: data.labels.clone(),
            flip_codes,
        })
    }

    /// Encodes a dataset into a shard set in `out` (`dpar tokenize`): shards of `shard_size`
    /// images, then the manifest. `overwrite` replaces a set already there. `progress` is
    /// called with the number of code sequences done. Returns the files written.
    #[allow(clippy::too_many_arguments)]
    pub fn tokenize_to_set(
        &self,
        data: &ImageDataset,
        out: &Path,
        overwrite: bool,
        flip: bool,
        shard_size: usize,
        batch: usize,
        device: &Device,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<PathBuf>> {
        if shard_size == 0 {
            return Err(TokenizerError::BadInput("shard size (--shard-size) must be > 0".into()));
        }
        let mut set = crate::data::shards::ShardSetWriter::create(out, overwrite)?;
        let per_image = if flip { 2 } else { 1 };
        let pixels = data.channels * data.height * data.width;
        let mut written = Vec::new();
        for start in (0..data.len()).step_by(shard_size) {
            let end = (start + shard_size).min(data.len());
            let part = ImageDataset {
                images: data.images[start * pixels..end * pixels].to_vec(),
                labels: data.labels[start..end].to_vec(),
                ..data.clone()
            };
            let shard = self.tokenize(&part, flip, batch, device, |n| progress(n * per_image))?;
            written.push(set.add(&shard)?);
        }
        written.push(set.finish()?);
        Ok(written)
    }

    /// Decodes codes (B, G·G) to images (B, C, H, W) in [−1, 1].
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        self.model.decode_codes(codes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    /// Synthetic 8×8 "digits": a bright square at a random place on black.
    fn squares(n: usize, seed: u64) -> ImageDataset {
        use rand::Rng;
        let mut rng = crate::util::rng_for(seed, "squares", 0);
        let mut images = vec![0u8; n * 64];
        for i in 0..n {
            let (x0, y0) = (rng.random_range(0..5), rng.random_range(0..5));
            for y in y0..y0 + 3 {
                for x in x0..x0 + 3 {
                    images[i * 64 + y * 8 + x] = 255;
                }
            }
        }
        ImageDataset {
            images,
            labels: vec![0; n],
            channels: 1,
            height: 8,
            width: 8,
            class_names: vec!["0".into()],
            source: "synthetic".into(),
        }
    }

    fn tiny_model() -> VqConfig {
        VqConfig {
            in_channels: 1,
            image_size: 8,
            ch: 8,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_at_lowest: false,
            z_channels: 8,
            codebook_size: 32,
            codebook_dim: 4,
            l2_norm: true,
            norm_groups: 4,
            commit_beta: 0.25,
        }
    }

    #[test]
    fn training_lowers_the_reconstruction_loss_and_restarts_dead_codes() {
        let dir = tempfile::tempdir().unwrap();
        let data = squares(64, 1);
        let config = TokenizerTrainConfig {
            kind: "tokenizer".into(),
            model: tiny_model(),
            seed: 0,
            batch_size: 16,
            restart_every: 20,
            data: "synthetic".into(),
            train_images: data.len(),
            train: LoopConfig {
                steps: 150,
                adamw: AdamWConfig { lr: 3e-3, weight_decay: 0.0, ..Default::default() },
                log_every: 10,
                checkpoint_every: 150,
                ..Default::default()
            },
        };
        let mut task = TokenizerTask::new(config.clone(), data.clone(), Some(squares(32, 2)), &Device::Cpu).unwrap();
        let before = evaluate(task.model(), &data, 64, &Device::Cpu).unwrap();
        let report = crate::train::run(&mut task, &config.train, dir.path(), false).unwrap();
        let after = evaluate(task.model(), &data, 64, &Device::Cpu).unwrap();
        assert!(after.mse < 0.5 * before.mse, "mse {} -> {}", before.mse, after.mse);
        let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
        assert!(log.contains("\"restarted\""), "no restart record in the log");
        assert!(report.validation.iter().any(|(k, _)| k == "psnr"));

        // The saved tokenizer loads by itself and encodes like the trained model.
        let tok = Tokenizer::load(dir.path(), None, &Device::Cpu).unwrap();
        let x = data.batch_tensor(&[0, 1, 2], false, &Device::Cpu).unwrap();
        let a = tok.model.encode(&x).unwrap().to_vec2::<u32>().unwrap();
        let b = task.model().encode(&x).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(a, b);
        let shard = tok.tokenize(&data.take(5), true, 2, &Device::Cpu, |_| {}).unwrap();
        assert_eq!(shard.codes.len(), 5 * 16);
        assert_eq!(shard.flip_codes.as_ref().unwrap().len(), 5 * 16);
        assert_eq!(shard.info.tokenizer_id.len(), 64);
    }

    #[test]
    fn mismatched_images_are_rejected() {
        let config = TokenizerTrainConfig {
            kind: "tokenizer".into(),
            model: VqConfig::mnist(),
            seed: 0,
            batch_size: 4,
            restart_every: 0,
            data: String::new(),
            train_images: 1,
            train: LoopConfig::default(),
        };
        let err = TokenizerTask::new(config, squares(4, 0), None, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("expects 1×32×32"), "{err}");
    }
}
