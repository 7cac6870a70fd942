//! Flags and helpers shared by several commands.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

/// `--allow-mismatch` (a global flag): mismatched parts are warnings, not errors.
pub static ALLOW_MISMATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn allow_mismatch() -> bool {
    ALLOW_MISMATCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the images come from.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset folder: IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-…`) or class sub-folders
    /// of PNG/JPEG images (optionally under `train/` and `test/`).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Explicit IDX image file (overrides --data; needs --labels).
    #[arg(long, requires = "labels")]
    pub images: Option<PathBuf>,
    /// Explicit IDX label file.
    #[arg(long, requires = "images")]
    pub labels: Option<PathBuf>,
    /// Class names of an IDX dataset, in label order (`--class-names 'T-shirt,Trouser,…'`):
    /// labels must lie below their count. Default: the label values `0`, `1`, …, which must cover
    /// 0..=max without a gap. Class folders are named by their folders.
    #[arg(long, value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
}

impl DataArgs {
    /// Loads `split` (its first `max_images` images when given), prepared to `size × size ×
    /// channels`.
    pub fn load(
        &self,
        split: &str,
        size: usize,
        channels: usize,
        max_images: Option<usize>,
    ) -> Result<dpar::data::ImageDataset> {
        let source = match (&self.images, &self.labels) {
            (Some(images), Some(labels)) => {
                dpar::data::DataSource::Idx { images: images.clone(), labels: labels.clone() }
            }
            _ => dpar::data::resolve(&self.data, split)?,
        };
        let t = std::time::Instant::now();
        let data = match (&source, &self.class_names) {
            (_, None) => dpar::data::load_limited(&source, size, channels, max_images),
            (dpar::data::DataSource::Idx { images, labels }, Some(names)) => {
                dpar::data::idx::load_idx_with_classes(images, labels, Some(names))
                    .map(|d| match max_images {
                        Some(n) => d.take(n),
                        None => d,
                    })
                    .and_then(|d| d.prepare(size, channels))
            }
            (dpar::data::DataSource::Folder { root }, Some(_)) => {
                bail!(
                    "--class-names: {} is a folder of class sub-folders, which name the classes themselves",
                    root.display()
                )
            }
        }
        .with_context(|| format!("loading the {split} split"))?;
        tracing::info!(
            "loaded {} {split} images ({} classes) from {} in {:.1}s",
            data.len(),
            data.num_classes(),
            data.source,
            t.elapsed().as_secs_f64()
        );
        Ok(data)
    }
}

/// A count flag that must be at least 1 (a clap value parser: the error names the flag).
pub fn positive_usize(value: &str) -> std::result::Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// [`positive_usize`] for u64 flags (step counts).
pub fn positive_u64(value: &str) -> std::result::Result<u64, String> {
    positive_usize(value).map(|v| v as u64)
}

/// A rate that must be finite and > 0 (learning rates).
pub fn positive_f64(value: &str) -> std::result::Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number > 0")),
        Err(e) => Err(e.to_string()),
    }
}

/// A model path flag: paths under `models/` are found from any working directory
/// ([`dpar::home::locate`]); other paths are taken as given.
pub fn model_path(value: &str) -> std::result::Result<PathBuf, String> {
    dpar::home::locate(std::path::Path::new(value)).map_err(|e| e.to_string())
}

/// How a training command treats its run folder (`--resume`, `--overwrite`, neither).
pub fn start(resume: bool, overwrite: bool) -> dpar::train::Start {
    match (resume, overwrite) {
        (true, _) => dpar::train::Start::Resume,
        (false, true) => dpar::train::Start::Overwrite,
        (false, false) => dpar::train::Start::Fresh,
    }
}

/// The compute device.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda` / `cuda:N` in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<candle_core::Device> {
        match self.device.as_str() {
            "cpu" => Ok(candle_core::Device::Cpu),
            d if d == "cuda" || d.starts_with("cuda:") => {
                // Plain `cuda` under a multi-process launcher: one GPU per process, by local rank.
                let default =
                    dpar::dist::launcher_rank().map(|(_, _, local)| local.to_string()).unwrap_or_else(|| "0".into());
                let ordinal: usize =
                    d.strip_prefix("cuda:").unwrap_or(&default).parse().context("--device cuda:N needs a number")?;
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device {d}: this binary was built without CUDA (rebuild with `--features cuda`)");
                }
                candle_core::Device::new_cuda(ordinal).map_err(|e| {
                    // candle's message may carry a backtrace; its first line is the driver's error.
                    let e = e.to_string();
                    anyhow::anyhow!(
                        "--device {d}: cannot open GPU {ordinal}: {}. Is this a machine with an NVIDIA GPU and driver (`nvidia-smi` lists them)?",
                        e.lines().next().unwrap_or("unknown error")
                    )
                })
            }
            other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        }
    }
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Print a summary of a dataset split: count, size, classes.
    Info {
        #[command(flatten)]
        data: DataArgs,
        /// Split to describe: `train` or `test`.
        #[arg(long, default_value = "train")]
        split: String,
    },
}

pub fn run_data(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Info { data, split } => {
            let source = match (&data.images, &data.labels) {
                (Some(i), Some(l)) => dpar::data::DataSource::Idx { images: i.clone(), labels: l.clone() },
                _ => dpar::data::resolve(&data.data, &split)?,
            };
            let set = match &source {
                dpar::data::DataSource::Idx { images, labels } => {
                    dpar::data::idx::load_idx_with_classes(images, labels, data.class_names.as_deref())?
                }
                dpar::data::DataSource::Folder { root } => dpar::data::folder::load_image_folder(root, 64, 3)?,
            };
            let mut counts = vec![0usize; set.num_classes()];
            for &y in &set.labels {
                counts[y as usize] += 1;
            }
            let kind = match set.channels {
                1 => "grey".to_string(),
                3 => "RGB".to_string(),
                n => format!("{n}-channel"),
            };
            println!("{split} split: {} images, {}×{} {kind}", set.len(), set.width, set.height);
            println!("from {source}");
            println!("{} classes (name: images):", set.num_classes());
            let width = set.class_names.iter().map(|n| n.chars().count()).max().unwrap_or(1).min(24);
            for (name, n) in set.class_names.iter().zip(&counts) {
                println!("  {name:>width$}: {n}");
            }
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct PlotLogsArgs {
    /// Run folders or log.jsonl files, each as NAME=PATH or PATH.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// The metric to plot (a key of the log lines, e.g. loss or val_loss).
    #[arg(long, default_value = "loss")]
    pub metric: String,
    /// The x axis: step, train_seconds (training wall-clock), train_flops or epoch.
    #[arg(long, default_value = "step")]
    pub x: String,
    /// Where the PNG goes.
    #[arg(long, default_value = "out/losses.png")]
    pub out: PathBuf,
    /// Linear y axis (default: log scale).
    #[arg(long)]
    pub linear: bool,
}

fn name_and_path(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => (spec.to_string(), PathBuf::from(spec)),
    }
}

pub fn plot_logs(args: PlotLogsArgs) -> Result<()> {
    let mut series = Vec::new();
    for spec in &args.runs {
        let (name, path) = name_and_path(spec);
        let log = dpar::runs::read_log(&path)?;
        let mut points = dpar::runs::curve(&log, &args.x, &args.metric);
        if args.x == "train_flops" {
            points.iter_mut().for_each(|p| p.0 /= 1e15);
        } else if args.x == "train_seconds" {
            points.iter_mut().for_each(|p| p.0 /= 60.0);
        }
        if points.is_empty() {
            bail!("{}: no lines with both `{}` and `{}`", path.display(), args.x, args.metric);
        }
        series.push(dpar::plot::Series { name, points });
    }
    let x_label = match args.x.as_str() {
        "train_flops" => "training PFLOP".to_string(),
        "train_seconds" => "training wall-clock (minutes)".to_string(),
        other => other.to_string(),
    };
    dpar::plot::line_plot(
        &args.out,
        &format!("{} vs {x_label}", args.metric),
        &x_label,
        &args.metric,
        &series,
        !args.linear,
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct PlotParetoArgs {
    /// A folder of variant folders, each with q-*/eval.json (`dpar eval samples --json`) and
    /// speed-*.json (`dpar bench speed --sampling-curve … --json`), one `baseline` among them
    /// (`scripts/pareto` fills it).
    pub dir: PathBuf,
    /// Batch sizes to draw, one panel each (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub batches: Vec<usize>,
    /// Where the PNG goes.
    #[arg(long, default_value = "out/pareto.png")]
    pub out: PathBuf,
    /// Also write the gathered numbers as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `dpar plot-pareto`: the speed–quality table and picture of the patchers (design §9).
pub fn plot_pareto(args: PlotParetoArgs) -> Result<()> {
    use dpar::experiments::pareto;
    if args.batches.is_empty() || args.batches.contains(&0) {
        bail!("--batches: give positive batch sizes, e.g. 1,100");
    }
    let variants = pareto::gather(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?;
    print!("{}", pareto::table(&variants, &args.batches));
    pareto::plot(&variants, &args.batches, &args.out)?;
    println!("wrote {}", args.out.display());
    if let Some(j) = &args.json {
        dpar::util::write_atomic(j, serde_json::to_string_pretty(&variants)?.as_bytes())?;
        println!("wrote {}", j.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SummarizeArgs {
    /// Run folders, each as NAME=PATH or PATH.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Also write the summaries as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Prints a markdown table of runs: shape, budget, cost and final validation loss.
pub fn summarize(args: SummarizeArgs) -> Result<()> {
    println!("{}", dpar::runs::RunSummary::markdown_header());
    let mut all = Vec::new();
    for spec in &args.runs {
        let (name, path) = name_and_path(spec);
        let s = dpar::runs::RunSummary::read(&path)?;
        println!("{}", s.markdown_row(&name));
        all.push(serde_json::json!({ "name": name, "summary": s }));
    }
    if let Some(path) = &args.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A weight file (or run folder with model.safetensors) written by dpar.
    #[arg(long)]
    pub from: PathBuf,
    /// Output weight file.
    #[arg(long)]
    pub to: PathBuf,
    /// Storage type: f32, f16 or bf16 (loading converts back to f32).
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

/// Copies weights with their metadata (config) in another storage type, e.g. to ship small files.
pub fn export(args: ExportArgs) -> Result<()> {
    let file = if args.from.is_dir() { args.from.join("model.safetensors") } else { args.from.clone() };
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    let loaded = dpar::tensor_io::read_safetensors(&file, &candle_core::Device::Cpu)?;
    let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::with_capacity(loaded.tensors.len());
    // The largest finite value of the target type: anything beyond would become ±inf.
    let max = match dtype {
        candle_core::DType::F16 => 65504.0,
        candle_core::DType::BF16 => 3.3895e38,
        _ => f64::from(f32::MAX),
    };
    for (name, t) in loaded.tensors {
        let t = if t.dtype().is_float() {
            let largest = t.to_dtype(candle_core::DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            if !largest.is_finite() || largest > max {
                bail!("{}: tensor {name} holds {largest:e}, which {} cannot store (largest {max:e}); keep f32 or use bf16", file.display(), args.dtype);
            }
            t.to_dtype(dtype)?
        } else {
            t
        };
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: std::collections::BTreeMap<String, String> = loaded.metadata.into_iter().collect();
    dpar::tensor_io::write_safetensors(&args.to, &tensors, &meta)
        .with_context(|| format!("--to {}", args.to.display()))?;
    let size = std::fs::metadata(&args.to).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({} tensors as {}, {:.1} MB)", args.to.display(), tensors.len(), args.dtype, size as f64 / 1e6);
    if let Some(parent) = args.to.parent() {
        if let Ok(config) = std::fs::read_to_string(file.with_file_name("config.json")) {
            dpar::util::write_atomic(&parent.join("config.json"), config.as_bytes())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- training flags

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum ModelKind {
    /// The LlamaGen baseline (class-conditional GPT).
    Gpt,
    /// The unconditional GPT that supplies DPAR's entropies (`dpar entropy train` is the
    /// command for it).
    #[value(hide = true)]
    Entropy,
    /// DPAR: patch encoder, patch transformer, patch decoder (needs stored entropies).
    Dpar,
}

/// `dpar train`: the baseline or DPAR.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(long, value_enum, default_value = "gpt")]
    pub model: ModelKind,
    /// Architecture preset: mnist (the default; it also sets the shipped models' training
    /// recipe), gpt-b, gpt-l, gpt-xl, gpt-xxl, bench for the baseline; mnist, dpar-b, dpar-l,
    /// dpar-xl, dpar-xxl (and splits such as dpar-l-e2d3) for DPAR. The paper's sizes train with
    /// the paper's recipe (lr 1e-4, constant).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// Depth (overrides the preset): `N` blocks for the baseline, `E+G+D` (encoder + patch
    /// transformer + decoder blocks, e.g. `1+4+1`) for DPAR.
    #[arg(long)]
    pub layers: Option<String>,
    /// Probability of replacing the class by the null class (for guidance) [default: the preset's, 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub class_dropout: Option<f64>,
    #[command(flatten)]
    pub run: RunArgs,
    /// DPAR: patcher switches (θ, P, rules) for training.
    #[command(flatten)]
    pub patch: PatchArgs,
    /// DPAR: find θ by bisection on the training entropies so that the mean patch length is
    /// this (used when --threshold is not given; the paper's 256 px figure is 1.81).
    #[arg(long, default_value_t = dpar::recipe::DEFAULT_TARGET_MEAN_LEN, allow_negative_numbers = true)]
    pub target_mean_len: f64,
    /// DPAR: position encoding of the patch transformer (paper Table 9).
    #[arg(long, value_enum)]
    pub patch_rope: Option<PatchRopeArg>,
}

/// `dpar entropy train`: the unconditional entropy model.
#[derive(Args, Debug)]
pub struct EntropyTrainArgs {
    /// Architecture preset: mnist-entropy (the default: 4 layers, width 128; it also sets the
    /// shipped entropy model's training recipe), or gpt-b, gpt-l, gpt-xl, gpt-xxl without their
    /// class slot (trained with the paper's recipe: lr 1e-4, constant).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// Depth: the number of blocks (overrides the preset).
    #[arg(long)]
    pub layers: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The flags every training command shares: data, run folder, budget, optimiser, shape,
/// kernels and ranks.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// A full experiment config (JSON or TOML, e.g. a run's config.json); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training code shards (folder or file) [default: the config's `codes` with --config or
    /// --resume, else data/codes/train].
    #[arg(long)]
    pub codes: Option<PathBuf>,
    /// Validation code shards (`none` trains without validation) [default: the config's
    /// `val_codes` with --config or --resume, else the `test` folder beside a --codes folder
    /// named `train`, if it exists].
    #[arg(long)]
    pub val_codes: Option<String>,
    /// Run folder [default: runs/gpt, runs/entropy or runs/dpar, in the working directory].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimiser steps [default: the preset's recipe: mnist 3 epochs (11,250 steps on MNIST),
    /// mnist-entropy 2400; other presets 2000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step [default: the preset's recipe: mnist 16, mnist-entropy 32; other presets 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate of AdamW [default: the preset's recipe: mnist 2e-3, mnist-entropy 1e-3;
    /// other presets the paper's 1e-4].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// AdamW weight decay on ≥ 2-D weights [default: 0.05].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Linear warm-up steps [default: the preset's recipe: mnist 2% of the steps, mnist-entropy
    /// 100; other presets 0].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Learning-rate schedule after the warm-up: `constant`, or `cosine` decay to --min-lr
    /// [default: the preset's recipe: cosine for mnist and mnist-entropy; constant, as in the
    /// paper, for the other presets].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// The same as `--schedule cosine` (kept for earlier scripts).
    #[arg(long, hide = true, conflicts_with = "schedule")]
    pub cosine: bool,
    /// The learning rate the cosine decay ends at (0 ≤ min-lr ≤ lr; default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr: Option<f64>,
    /// Clip the global gradient norm to this (0 turns clipping off) [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    pub grad_clip: Option<f64>,
    /// The seed every random choice flows from (initial weights, batches, dropout) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model width (overrides the preset; a multiple of --heads, head dim divisible by 16 for DPAR).
    #[arg(long)]
    pub dim: Option<usize>,
    /// Attention heads (overrides the preset).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Sets token, residual and FFN dropout together [default: the preset's].
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f64>,
    /// Train on the horizontally flipped copy of each image half of the time (the shards must be
    /// tokenized with `--flip`). Right for photos of natural scenes; wrong for digits, letters
    /// and anything else with a handedness, which is why it is off by default.
    #[arg(long)]
    pub flip: bool,
    /// Save the checkpoint every N steps [default: the preset's recipe: 100 for mnist and
    /// mnist-entropy; 250 otherwise].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Log a line to log.jsonl every N steps [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Validate and keep a weight snapshot every N steps (0: only at the end) [default: the
    /// preset's recipe: a tenth of the steps for mnist, 400 for mnist-entropy; 0 otherwise].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation images (from --val-codes) [default: 1000].
    #[arg(long)]
    pub val_images: Option<usize>,
    /// Continue from the run folder's checkpoint (its config.json is the default config).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Delete the run already in --out (checkpoint, log, snapshots) and start over. Without
    /// --resume or --overwrite, a folder that holds a run is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Kernels: `fused` (our CPU kernels, default), `bf16` (fused with bf16 matmul operands and
    /// f32 accumulation) or `stock` (candle's composed ops, the reference).
    #[arg(long, value_enum)]
    pub ops: Option<OpsArg>,
    /// Arithmetic of the training forward: `f32`, or `bf16`: on a GPU (and with `--ops stock`
    /// on the CPU) bf16 activations and matmuls with f32 master weights and optimiser state
    /// (f32 softmax, norms and loss); with the CPU's fused kernels, their bf16 GEMM operands
    /// (the same as `--ops bf16`). Checkpoints hold f32 weights either way.
    #[arg(long, value_enum)]
    pub dtype: Option<PrecisionArg>,
    /// Data parallelism in this process: N ranks as threads, each with a 1/N share of every
    /// batch. Under `mpirun` (a build with `--features mpi`) the ranks are MPI processes instead.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation): each rank splits its share of
    /// the batch into this many parts.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Seconds a rank waits for its peers before giving up (threads backend; NCCL id exchange).
    #[arg(long, default_value_t = 600)]
    pub rank_timeout: u64,
    /// NCCL (`--features nccl`, `--device cuda`, one process per GPU): the file through which
    /// rank 0 hands the NCCL id to the others; it must be visible to every rank (default:
    /// `<out>/.nccl-id`, so a shared run folder).
    #[arg(long)]
    pub nccl_id_file: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum OpsArg {
    Fused,
    Bf16,
    Stock,
}

impl From<OpsArg> for dpar::nn::Ops {
    fn from(a: OpsArg) -> Self {
        match a {
            OpsArg::Fused => Self::Fused,
            OpsArg::Bf16 => Self::Bf16,
            OpsArg::Stock => Self::Stock,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for dpar::nn::Precision {
    fn from(a: PrecisionArg) -> Self {
        match a {
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum PatchRopeArg {
    Dynamic4d,
    Dynamic2d,
    Plain2d,
}

impl From<PatchRopeArg> for dpar::nn::rope::PatchRope {
    fn from(a: PatchRopeArg) -> Self {
        match a {
            PatchRopeArg::Dynamic4d => Self::Dynamic4d,
            PatchRopeArg::Dynamic2d => Self::Dynamic2d,
            PatchRopeArg::Plain2d => Self::Plain2d,
        }
    }
}

impl From<ModelKind> for dpar::recipe::ModelKind {
    fn from(k: ModelKind) -> Self {
        match k {
            ModelKind::Gpt => Self::Gpt,
            ModelKind::Entropy => Self::Entropy,
            ModelKind::Dpar => Self::Dpar,
        }
    }
}

impl RunArgs {
    /// The library's description of a run of `kind` with these flags; `overrides` holds the
    /// model-specific ones already.
    fn request(
        &self,
        kind: dpar::recipe::ModelKind,
        preset: Option<String>,
        mut overrides: dpar::recipe::Overrides,
    ) -> dpar::recipe::TrainRequest {
        overrides.steps = self.steps;
        overrides.batch_size = self.batch_size;
        overrides.lr = self.lr;
        overrides.weight_decay = self.weight_decay;
        overrides.warmup = self.warmup;
        overrides.cosine = match (self.schedule, self.cosine) {
            (Some(s), _) => Some(s == ScheduleArg::Cosine),
            (None, true) => Some(true),
            (None, false) => None,
        };
        overrides.min_lr = self.min_lr;
        overrides.grad_clip = self.grad_clip;
        overrides.seed = self.seed;
        overrides.dim = self.dim;
        overrides.heads = self.heads;
        overrides.dropout = self.dropout;
        overrides.flip = self.flip;
        overrides.checkpoint_every = self.checkpoint_every;
        overrides.log_every = self.log_every;
        overrides.eval_every = self.eval_every;
        overrides.val_images = self.val_images;
        overrides.ops = self.ops.map(Into::into);
        overrides.precision = self.dtype.map(Into::into);
        dpar::recipe::TrainRequest {
            kind,
            preset,
            config: self.config.clone(),
            codes: self.codes.clone(),
            val_codes: self.val_codes.clone(),
            out: self.out.clone(),
            overrides,
            start: start(self.resume, self.overwrite),
            launch: dpar::recipe::Launch {
                world_size: self.world_size,
                grad_accum: self.grad_accum,
                rank_timeout: std::time::Duration::from_secs(self.rank_timeout),
                nccl_id_file: self.nccl_id_file.clone(),
            },
            allow_mismatch: allow_mismatch(),
        }
    }
}

impl TrainArgs {
    /// The library's description of the run these flags ask for.
    pub fn request(&self) -> dpar::recipe::TrainRequest {
        let overrides = dpar::recipe::Overrides {
            layers: self.layers.clone(),
            class_dropout: self.class_dropout,
            patch: self.patch.overrides(),
            target_mean_len: Some(self.target_mean_len),
            patch_rope: self.patch_rope.map(Into::into),
            ..Default::default()
        };
        self.run.request(self.model.into(), self.preset.clone(), overrides)
    }
}

impl EntropyTrainArgs {
    /// The library's description of the run these flags ask for.
    pub fn request(&self) -> dpar::recipe::TrainRequest {
        let overrides = dpar::recipe::Overrides { layers: self.layers.clone(), ..Default::default() };
        self.run.request(dpar::recipe::ModelKind::Entropy, self.preset.clone(), overrides)
    }
}

/// Patcher switches (θ, P, rules), shared by training, sampling and `dpar patchify`.
#[derive(Args, Debug, Clone, Default)]
pub struct PatchArgs {
    /// Entropy threshold θ (natural log).
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Maximum patch length P.
    #[arg(long)]
    pub max_patch_len: Option<usize>,
    /// Disable the entropy gate.
    #[arg(long)]
    pub no_entropy_gate: bool,
    /// Disable the maximum patch length.
    #[arg(long)]
    pub no_max_len: bool,
    /// Disable row resets.
    #[arg(long)]
    pub no_row_reset: bool,
    /// Static patches: fixed length P with row resets, no entropy.
    #[arg(long = "static")]
    pub static_patches: bool,
}

impl PatchArgs {
    pub fn overrides(&self) -> dpar::recipe::PatchOverrides {
        dpar::recipe::PatchOverrides {
            threshold: self.threshold,
            max_patch_len: self.max_patch_len,
            no_entropy_gate: self.no_entropy_gate,
            no_max_len: self.no_max_len,
            no_row_reset: self.no_row_reset,
            static_patches: self.static_patches,
        }
    }

    /// Applies the flags on top of `base`.
    pub fn apply(&self, base: dpar::patching::PatchConfig) -> dpar::patching::PatchConfig {
        self.overrides().apply(base)
    }
}

/// The θ a sampling command takes from the model's stored sampling thresholds: with
/// `--sampling-threshold` the chosen patcher's (an error when none is stored), and for
/// `--patcher self` without --threshold the self-entropy one (an error when none is stored:
/// the training θ is on the entropy model's scale, not the decoder's). `None`: keep the θ the
/// flags and the model give.
pub fn stored_threshold(
    model: &std::path::Path,
    patcher: dpar::patching::EntropyFrom,
    given: Option<f64>,
    sampling_threshold: bool,
) -> Result<Option<f64>> {
    use dpar::patching::{EntropyFrom, SamplingThresholds};
    if given.is_some() || !(sampling_threshold || patcher == EntropyFrom::Decoder) {
        return Ok(None);
    }
    let stored = SamplingThresholds::read(model)?;
    match stored.get(patcher) {
        Some(c) => {
            tracing::info!(
                "θ = {:.4} for the {} patcher, calibrated on {} sampled images to mean patch length {} ({})",
                c.threshold,
                patcher.name(),
                c.images,
                c.target_mean_len,
                SamplingThresholds::path(model).display()
            );
            Ok(Some(c.threshold))
        }
        None => bail!(
            "{}: no θ stored for the {} patcher; give --threshold, or calibrate and store one with `dpar patchify --on-samples {} --patcher {} --target-mean-len 1.8 --store`",
            SamplingThresholds::path(model).display(),
            patcher.name(),
            model.display(),
            patcher.name()
        ),
    }
}
