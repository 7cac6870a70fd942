//! One training loop for every model: data → forward → loss → backward → clip → AdamW → log →
//! checkpoint (nanoGPT's shape).
//!
//! A model plugs in through [`Task`]: it builds its loss for a given step (drawing its batch from
//! the step's seeded RNG) and may keep extra state. The loop owns everything else:
//!
//! - AdamW (decay on ≥ 2-D weights only), optional warm-up / cosine schedule, global-norm clip;
//! - a progress bar with loss, throughput and ETA, plus a log line every `log_every` steps when
//!   stderr is not a terminal;
//! - `log.jsonl` (one JSON object per logged step) and `loss.png` at the end;
//! - atomic checkpoints: `checkpoint.safetensors` holds weights, optimiser moments, extra task
//!   state, the step and the full config; `model.safetensors` holds the weights alone;
//! - exact resume: every random choice is a pure function of `(seed, step)` (see
//!   [`crate::util::rng_for`]), so the RNG "state" saved is the seed and the step, and a resumed
//!   run reproduces an uninterrupted one bit for bit;
//! - a NaN/Inf loss or gradient norm stops the run with a clear error, keeping the last good
//!   checkpoint on disk untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::params::ParamStore;
pub use crate::rundir::Start;

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A loop setting is impossible.
    #[error("training config: {0}")]
    BadConfig(String),
    /// The loss, gradient norm or weights became NaN/Inf or left their sanity bounds.
    #[error("step {step}: {what} is {value:e}; stopping. The last good checkpoint ({checkpoint}) is kept; resume it with a lower learning rate (--resume --lr …: a resume may change the learning rate and schedule), or check the data")]
    NonFinite { step: u64, what: String, value: f64, checkpoint: String },
    /// The checkpoint to resume from does not fit this run.
    #[error("{path}: cannot resume: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    /// The task failed.
    #[error(transparent)]
    Task(TaskError),
    /// The ranks could not exchange gradients or state.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// What a task returns for one step.
pub struct StepOutput {
    /// The scalar loss to minimise.
    pub loss: Tensor,
    /// Extra scalars to log (already reduced), e.g. `("recon_mse", 0.01)`.
    pub metrics: Vec<(String, f64)>,
    /// Positions processed (codes, pixels, …) for the throughput figure.
    pub tokens: usize,
    /// Training FLOPs of this part of the step (forward + backward, the paper's accounting:
    /// 3 × forward), 0 when the task does not count them. Summed into the log's `train_flops`.
    pub flops: f64,
}

/// One of `count` equal, contiguous parts of a step's global batch (data-parallel ranks ×
/// gradient-accumulation micro-batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl Part {
    /// The part of `items` this is (the global batch must divide evenly).
    pub fn slice<'a, T>(&self, items: &'a [T]) -> std::result::Result<&'a [T], String> {
        if self.count == 0 || !items.len().is_multiple_of(self.count) {
            return Err(format!(
                "a batch of {} cannot be split into {} equal parts (ranks × micro-batches)",
                items.len(),
                self.count
            ));
        }
        let n = items.len() / self.count;
        Ok(&items[self.index * n..(self.index + 1) * n])
    }
}

/// The error a [`Task`] returns: any error, its chain kept (a message converts with `.into()`).
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// A model being trained.
pub trait Task {
    /// The parameters to optimise.
    fn params(&self) -> &ParamStore;
    /// Forward pass and loss for `step` (0-based). Randomness must come from
    /// `crate::util::rng_for(seed, …, step)` so that resume is exact.
    fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, TaskError>;
    /// Loss of one part of step `step`'s global batch (data parallelism, gradient
    /// accumulation). Tasks that support it draw the global batch and every per-sample random
    /// choice for the whole batch, then keep their part, so the parts of all ranks together
    /// equal the single-process batch.
    fn part_loss(&mut self, step: u64, part: Part) -> std::result::Result<StepOutput, TaskError> {
        if part.count == 1 {
            return self.step_loss(step);
        }
        Err(format!("{} training does not support data parallelism or gradient accumulation", self.name()).into())
    }
    /// Called after each optimiser step (e.g. dead-code restarts).
    fn after_step(&mut self, _step: u64) -> std::result::Result<Vec<(String, f64)>, TaskError> {
        Ok(Vec::new())
    }
    /// Validation metrics, run every `eval_every` steps and at the end.
    fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, TaskError> {
        Ok(Vec::new())
    }
    /// Extra state to checkpoint (named tensors), restored by [`Task::load_extra_state`].
    fn extra_state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn load_extra_state(&mut self, _tensors: &HashMap<String, Tensor>) -> std::result::Result<(), TaskError> {
        Ok(())
    }
    /// The full experiment config, saved beside every checkpoint and compared on resume.
    fn config_json(&self) -> serde_json::Value;
    /// Short name for progress bars and messages.
    fn name(&self) -> String;
    /// The name of the throughput unit (`codes/s`, `img/s`).
    fn throughput_unit(&self) -> &'static str {
        "tok/s"
    }
    /// Epochs of the training data seen after `step + 1` steps, when the task knows it.
    fn epoch_at(&self, _step: u64) -> Option<f64> {
        None
    }
}

/// Settings of the loop itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopConfig {
    /// Total optimiser steps.
    pub steps: u64,
    pub adamw: AdamWConfig,
    pub schedule: LrSchedule,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    pub log_every: u64,
    pub checkpoint_every: u64,
    /// Validation every this many steps (0: only at the end).
    pub eval_every: u64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            adamw: AdamWConfig::default(),
            schedule: LrSchedule::default(),
            grad_clip: 1.0,
            log_every: 10,
            checkpoint_every: 200,
            eval_every: 0,
        }
    }
}

impl LoopConfig {
    pub fn validate(&self) -> Result<()> {
        self.adamw.validate()?;
        if self.steps == 0 {
            return Err(TrainError::BadConfig("steps must be > 0".into()));
        }
        if self.log_every == 0 || self.checkpoint_every == 0 {
            return Err(TrainError::BadConfig("log_every and checkpoint_every must be > 0".into()));
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return Err(TrainError::BadConfig(format!("grad_clip must be finite and ≥ 0, got {}", self.grad_clip)));
        }
        let min_lr = self.schedule.min_lr;
        if !(min_lr >= 0.0 && min_lr <= self.adamw.lr) {
            return Err(TrainError::BadConfig(format!(
                "min_lr (--min-lr) must be between 0 and the learning rate {}, got {min_lr}",
                self.adamw.lr
            )));
        }
        Ok(())
    }
}

/// Summary of a finished run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// The run was resumed at or past its last step: nothing was trained or written.
    pub already_finished: bool,
    pub final_loss: f64,
    pub final_metrics: Vec<(String, f64)>,
    pub validation: Vec<(String, f64)>,
    pub seconds: f64,
    pub ms_per_step: f64,
    pub throughput: f64,
    pub out_dir: PathBuf,
}

/// Deterministic epoch-shuffled batches: batch `step` is a pure function of `(seed, step)`.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    n: usize,
    batch_size: usize,
    seed: u64,
    cached_epoch: Option<(u64, Vec<usize>)>,
}

impl BatchSampler {
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        Self { n, batch_size, seed, cached_epoch: None }
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached_epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            use rand::seq::SliceRandom;
            let mut order: Vec<usize> = (0..self.n).collect();
            order.shuffle(&mut crate::util::rng_for(self.seed, "epoch-order", epoch));
            self.cached_epoch = Some((epoch, order));
        }
        &self.cached_epoch.as_ref().expect("permutation cached just above").1
    }

    /// The dataset indices of batch `step`. Batches run through a fresh permutation each epoch
    /// and wrap around at its end.
    pub fn indices(&mut self, step: u64) -> Vec<usize> {
        let start = step as u128 * self.batch_size as u128;
        (0..self.batch_size as u128)
            .map(|i| {
                let global = start + i;
                let epoch = (global / self.n as u128) as u64;
                let pos = (global % self.n as u128) as usize;
                self.permutation(epoch)[pos]
            })
            .collect()
    }

    /// The epoch (fractional) reached after `step + 1` batches.
    pub fn epoch_at(&self, step: u64) -> f64 {
        (step + 1) as f64 * self.batch_size as f64 / self.n as f64
    }
}

/// Paths of a run folder.
pub struct RunPaths {
    pub checkpoint: PathBuf,
    pub model: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub loss_png: PathBuf,
    pub snapshots: PathBuf,
}

impl RunPaths {
    /// The weights saved at `step` (every `eval_every` steps).
    pub fn snapshot(&self, step: u64) -> PathBuf {
        self.snapshots.join(format!("model-step{step:07}.safetensors"))
    }

    /// Every snapshot of the run, sorted by step.
    pub fn list_snapshots(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.snapshots)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter_map(|p| {
                        let name = p.file_name()?.to_str()?.to_string();
                        let step = name.strip_prefix("model-step")?.strip_suffix(".safetensors")?.parse().ok()?;
                        Some((step, p))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn new(out_dir: &Path) -> Self {
        Self {
            checkpoint: out_dir.join("checkpoint.safetensors"),
            model: out_dir.join("model.safetensors"),
            config: out_dir.join("config.json"),
            log: out_dir.join("log.jsonl"),
            loss_png: out_dir.join("loss.png"),
            snapshots: out_dir.join("snapshots"),
        }
    }
}

/// Sanity bounds of a training step. A run past them is diverging (with `--lr 1e9` the weights
/// reach 1e16 while every number is still finite): it stops before it can overwrite the last
/// good checkpoint. Healthy runs are orders of magnitude inside them (cross-entropy ≤ ln V + a
/// few nats, gradient norms of order 1, weights of order 1).
const LOSS_BOUND: f64 = 1e4;
const GRAD_NORM_BOUND: f64 = 1e8;
const WEIGHT_BOUND: f64 = 1e6;

/// The largest |weight| of the task's parameters.
fn max_abs_weight(task: &dyn Task) -> Result<f64> {
    let mut max = 0f64;
    for (_, var) in task.params().vars() {
        let m = var.as_tensor().abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        max = if m.is_nan() { f64::NAN } else { max.max(m) };
    }
    Ok(max)
}

/// Running totals of a run that survive a resume: training wall time (step time only, without
/// validation and checkpoints) and training FLOPs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    seconds: f64,
    flops: f64,
}

fn save_checkpoint(task: &dyn Task, opt: &AdamW, step: u64, totals: Totals, paths: &RunPaths) -> Result<()> {
    let config = task.config_json();
    let config_text = serde_json::to_string_pretty(&config).unwrap_or_default();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "dpar-checkpoint-v1".to_string());
    meta.insert("step".to_string(), step.to_string());
    meta.insert("train_seconds".to_string(), totals.seconds.to_string());
    meta.insert("train_flops".to_string(), totals.flops.to_string());
    meta.insert("config".to_string(), config_text.clone());
    let mut tensors = task.params().named_tensors();
    let (adam, _) = opt.state();
    tensors.extend(adam);
    tensors.extend(task.extra_state().into_iter().map(|(k, v)| (format!("extra.{k}"), v)));
    crate::tensor_io::write_safetensors(&paths.checkpoint, &tensors, &meta)?;
    let mut model_meta = BTreeMap::new();
    model_meta.insert("format".to_string(), "dpar-weights-v1".to_string());
    model_meta.insert("step".to_string(), step.to_string());
    model_meta.insert("config".to_string(), config_text.clone());
    task.params().save(&paths.model, &model_meta)?;
    crate::util::write_atomic(&paths.config, config_text.as_bytes())?;
    Ok(())
}

fn load_checkpoint(task: &mut dyn Task, opt: &mut AdamW, paths: &RunPaths) -> Result<(u64, Totals, Option<String>)> {
    let file = crate::tensor_io::read_safetensors(&paths.checkpoint, task.params().device())?;
    let bad = |reason: String| TrainError::BadCheckpoint { path: paths.checkpoint.clone(), reason };
    let step: u64 = file.meta_parse("step")?;
    // Checkpoints written before the totals existed resume with totals counted from here.
    let totals = Totals {
        seconds: file.meta_parse("train_seconds").unwrap_or(0.0),
        flops: file.meta_parse("train_flops").unwrap_or(0.0),
    };
    let saved: serde_json::Value =
        serde_json::from_str(file.meta("config")?).map_err(|e| bad(format!("config metadata: {e}")))?;
    let current = task.config_json();
    if strip_resumable(&saved) != strip_resumable(&current) {
        return Err(bad(format!(
            "the checkpoint was made with a different config.\n  saved:   {}\n  current: {}",
            strip_resumable(&saved),
            strip_resumable(&current)
        )));
    }
    task.params().load_map(&file.tensors, &paths.checkpoint, false)?;
    opt.load_state(&file.tensors, step)?;
    let extra: HashMap<String, Tensor> =
        file.tensors.iter().filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone()))).collect();
    task.load_extra_state(&extra).map_err(|e| bad(e.to_string()))?;
    let pick = |c: &serde_json::Value| (c["train"]["adamw"]["lr"].clone(), c["train"]["schedule"].clone());
    if pick(&saved) != pick(&current) {
        let (old_lr, old_schedule) = pick(&saved);
        let (new_lr, new_schedule) = pick(&current);
        let change = format!("learning rate {old_lr} → {new_lr}, schedule {old_schedule} → {new_schedule}");
        tracing::warn!("resuming at step {step} with a changed {change}");
        return Ok((step, totals, Some(change)));
    }
    Ok((step, totals, None))
}

/// Settings that may change between an interrupted run and its resumption: the total number of
/// steps, the logging/checkpoint cadence, the learning rate and its schedule (to recover from a
/// divergence; the change is logged) and the kernel implementation (`model.ops`: the same
/// maths). Everything else must match.
fn strip_resumable(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    // Where the shards live may change (a moved folder, `--val-codes none`); what they hold is
    // checked against the tokenizer the config records.
    if let Some(top) = c.as_object_mut() {
        top.remove("codes");
        top.remove("val_codes");
    }
    if let Some(lp) = c.get_mut("train").and_then(|t| t.as_object_mut()) {
        for key in ["steps", "log_every", "checkpoint_every", "eval_every", "schedule"] {
            lp.remove(key);
        }
        if let Some(adamw) = lp.get_mut("adamw").and_then(|a| a.as_object_mut()) {
            adamw.remove("lr");
        }
    }
    if let Some(m) = c.get_mut("model").and_then(|t| t.as_object_mut()) {
        m.remove("ops");
    }
    c
}

/// Keeps only the log lines of steps ≤ `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::util::write_atomic(path, out.as_bytes())?;
    Ok(())
}

/// Runs (or resumes) training of `task` into `out_dir` in this process alone. `start` is a
/// [`Start`] or the `--resume` flag as a bool.
pub fn run(task: &mut dyn Task, config: &LoopConfig, out_dir: &Path, start: impl Into<Start>) -> Result<TrainReport> {
    run_parallel(task, config, out_dir, start, &crate::dist::Single, 1)
}

/// Computes one optimiser step's gradients over `accum` micro-batches per rank, averaged over
/// the ranks of `collective`: the global batch of the step is cut into world × accum equal
/// parts; this rank takes parts rank·accum … rank·accum + accum − 1. Returns the summed-and-
/// averaged gradients, the mean loss over the global batch, the last micro-batch's metrics and
/// this rank's processed tokens.
#[allow(clippy::type_complexity)]
fn parallel_gradients(
    task: &mut dyn Task,
    vars: &[candle_core::Var],
    step: u64,
    collective: &dyn crate::dist::Collective,
    accum: usize,
) -> Result<(candle_core::backprop::GradStore, f64, Vec<(String, f64)>, usize, f64)> {
    let parts = collective.world_size() * accum;
    // The step's gradients as one flat f32 tensor on the model's device (summed over the
    // micro-batches there), then averaged over the ranks where they live: in GPU memory under
    // NCCL, through a host buffer for threads and MPI.
    let device = vars.first().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let mut flat: Option<Tensor> = None;
    let mut loss_sum = 0f64;
    let mut metrics = Vec::new();
    let mut tokens = 0;
    let mut flops = 0.0;
    for m in 0..accum {
        let part = Part { index: collective.rank() * accum + m, count: parts };
        let out = task.part_loss(step, part).map_err(TrainError::Task)?;
        loss_sum += out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let grads = (out.loss / accum as f64)?.backward()?;
        let pieces = vars
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                Some(g) => g.to_dtype(candle_core::DType::F32)?.flatten_all(),
                None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, &device),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let this = Tensor::cat(&pieces, 0)?;
        flat = Some(match flat {
            Some(sum) => (sum + this)?,
            None => this,
        });
        metrics = out.metrics;
        tokens += out.tokens;
        flops += out.flops;
    }
    // The step's mean loss travels with the gradients (last value).
    let loss_value = Tensor::new(&[(loss_sum / accum as f64) as f32], &device)?;
    let flat = match flat {
        Some(g) => Tensor::cat(&[g, loss_value], 0)?,
        None => loss_value,
    };
    let flat = crate::dist::all_reduce_mean_tensor(collective, &flat)?;
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let loss = flat.narrow(0, total, 1)?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0];
    let mut store = candle_core::backprop::GradStore::default();
    let mut offset = 0;
    for var in vars {
        let n = var.elem_count();
        let g = flat.narrow(0, offset, n)?.reshape(var.shape())?.to_dtype(var.dtype())?;
        store.insert(var.as_tensor(), g);
        offset += n;
    }
    Ok((store, loss, metrics, tokens, flops))
}

/// Runs (or resumes) training as one rank of a data-parallel group: every rank computes the
/// gradients of its share of each global batch (over `accum` micro-batches), the gradients are
/// averaged over the ranks in buckets, clipped by their global norm and applied identically on
/// every rank. Rank 0 alone writes checkpoints, logs and pictures. With one rank and one
/// micro-batch this is the plain single-process loop.
pub fn run_parallel(
    task: &mut dyn Task,
    config: &LoopConfig,
    out_dir: &Path,
    start: impl Into<Start>,
    collective: &dyn crate::dist::Collective,
    accum: usize,
) -> Result<TrainReport> {
    let start_mode: Start = start.into();
    let resume = start_mode == Start::Resume;
    config.validate()?;
    if accum == 0 {
        return Err(TrainError::BadConfig("gradient accumulation needs at least one micro-batch".into()));
    }
    let leader = collective.rank() == 0;
    let fast_path = collective.world_size() == 1 && accum == 1;
    let dist_err = TrainError::Dist;
    // The leader owns the folder for the whole run: an exclusive lock, then the checks of what
    // the folder already holds (and removal of temporaries left by killed writes).
    let _lock = if leader {
        let lock = crate::rundir::RunLock::acquire(out_dir)?;
        crate::rundir::prepare(out_dir, &lock, start_mode)?;
        Some(lock)
    } else {
        None
    };
    let paths = RunPaths::new(out_dir);
    let vars = task.params().vars();
    let mut opt = AdamW::new(vars.clone(), config.adamw)?;
    let mut start = 0u64;
    let mut resumed_from = None;
    let mut totals = Totals::default();
    if resume {
        if paths.checkpoint.is_file() {
            let change;
            (start, totals, change) = load_checkpoint(task, &mut opt, &paths)?;
            resumed_from = Some(start);
            if start >= config.steps {
                // A finished run: its log, weights and checkpoint stay as they are.
                tracing::info!("{}: already at step {start} of {}; nothing to do", task.name(), config.steps);
                return Ok(TrainReport {
                    steps: start,
                    resumed_from,
                    already_finished: true,
                    final_loss: f64::NAN,
                    final_metrics: Vec::new(),
                    validation: Vec::new(),
                    seconds: 0.0,
                    ms_per_step: f64::NAN,
                    throughput: 0.0,
                    out_dir: out_dir.to_path_buf(),
                });
            }
            if leader {
                truncate_log(&paths.log, start)?;
                if let Some(change) = change {
                    crate::util::append_line(
                        &paths.log,
                        &serde_json::json!({ "step": start, "change": change }).to_string(),
                    )?;
                }
            }
            tracing::info!("resumed {} from step {start} ({})", task.name(), paths.checkpoint.display());
        } else {
            tracing::warn!("--resume: no checkpoint at {}, starting from scratch", paths.checkpoint.display());
            if leader {
                // Lines of an attempt that died before its first checkpoint.
                truncate_log(&paths.log, 0)?;
            }
        }
    }
    let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    if !fast_path && collective.world_size() > 1 {
        // Every rank starts from rank 0's parameters.
        for var in &var_list {
            let mut values = var.as_tensor().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            collective.broadcast(&mut values, 0).map_err(dist_err)?;
            var.set(&candle_core::Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
        }
        tracing::info!(
            "rank {} of {} ({} backend), {accum} micro-batch(es) per step",
            collective.rank(),
            collective.world_size(),
            collective.name()
        );
    }
    let params: usize = task.params().num_params();
    tracing::info!("{}: {params} parameters, steps {start}..{}", task.name(), config.steps);
    if leader {
        crate::util::write_atomic(
            &paths.config,
            serde_json::to_string_pretty(&task.config_json()).unwrap_or_default().as_bytes(),
        )?;
    }

    let bar =
        if leader { crate::util::progress_bar(config.steps, &task.name()) } else { indicatif::ProgressBar::hidden() };
    bar.set_position(start);
    let interactive = !bar.is_hidden();
    let t0 = Instant::now();
    let mut step_times = Vec::new();
    let mut total_tokens = 0usize;
    let mut last = (f64::NAN, Vec::new());
    let mut last_checkpoint_step = resumed_from;
    for step in start..config.steps {
        let ts = Instant::now();
        opt.set_lr(config.schedule.lr(config.adamw.lr, step, config.steps));
        let ckpt_msg = |last: Option<u64>| match last {
            Some(s) => format!("{} at step {s}", paths.checkpoint.display()),
            None => "none written yet".to_string(),
        };
        let (mut grads, loss, step_metrics, tokens, flops) = if fast_path {
            let out = task.step_loss(step).map_err(TrainError::Task)?;
            let loss = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !loss.is_finite() {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    step,
                    what: "the loss".into(),
                    value: loss,
                    checkpoint: ckpt_msg(last_checkpoint_step),
                });
            }
            (out.loss.backward()?, loss, out.metrics, out.tokens, out.flops)
        } else {
            parallel_gradients(task, &var_list, step, collective, accum)?
        };
        if !loss.is_finite() {
            bar.abandon();
            return Err(TrainError::NonFinite {
                step,
                what: "the loss".into(),
                value: loss,
                checkpoint: ckpt_msg(last_checkpoint_step),
            });
        }
        if loss > LOSS_BOUND {
            bar.abandon();
            return Err(TrainError::NonFinite {
                step,
                what: format!("the loss (bound {LOSS_BOUND:e})"),
                value: loss,
                checkpoint: ckpt_msg(last_checkpoint_step),
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, var_list.iter(), config.grad_clip)?;
        if !grad_norm.is_finite() || grad_norm > GRAD_NORM_BOUND {
            bar.abandon();
            return Err(TrainError::NonFinite {
                step,
                what: format!("the gradient norm (bound {GRAD_NORM_BOUND:e})"),
                value: grad_norm,
                checkpoint: ckpt_msg(last_checkpoint_step),
            });
        }
        opt.step(&grads)?;
        drop(grads);
        let mut metrics = step_metrics;
        metrics.extend(task.after_step(step).map_err(TrainError::Task)?);
        let dt = ts.elapsed().as_secs_f64();
        step_times.push(dt);
        total_tokens += tokens;
        // Every rank processes an equal part of the global batch.
        totals.seconds += dt;
        totals.flops += flops * collective.world_size() as f64;
        let done = step + 1;
        let throughput = tokens as f64 * collective.world_size() as f64 / dt;
        let eval_step = config.eval_every > 0 && done % config.eval_every == 0;
        if leader && (done % config.log_every == 0 || done == config.steps || done == start + 1 || eval_step) {
            let mut record = serde_json::Map::new();
            record.insert("step".into(), done.into());
            record.insert("loss".into(), loss.into());
            record.insert("grad_norm".into(), grad_norm.into());
            record.insert("lr".into(), opt.config().lr.into());
            record.insert("ms_per_step".into(), (dt * 1e3).into());
            record.insert("train_seconds".into(), totals.seconds.into());
            if totals.flops > 0.0 {
                record.insert("train_flops".into(), totals.flops.into());
            }
            record.insert(task.throughput_unit().into(), throughput.into());
            if let Some(e) = task.epoch_at(step) {
                record.insert("epoch".into(), e.into());
            }
            for (k, v) in &metrics {
                record.insert(k.clone(), (*v).into());
            }
            if eval_step && done != config.steps {
                for (k, v) in task.validate().map_err(TrainError::Task)? {
                    record.insert(format!("val_{k}"), v.into());
                }
            }
            crate::util::append_line(&paths.log, &serde_json::Value::Object(record).to_string())?;
            let extra: String = metrics.iter().take(3).map(|(k, v)| format!(" {k} {v:.4}")).collect();
            let msg = format!("loss {loss:.4}{extra} | {throughput:.0} {}", task.throughput_unit());
            if interactive {
                bar.set_message(msg);
            } else {
                // Logs that go to a file get what the bar shows: position, elapsed time and ETA.
                let elapsed = t0.elapsed().as_secs_f64();
                let eta = elapsed / (done - start) as f64 * (config.steps - done) as f64;
                tracing::info!(
                    "{} step {done}/{} ({:.1}%, {} elapsed, ETA {}): {msg}",
                    task.name(),
                    config.steps,
                    100.0 * done as f64 / config.steps as f64,
                    crate::util::human_duration(elapsed),
                    crate::util::human_duration(eta)
                );
            }
        }
        if leader && eval_step {
            // Weight snapshots at every evaluation step, for quality-vs-steps curves.
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "dpar-weights-v1".to_string());
            meta.insert("step".to_string(), done.to_string());
            meta.insert("config".to_string(), serde_json::to_string_pretty(&task.config_json()).unwrap_or_default());
            task.params().save(&paths.snapshot(done), &meta)?;
        }
        bar.set_position(done);
        if leader && (done % config.checkpoint_every == 0 || done == config.steps) {
            // Only sane weights may replace the last good checkpoint.
            let max_weight = max_abs_weight(task)?;
            if max_weight.is_nan() || max_weight > WEIGHT_BOUND {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    step: done,
                    what: format!("the largest |weight| (bound {WEIGHT_BOUND:e})"),
                    value: max_weight,
                    checkpoint: ckpt_msg(last_checkpoint_step),
                });
            }
            save_checkpoint(task, &opt, done, totals, &paths)?;
            last_checkpoint_step = Some(done);
        }
        last = (loss, metrics);
    }
    bar.finish_and_clear();
    let validation = if leader { task.validate().map_err(TrainError::Task)? } else { Vec::new() };
    if leader && !validation.is_empty() {
        let mut record = serde_json::Map::new();
        record.insert("step".into(), config.steps.into());
        record.insert("train_seconds".into(), totals.seconds.into());
        if let Some(e) = task.epoch_at(config.steps.saturating_sub(1)) {
            record.insert("epoch".into(), e.into());
        }
        if totals.flops > 0.0 {
            record.insert("train_flops".into(), totals.flops.into());
        }
        for (k, v) in &validation {
            record.insert(format!("val_{k}"), (*v).into());
        }
        record.insert("final".into(), true.into());
        crate::util::append_line(&paths.log, &serde_json::Value::Object(record).to_string())?;
    }
    if leader {
        if let Err(e) = crate::plot::loss_curve_from_log(&paths.log, &paths.loss_png, &task.name()) {
            tracing::warn!("could not draw {}: {e}", paths.loss_png.display());
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let ms_per_step = crate::util::median(&step_times) * 1e3;
    Ok(TrainReport {
        steps: config.steps,
        resumed_from,
        already_finished: false,
        final_loss: last.0,
        final_metrics: last.1,
        validation,
        seconds,
        ms_per_step,
        throughput: if seconds > 0.0 { total_tokens as f64 * collective.world_size() as f64 / seconds } else { 0.0 },
        out_dir: out_dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Init;
    use candle_core::Device;

    #[test]
    fn batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch() {
        let mut a = BatchSampler::new(10, 4, 3);
        let mut b = BatchSampler::new(10, 4, 3);
        let first: Vec<Vec<usize>> = (0..5).map(|s| a.indices(s)).collect();
        // b visits steps out of order: same answers.
        assert_eq!(b.indices(4), first[4]);
        assert_eq!(b.indices(0), first[0]);
        let mut epoch0: Vec<usize> = first.concat()[..10].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_ne!(first.concat()[..10], first.concat()[10..20]);
    }

    /// Linear regression y = 3x: a task small enough to test the loop's mechanics.
    struct Regression {
        store: ParamStore,
        w: Tensor,
        seed: u64,
        poison_at: Option<u64>,
        validates: bool,
    }

    impl Regression {
        fn new(seed: u64) -> Self {
            let store = ParamStore::new(seed, &Device::Cpu);
            let w = store.root().get((1, 1), "w", Init::Normal(0.5)).unwrap();
            Self { store, w, seed, poison_at: None, validates: false }
        }
    }

    impl Task for Regression {
        fn params(&self) -> &ParamStore {
            &self.store
        }
        fn step_loss(&mut self, step: u64) -> std::result::Result<StepOutput, TaskError> {
            use rand::Rng;
            let mut rng = crate::util::rng_for(self.seed, "x", step);
            let xs: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(xs, (8, 1), &Device::Cpu)?;
            let target = (&x * 3.0).map_err(|e| e.to_string())?;
            let mut loss =
                x.matmul(&self.w).and_then(|p| (p - target)?.sqr()?.mean_all()).map_err(|e| e.to_string())?;
            if self.poison_at == Some(step) {
                loss = (loss * f64::NAN).map_err(|e| e.to_string())?;
            }
            Ok(StepOutput { loss, metrics: vec![], tokens: 8, flops: 0.0 })
        }
        fn validate(&mut self) -> std::result::Result<Vec<(String, f64)>, TaskError> {
            Ok(if self.validates { vec![("w".into(), w_of(self) as f64)] } else { Vec::new() })
        }
        fn config_json(&self) -> serde_json::Value {
            serde_json::json!({"task": "regression", "seed": self.seed, "train": {"steps": 0}})
        }
        fn name(&self) -> String {
            "regression".into()
        }
    }

    fn w_of(task: &Regression) -> f32 {
        task.store.var("w").unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    fn loop_config(steps: u64) -> LoopConfig {
        LoopConfig {
            steps,
            adamw: AdamWConfig { lr: 0.3, ..Default::default() },
            checkpoint_every: 5,
            log_every: 1,
            ..Default::default()
        }
    }

    #[test]
    fn loss_falls_and_resume_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let mut full = Regression::new(1);
        let report = run(&mut full, &loop_config(20), &dir.path().join("full"), false).unwrap();
        assert!(report.final_loss < 0.5, "loss {}", report.final_loss);

        let mut first = Regression::new(1);
        run(&mut first, &loop_config(10), &dir.path().join("split"), false).unwrap();
        let mut second = Regression::new(1); // fresh process: different object, same seed
        let report = run(&mut second, &loop_config(20), &dir.path().join("split"), true).unwrap();
        assert_eq!(report.resumed_from, Some(10));
        assert_eq!(w_of(&full).to_bits(), w_of(&second).to_bits());
        let log = std::fs::read_to_string(dir.path().join("split/log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 20);
        // The running wall-clock continues across the resume instead of restarting at 0.
        let seconds: Vec<f64> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_seconds"].as_f64().unwrap())
            .collect();
        assert!(seconds.windows(2).all(|w| w[1] >= w[0]) && seconds[10] > 0.0, "{seconds:?}");
        assert!(dir.path().join("split/loss.png").is_file());
    }

    #[test]
    fn validation_and_snapshots_happen_at_every_eval_step_whatever_the_log_cadence() {
        let dir = tempfile::tempdir().unwrap();
        let mut task = Regression::new(5);
        task.validates = true;
        let config = LoopConfig { log_every: 4, eval_every: 3, ..loop_config(10) };
        run(&mut task, &config, dir.path(), false).unwrap();
        let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
        let validated: Vec<u64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("val_w").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        // Steps 3, 6 and 9 (none of them a multiple of 4), then the final validation at 10.
        assert_eq!(validated, vec![3, 6, 9, 10]);
        let snapshots: Vec<u64> = RunPaths::new(dir.path()).list_snapshots().into_iter().map(|(s, _)| s).collect();
        assert_eq!(snapshots, vec![3, 6, 9]);
        // Every logged line carries the running totals.
        assert!(log.lines().all(|l| l.contains("train_seconds")), "{log}");
    }

    #[test]
    fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut task = Regression::new(2);
        task.poison_at = Some(7);
        let err = run(&mut task, &loop_config(20), dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("step 7: the loss is NaN"), "{err}");
        assert!(err.contains("at step 5"), "{err}");
        let file =
            crate::tensor_io::read_safetensors(&dir.path().join("checkpoint.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(file.meta_parse::<u64>("step").unwrap(), 5);
    }

    #[test]
    fn resuming_with_a_different_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut task = Regression::new(3);
        run(&mut task, &loop_config(5), dir.path(), false).unwrap();
        let mut other = Regression::new(4);
        let err = run(&mut other, &loop_config(10), dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("different config"), "{err}");
    }
}
