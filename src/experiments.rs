//! The paper's claims as experiments (spec §8), at small MNIST scale: train (or load) models
//! through the shared loop, sample them with the cached generators, and measure quality with the
//! frozen classifier. Every table is printed in markdown and saved as JSON with the scale used.
//!
//! - [`bench`]: LlamaGen baseline vs DPAR with the same budget (FLOPs, speed, quality, FD curve);
//! - [`ablate_patching`]: static vs entropy vs entropy + max length vs all three (Table 3);
//! - [`ablate_threshold`] / [`ablate_max_len`]: θ and P sweeps (Tables 4 and 5);
//! - [`ablate_inference`]: raising θ at inference, DPAR vs static (Table 6);
//! - [`linear_probe`]: average-pooled final hidden states, DPAR vs baseline (Table 7).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::dpar::train::{read_entropy_codes, DparTask, DparTrainConfig, EntropyCodes};
use crate::dpar::{Dpar, DparConfig};
use crate::eval::classifier::Classifier;
use crate::eval::QualityReport;
use crate::gpt::train::{GptTask, GptTrainConfig};
use crate::gpt::Gpt;
use crate::params::ParamStore;
use crate::patching::{PatchConfig, PatchStats};
use crate::sample::SamplingConfig;
use crate::tokenizer::train::Tokenizer;
use crate::train::LoopConfig;

/// Errors of the experiments (wrapping every stage's errors as text with context).
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, ExperimentError>;

fn ctx<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ExperimentError + '_ {
    move |e| ExperimentError::Failed(format!("{what}: {e}"))
}

/// Where the inputs are and how much to spend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setup {
    pub train_codes: PathBuf,
    pub test_codes: PathBuf,
    pub tokenizer: PathBuf,
    pub entropy_model: PathBuf,
    pub classifier: PathBuf,
    /// Folder of the dataset (for the reference split's images).
    pub data: PathBuf,
    /// Where runs and results go.
    pub out: PathBuf,
    /// Samples per quality measurement (and reference test images).
    pub samples: usize,
    /// Images generated together.
    pub sample_batch: usize,
    pub cfg_scale: f64,
    pub seed: u64,
}

/// Loaded inputs shared by every experiment.
pub struct Env {
    pub setup: Setup,
    pub device: Device,
    pub tokenizer: Tokenizer,
    pub classifier: Classifier,
    _classifier_store: ParamStore,
    pub classifier_sha256: String,
    /// Features of the first `samples` test images.
    pub reference: Vec<f32>,
    pub entropy_model: Gpt,
    _entropy_store: ParamStore,
    pub entropy_model_id: String,
    pub train: EntropyCodes,
    pub test: EntropyCodes,
}

impl Env {
    pub fn load(setup: Setup, device: &Device) -> Result<Self> {
        let tokenizer = Tokenizer::load(&setup.tokenizer, None, device).map_err(ctx("tokenizer"))?;
        let (classifier, cstore, hash) = crate::eval::classifier::load(&setup.classifier, device).map_err(ctx("classifier"))?;
        let cc = classifier.config().clone();
        let source = crate::data::resolve(&setup.data, "test").map_err(ctx("test split"))?;
        let test_images = crate::data::load(&source, cc.image_size, cc.in_channels).map_err(ctx("test split"))?.take(setup.samples);
        let mut reference = Vec::new();
        let idx: Vec<usize> = (0..test_images.len()).collect();
        for chunk in idx.chunks(1000) {
            let x = test_images.batch_tensor(chunk, false, device).map_err(ctx("test images"))?;
            reference.extend(classifier.features_and_probs(&x).map_err(ctx("reference features"))?.0);
        }
        let (entropy_model, estore) = crate::gpt::load(&setup.entropy_model, None, device).map_err(ctx("entropy model"))?;
        let efile = if setup.entropy_model.is_dir() { setup.entropy_model.join("model.safetensors") } else { setup.entropy_model.clone() };
        let entropy_model_id = crate::util::sha256_file(&efile).map_err(ctx("entropy model"))?;
        let train = read_entropy_codes(&setup.train_codes, Some(&entropy_model_id)).map_err(ctx("training shards"))?;
        let test = read_entropy_codes(&setup.test_codes, Some(&entropy_model_id)).map_err(ctx("test shards"))?;
        if train.shard.info.tokenizer_id != tokenizer.id {
            return Err(ExperimentError::Failed(format!("{}: codes were made by another tokenizer than {}", setup.train_codes.display(), setup.tokenizer.display())));
        }
        Ok(Self { setup, device: device.clone(), tokenizer, classifier, _classifier_store: cstore, classifier_sha256: hash, reference, entropy_model, _entropy_store: estore, entropy_model_id, train, test })
    }

    /// Balanced labels for `n` samples (class i for sample i mod classes).
    fn labels(&self, n: usize, classes: usize) -> Vec<u32> {
        (0..n).map(|i| (i % classes) as u32).collect()
    }

    /// Patch statistics of the training entropies under `config`.
    pub fn patch_stats(&self, config: &PatchConfig) -> Result<PatchStats> {
        crate::patching::stats(&self.train.entropies.entropy, self.train.shard.info.grid_size, config).map_err(ctx("patch statistics"))
    }

    /// θ giving mean patch length `target` on the training entropies with the other settings
    /// of `base`.
    pub fn theta_for(&self, base: &PatchConfig, target: f64) -> Result<f64> {
        Ok(crate::patching::calibrate(&self.train.entropies.entropy, self.train.shard.info.grid_size, base, target).map_err(ctx("θ calibration"))?.0)
    }

    fn quality(&self, codes: &[Vec<u32>], labels: &[u32]) -> Result<QualityReport> {
        let l = self.tokenizer.config.seq_len();
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        let mut images = Vec::new();
        for start in (0..codes.len()).step_by(200) {
            let len = 200.min(codes.len() - start);
            let t = Tensor::from_slice(&flat[start * l..(start + len) * l], (len, l), &self.device).map_err(ctx("codes"))?;
            images.push(self.tokenizer.decode(&t).map_err(ctx("decode"))?.clamp(-1f32, 1f32).map_err(ctx("decode"))?);
        }
        let images = Tensor::cat(&images, 0).map_err(ctx("decode"))?;
        crate::eval::quality(&self.classifier, &self.classifier_sha256, &images, Some(labels), &self.reference).map_err(ctx("metrics"))
    }
}

/// One evaluated model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRow {
    pub name: String,
    pub quality: QualityReport,
    pub images_per_s: f64,
    /// Mean transformer positions per image (L for the baseline, patches for DPAR).
    pub positions_per_image: f64,
}

/// Samples `n` images from a trained DPAR model with the inference patcher `patch` and measures
/// them.
pub fn eval_dpar(env: &Env, name: &str, run: &Path, patch: &PatchConfig, n: usize) -> Result<EvalRow> {
    let (model, _s, _c) = crate::dpar::train::load(run, &env.device).map_err(ctx("DPAR model"))?;
    let labels = env.labels(n, model.config().num_classes);
    let t = Instant::now();
    let mut codes = Vec::with_capacity(n);
    let mut steps = 0usize;
    for (i, chunk) in labels.chunks(env.setup.sample_batch).enumerate() {
        let sampling = SamplingConfig { cfg_scale: env.setup.cfg_scale, seed: env.setup.seed.wrapping_add(i as u64), ..Default::default() };
        let out = crate::dpar::generate::generate(&model, &env.entropy_model, chunk, &sampling, patch, &env.device).map_err(ctx("DPAR sampling"))?;
        steps += out.global_steps().iter().sum::<usize>();
        codes.extend(out.codes);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(EvalRow { name: name.into(), quality: env.quality(&codes, &labels)?, images_per_s: n as f64 / secs, positions_per_image: steps as f64 / n as f64 })
}

/// Samples `n` images from a trained GPT baseline and measures them.
pub fn eval_gpt(env: &Env, name: &str, run: &Path, n: usize) -> Result<EvalRow> {
    let (model, _s) = crate::gpt::load(run, None, &env.device).map_err(ctx("GPT model"))?;
    let labels = env.labels(n, model.config().num_classes);
    let t = Instant::now();
    let mut codes = Vec::with_capacity(n);
    for (i, chunk) in labels.chunks(env.setup.sample_batch).enumerate() {
        let sampling = SamplingConfig { cfg_scale: env.setup.cfg_scale, seed: env.setup.seed.wrapping_add(i as u64), ..Default::default() };
        codes.extend(crate::sample::generate_gpt(&model, chunk, &sampling, &env.device).map_err(ctx("GPT sampling"))?);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(EvalRow { name: name.into(), quality: env.quality(&codes, &labels)?, images_per_s: n as f64 / secs, positions_per_image: model.config().seq_len() as f64 })
}

/// Whether a run folder holds a finished training of `steps` steps.
fn finished(run: &Path, steps: u64) -> bool {
    crate::tensor_io::read_safetensors_metadata(&run.join("checkpoint.safetensors"))
        .ok()
        .and_then(|m| m.get("step").and_then(|s| s.parse::<u64>().ok()))
        .is_some_and(|s| s >= steps)
}

/// Trains a DPAR variant into `out/name` (resuming; skipped when already finished).
pub fn train_dpar(env: &Env, name: &str, config: DparTrainConfig) -> Result<PathBuf> {
    let run = env.setup.out.join(name);
    if finished(&run, config.train.steps) {
        tracing::info!("{name}: already trained in {}", run.display());
        return Ok(run);
    }
    tracing::info!("{name}: training ({})", config.model.patch.label());
    let mut task = DparTask::new(config.clone(), env.train.clone(), Some(env.test.clone()), &env.device).map_err(ctx(name))?;
    crate::train::run(&mut task, &config.train, &run, true).map_err(ctx(name))?;
    Ok(run)
}

/// The run folder name of an ablation model: named by its patch rules, so that a table that
/// needs a model another table trained (same rules, same budget) reuses it.
pub fn run_name(patch: &PatchConfig) -> String {
    if !patch.entropy_gate && patch.max_len_rule && patch.row_reset {
        return format!("ablate-static-p{}", patch.max_patch_len);
    }
    let mut name = format!("ablate-theta{:.4}-p{}", patch.threshold, patch.max_patch_len);
    for (on, tag) in [(patch.entropy_gate, "-nogate"), (patch.max_len_rule, "-nomaxlen"), (patch.row_reset, "-norow")] {
        if !on {
            name.push_str(tag);
        }
    }
    name
}

/// Trains a GPT into `out/name` (resuming; skipped when already finished).
pub fn train_gpt(env: &Env, name: &str, config: GptTrainConfig) -> Result<PathBuf> {
    let run = env.setup.out.join(name);
    if finished(&run, config.train.steps) {
        tracing::info!("{name}: already trained in {}", run.display());
        return Ok(run);
    }
    let mut task = GptTask::new(config.clone(), env.train.shard.clone(), Some(env.test.shard.clone()), &env.device).map_err(ctx(name))?;
    crate::train::run(&mut task, &config.train, &run, true).map_err(ctx(name))?;
    Ok(run)
}

/// The training budget of the ablation models.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scale {
    /// DPAR model of the ablations (a small one: the sweeps train a dozen of them).
    pub model: DparConfig,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
}

impl Scale {
    /// The ablation scale: width 128, 2 heads, 1 + 4 + 2 layers, 600 steps of 16 images.
    pub fn small(vocab: usize, classes: usize, grid: usize) -> Self {
        let model = DparConfig { dim: 128, n_head: 2, encoder_layers: 1, global_layers: 4, decoder_layers: 2, ffn_hidden: Some(384), vocab_size: vocab, num_classes: classes, grid_size: grid, ..DparConfig::mnist() };
        Self { model, steps: 600, batch_size: 16, lr: 1e-3 }
    }

    fn config(&self, env: &Env, patch: PatchConfig, seed: u64) -> DparTrainConfig {
        DparTrainConfig {
            kind: "dpar".into(),
            model: DparConfig { patch, ..self.model.clone() },
            seed,
            batch_size: self.batch_size,
            codes: env.setup.train_codes.display().to_string(),
            val_codes: Some(env.setup.test_codes.display().to_string()),
            val_images: 200,
            use_flip: true,
            tokenizer_id: env.tokenizer.id.clone(),
            entropy_model_id: env.entropy_model_id.clone(),
            train: LoopConfig { steps: self.steps, log_every: 20, checkpoint_every: self.steps, adamw: crate::optim::AdamWConfig { lr: self.lr, ..Default::default() }, schedule: crate::optim::LrSchedule { warmup_steps: 50, ..Default::default() }, ..Default::default() },
        }
    }

    pub fn describe(&self) -> String {
        let m = &self.model;
        format!(
            "small scale: DPAR width {}, {}+{}+{} layers, {} steps × {} images (~{:.2} epochs of MNIST), lr {}",
            m.dim, m.encoder_layers, m.global_layers, m.decoder_layers, self.steps, self.batch_size, (self.steps as f64 * self.batch_size as f64) / 60000.0, self.lr
        )
    }
}

/// A results table: markdown for people, JSON for programs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Table {
    pub title: String,
    pub scale: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub data: serde_json::Value,
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n{}\n\n| {} |\n|{}|\n", self.title, self.scale, self.header.join(" | "), vec!["---"; self.header.len()].join("|"));
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s
    }

    /// Prints the table and writes `name.md` and `name.json` into `dir`.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        println!("{}", self.markdown());
        crate::util::write_atomic(&dir.join(format!("{name}.md")), self.markdown().as_bytes()).map_err(ctx("writing results"))?;
        let json = serde_json::to_string_pretty(self).map_err(ctx("json"))?;
        crate::util::write_atomic(&dir.join(format!("{name}.json")), json.as_bytes()).map_err(ctx("writing results"))?;
        println!("wrote {}/{name}.{{md,json}}", dir.display());
        Ok(())
    }
}

fn quality_cells(q: &QualityReport) -> Vec<String> {
    vec![
        format!("{:.2}", q.fd),
        format!("{:.2}", q.is_mean),
        format!("{:.3}", q.precision),
        format!("{:.3}", q.recall),
        q.accuracy.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_default(),
    ]
}

const QUALITY_HEADER: [&str; 5] = ["FD ↓", "IS ↑", "precision ↑", "recall ↑", "class acc ↑"];

/// Table 3: which patch rules matter. Static patches use P = round(mean length of the full
/// method), as in the paper; the entropy rows keep the full method's θ.
pub fn ablate_patching(env: &Env, scale: &Scale, target_len: f64) -> Result<Table> {
    let full = PatchConfig::dpar(0.0, 4);
    let theta = env.theta_for(&full, target_len)?;
    let static_p = target_len.round().max(1.0) as usize;
    let variants = [
        ("static", PatchConfig::static_patches(static_p)),
        ("entropy", PatchConfig { threshold: theta, max_patch_len: 4, entropy_gate: true, max_len_rule: false, row_reset: false }),
        ("entropy+maxlen", PatchConfig { threshold: theta, max_patch_len: 4, entropy_gate: true, max_len_rule: true, row_reset: false }),
        ("entropy+maxlen+row", PatchConfig { threshold: theta, ..full }),
    ];
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for (name, patch) in &variants {
        let run = train_dpar(env, &run_name(patch), scale.config(env, *patch, env.setup.seed))?;
        let stats = env.patch_stats(patch)?;
        let row = eval_dpar(env, name, &run, patch, env.setup.samples)?;
        let tick = |b: bool| if b { "✓" } else { "" }.to_string();
        let mut cells = vec![
            tick(patch.entropy_gate),
            if patch.max_len_rule { format!("P={}", patch.max_patch_len) } else { String::new() },
            tick(patch.row_reset),
            format!("{:.2}", stats.mean_len),
        ];
        cells.extend(quality_cells(&row.quality));
        rows.push(cells);
        data.push(serde_json::json!({ "variant": name, "patch": patch, "stats": stats, "eval": row }));
    }
    let mut header: Vec<String> = ["entropy", "max length", "row reset", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table { title: "Patchification strategies (paper Table 3)".into(), scale: format!("{}; {} samples per row, cfg {}", scale.describe(), env.setup.samples, env.setup.cfg_scale), header, rows, data: data.into() })
}

/// Table 4: θ sweep at P = 4, θ chosen for mean patch lengths `targets`.
pub fn ablate_threshold(env: &Env, scale: &Scale, targets: &[f64]) -> Result<Table> {
    let base = PatchConfig::dpar(0.0, 4);
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for &target in targets {
        let theta = env.theta_for(&base, target)?;
        let patch = PatchConfig { threshold: theta, ..base };
        let run = train_dpar(env, &run_name(&patch), scale.config(env, patch, env.setup.seed))?;
        let stats = env.patch_stats(&patch)?;
        let row = eval_dpar(env, &format!("θ={theta:.3}"), &run, &patch, env.setup.samples)?;
        let mut cells = vec![format!("{theta:.3}"), format!("{:.2}", stats.mean_len)];
        cells.extend(quality_cells(&row.quality));
        rows.push(cells);
        data.push(serde_json::json!({ "threshold": theta, "stats": stats, "eval": row }));
    }
    let mut header: Vec<String> = ["θ (nats)", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table { title: "Entropy threshold θ at P = 4 (paper Table 4)".into(), scale: format!("{}; {} samples per row", scale.describe(), env.setup.samples), header, rows, data: data.into() })
}

/// Table 5: P sweep at the θ of mean length `target_len` (P = 4).
pub fn ablate_max_len(env: &Env, scale: &Scale, target_len: f64, ps: &[usize]) -> Result<Table> {
    let theta = env.theta_for(&PatchConfig::dpar(0.0, 4), target_len)?;
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for &p in ps {
        let patch = PatchConfig::dpar(theta, p);
        let run = train_dpar(env, &run_name(&patch), scale.config(env, patch, env.setup.seed))?;
        let stats = env.patch_stats(&patch)?;
        let row = eval_dpar(env, &format!("P={p}"), &run, &patch, env.setup.samples)?;
        let mut cells = vec![p.to_string(), format!("{:.2}", stats.mean_len)];
        cells.extend(quality_cells(&row.quality));
        rows.push(cells);
        data.push(serde_json::json!({ "max_patch_len": p, "threshold": theta, "stats": stats, "eval": row }));
    }
    let mut header: Vec<String> = ["P", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table { title: format!("Maximum patch length P at θ = {theta:.3} (paper Table 5)"), scale: format!("{}; {} samples per row", scale.describe(), env.setup.samples), header, rows, data: data.into() })
}

/// Table 6: raise θ at inference (mean lengths `targets`) for the full DPAR model and the
/// static model of [`ablate_patching`] (both trained at mean length `train_len`).
pub fn ablate_inference(env: &Env, scale: &Scale, train_len: f64, targets: &[f64]) -> Result<Table> {
    let full = PatchConfig::dpar(0.0, 4);
    let theta_train = env.theta_for(&full, train_len)?;
    let static_p = train_len.round().max(1.0) as usize;
    let (dpar_patch, static_patch) = (PatchConfig { threshold: theta_train, ..full }, PatchConfig::static_patches(static_p));
    let dpar_run = train_dpar(env, &run_name(&dpar_patch), scale.config(env, dpar_patch, env.setup.seed))?;
    let static_run = train_dpar(env, &run_name(&static_patch), scale.config(env, static_patch, env.setup.seed))?;
    let mut header = vec!["model".to_string()];
    let mut thetas = Vec::new();
    let mut lens = vec!["mean patch len".to_string()];
    for &t in targets {
        let theta = env.theta_for(&full, t)?;
        header.push(format!("θ = {theta:.3}"));
        lens.push(format!("{:.2}", env.patch_stats(&PatchConfig { threshold: theta, ..full })?.mean_len));
        thetas.push(theta);
    }
    let mut rows = vec![lens];
    let mut data = Vec::new();
    for (name, run) in [("static", &static_run), ("DPAR", &dpar_run)] {
        let mut cells = vec![format!("{name} FD ↓")];
        for &theta in &thetas {
            let patch = PatchConfig { threshold: theta, ..full };
            let row = eval_dpar(env, name, run, &patch, env.setup.samples)?;
            cells.push(format!("{:.2}", row.quality.fd));
            data.push(serde_json::json!({ "model": name, "threshold": theta, "eval": row }));
        }
        rows.push(cells);
    }
    Ok(Table {
        title: "Adaptive patch lengths at inference: FD as θ rises (paper Table 6)".into(),
        scale: format!("{}; trained at mean length {train_len} (θ = {theta_train:.3}, static P = {static_p}); {} samples per cell", scale.describe(), env.setup.samples),
        header,
        rows,
        data: data.into(),
    })
}

/// Average-pooled final hidden states (null class, so no label leaks in) of `n` images of a
/// shard: the patch transformer's outputs for DPAR, the last block's outputs for the baseline.
fn pooled_features(env: &Env, model: &PoolModel, data: &EntropyCodes, n: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let n = n.min(data.shard.len());
    let mut feats = Vec::new();
    for start in (0..n).step_by(50) {
        let idx: Vec<usize> = (start..(start + 50).min(n)).collect();
        match model {
            PoolModel::Dpar(m) => {
                let (codes, _labels, lengths) = crate::dpar::train::batch(data, &idx, m.config(), &env.device).map_err(ctx("probe batch"))?;
                let null = Tensor::new(vec![m.config().num_classes as u32; idx.len()], &env.device).map_err(ctx("labels"))?;
                let layout = m.layout(lengths, m.config().seq_len()).map_err(ctx("layout"))?;
                let (_, g) = m.forward_with_global::<rand_chacha::ChaCha8Rng>(&codes, &null, &layout, crate::dpar::model::GlobalLayout::Packed, None).map_err(ctx("DPAR forward"))?;
                for &(start, len) in &layout.packed_segments {
                    // Patch positions only (the class slot's output is left out).
                    let pooled = g.narrow(0, start + 1, len.saturating_sub(1).max(1)).and_then(|x| x.mean(0)).map_err(ctx("pool"))?;
                    feats.extend(pooled.to_vec1::<f32>().map_err(ctx("pool"))?);
                }
            }
            PoolModel::Gpt(m) => {
                let (codes, _labels) = crate::gpt::train::batch_tensors(&data.shard, &idx, &vec![false; idx.len()], &env.device).map_err(ctx("probe batch"))?;
                let null = Tensor::new(vec![m.config().num_classes as u32; idx.len()], &env.device).map_err(ctx("labels"))?;
                let h = m.hidden_states(&codes, Some(&null)).map_err(ctx("GPT forward"))?;
                let t = h.dim(1).map_err(ctx("pool"))?;
                let pooled = h.narrow(1, 1, t - 1).and_then(|x| x.mean(1)).map_err(ctx("pool"))?;
                feats.extend(pooled.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(ctx("pool"))?);
            }
        }
    }
    Ok((feats, data.shard.labels[..n].to_vec()))
}

enum PoolModel {
    Dpar(Dpar),
    Gpt(Gpt),
}

/// Trains a linear classifier (standardised features, AdamW, full batch) and returns top-1 and
/// top-5 test accuracy.
fn probe(train: &(Vec<f32>, Vec<u32>), test: &(Vec<f32>, Vec<u32>), dim: usize, classes: usize, device: &Device) -> Result<(f64, f64)> {
    let n = train.1.len();
    let x = Tensor::from_slice(&train.0, (n, dim), device).map_err(ctx("probe"))?;
    let mean = x.mean_keepdim(0).map_err(ctx("probe"))?;
    let std = (x.broadcast_sub(&mean).and_then(|d| d.sqr()?.mean_keepdim(0)).and_then(|v| v + 1e-6).and_then(|v| v.sqrt())).map_err(ctx("probe"))?;
    let norm = |t: &Tensor| t.broadcast_sub(&mean).and_then(|d| d.broadcast_div(&std));
    let xs = norm(&x).map_err(ctx("probe"))?;
    let y = Tensor::new(train.1.as_slice(), device).map_err(ctx("probe"))?;
    let store = ParamStore::new(0, device);
    let w = store.root().get((classes, dim), "w", crate::params::Init::Const(0.0)).map_err(ctx("probe"))?;
    let b = store.root().get(classes, "b", crate::params::Init::Const(0.0)).map_err(ctx("probe"))?;
    let mut opt = crate::optim::AdamW::new(store.vars(), crate::optim::AdamWConfig { lr: 1e-2, weight_decay: 1e-3, ..Default::default() }).map_err(ctx("probe"))?;
    for _ in 0..300 {
        let logits = xs.matmul(&w.t().map_err(ctx("probe"))?).and_then(|l| l.broadcast_add(&b)).map_err(ctx("probe"))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y).map_err(ctx("probe"))?;
        opt.step(&loss.backward().map_err(ctx("probe"))?).map_err(ctx("probe"))?;
    }
    let m = test.1.len();
    let xt = norm(&Tensor::from_slice(&test.0, (m, dim), device).map_err(ctx("probe"))?).map_err(ctx("probe"))?;
    let logits = xt.matmul(&w.t().map_err(ctx("probe"))?).and_then(|l| l.broadcast_add(&b)).and_then(|l| l.to_vec2::<f32>()).map_err(ctx("probe"))?;
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &yt) in logits.iter().zip(&test.1) {
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        top1 += (order[0] as u32 == yt) as usize;
        top5 += order.iter().take(5).any(|&c| c as u32 == yt) as usize;
    }
    Ok((top1 as f64 / m as f64, top5 as f64 / m as f64))
}

/// Table 7: linear probe on average-pooled final hidden states, DPAR vs baseline.
pub fn linear_probe(env: &Env, dpar_run: &Path, gpt_run: &Path, train_n: usize, test_n: usize) -> Result<Table> {
    let (dmodel, _ds, _dc) = crate::dpar::train::load(dpar_run, &env.device).map_err(ctx("DPAR model"))?;
    let (gmodel, _gs) = crate::gpt::load(gpt_run, None, &env.device).map_err(ctx("GPT model"))?;
    let classes = dmodel.config().num_classes;
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for (name, model) in [("LlamaGen baseline", PoolModel::Gpt(gmodel)), ("DPAR", PoolModel::Dpar(dmodel))] {
        let train = pooled_features(env, &model, &env.train, train_n)?;
        let test = pooled_features(env, &model, &env.test, test_n)?;
        let dim = train.0.len() / train.1.len().max(1);
        let (a1, a5) = probe(&train, &test, dim, classes, &env.device)?;
        rows.push(vec![name.to_string(), format!("{:.2}", 100.0 * a1), format!("{:.2}", 100.0 * a5)]);
        data.push(serde_json::json!({ "model": name, "acc1": a1, "acc5": a5, "train_images": train.1.len(), "test_images": test.1.len() }));
    }
    Ok(Table {
        title: "Linear probe on average-pooled final hidden states (paper Table 7)".into(),
        scale: format!("models {} and {}; probe trained on {train_n} train images, tested on {test_n} test images (null class input)", gpt_run.display(), dpar_run.display()),
        header: vec!["model".into(), "Acc@1".into(), "Acc@5".into()],
        rows,
        data: data.into(),
    })
}

/// FD of the weight snapshots of a run (every evaluation step), for FD-vs-steps curves.
pub fn fd_curve(env: &Env, run: &Path, dpar: bool, n: usize) -> Result<Vec<(u64, f64)>> {
    let snapshots = crate::train::RunPaths::new(run).list_snapshots();
    let mut points = Vec::new();
    for (step, path) in snapshots {
        let row = if dpar {
            let (_, _, cfg) = crate::dpar::train::load(&path, &env.device).map_err(ctx("snapshot"))?;
            eval_dpar(env, "snapshot", &path, &cfg.model.patch, n)?
        } else {
            eval_gpt(env, "snapshot", &path, n)?
        };
        tracing::info!("{}: step {step}: FD {:.3}", run.display(), row.quality.fd);
        points.push((step, row.quality.fd));
    }
    Ok(points)
}

/// Training speed of a run: the median `ms_per_step` of its log.
fn ms_per_step(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("log.jsonl")).unwrap_or_default();
    let v: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("ms_per_step")?.as_f64()).collect();
    crate::util::median(&v)
}

/// The side-by-side benchmark of the baseline and DPAR (trained runs), with FD-vs-steps curves
/// from their snapshots (`curve_samples` samples per point).
pub fn bench(env: &Env, gpt_run: &Path, dpar_run: &Path, curve_samples: usize) -> Result<(Table, Vec<(String, Vec<(u64, f64)>)>)> {
    let (gmodel, _gs) = crate::gpt::load(gpt_run, None, &env.device).map_err(ctx("GPT model"))?;
    let (dmodel, _ds, dcfg) = crate::dpar::train::load(dpar_run, &env.device).map_err(ctx("DPAR model"))?;
    let stats = env.patch_stats(&dcfg.model.patch)?;
    let gflops = crate::flops::gpt_forward(gmodel.config()) / 1e9;
    let dflops = crate::flops::dpar_forward(dmodel.config(), stats.mean_patches) / 1e9;
    drop((gmodel, dmodel));
    let n = env.setup.samples;
    let g = eval_gpt(env, "LlamaGen baseline", gpt_run, n)?;
    let d = eval_dpar(env, "DPAR", dpar_run, &dcfg.model.patch, n)?;
    let mut rows = Vec::new();
    for (row, flops, run) in [(&g, gflops, gpt_run), (&d, dflops, dpar_run)] {
        let mut cells = vec![
            row.name.clone(),
            format!("{:.1}", row.positions_per_image),
            format!("{:.3}", flops),
            format!("{:.3}", 3.0 * flops),
            format!("{:.0}", ms_per_step(run)),
            format!("{:.2}", row.images_per_s),
        ];
        cells.extend(quality_cells(&row.quality));
        rows.push(cells);
    }
    let mut header: Vec<String> = ["model", "positions per image", "fwd GFLOP/image", "train GFLOP/image", "ms per train step", "sampling images/s"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    let curves = vec![("LlamaGen baseline".to_string(), fd_curve(env, gpt_run, false, curve_samples)?), ("DPAR".to_string(), fd_curve(env, dpar_run, true, curve_samples)?)];
    let data = serde_json::json!({ "baseline": g, "dpar": d, "fwd_gflops": { "baseline": gflops, "dpar": dflops }, "patch_stats": stats, "fd_curves": curves });
    Ok((
        Table {
            title: "LlamaGen baseline vs DPAR, same depth, width and training budget".into(),
            scale: format!("MNIST (small scale): runs {} and {}; {n} samples each, cfg {}; FD in the classifier's features (not FID)", gpt_run.display(), dpar_run.display(), env.setup.cfg_scale),
            header,
            rows,
            data,
        },
        curves,
    ))
}
