//! `dpar tokenizer {train, reconstruct, eval}` and `dpar tokenize`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dpar::tokenizer::train::{evaluate, Tokenizer, TokenizerTask, TokenizerTrainConfig};
use dpar::tokenizer::VqConfig;

use crate::common::{DataArgs, DeviceArgs};

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a VQ tokenizer on a dataset's train split.
    Train(TrainArgs),
    /// Write a PNG grid of test images (rows of originals above rows of reconstructions).
    Reconstruct(ReconstructArgs),
    /// Measure reconstruction MSE, PSNR and codebook usage on a split.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Architecture preset: `mnist` (32 px grey → 16×16 codes) or `vq16` (LlamaGen VQ-16).
    #[arg(long, default_value = "mnist")]
    preset: String,
    /// Override the codebook size of the preset.
    #[arg(long)]
    codebook_size: Option<usize>,
    /// Run folder for checkpoints, logs and pictures.
    #[arg(long, default_value = "runs/tokenizer")]
    out: PathBuf,
    /// Optimiser steps (the default is the shipped MNIST tokenizer's recipe).
    #[arg(long, default_value_t = 1500, value_parser = crate::common::positive_u64)]
    steps: u64,
    /// Images per step.
    #[arg(long, default_value_t = 32, value_parser = crate::common::positive_usize)]
    batch_size: usize,
    /// AdamW learning rate (constant).
    #[arg(long, default_value_t = 1e-3, value_parser = crate::common::positive_f64)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// The seed every random choice flows from.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N training images.
    #[arg(long, value_parser = crate::common::positive_usize)]
    max_images: Option<usize>,
    /// Restart unused codes every N steps (0: never).
    #[arg(long, default_value_t = 100)]
    restart_every: u64,
    /// Save the checkpoint every N steps.
    #[arg(long, default_value_t = 250, value_parser = crate::common::positive_u64)]
    checkpoint_every: u64,
    /// Log a line to log.jsonl every N steps.
    #[arg(long, default_value_t = 10, value_parser = crate::common::positive_u64)]
    log_every: u64,
    /// Validation (test split) every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    eval_every: u64,
    /// Test images used for validation.
    #[arg(long, default_value_t = 2000, value_parser = crate::common::positive_usize)]
    val_images: usize,
    /// Continue from the run folder's checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Delete the run already in --out (checkpoint, log, snapshots) and start over.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
pub struct ReconstructArgs {
    /// Tokenizer run folder or weight file.
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/tokenizer", value_parser = crate::common::model_path)]
    tokenizer: PathBuf,
    /// Architecture, for weight files without an embedded config (LlamaGen `.pt`): `vq16`, or a
    /// JSON file with a whole tokenizer config.
    #[arg(long)]
    tokenizer_preset: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, default_value = "test")]
    split: String,
    /// Number of images.
    #[arg(long, default_value_t = 32, value_parser = crate::common::positive_usize)]
    n: usize,
    /// Output PNG (relative to the working directory, never inside the model's folder).
    #[arg(long, default_value = "out/reconstruction.png")]
    out: PathBuf,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Tokenizer run folder or weight file.
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/tokenizer", value_parser = crate::common::model_path)]
    tokenizer: PathBuf,
    /// Architecture, for weight files without an embedded config (LlamaGen `.pt`): `vq16`, or a
    /// JSON file with a whole tokenizer config.
    #[arg(long)]
    tokenizer_preset: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Dataset split to measure: `train` or `test`.
    #[arg(long, default_value = "test")]
    split: String,
    /// Measure the first N images.
    #[arg(long, default_value_t = 10000, value_parser = crate::common::positive_usize)]
    max_images: usize,
    /// Also write the report as JSON here (it names the tokenizer and the data it measured).
    /// Nothing is written into the tokenizer's folder.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// Tokenizer run folder or weight file (the shipped MNIST tokenizer by default, like every
    /// other command).
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/tokenizer", value_parser = crate::common::model_path)]
    tokenizer: PathBuf,
    /// Architecture, for weight files without an embedded config (LlamaGen `.pt`): `vq16`, or a
    /// JSON file with a whole tokenizer config.
    #[arg(long)]
    tokenizer_preset: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Dataset split to encode: `train` or `test`.
    #[arg(long, default_value = "train")]
    split: String,
    /// Output folder for the shards (default: data/codes/<split>). It must not hold another
    /// shard set unless --overwrite is given; the set's manifest.json is written last.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the shard set (shards, entropy sidecars, manifest) already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Also store the codes of horizontally flipped images, as an augmentation copy that
    /// `dpar train --flip` can use. Suits photos of natural scenes (ImageNet); do not use it for
    /// digits, letters or anything else whose mirror image is a different thing. Off by default.
    #[arg(long)]
    flip: bool,
    /// LlamaGen's ImageNet augmentation: centre-crop each image to --crop-range × the tokenizer's
    /// size, then store its five crops (corners and centre) at the tokenizer's size, each with a
    /// flip copy: the ten views of LlamaGen's `extract_codes_c2i.py --ten-crop`. (Each crop is a
    /// separate entry of the shards, so an epoch sees each crop once, with a random flip.)
    #[arg(long)]
    ten_crop: bool,
    /// With --ten-crop: the centre crop's size relative to the tokenizer's (LlamaGen: 1.1).
    #[arg(long, default_value_t = 1.1, requires = "ten_crop")]
    crop_range: f64,
    /// Images per shard file.
    #[arg(long, default_value_t = 65536, value_parser = crate::common::positive_usize)]
    shard_size: usize,
    /// Use only the first N images (default: all).
    #[arg(long, value_parser = crate::common::positive_usize)]
    max_images: Option<usize>,
    /// Images encoded together.
    #[arg(long, default_value_t = 200, value_parser = crate::common::positive_usize)]
    batch: usize,
}

pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train(args) => train(args),
        TokenizerCmd::Reconstruct(args) => reconstruct(args),
        TokenizerCmd::Eval(args) => eval(args),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut model = VqConfig::preset(&args.preset)?;
    if let Some(v) = args.codebook_size {
        model.codebook_size = v;
    }
    model.validate()?;
    let data = args.data.load("train", model.image_size, model.in_channels, args.max_images)?;
    let val = args.data.load("test", model.image_size, model.in_channels, Some(args.val_images)).ok();
    if val.is_none() {
        tracing::warn!("no test split found: training without validation");
    }
    let config = TokenizerTrainConfig {
        kind: "tokenizer".into(),
        model,
        seed: args.seed,
        batch_size: args.batch_size,
        restart_every: args.restart_every,
        data: data.source.clone(),
        train_images: data.len(),
        train: dpar::train::LoopConfig {
            steps: args.steps,
            adamw: dpar::optim::AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
            checkpoint_every: args.checkpoint_every,
            log_every: args.log_every,
            eval_every: args.eval_every,
            ..Default::default()
        },
    };
    let mut task = TokenizerTask::new(config.clone(), data, val.clone(), &device)?;
    let report =
        dpar::train::run(&mut task, &config.train, &args.out, crate::common::start(args.resume, args.overwrite))?;
    if report.already_finished {
        println!(
            "{} is finished at step {}; nothing was trained or written (train further with --resume --steps N, N > {})",
            args.out.display(),
            report.steps,
            report.steps
        );
        return Ok(());
    }
    println!(
        "trained tokenizer: {} steps in {} ({:.0} ms/step), final loss {:.5}",
        report.steps,
        dpar::util::human_duration(report.seconds),
        report.ms_per_step,
        report.final_loss
    );
    for (k, v) in &report.validation {
        println!("  test {k}: {v:.4}");
    }
    println!(
        "wrote {}/{{model.safetensors, checkpoint.safetensors, config.json, log.jsonl, loss.png}}",
        args.out.display()
    );
    if let Some(val) = val {
        let tok = dpar::models::tokenizer(&args.out, None, &device)?;
        let png = args.out.join("reconstruction.png");
        write_reconstruction(&tok, &val, 32, &png, &device)?;
        println!("wrote {}", png.display());
    }
    Ok(())
}

/// Rows of 16: originals, then their reconstructions, for `n` images.
fn write_reconstruction(
    tok: &Tokenizer,
    data: &dpar::data::ImageDataset,
    n: usize,
    png: &Path,
    device: &candle_core::Device,
) -> Result<()> {
    let n = n.min(data.len());
    if n == 0 {
        bail!("no images to reconstruct");
    }
    let idx: Vec<usize> = (0..n).collect();
    let x = data.batch_tensor(&idx, false, device)?;
    let recon = tok.decode(&tok.model.encode(&x)?)?;
    let originals = dpar::viz::tensor_to_images(&x)?;
    let recons = dpar::viz::tensor_to_images(&recon)?;
    let scale = (128 / tok.config.image_size as u32).max(1);
    let mut rows = Vec::new();
    for start in (0..n).step_by(16) {
        let end = (start + 16).min(n);
        rows.push(originals[start..end].iter().map(|i| dpar::viz::upscale(i, scale)).collect());
        rows.push(recons[start..end].iter().map(|i| dpar::viz::upscale(i, scale)).collect());
    }
    dpar::viz::save_png(&dpar::viz::grid(&rows, 4), png)?;
    Ok(())
}

fn reconstruct(args: ReconstructArgs) -> Result<()> {
    let device = args.device.device()?;
    let tok = dpar::models::tokenizer(&args.tokenizer, args.tokenizer_preset.as_deref(), &device)?;
    tok.check_batch_memory(args.n.min(dpar::tokenizer::train::EVAL_BATCH))?;
    let data = args.data.load(&args.split, tok.config.image_size, tok.config.in_channels, Some(args.n))?;
    let png = args.out;
    write_reconstruction(&tok, &data, args.n, &png, &device)?;
    let stats = evaluate(&tok.model, &data, args.n, &device)?;
    println!("{} images: MSE {:.5}, PSNR {:.2} dB", stats.images, stats.mse, stats.psnr);
    println!("wrote {} (rows: originals, then reconstructions)", png.display());
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    let tok = dpar::models::tokenizer(&args.tokenizer, args.tokenizer_preset.as_deref(), &device)?;
    tok.check_batch_memory(args.max_images.min(dpar::tokenizer::train::EVAL_BATCH))?;
    let data = args.data.load(&args.split, tok.config.image_size, tok.config.in_channels, Some(args.max_images))?;
    let t = std::time::Instant::now();
    let stats = evaluate(&tok.model, &data, args.max_images, &device)?;
    println!(
        "{} split, {} images: MSE {:.5} (on [-1, 1]), PSNR {:.2} dB, codebook usage {:.1}% of {} ({:.1}s)",
        args.split,
        stats.images,
        stats.mse,
        stats.psnr,
        100.0 * stats.usage,
        tok.config.codebook_size,
        t.elapsed().as_secs_f64()
    );
    if let Some(out) = &args.json {
        // The report says what it measured: which tokenizer, on which data.
        let report = serde_json::json!({
            "tokenizer": tok.path.display().to_string(),
            "tokenizer_id": tok.id,
            "data": data.source,
            "split": args.split,
            "images": stats.images,
            "mse": stats.mse,
            "psnr": stats.psnr,
            "usage": stats.usage,
        });
        dpar::util::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let device = args.device.device()?;
    let tok = dpar::models::tokenizer(&args.tokenizer, args.tokenizer_preset.as_deref(), &device)?;
    let size = tok.config.image_size;
    let load_size = if args.ten_crop {
        if !(1.0..=2.0).contains(&args.crop_range) {
            bail!("--crop-range {}: must lie in [1, 2] (LlamaGen uses 1.1)", args.crop_range);
        }
        (size as f64 * args.crop_range) as usize
    } else {
        size
    };
    tok.check_batch_memory(args.batch)?;
    let mut data = args.data.load(&args.split, load_size, tok.config.in_channels, args.max_images)?;
    let flip = args.flip || args.ten_crop;
    if args.ten_crop {
        data = data.five_crops(size)?;
        println!("--ten-crop: {} crops of {size}² from {load_size}² centre crops, each with a flip copy", data.len());
    }
    let out = args.out.unwrap_or_else(|| PathBuf::from("data/codes").join(&args.split));
    let t = std::time::Instant::now();
    let per_image = if flip { 2 } else { 1 };
    let bar = dpar::util::progress_bar((data.len() * per_image) as u64, "tokenize");
    let written = tok
        .tokenize_to_set(&data, &out, args.overwrite, flip, args.shard_size, args.batch, &device, |n| bar.inc(n as u64))
        .with_context(|| format!("--out {}", out.display()))?;
    bar.finish_and_clear();
    let g = tok.config.grid_size();
    println!(
        "tokenized {} {} images into {}×{} = {} codes each{} in {:.1}s ({:.0} img/s)",
        data.len(),
        args.split,
        g,
        g,
        g * g,
        if flip { " (+ flip copy)" } else { "" },
        t.elapsed().as_secs_f64(),
        (data.len() * per_image) as f64 / t.elapsed().as_secs_f64()
    );
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
