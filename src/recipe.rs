//! Training recipes: everything `dpar train` does, as a library call.
//!
//! A run's config comes from one of three sources (a preset fitted to the shards, a config file,
//! or the run folder's own `config.json` on resume), then flag-style [`Overrides`] apply on top,
//! and for DPAR θ is calibrated on the training entropies when nobody gave one. [`train`] then
//! runs the shared loop as one process, N thread ranks, this process's MPI rank or NCCL rank
//! ([`Launch`]). The `dpar train` and `dpar entropy train` commands only translate flags into a
//! [`TrainRequest`]; the experiments build their configs with [`new_dpar_config`] and
//! [`Overrides`] too, so there is one place where a run's config is assembled.
//!
//! ```no_run
//! use dpar::recipe::{train, ModelKind, TrainRequest};
//! let mut request = TrainRequest::new(ModelKind::Dpar, "data/codes/train");
//! request.overrides.steps = Some(100);
//! let trained = train(&request, &candle_core::Device::Cpu)?;
//! println!("final loss {:.3} in {}", trained.report.final_loss, trained.out.display());
//! # Ok::<(), dpar::recipe::RecipeError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;

use crate::data::shards::CodeShard;
use crate::dpar::train::{read_entropy_codes, DparTask, DparTrainConfig, EntropyCodes};
use crate::dpar::DparConfig;
use crate::gpt::train::{GptTask, GptTrainConfig};
use crate::gpt::GptConfig;
use crate::nn::rope::PatchRope;
use crate::nn::Ops;
use crate::patching::{PatchConfig, PatchStats};
use crate::rundir::Start;
use crate::train::{LoopConfig, Task, TrainReport};

/// Errors of assembling a run and launching it. Each keeps the error it wraps as its source.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// A flag (or the override it stands for) is impossible.
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    /// A config file cannot be read or does not describe this kind of run.
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    /// Two parts that must match do not (e.g. the tokenizer of the training and validation
    /// codes).
    #[error("{msg} ({fix}, or pass --allow-mismatch)")]
    Mismatch { msg: String, fix: &'static str },
    /// A stage failed; `context` says which and for what input.
    #[error("{context}")]
    Stage {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The training loop failed (divergence, a bad checkpoint, the task).
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A data-parallel group could not be formed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
}

pub type Result<T> = std::result::Result<T, RecipeError>;

impl RecipeError {
    /// Whether training stopped because the loss, gradients or weights diverged (on any rank):
    /// the run can continue from its last good checkpoint with a lower learning rate.
    pub fn diverged(&self) -> bool {
        match self {
            RecipeError::Train(crate::train::TrainError::NonFinite { .. }) => true,
            RecipeError::Stage { source, .. } => {
                source.downcast_ref::<RecipeError>().is_some_and(RecipeError::diverged)
            }
            _ => false,
        }
    }
}

fn stage<E: std::error::Error + Send + Sync + 'static>(context: impl Into<String>) -> impl FnOnce(E) -> RecipeError {
    let context = context.into();
    move |e| RecipeError::Stage { context, source: Box::new(e) }
}

/// Which model a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The LlamaGen baseline (class-conditional GPT).
    Gpt,
    /// The unconditional GPT that supplies DPAR's entropies.
    Entropy,
    /// DPAR: patch encoder, patch transformer, patch decoder (needs stored entropies).
    Dpar,
}

impl ModelKind {
    /// The `kind` recorded in a run's config.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Gpt => "gpt",
            ModelKind::Entropy => "entropy",
            ModelKind::Dpar => "dpar",
        }
    }

    /// The run folder used when none is given.
    pub fn default_out(self) -> PathBuf {
        PathBuf::from("runs").join(self.name())
    }

    /// The preset used when none is given.
    pub fn default_preset(self) -> &'static str {
        match self {
            ModelKind::Entropy => "mnist-entropy",
            ModelKind::Gpt | ModelKind::Dpar => "mnist",
        }
    }

    /// The command that trains this kind.
    pub fn command(self) -> &'static str {
        match self {
            ModelKind::Entropy => "dpar entropy train",
            ModelKind::Gpt => "dpar train --model gpt",
            ModelKind::Dpar => "dpar train --model dpar",
        }
    }
}

/// Patcher switches on top of a base [`PatchConfig`] (the `--threshold`, `--max-patch-len`,
/// `--no-…` and `--static` flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatchOverrides {
    /// Entropy threshold θ (natural log).
    pub threshold: Option<f64>,
    /// Maximum patch length P.
    pub max_patch_len: Option<usize>,
    pub no_entropy_gate: bool,
    pub no_max_len: bool,
    pub no_row_reset: bool,
    /// Static patches: fixed length P with row resets, no entropy.
    pub static_patches: bool,
}

impl PatchOverrides {
    /// The switches applied on top of `base`.
    pub fn apply(&self, base: PatchConfig) -> PatchConfig {
        let mut c = base;
        if self.static_patches {
            c = PatchConfig::static_patches(c.max_patch_len);
        }
        if let Some(t) = self.threshold {
            c.threshold = t;
        }
        if let Some(p) = self.max_patch_len {
            c.max_patch_len = p;
        }
        if self.no_entropy_gate {
            c.entropy_gate = false;
        }
        if self.no_max_len {
            c.max_len_rule = false;
        }
        if self.no_row_reset {
            c.row_reset = false;
        }
        c
    }
}

/// Settings that override the preset or config file, one per `dpar train` flag. `None` (or
/// `false`) keeps the config's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup: Option<u64>,
    /// `Some(true)`: cosine decay to `min_lr` after the warm-up; `Some(false)`: a constant rate.
    pub cosine: Option<bool>,
    pub min_lr: Option<f64>,
    pub grad_clip: Option<f64>,
    pub seed: Option<u64>,
    pub dim: Option<usize>,
    pub heads: Option<usize>,
    /// `N` blocks for a GPT, `E+G+D` for DPAR.
    pub layers: Option<String>,
    /// Token, residual and FFN dropout together.
    pub dropout: Option<f64>,
    pub class_dropout: Option<f64>,
    /// Train on the flip copy of each image half of the time.
    pub flip: bool,
    pub checkpoint_every: Option<u64>,
    pub log_every: Option<u64>,
    pub eval_every: Option<u64>,
    pub val_images: Option<usize>,
    /// DPAR: the training patcher.
    pub patch: PatchOverrides,
    /// DPAR: the mean patch length θ is calibrated for when no θ is given or saved (default
    /// [`DEFAULT_TARGET_MEAN_LEN`]).
    pub target_mean_len: Option<f64>,
    /// DPAR: position encoding of the patch transformer.
    pub patch_rope: Option<PatchRope>,
    /// Kernels requested (resolved against the device and the CPU by [`Ops::resolve`] when the
    /// model is built; not saved in the run's config).
    pub ops: Option<Ops>,
    /// Arithmetic of the training forward (`--dtype`; not saved in the run's config).
    pub precision: Option<crate::nn::Precision>,
}

/// The training shards of a run when neither a flag nor a config names them.
pub const DEFAULT_CODES: &str = "data/codes/train";

/// The mean patch length θ is calibrated for by default (the paper's 256 px figure is 1.81).
pub const DEFAULT_TARGET_MEAN_LEN: f64 = 1.8;

impl Overrides {
    /// Refuses impossible values before anything is read or built, naming the flag.
    pub fn check(&self) -> Result<()> {
        fn flag(flag: &'static str, reason: String) -> Result<()> {
            Err(RecipeError::Flag { flag, reason })
        }
        let positive = |v: Option<u64>| v == Some(0);
        if positive(self.steps) {
            return flag("--steps", "0: a run takes at least one step".into());
        }
        if self.batch_size == Some(0) {
            return flag("--batch-size", "0: a step takes at least one image".into());
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return flag("--lr", format!("{lr}: the learning rate must be finite and > 0"));
            }
        }
        if let Some(wd) = self.weight_decay {
            if !(wd.is_finite() && wd >= 0.0) {
                return flag("--weight-decay", format!("{wd}: must be finite and ≥ 0"));
            }
        }
        if let (Some(w), Some(steps)) = (self.warmup, self.steps) {
            if w >= steps {
                return flag(
                    "--warmup",
                    format!("{w} warm-up steps leave none of the {steps} --steps at the full rate"),
                );
            }
        }
        if let Some(clip) = self.grad_clip {
            if !(clip.is_finite() && clip >= 0.0) {
                return flag("--grad-clip", format!("{clip}: must be finite and ≥ 0 (0 turns clipping off)"));
            }
        }
        if let Some(m) = self.min_lr {
            if !(m.is_finite() && m >= 0.0) || self.lr.is_some_and(|lr| m > lr) {
                return flag("--min-lr", format!("{m}: must lie between 0 and the learning rate"));
            }
        }
        if self.dim == Some(0) {
            return flag("--dim", "0: the width must be positive".into());
        }
        if self.heads == Some(0) {
            return flag("--heads", "0: a model needs at least one attention head".into());
        }
        for (name, p) in [("--dropout", self.dropout), ("--class-dropout", self.class_dropout)] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return flag(name, format!("{p}: a probability in [0, 1)"));
                }
            }
        }
        for (name, v) in [("--checkpoint-every", self.checkpoint_every), ("--log-every", self.log_every)] {
            if v == Some(0) {
                return flag(name, "0: must be at least 1 step".into());
            }
        }
        if self.val_images == Some(0) {
            return flag("--val-images", "0: validation needs at least one image (`--val-codes none` skips it)".into());
        }
        if let Some(t) = self.target_mean_len {
            if !(t.is_finite() && t >= 1.0) {
                return flag("--target-mean-len", format!("{t}: a mean patch length is at least 1"));
            }
        }
        Ok(())
    }

    /// Applies the loop settings (steps, optimiser, schedule, clipping, cadence).
    pub fn apply_loop(&self, t: &mut LoopConfig) {
        if let Some(v) = self.steps {
            t.steps = v;
        }
        if let Some(v) = self.lr {
            t.adamw.lr = v;
        }
        if let Some(v) = self.weight_decay {
            t.adamw.weight_decay = v;
        }
        if let Some(v) = self.warmup {
            t.schedule.warmup_steps = v;
        }
        if let Some(cosine) = self.cosine {
            t.schedule.cosine = cosine;
        }
        if let Some(v) = self.min_lr {
            t.schedule.min_lr = v;
        }
        if let Some(v) = self.grad_clip {
            t.grad_clip = v;
        }
        if let Some(v) = self.checkpoint_every {
            t.checkpoint_every = v;
        }
        if let Some(v) = self.log_every {
            t.log_every = v;
        }
        if let Some(v) = self.eval_every {
            t.eval_every = v;
        }
    }

    /// The settings shared by both configs: batch, seed, validation size, flip and the model's
    /// dropouts, width, heads and kernels.
    fn apply_common(&self, run: RunFields<'_>) {
        if let Some(v) = self.batch_size {
            *run.batch_size = v;
        }
        if let Some(v) = self.seed {
            *run.seed = v;
        }
        if let Some(v) = self.val_images {
            *run.val_images = v;
        }
        if self.flip {
            *run.use_flip = true;
        }
        let m = run.model;
        if let Some(p) = self.dropout {
            (m.token_dropout, m.resid_dropout, m.ffn_dropout) = (p, p, p);
        }
        if let Some(p) = self.class_dropout {
            m.class_dropout = p;
        }
        if let Some(o) = self.ops {
            m.ops = o;
        }
        if let Some(p) = self.precision {
            m.precision = p;
        }
        if let Some(d) = self.dim {
            m.dim = d;
        }
        if let Some(h) = self.heads {
            m.n_head = h;
        }
    }

    /// Applies every override that concerns a GPT run and validates the model.
    pub fn apply_gpt(&self, config: &mut GptTrainConfig) -> Result<()> {
        self.apply_loop(&mut config.train);
        self.apply_common(RunFields {
            batch_size: &mut config.batch_size,
            seed: &mut config.seed,
            val_images: &mut config.val_images,
            use_flip: &mut config.use_flip,
            model: &mut config.model.core,
        });
        let m = &mut config.model;
        if let Some(layers) = &self.layers {
            m.n_layer = layers.trim().parse().map_err(|_| RecipeError::Flag {
                flag: "--layers",
                reason: format!("{layers}: a GPT takes one number of blocks, e.g. 6"),
            })?;
        }
        m.validate().map_err(stage("model config"))
    }

    /// Applies every override that concerns a DPAR run (θ calibration is [`train`]'s).
    pub fn apply_dpar(&self, config: &mut DparTrainConfig) -> Result<()> {
        self.apply_loop(&mut config.train);
        self.apply_common(RunFields {
            batch_size: &mut config.batch_size,
            seed: &mut config.seed,
            val_images: &mut config.val_images,
            use_flip: &mut config.use_flip,
            model: &mut config.model.core,
        });
        let m = &mut config.model;
        if let Some(layers) = &self.layers {
            let parts: Vec<usize> =
                layers.split('+').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().unwrap_or_default();
            let [e, g, d] = parts[..] else {
                return Err(RecipeError::Flag {
                    flag: "--layers",
                    reason: format!("{layers}: DPAR takes encoder+global+decoder blocks, e.g. 1+4+1"),
                });
            };
            (m.encoder_layers, m.global_layers, m.decoder_layers) = (e, g, d);
        }
        if let Some(r) = self.patch_rope {
            m.patch_rope = r;
        }
        m.patch = self.patch.apply(m.patch);
        Ok(())
    }
}

/// The fields [`Overrides::apply_common`] sets, borrowed from either config.
struct RunFields<'a> {
    batch_size: &'a mut usize,
    seed: &'a mut u64,
    val_images: &'a mut usize,
    use_flip: &'a mut bool,
    /// The model's shared transformer settings.
    model: &'a mut crate::nn::TransformerConfig,
}

/// The loop of a fresh run before overrides: 2000 steps, a log line every 10, a checkpoint
/// every 250, AdamW at the paper's lr 1e-4 with a constant rate (design §7).
pub fn default_loop() -> LoopConfig {
    LoopConfig { steps: 2000, log_every: 10, checkpoint_every: 250, ..Default::default() }
}

/// The training settings a preset ships with, applied to a fresh run built from that preset
/// (a config file or a resumed run keeps its own). The small presets carry the settings of the
/// shipped models in `models/mnist`, so `dpar train --model gpt --preset mnist` and `dpar
/// entropy train` reproduce them; every other preset (the paper's sizes) keeps the paper's
/// recipe of [`default_loop`]: lr 1e-4, constant, no warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetRecipe {
    pub batch_size: usize,
    /// Optimiser steps; `None`: `epochs` passes over the training set.
    pub steps: Option<u64>,
    pub epochs: u64,
    pub lr: f64,
    /// Warm-up as a share of the steps.
    pub warmup_share: f64,
    pub cosine: bool,
    /// Validations (with weight snapshots) per run.
    pub evals: u64,
    pub checkpoint_every: u64,
    /// Token, residual and FFN dropout, when the recipe sets them.
    pub dropout: Option<f64>,
}

impl PresetRecipe {
    /// The recipe of a preset, if it has one of its own.
    pub fn of(kind: ModelKind, preset: &str) -> Option<Self> {
        match (kind, preset) {
            // The shipped baseline and DPAR: 3 epochs at batch 16 (11,250 steps on MNIST's
            // 60,000 images), lr 2e-3 with 2 % warm-up and cosine decay, no dropout (the preset's).
            (ModelKind::Gpt | ModelKind::Dpar, "mnist") => Some(Self {
                batch_size: 16,
                steps: None,
                epochs: 3,
                lr: 2e-3,
                warmup_share: 0.02,
                cosine: true,
                evals: 10,
                checkpoint_every: 100,
                dropout: None,
            }),
            // The shipped entropy model: 2400 steps at batch 32, lr 1e-3, 100 warm-up steps and
            // cosine decay, validation every 400 steps, no dropout.
            (ModelKind::Entropy, "mnist-entropy") => Some(Self {
                batch_size: 32,
                steps: Some(2400),
                epochs: 0,
                lr: 1e-3,
                warmup_share: 100.0 / 2400.0,
                cosine: true,
                evals: 6,
                checkpoint_every: 100,
                dropout: Some(0.0),
            }),
            _ => None,
        }
    }

    /// After the overrides: a warm-up and a validation cadence that were not given explicitly
    /// follow the run's final step count (the recipe states them as shares of the run).
    pub fn fit_to_steps(&self, overrides: &Overrides, train: &mut LoopConfig) {
        if overrides.warmup.is_none() {
            train.schedule.warmup_steps = (train.steps as f64 * self.warmup_share).round() as u64;
        }
        if overrides.eval_every.is_none() {
            train.eval_every = (train.steps / self.evals.max(1)).max(1);
        }
    }

    /// Sets batch, steps, learning rate, schedule, cadence and dropout for a training set of
    /// `images`.
    pub fn apply(
        &self,
        images: usize,
        batch_size: &mut usize,
        train: &mut LoopConfig,
        model: &mut crate::nn::TransformerConfig,
    ) {
        *batch_size = self.batch_size;
        if let Some(p) = self.dropout {
            (model.token_dropout, model.resid_dropout, model.ffn_dropout) = (p, p, p);
        }
        let steps = self.steps.unwrap_or_else(|| (self.epochs * images as u64).div_ceil(self.batch_size as u64).max(1));
        train.steps = steps;
        train.adamw.lr = self.lr;
        train.schedule = crate::optim::LrSchedule {
            warmup_steps: (steps as f64 * self.warmup_share).round() as u64,
            cosine: self.cosine,
            min_lr: 0.0,
        };
        train.eval_every = (steps / self.evals.max(1)).max(1);
        train.checkpoint_every = self.checkpoint_every;
    }
}

/// A fresh GPT (or entropy model) config: `model` fitted to the shards (vocabulary, classes and
/// their names, grid), batch 16, seed 0, 1000 validation images, [`default_loop`]. An entropy
/// model drops the class token.
pub fn new_gpt_config(
    kind: ModelKind,
    mut model: GptConfig,
    train: &CodeShard,
    codes: &Path,
    val_codes: Option<String>,
) -> GptTrainConfig {
    model.vocab_size = train.info.codebook_size;
    model.num_classes = train.info.num_classes;
    model.grid_size = train.info.grid_size;
    if kind == ModelKind::Entropy {
        model.cls_token_num = 0;
        model.class_dropout = 0.0;
    } else {
        model.class_names = train.info.class_names.clone();
    }
    GptTrainConfig {
        kind: kind.name().into(),
        model,
        seed: 0,
        batch_size: 16,
        codes: codes.display().to_string(),
        val_codes,
        val_images: 1000,
        use_flip: false,
        tokenizer_id: train.info.tokenizer_id.clone(),
        train: default_loop(),
    }
}

/// A fresh DPAR config: `model` fitted to the shards (vocabulary, classes and their names,
/// grid), with the tokenizer and entropy model they record, batch 16, seed 0, 1000 validation images and [`default_loop`].
pub fn new_dpar_config(
    mut model: DparConfig,
    train: &EntropyCodes,
    codes: &Path,
    val_codes: Option<String>,
) -> DparTrainConfig {
    model.vocab_size = train.shard.info.codebook_size;
    model.num_classes = train.shard.info.num_classes;
    model.grid_size = train.shard.info.grid_size;
    model.class_names = train.shard.info.class_names.clone();
    DparTrainConfig {
        kind: "dpar".into(),
        model,
        seed: 0,
        batch_size: 16,
        codes: codes.display().to_string(),
        val_codes,
        val_images: 1000,
        use_flip: false,
        tokenizer_id: train.shard.info.tokenizer_id.clone(),
        entropy_model_id: train.entropies.entropy_model_id.clone(),
        train: default_loop(),
    }
}

/// Reads a JSON or TOML config file (TOML by the `.toml` extension). Keys the config type
/// does not know are an error naming them (a misspelt setting would otherwise be ignored).
pub fn read_config<T: serde::de::DeserializeOwned + serde::Serialize>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RecipeError::Config { path: path.into(), reason: format!("cannot read: {e}") })?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let value: serde_json::Value = if is_toml {
        toml::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }
    .map_err(|e| RecipeError::Config { path: path.into(), reason: format!("not a valid config: {e}") })?;
    crate::util::from_json_strict(value, crate::nn::config::TOLERATED_KEYS)
        .map_err(|e| RecipeError::Config { path: path.into(), reason: format!("not a valid config: {e}") })
}

/// How the ranks of a run are launched. Under `mpirun` (a build with `--features mpi`) or, with
/// `cuda` and `--features nccl`, a multi-process launcher, the ranks are processes and
/// `world_size` is ignored; otherwise `world_size` ranks run as threads of this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// Thread ranks in this process, each with a 1/N share of every batch.
    pub world_size: usize,
    /// Micro-batches per optimiser step on each rank.
    pub grad_accum: usize,
    /// How long a rank waits for its peers.
    pub rank_timeout: Duration,
    /// NCCL: the file through which rank 0 hands out the NCCL id (default `<out>/.nccl-id`).
    pub nccl_id_file: Option<PathBuf>,
}

/// The most thread ranks one process starts (`--world-size`): each is an OS thread with its
/// own model copy, so more than this is a mistake, not a plan.
pub const MAX_THREAD_RANKS: usize = 256;

impl Launch {
    /// Refuses impossible rank settings before anything starts.
    pub fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > MAX_THREAD_RANKS {
            return Err(RecipeError::Flag {
                flag: "--world-size",
                reason: format!(
                    "{}: thread ranks run 1 to {MAX_THREAD_RANKS} per process (more processes: mpirun)",
                    self.world_size
                ),
            });
        }
        if self.grad_accum == 0 {
            return Err(RecipeError::Flag {
                flag: "--grad-accum",
                reason: "0: each rank takes at least one micro-batch".into(),
            });
        }
        Ok(())
    }

    /// Refuses a batch that the ranks and micro-batches cannot split into equal parts, before
    /// any rank starts.
    pub fn check_split(&self, batch: usize) -> Result<()> {
        let parts = self.world_size.saturating_mul(self.grad_accum);
        if batch < parts || !batch.is_multiple_of(parts) {
            return Err(RecipeError::Flag {
                flag: "--batch-size/--world-size/--grad-accum",
                reason: format!(
                    "a batch of {batch} cannot be split into {} ranks × {} micro-batches of equal size",
                    self.world_size, self.grad_accum
                ),
            });
        }
        Ok(())
    }
}

impl Default for Launch {
    fn default() -> Self {
        Self { world_size: 1, grad_accum: 1, rank_timeout: Duration::from_secs(600), nccl_id_file: None }
    }
}

/// Runs the shared loop for a task built by `make` on every rank of `launch`; returns rank 0's
/// report.
pub fn run_ranks<T: Task>(
    make: &(dyn Fn() -> Result<T> + Sync),
    config: &LoopConfig,
    out: &Path,
    start: Start,
    launch: &Launch,
    device: &Device,
) -> Result<TrainReport> {
    if launch.grad_accum == 0 || launch.world_size == 0 {
        return Err(RecipeError::Flag { flag: "--world-size/--grad-accum", reason: "must be ≥ 1".into() });
    }
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        if let Some((rank, world, _local)) = crate::dist::launcher_rank() {
            let id_file =
                launch.nccl_id_file.clone().unwrap_or_else(|| crate::dist::NcclCollective::default_id_file(out));
            let collective = crate::dist::NcclCollective::init(rank, world, device, &id_file, launch.rank_timeout)?;
            let mut task = make()?;
            return Ok(crate::train::run_parallel(&mut task, config, out, start, &collective, launch.grad_accum)?);
        }
    }
    #[cfg(not(feature = "nccl"))]
    let _ = device;
    if crate::dist::launched_by_mpi() {
        #[cfg(feature = "mpi")]
        {
            let collective = crate::dist::MpiCollective::init()?;
            let mut task = make()?;
            return Ok(crate::train::run_parallel(&mut task, config, out, start, &collective, launch.grad_accum)?);
        }
        #[cfg(not(feature = "mpi"))]
        return Err(RecipeError::Flag {
            flag: "mpirun",
            reason: "started by mpirun, but this binary was built without MPI (rebuild with `cargo build --release --features mpi`)".into(),
        });
    }
    if launch.world_size == 1 {
        let mut task = make()?;
        return Ok(crate::train::run_parallel(&mut task, config, out, start, &crate::dist::Single, launch.grad_accum)?);
    }
    let group = crate::dist::ThreadGroup::new(launch.world_size, launch.rank_timeout);
    let results: Vec<Result<TrainReport>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|rank| {
                scope.spawn(move || -> Result<TrainReport> {
                    let mut task = make()?;
                    Ok(crate::train::run_parallel(&mut task, config, out, start, &rank, launch.grad_accum)?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RecipeError::Dist(crate::dist::DistError::Bad("a rank panicked".into()))))
            })
            .collect()
    });
    let mut first = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(report) if rank == 0 => first = Some(report),
            Ok(_) => {}
            Err(e) => return Err(RecipeError::Stage { context: format!("rank {rank}"), source: Box::new(e) }),
        }
    }
    first.ok_or_else(|| RecipeError::Dist(crate::dist::DistError::Bad("rank 0 produced no report".into())))
}

/// One training run, as `dpar train` describes it.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub kind: ModelKind,
    /// Architecture preset (default: [`ModelKind::default_preset`]); excludes `config`.
    pub preset: Option<String>,
    /// A full experiment config (JSON or TOML); overrides apply on top.
    pub config: Option<PathBuf>,
    /// Training code shards (folder or file); `None`: the config file's (with `config`, or the
    /// run's own on resume), else [`DEFAULT_CODES`].
    pub codes: Option<PathBuf>,
    /// Validation shards, `Some("none")` for none; `None`: the config file's, else the `test`
    /// set beside a `train` folder when there is one.
    pub val_codes: Option<String>,
    /// Run folder (default: [`ModelKind::default_out`]).
    pub out: Option<PathBuf>,
    pub overrides: Overrides,
    pub start: Start,
    pub launch: Launch,
    /// Mismatched parts (the validation codes' tokenizer) are warnings, not errors.
    pub allow_mismatch: bool,
}

impl TrainRequest {
    /// A fresh run of `kind` on `codes` with every default.
    pub fn new(kind: ModelKind, codes: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            preset: None,
            config: None,
            codes: Some(codes.into()),
            val_codes: None,
            out: None,
            overrides: Overrides::default(),
            start: Start::Fresh,
            launch: Launch::default(),
            allow_mismatch: false,
        }
    }

    /// The run folder.
    pub fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| self.kind.default_out())
    }

    /// The shards a run trains and validates on. A flag given in the request wins; else the
    /// config file's entry (`recorded`: its `codes` and `val_codes`); else the defaults:
    /// [`DEFAULT_CODES`], and the `test` set beside a `train` folder when there is one. Named
    /// validation shards (a flag or a config) must exist; `none` trains without validation.
    pub fn data_paths(&self, recorded: Option<(&str, Option<&str>)>) -> Result<(PathBuf, Option<String>)> {
        let codes = match (&self.codes, recorded) {
            (Some(c), _) => c.clone(),
            (None, Some((c, _))) => PathBuf::from(c),
            (None, None) => PathBuf::from(DEFAULT_CODES),
        };
        let (named, flag) = match (&self.val_codes, recorded) {
            (Some(v), _) => (Some(v.clone()), "--val-codes"),
            (None, Some((_, v))) => (Some(v.unwrap_or("none").to_string()), "the config's val_codes"),
            (None, None) => (None, ""),
        };
        let val = match named.as_deref() {
            Some("none") | Some("") => None,
            Some(path) if Path::new(path).exists() => Some(path.to_string()),
            Some(path) => {
                return Err(RecipeError::Flag {
                    flag: "--val-codes",
                    reason: format!(
                        "{flag} names {path}, which does not exist (`--val-codes none` trains without validation)"
                    ),
                })
            }
            None => {
                let beside = (codes.file_name().is_some_and(|n| n == "train")).then(|| codes.with_file_name("test"));
                match beside {
                    Some(test) if test.exists() => Some(test.display().to_string()),
                    _ => {
                        tracing::warn!("no --val-codes and no `test` set beside --codes: training without validation");
                        None
                    }
                }
            }
        };
        Ok((codes, val))
    }

    /// The config file to start from: the given one, or the run folder's on resume.
    fn config_file(&self) -> Result<Option<PathBuf>> {
        if self.preset.is_some() && self.config.is_some() {
            return Err(RecipeError::Flag { flag: "--preset/--config", reason: "give one, not both".into() });
        }
        let saved = self.out().join("config.json");
        Ok(match (&self.config, self.start == Start::Resume && saved.is_file()) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(saved),
            (None, false) => None,
        })
    }

    /// The flags' own checks ([`Overrides::check`]) and the ranks' ([`Launch::check`]).
    pub fn check(&self) -> Result<()> {
        self.overrides.check()?;
        self.launch.check()
    }

    /// A model config that fails validation after the overrides names where it came from: the
    /// config file or preset, and the shape flags given.
    fn name_config_source(&self, err: RecipeError, file: Option<&Path>) -> RecipeError {
        let RecipeError::Stage { context, source } = err else { return err };
        if context != "model config" {
            return RecipeError::Stage { context, source };
        }
        let from = match file {
            Some(f) => format!("the config {}", f.display()),
            None => format!("the preset {}", self.preset.as_deref().unwrap_or(self.kind.default_preset())),
        };
        let o = &self.overrides;
        let flags: Vec<&str> =
            [("--dim", o.dim.is_some()), ("--heads", o.heads.is_some()), ("--layers", o.layers.is_some())]
                .iter()
                .filter(|(_, given)| *given)
                .map(|(f, _)| *f)
                .collect();
        let context = if flags.is_empty() {
            format!("model config ({from})")
        } else {
            format!("model config ({from} with {})", flags.join(", "))
        };
        RecipeError::Stage { context, source }
    }

    fn check_same_tokenizer(&self, val: &str, val_id: &str, train_id: &str) -> Result<()> {
        if val_id != train_id {
            let msg = format!(
                "--val-codes {val}: codes of tokenizer {}…, but the training codes come from tokenizer {}…; a validation loss across tokenizers means nothing",
                short(val_id),
                short(train_id)
            );
            if !self.allow_mismatch {
                return Err(RecipeError::Mismatch { msg, fix: "tokenize both splits with the same tokenizer" });
            }
            tracing::warn!("--allow-mismatch: {msg}");
        }
        Ok(())
    }
}

fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// A GPT or entropy run, assembled: the config and the shards it trains on.
pub struct GptRun {
    pub config: GptTrainConfig,
    pub train: CodeShard,
    pub val: Option<CodeShard>,
}

/// A DPAR run, assembled: the config (θ calibrated if needed) and the codes with entropies.
pub struct DparRun {
    pub config: DparTrainConfig,
    pub train: EntropyCodes,
    pub val: Option<EntropyCodes>,
    /// θ and the patch statistics it gives, when θ was calibrated here.
    pub calibrated: Option<(f64, PatchStats)>,
}

/// Reads the shards and assembles a GPT or entropy-model run.
pub fn prepare_gpt(req: &TrainRequest) -> Result<GptRun> {
    req.check()?;
    let file = req.config_file()?;
    let from_file: Option<GptTrainConfig> = file.as_deref().map(read_config).transpose()?;
    let (codes, val_codes) = req.data_paths(from_file.as_ref().map(|c| (c.codes.as_str(), c.val_codes.as_deref())))?;
    let (train, _) =
        crate::data::shards::read_shard_set(&codes).map_err(stage(format!("--codes {}", codes.display())))?;
    let val = match val_codes.as_deref() {
        None => None,
        Some(path) => {
            let (v, _) =
                crate::data::shards::read_shard_set(Path::new(path)).map_err(stage(format!("--val-codes {path}")))?;
            req.check_same_tokenizer(path, &v.info.tokenizer_id, &train.info.tokenizer_id)?;
            Some(v)
        }
    };
    let kind = req.kind.name();
    let mut recipe = None;
    let mut config = match from_file {
        Some(mut config) => {
            (config.codes, config.val_codes) = (codes.display().to_string(), val_codes.clone());
            config
        }
        None => {
            let preset = req.preset.clone().unwrap_or_else(|| req.kind.default_preset().into());
            let model = GptConfig::preset(&preset).map_err(stage("--preset"))?;
            let mut config = new_gpt_config(req.kind, model, &train, &codes, val_codes.clone());
            recipe = PresetRecipe::of(req.kind, &preset);
            if let Some(recipe) = &recipe {
                recipe.apply(train.len(), &mut config.batch_size, &mut config.train, &mut config.model.core);
            }
            config
        }
    };
    if config.kind != kind {
        return Err(RecipeError::Config {
            path: file.unwrap_or_default(),
            reason: format!("describes a `{}` model but --model is {kind}", config.kind),
        });
    }
    req.overrides.apply_gpt(&mut config).map_err(|e| req.name_config_source(e, file.as_deref()))?;
    if let Some(recipe) = &recipe {
        recipe.fit_to_steps(&req.overrides, &mut config.train);
    }
    if train.info.tokenizer_id != config.tokenizer_id {
        return Err(RecipeError::Flag {
            flag: "--codes",
            reason: format!(
                "{}: codes come from tokenizer {}, the config expects {}",
                codes.display(),
                short(&train.info.tokenizer_id),
                short(&config.tokenizer_id)
            ),
        });
    }
    Ok(GptRun { config, train, val })
}

/// Reads the codes with their entropies and assembles a DPAR run; θ is calibrated on the
/// training entropies for the target mean patch length when it is neither given nor saved.
pub fn prepare_dpar(req: &TrainRequest) -> Result<DparRun> {
    req.check()?;
    let file = req.config_file()?;
    let from_file: Option<DparTrainConfig> = file.as_deref().map(read_config).transpose()?;
    let (codes, val_codes) = req.data_paths(from_file.as_ref().map(|c| (c.codes.as_str(), c.val_codes.as_deref())))?;
    let train = read_entropy_codes(&codes, None).map_err(stage(format!("--codes {}", codes.display())))?;
    let val = match val_codes.as_deref() {
        None => None,
        Some(path) => {
            let v = read_entropy_codes(Path::new(path), Some(&train.entropies.entropy_model_id))
                .map_err(stage(format!("--val-codes {path}")))?;
            req.check_same_tokenizer(path, &v.shard.info.tokenizer_id, &train.shard.info.tokenizer_id)?;
            Some(v)
        }
    };
    let from_config = from_file.is_some();
    let mut recipe = None;
    let mut config = match from_file {
        Some(mut config) => {
            (config.codes, config.val_codes) = (codes.display().to_string(), val_codes.clone());
            config
        }
        None => {
            let preset = req.preset.as_deref().unwrap_or(req.kind.default_preset());
            let model = DparConfig::preset(preset).map_err(stage("--preset"))?;
            let mut config = new_dpar_config(model, &train, &codes, val_codes.clone());
            recipe = PresetRecipe::of(req.kind, preset);
            if let Some(recipe) = &recipe {
                recipe.apply(train.shard.len(), &mut config.batch_size, &mut config.train, &mut config.model.core);
            }
            config
        }
    };
    if config.kind != "dpar" {
        return Err(RecipeError::Config {
            path: file.unwrap_or_default(),
            reason: format!("describes a `{}` model, not dpar", config.kind),
        });
    }
    req.overrides.apply_dpar(&mut config).map_err(|e| req.name_config_source(e, file.as_deref()))?;
    if let Some(recipe) = &recipe {
        recipe.fit_to_steps(&req.overrides, &mut config.train);
    }
    let calibrate = config.model.patch.entropy_gate
        && req.overrides.patch.threshold.is_none()
        && !(from_config && config.model.patch.threshold.is_finite());
    let mut calibrated = None;
    if calibrate {
        let target = req.overrides.target_mean_len.unwrap_or(DEFAULT_TARGET_MEAN_LEN);
        let (theta, stats) =
            crate::patching::calibrate(&train.entropies.entropy, config.model.grid_size, &config.model.patch, target)
                .map_err(stage(format!("--target-mean-len {target} (θ calibration)")))?;
        config.model.patch.threshold = theta;
        calibrated = Some((theta, stats));
    }
    config
        .model
        .validate()
        .map_err(stage("model config (--preset/--config and --dim, --heads, --layers, the patcher flags)"))?;
    if train.shard.info.tokenizer_id != config.tokenizer_id {
        return Err(RecipeError::Flag {
            flag: "--codes",
            reason: format!("{}: codes come from another tokenizer than the config expects", codes.display()),
        });
    }
    Ok(DparRun { config, train, val, calibrated })
}

/// What [`train`] did.
#[derive(Debug, Clone)]
pub struct Trained {
    pub kind: ModelKind,
    pub out: PathBuf,
    pub report: TrainReport,
    /// DPAR: θ and its patch statistics when θ was calibrated for this run.
    pub calibrated: Option<(f64, PatchStats)>,
    /// DPAR: the training patcher, in words.
    pub patcher: Option<String>,
}

/// Assembles the run of `req` ([`prepare_gpt`] / [`prepare_dpar`]) and trains it on `device`
/// over the ranks of `req.launch`.
pub fn train(req: &TrainRequest, device: &Device) -> Result<Trained> {
    let out = req.out();
    match req.kind {
        ModelKind::Gpt | ModelKind::Entropy => {
            let run = prepare_gpt(req)?;
            req.launch.check_split(run.config.batch_size)?;
            let make = || -> Result<GptTask> {
                GptTask::new(run.config.clone(), run.train.clone(), run.val.clone(), device).map_err(stage("model"))
            };
            let report = run_ranks(&make, &run.config.train, &out, req.start, &req.launch, device)?;
            Ok(Trained { kind: req.kind, out, report, calibrated: None, patcher: None })
        }
        ModelKind::Dpar => {
            let run = prepare_dpar(req)?;
            req.launch.check_split(run.config.batch_size)?;
            if let Some((theta, stats)) = &run.calibrated {
                tracing::info!(
                    "calibrated θ = {theta:.4} on the training entropies: mean patch length {:.3} ({:.1} patches per image)",
                    stats.mean_len,
                    stats.mean_patches
                );
            }
            let patcher = run.config.model.patch.label();
            tracing::info!("patcher: {patcher}");
            let make = || -> Result<DparTask> {
                DparTask::new(run.config.clone(), run.train.clone(), run.val.clone(), device).map_err(stage("model"))
            };
            let report = run_ranks(&make, &run.config.train, &out, req.start, &req.launch, device)?;
            Ok(Trained { kind: req.kind, out, report, calibrated: run.calibrated, patcher: Some(patcher) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_touch_only_what_they_name() {
        let mut t = default_loop();
        Overrides::default().apply_loop(&mut t);
        assert_eq!(t, default_loop());
        let o =
            Overrides { steps: Some(7), lr: Some(3e-3), cosine: Some(true), log_every: Some(2), ..Default::default() };
        o.apply_loop(&mut t);
        assert_eq!((t.steps, t.adamw.lr, t.schedule.cosine, t.log_every), (7, 3e-3, true, 2));
        assert_eq!(t.checkpoint_every, default_loop().checkpoint_every);
    }

    #[test]
    fn layers_are_parsed_per_model_and_bad_ones_name_the_flag() {
        let o = Overrides { layers: Some("2+3+1".into()), ..Default::default() };
        let model = DparConfig::mnist();
        let mut c = DparTrainConfig {
            kind: "dpar".into(),
            model,
            seed: 0,
            batch_size: 16,
            codes: String::new(),
            val_codes: None,
            val_images: 10,
            use_flip: false,
            tokenizer_id: String::new(),
            entropy_model_id: String::new(),
            train: default_loop(),
        };
        o.apply_dpar(&mut c).unwrap();
        assert_eq!((c.model.encoder_layers, c.model.global_layers, c.model.decoder_layers), (2, 3, 1));
        let bad = Overrides { layers: Some("6".into()), ..Default::default() };
        let err = bad.apply_dpar(&mut c).unwrap_err().to_string();
        assert!(err.starts_with("--layers: 6:"), "{err}");
    }

    /// The `mnist` presets' recipes are those the shipped models were trained with (their
    /// `config.json`), so the README's pipeline commands rebuild them.
    #[test]
    fn the_mnist_presets_carry_the_shipped_models_recipes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mnist");
        for (kind, preset, folder) in [
            (ModelKind::Gpt, "mnist", "gpt"),
            (ModelKind::Dpar, "mnist", "dpar"),
            (ModelKind::Entropy, "mnist-entropy", "entropy"),
        ] {
            let shipped: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(root.join(folder).join("config.json")).unwrap()).unwrap();
            let recipe = PresetRecipe::of(kind, preset).unwrap();
            let (mut batch, mut train) = (0, default_loop());
            let mut model =
                GptConfig::preset(if kind == ModelKind::Entropy { "mnist-entropy" } else { "mnist" }).unwrap().core;
            recipe.apply(60_000, &mut batch, &mut train, &mut model);
            let want = &shipped["train"];
            assert_eq!(batch as u64, shipped["batch_size"].as_u64().unwrap(), "{folder}");
            assert_eq!(train.steps, want["steps"].as_u64().unwrap(), "{folder}");
            assert_eq!(train.adamw.lr, want["adamw"]["lr"].as_f64().unwrap(), "{folder}");
            assert_eq!(train.schedule.warmup_steps, want["schedule"]["warmup_steps"].as_u64().unwrap(), "{folder}");
            assert_eq!(train.schedule.cosine, want["schedule"]["cosine"].as_bool().unwrap(), "{folder}");
            assert_eq!(train.eval_every, want["eval_every"].as_u64().unwrap(), "{folder}");
            assert_eq!(train.checkpoint_every, want["checkpoint_every"].as_u64().unwrap(), "{folder}");
            let dropout = shipped["model"]["resid_dropout"].as_f64().unwrap();
            if kind == ModelKind::Entropy {
                assert_eq!(model.resid_dropout, dropout, "{folder}");
            } else {
                let preset_dropout = if kind == ModelKind::Gpt {
                    GptConfig::mnist().resid_dropout
                } else {
                    DparConfig::mnist().resid_dropout
                };
                assert_eq!(preset_dropout, dropout, "{folder}");
            }
        }
        // The paper's presets keep the paper's recipe.
        assert_eq!(PresetRecipe::of(ModelKind::Entropy, "gpt-b"), None);
        assert_eq!(PresetRecipe::of(ModelKind::Dpar, "dpar-b"), None);
    }

    #[test]
    fn static_patches_override_the_base_and_keep_p() {
        let base = PatchConfig::dpar(2.5, 4);
        let o = PatchOverrides { static_patches: true, ..Default::default() };
        assert_eq!(o.apply(base), PatchConfig::static_patches(4));
        let o = PatchOverrides { threshold: Some(1.0), no_row_reset: true, ..Default::default() };
        let c = o.apply(base);
        assert_eq!((c.threshold, c.row_reset, c.max_patch_len), (1.0, false, 4));
    }
}
