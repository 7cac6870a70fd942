//! `dpar train --model gpt …` (and `dpar entropy train`): the shared training loop on code shards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;

use crate::common::DeviceArgs;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum ModelKind {
    /// The LlamaGen baseline (class-conditional GPT).
    Gpt,
    /// The unconditional GPT that supplies DPAR's entropies.
    Entropy,
    /// DPAR: patch encoder, patch transformer, patch decoder (needs stored entropies).
    Dpar,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(long, value_enum, default_value = "gpt")]
    pub model: ModelKind,
    /// Architecture preset (gpt-b, gpt-l, gpt-xl, gpt-xxl, mnist, mnist-entropy, bench).
    #[arg(long)]
    pub preset: Option<String>,
    /// A full experiment config (JSON or TOML, e.g. a run's config.json); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training code shards (folder or file).
    #[arg(long, default_value = "data/codes/train")]
    pub codes: PathBuf,
    /// Validation code shards (`none` trains without validation). Default: the `test` folder
    /// beside a --codes folder named `train` (data/codes/train → data/codes/test), if it exists.
    #[arg(long)]
    pub val_codes: Option<String>,
    /// Run folder [default: runs/gpt, runs/entropy or runs/dpar].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimiser steps [default: 2000; entropy model 2400].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step [default: 16; entropy model 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate of AdamW [default: 1e-4, the paper's; entropy model 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay on ≥ 2-D weights [default: 0.05].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warm-up steps [default: 0; entropy model 100].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Cosine decay to --min-lr after warm-up (default: constant, as in the paper; the entropy
    /// model decays by default).
    #[arg(long)]
    pub cosine: bool,
    /// The learning rate the cosine decay ends at (0 ≤ min-lr ≤ lr; default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr: Option<f64>,
    /// Clip the global gradient norm to this [default: 1.0].
    #[arg(long)]
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
    /// Depth (overrides the preset): `N` blocks for a GPT, `E+G+D` (encoder + patch transformer +
    /// decoder blocks, e.g. `1+4+1`) for DPAR.
    #[arg(long)]
    pub layers: Option<String>,
    /// Sets token, residual and FFN dropout together.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Probability of replacing the class by the null class (for guidance) [default: the preset's, 0.1].
    #[arg(long)]
    pub class_dropout: Option<f64>,
    /// Train on the horizontally flipped copy of each image half of the time (the shards must be
    /// tokenized with `--flip`). Right for photos of natural scenes; wrong for digits, letters
    /// and anything else with a handedness, which is why it is off by default.
    #[arg(long)]
    pub flip: bool,
    /// Save the checkpoint every N steps [default: 250].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Log a line to log.jsonl every N steps [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Validate and keep a weight snapshot every N steps (0: only at the end) [default: 0; entropy model 400].
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
    /// DPAR: patcher switches (θ, P, rules) for training.
    #[command(flatten)]
    pub patch: crate::patch_cmd::PatchArgs,
    /// DPAR: find θ by bisection on the training entropies so that the mean patch length is
    /// this (used when --threshold is not given; the paper's 256 px figure is 1.81).
    #[arg(long, default_value_t = 1.8)]
    pub target_mean_len: f64,
    /// DPAR: position encoding of the patch transformer (paper Table 9).
    #[arg(long, value_enum)]
    pub patch_rope: Option<PatchRopeArg>,
    /// Kernels: `fused` (our CPU kernels, default), `bf16` (fused with bf16 matmul operands and
    /// f32 accumulation) or `stock` (candle's composed ops, the reference).
    #[arg(long, value_enum)]
    pub ops: Option<OpsArg>,
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

/// `--ops bf16` on a CPU without AVX512-BF16 runs the f32 kernels; say so instead of silently
/// rounding operands for no gain.
fn check_ops(ops: &mut dpar::nn::Ops) {
    if *ops == dpar::nn::Ops::Bf16 && !dpar::kernels::bf16::available() {
        eprintln!("note: this CPU has no AVX512-BF16; --ops bf16 falls back to the f32 kernels (--ops fused)");
        *ops = dpar::nn::Ops::Fused;
    }
}

/// Adds to a divergence error the command that continues from the last good checkpoint with a
/// tenth of the learning rate.
fn recovery_hint(err: anyhow::Error, kind: ModelKind, out: &Path, lr: f64) -> anyhow::Error {
    let diverged =
        matches!(err.downcast_ref::<dpar::train::TrainError>(), Some(dpar::train::TrainError::NonFinite { .. }));
    if !diverged {
        return err;
    }
    let command = match kind {
        ModelKind::Entropy => "dpar entropy train".to_string(),
        ModelKind::Gpt => "dpar train --model gpt".to_string(),
        ModelKind::Dpar => "dpar train --model dpar".to_string(),
    };
    anyhow::anyhow!("{err:#}\nto continue from the last good checkpoint with a tenth of the learning rate:\n  {command} --out {} --resume --lr {:e}", out.display(), lr / 10.0)
}

/// Applies the loop flags to a loop config.
fn apply_loop_flags(args: &TrainArgs, t: &mut dpar::train::LoopConfig) {
    if let Some(v) = args.steps {
        t.steps = v;
    }
    if let Some(v) = args.lr {
        t.adamw.lr = v;
    }
    if let Some(v) = args.weight_decay {
        t.adamw.weight_decay = v;
    }
    if let Some(v) = args.warmup {
        t.schedule.warmup_steps = v;
    }
    if args.cosine {
        t.schedule.cosine = true;
    }
    if let Some(v) = args.min_lr {
        t.schedule.min_lr = v;
    }
    if let Some(v) = args.grad_clip {
        t.grad_clip = v;
    }
    if let Some(v) = args.checkpoint_every {
        t.checkpoint_every = v;
    }
    if let Some(v) = args.log_every {
        t.log_every = v;
    }
    if let Some(v) = args.eval_every {
        t.eval_every = v;
    }
}

/// The entropy model's defaults are the recipe of README "Entropy model and patches" (and of
/// `scripts/train-mnist`): batch 32, 2400 steps, lr 1e-3 with 100 warm-up steps and cosine decay,
/// no dropout, validation every 400 steps. Flags still override each of them.
fn entropy_recipe(config: &mut GptTrainConfig) {
    config.batch_size = 32;
    config.model.token_dropout = 0.0;
    config.model.resid_dropout = 0.0;
    config.model.ffn_dropout = 0.0;
    config.train.steps = 2400;
    config.train.eval_every = 400;
    config.train.adamw.lr = 1e-3;
    config.train.schedule = dpar::optim::LrSchedule { warmup_steps: 100, cosine: true, min_lr: 0.0 };
}

fn default_loop() -> dpar::train::LoopConfig {
    dpar::train::LoopConfig { steps: 2000, log_every: 10, checkpoint_every: 250, ..Default::default() }
}

/// Runs the shared loop for a task built by `make`, as one process, N thread ranks or this
/// process's MPI rank; returns rank 0's report.
pub fn run_ranks<T: dpar::train::Task>(
    make: &(dyn Fn() -> Result<T> + Sync),
    config: &dpar::train::LoopConfig,
    out: &Path,
    args: &TrainArgs,
) -> Result<dpar::train::TrainReport> {
    if args.grad_accum == 0 || args.world_size == 0 {
        bail!("--world-size and --grad-accum must be ≥ 1");
    }
    #[cfg(feature = "nccl")]
    if args.device.device.starts_with("cuda") {
        if let Some((rank, world, local)) = dpar::dist::launcher_rank() {
            let id_file = args.nccl_id_file.clone().unwrap_or_else(|| dpar::dist::NcclCollective::default_id_file(out));
            let timeout = std::time::Duration::from_secs(args.rank_timeout);
            let collective = dpar::dist::NcclCollective::init(rank, world, local, &id_file, timeout)?;
            let mut task = make()?;
            return Ok(dpar::train::run_parallel(
                &mut task,
                config,
                out,
                crate::common::start(args.resume, args.overwrite),
                &collective,
                args.grad_accum,
            )?);
        }
    }
    if dpar::dist::launched_by_mpi() {
        #[cfg(feature = "mpi")]
        {
            let collective = dpar::dist::MpiCollective::init()?;
            let mut task = make()?;
            return Ok(dpar::train::run_parallel(
                &mut task,
                config,
                out,
                crate::common::start(args.resume, args.overwrite),
                &collective,
                args.grad_accum,
            )?);
        }
        #[cfg(not(feature = "mpi"))]
        bail!("started by mpirun, but this binary was built without MPI (rebuild with `cargo build --release --features mpi`)");
    }
    if args.world_size == 1 {
        let mut task = make()?;
        return Ok(dpar::train::run_parallel(
            &mut task,
            config,
            out,
            crate::common::start(args.resume, args.overwrite),
            &dpar::dist::Single,
            args.grad_accum,
        )?);
    }
    let group = dpar::dist::ThreadGroup::new(args.world_size, std::time::Duration::from_secs(args.rank_timeout));
    let results: Vec<Result<dpar::train::TrainReport>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|rank| {
                scope.spawn(move || -> Result<dpar::train::TrainReport> {
                    let mut task = make()?;
                    Ok(dpar::train::run_parallel(
                        &mut task,
                        config,
                        out,
                        crate::common::start(args.resume, args.overwrite),
                        &rank,
                        args.grad_accum,
                    )?)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))).collect()
    });
    let mut first = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(report) if rank == 0 => first = Some(report),
            Ok(_) => {}
            Err(e) => return Err(e.context(format!("rank {rank}"))),
        }
    }
    first.ok_or_else(|| anyhow::anyhow!("rank 0 produced no report"))
}

/// Reads a JSON or TOML config file.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        toml::from_str(&text).with_context(|| format!("{}: not a valid config", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid config", path.display()))
    }
}

/// The validation shards: --val-codes, or the `test` set beside a `train` set; `None` (with a
/// warning when some were expected) for none.
fn val_path(args: &TrainArgs) -> Option<String> {
    let path = match args.val_codes.as_deref() {
        Some("none") | Some("") => return None,
        Some(path) => path.to_string(),
        None => (args.codes.file_name()? == "train").then(|| args.codes.with_file_name("test"))?.display().to_string(),
    };
    if Path::new(&path).exists() {
        return Some(path);
    }
    match &args.val_codes {
        Some(_) => tracing::warn!(
            "--val-codes {path}: no such shards; training without validation (`--val-codes none` says so on purpose)"
        ),
        None => tracing::warn!("no --val-codes and no {path} beside --codes: training without validation"),
    }
    None
}

/// Validation codes must come from the training codes' tokenizer.
fn check_same_tokenizer(val: &str, val_id: &str, train_id: &str) -> Result<()> {
    if val_id != train_id {
        let msg = format!(
            "--val-codes {val}: codes of tokenizer {}…, but the training codes come from tokenizer {}…; a validation loss across tokenizers means nothing",
            &val_id[..12.min(val_id.len())],
            &train_id[..12.min(train_id.len())]
        );
        crate::common::mismatch(msg, "tokenize both splits with the same tokenizer")?;
    }
    Ok(())
}

fn default_out(kind: ModelKind) -> PathBuf {
    match kind {
        ModelKind::Gpt => PathBuf::from("runs/gpt"),
        ModelKind::Entropy => PathBuf::from("runs/entropy"),
        ModelKind::Dpar => PathBuf::from("runs/dpar"),
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    if args.model == ModelKind::Dpar {
        return train_dpar(args);
    }
    let device = args.device.device()?;
    if args.preset.is_some() && args.config.is_some() {
        bail!("give either --preset or --config, not both");
    }
    let out = args.out.clone().unwrap_or_else(|| default_out(args.model));
    let kind = if args.model == ModelKind::Gpt { "gpt" } else { "entropy" };
    let (train, _) = dpar::data::shards::read_shard_set(&args.codes)?;
    let val_codes = val_path(&args);
    let val = match val_codes.as_deref() {
        None => None,
        Some(path) => {
            let (v, _) =
                dpar::data::shards::read_shard_set(Path::new(path)).with_context(|| format!("--val-codes {path}"))?;
            check_same_tokenizer(path, &v.info.tokenizer_id, &train.info.tokenizer_id)?;
            Some(v)
        }
    };
    let saved = out.join("config.json");
    let mut config: GptTrainConfig = match (&args.config, args.resume && saved.is_file()) {
        (Some(path), _) => read_config(path)?,
        (None, true) => read_config(&saved)?,
        (None, false) => {
            let preset =
                args.preset
                    .clone()
                    .unwrap_or_else(|| if kind == "gpt" { "mnist".into() } else { "mnist-entropy".into() });
            let mut model = GptConfig::preset(&preset)?;
            if kind == "entropy" {
                model.cls_token_num = 0;
                model.class_dropout = 0.0;
            }
            // Fit the vocabulary, classes and grid to the shards.
            model.vocab_size = train.info.codebook_size;
            model.num_classes = train.info.num_classes;
            model.grid_size = train.info.grid_size;
            let mut config = GptTrainConfig {
                kind: kind.into(),
                model,
                seed: 0,
                batch_size: 16,
                codes: args.codes.display().to_string(),
                val_codes: val.as_ref().and(val_codes.clone()),
                val_images: 1000,
                use_flip: args.flip,
                tokenizer_id: train.info.tokenizer_id.clone(),
                train: default_loop(),
            };
            if kind == "entropy" {
                entropy_recipe(&mut config);
            }
            config
        }
    };
    if config.kind != kind {
        bail!("the config describes a `{}` model but --model is {kind}", config.kind);
    }
    // Flag overrides.
    apply_loop_flags(&args, &mut config.train);
    if let Some(v) = args.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.val_images {
        config.val_images = v;
    }
    if let Some(p) = args.dropout {
        config.model.token_dropout = p;
        config.model.resid_dropout = p;
        config.model.ffn_dropout = p;
    }
    if let Some(p) = args.class_dropout {
        config.model.class_dropout = p;
    }
    if let Some(o) = args.ops {
        config.model.ops = o.into();
    }
    check_ops(&mut config.model.ops);
    if args.flip {
        config.use_flip = true;
    }
    if let Some(d) = args.dim {
        config.model.dim = d;
    }
    if let Some(h) = args.heads {
        config.model.n_head = h;
    }
    if let Some(layers) = &args.layers {
        config.model.n_layer = layers
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--layers {layers}: a GPT takes one number of blocks, e.g. 6"))?;
    }
    config.model.validate()?;
    if train.info.tokenizer_id != config.tokenizer_id {
        bail!(
            "{}: codes come from tokenizer {}, the config expects {}",
            args.codes.display(),
            &train.info.tokenizer_id[..12.min(train.info.tokenizer_id.len())],
            &config.tokenizer_id[..12.min(config.tokenizer_id.len())]
        );
    }
    let make = || -> Result<GptTask> { Ok(GptTask::new(config.clone(), train.clone(), val.clone(), &device)?) };
    let report = run_ranks(&make, &config.train, &out, &args)
        .map_err(|e| recovery_hint(e, args.model, &out, config.train.adamw.lr))?;
    println!(
        "trained {kind}: {} steps in {} ({:.0} ms/step, {:.0} codes/s), final train loss {:.4}",
        report.steps,
        dpar::util::human_duration(report.seconds),
        report.ms_per_step,
        report.throughput,
        report.final_loss
    );
    for (k, v) in &report.validation {
        println!("  validation {k}: {v:.4}");
    }
    println!("wrote {}/{{model.safetensors, checkpoint.safetensors, config.json, log.jsonl, loss.png}}", out.display());
    Ok(())
}

fn train_dpar(args: TrainArgs) -> Result<()> {
    use dpar::dpar::train::{read_entropy_codes, DparTask, DparTrainConfig};
    let device = args.device.device()?;
    if args.preset.is_some() && args.config.is_some() {
        bail!("give either --preset or --config, not both");
    }
    let out = args.out.clone().unwrap_or_else(|| default_out(args.model));
    let train = read_entropy_codes(&args.codes, None)?;
    let val_codes = val_path(&args);
    let val = match val_codes.as_deref() {
        None => None,
        Some(path) => {
            let v = read_entropy_codes(Path::new(path), Some(&train.entropies.entropy_model_id))
                .with_context(|| format!("--val-codes {path}"))?;
            check_same_tokenizer(path, &v.shard.info.tokenizer_id, &train.shard.info.tokenizer_id)?;
            Some(v)
        }
    };
    let saved = out.join("config.json");
    let from_file = args.config.is_some() || (args.resume && saved.is_file());
    let mut config: DparTrainConfig = match (&args.config, args.resume && saved.is_file()) {
        (Some(path), _) => read_config(path)?,
        (None, true) => read_config(&saved)?,
        (None, false) => {
            let mut model = dpar::dpar::DparConfig::preset(args.preset.as_deref().unwrap_or("mnist"))?;
            model.vocab_size = train.shard.info.codebook_size;
            model.num_classes = train.shard.info.num_classes;
            model.grid_size = train.shard.info.grid_size;
            DparTrainConfig {
                kind: "dpar".into(),
                model,
                seed: 0,
                batch_size: 16,
                codes: args.codes.display().to_string(),
                val_codes: val.as_ref().and(val_codes.clone()),
                val_images: 1000,
                use_flip: args.flip,
                tokenizer_id: train.shard.info.tokenizer_id.clone(),
                entropy_model_id: train.entropies.entropy_model_id.clone(),
                train: default_loop(),
            }
        }
    };
    if config.kind != "dpar" {
        bail!("the config describes a `{}` model, not dpar", config.kind);
    }
    apply_loop_flags(&args, &mut config.train);
    if let Some(v) = args.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.val_images {
        config.val_images = v;
    }
    if let Some(p) = args.dropout {
        config.model.token_dropout = p;
        config.model.resid_dropout = p;
        config.model.ffn_dropout = p;
    }
    if let Some(p) = args.class_dropout {
        config.model.class_dropout = p;
    }
    if let Some(o) = args.ops {
        config.model.ops = o.into();
    }
    check_ops(&mut config.model.ops);
    if args.flip {
        config.use_flip = true;
    }
    if let Some(d) = args.dim {
        config.model.dim = d;
    }
    if let Some(h) = args.heads {
        config.model.n_head = h;
    }
    if let Some(layers) = &args.layers {
        let parts: Vec<usize> =
            layers.split('+').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().unwrap_or_default();
        let [e, g, d] = parts[..] else {
            bail!("--layers {layers}: DPAR takes encoder+global+decoder blocks, e.g. 1+4+1");
        };
        (config.model.encoder_layers, config.model.global_layers, config.model.decoder_layers) = (e, g, d);
    }
    if let Some(r) = args.patch_rope {
        config.model.patch_rope = r.into();
    }
    config.model.patch = args.patch.apply(config.model.patch);
    // θ: given, kept from a saved config, or calibrated on the training entropies.
    let calibrate = config.model.patch.entropy_gate
        && args.patch.threshold.is_none()
        && !(from_file && config.model.patch.threshold.is_finite());
    if calibrate {
        let (theta, stats) = dpar::patching::calibrate(
            &train.entropies.entropy,
            config.model.grid_size,
            &config.model.patch,
            args.target_mean_len,
        )?;
        config.model.patch.threshold = theta;
        println!(
            "calibrated θ = {theta:.4} on the training entropies: mean patch length {:.3} ({:.1} patches per image)",
            stats.mean_len, stats.mean_patches
        );
    }
    if train.shard.info.tokenizer_id != config.tokenizer_id {
        bail!("{}: codes come from another tokenizer than the config expects", args.codes.display());
    }
    println!("patcher: {}", config.model.patch.label());
    let make = || -> Result<DparTask> { Ok(DparTask::new(config.clone(), train.clone(), val.clone(), &device)?) };
    let report = run_ranks(&make, &config.train, &out, &args)
        .map_err(|e| recovery_hint(e, args.model, &out, config.train.adamw.lr))?;
    let patches =
        report.final_metrics.iter().find(|(k, _)| k == "patches_per_image").map(|(_, v)| *v).unwrap_or(f64::NAN);
    println!(
        "trained dpar: {} steps in {} ({:.0} ms/step, {:.0} codes/s, {:.1} patches per image), final train loss {:.4}",
        report.steps,
        dpar::util::human_duration(report.seconds),
        report.ms_per_step,
        report.throughput,
        patches,
        report.final_loss
    );
    for (k, v) in &report.validation {
        println!("  validation {k}: {v:.4}");
    }
    println!("wrote {}/{{model.safetensors, checkpoint.safetensors, config.json, log.jsonl, loss.png}}", out.display());
    Ok(())
}
