//! `dpar entropy {train, compute}` and `dpar patchify`: where DPAR's patches come from.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dpar::patching::{self, PatchConfig, PatchStats};

use crate::common::DeviceArgs;
use crate::train_cmd::{self, ModelKind, TrainArgs};

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum EntropyCmd {
    /// Train the unconditional entropy model (`dpar train --model entropy`).
    Train(TrainArgs),
    /// Run the entropy model once over shards and store H_k beside the codes.
    Compute(ComputeArgs),
}

#[derive(Args)]
pub struct ComputeArgs {
    /// Entropy model run folder or weight file (`dpar entropy train` writes runs/entropy). It
    /// must have been trained on codes of the same tokenizer as --codes.
    #[arg(long, default_value = "runs/entropy")]
    model: PathBuf,
    /// Shard folders or files (repeatable).
    #[arg(long, default_values = ["data/codes/train", "data/codes/test"])]
    codes: Vec<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Patcher switches shared by `patchify`, `train --model dpar` and `sample`.
#[derive(Args, Debug, Clone)]
pub struct PatchArgs {
    /// Entropy threshold θ (natural log).
    #[arg(long)]
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
    /// Applies the flags on top of `base`.
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

#[derive(Args)]
pub struct PatchifyArgs {
    /// Shards with stored entropies.
    #[arg(long, default_value = "data/codes/train")]
    codes: PathBuf,
    /// Find θ by bisection so that the mean patch length is this.
    #[arg(long)]
    target_mean_len: Option<f64>,
    #[command(flatten)]
    patch: PatchArgs,
    /// Also report the mean length at P for θ at the 30th, 50th and 70th entropy percentiles.
    #[arg(long)]
    percentiles: bool,
    /// Draw N images with their patches and entropy heat maps.
    #[arg(long)]
    show: Option<usize>,
    /// Tokenizer to decode the images for --show. Default: the one the codes record (by hash),
    /// found beside the codes' folder, in models/mnist/tokenizer or in runs/tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Picture path for --show.
    #[arg(long, default_value = "out/patches.png")]
    out: PathBuf,
    /// Use only the first N images for the statistics.
    #[arg(long)]
    max_images: Option<usize>,
    /// Write the statistics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run_entropy(cmd: EntropyCmd) -> Result<()> {
    match cmd {
        EntropyCmd::Train(mut args) => {
            args.model = ModelKind::Entropy;
            train_cmd::train(args)
        }
        EntropyCmd::Compute(args) => compute(args),
    }
}

fn compute(args: ComputeArgs) -> Result<()> {
    let device = args.device.device()?;
    let (model, _store) = dpar::gpt::load(&args.model, None, &device)?;
    let weights = if args.model.is_dir() { args.model.join("model.safetensors") } else { args.model.clone() };
    let model_id = dpar::util::sha256_file(&weights)?;
    let model_tokenizer = dpar::parts::Recorded::of(&args.model).tokenizer_id;
    let t = std::time::Instant::now();
    let mut images = 0;
    for set in &args.codes {
        for (file, shard) in dpar::data::shards::read_set_shards(set)? {
            dpar::entropy::check_model_fits(&model, &shard, &file)?;
            if let Some(want) = &model_tokenizer {
                if *want != shard.info.tokenizer_id {
                    let msg = format!(
                        "{}: codes of tokenizer {}…, but the entropy model {} was trained on codes of tokenizer {}…; its entropies would not mean anything here",
                        file.display(),
                        &shard.info.tokenizer_id[..12.min(shard.info.tokenizer_id.len())],
                        args.model.display(),
                        &want[..12.min(want.len())]
                    );
                    crate::common::mismatch(msg, "give the matching --model or --codes")?;
                }
            }
            let copies = if shard.flip_codes.is_some() { 2 } else { 1 };
            let bar = dpar::util::progress_bar((shard.len() * copies) as u64, "entropy");
            let entropy = dpar::entropy::compute(&model, &shard, false, args.batch, &device, |n| bar.inc(n as u64))?;
            let entropy_flip = if shard.flip_codes.is_some() {
                Some(dpar::entropy::compute(&model, &shard, true, args.batch, &device, |n| bar.inc(n as u64))?)
            } else {
                None
            };
            bar.finish_and_clear();
            let finite: Vec<f32> = entropy.iter().copied().filter(|h| h.is_finite()).collect();
            let mean = finite.iter().map(|&h| h as f64).sum::<f64>() / finite.len().max(1) as f64;
            let e = dpar::entropy::ShardEntropies { entropy, entropy_flip, entropy_model_id: model_id.clone() };
            dpar::entropy::write(&file, &shard, &e)?;
            images += shard.len() * copies;
            println!(
                "{}: {} images{}, mean H {:.3} nats (ln V = {:.3}), p30/p50/p70 {:.3}/{:.3}/{:.3} → wrote {}",
                file.display(),
                shard.len(),
                if copies == 2 { " + flip copies" } else { "" },
                mean,
                (shard.info.codebook_size as f64).ln(),
                patching::percentile(&finite, 0.3).unwrap_or(f64::NAN),
                patching::percentile(&finite, 0.5).unwrap_or(f64::NAN),
                patching::percentile(&finite, 0.7).unwrap_or(f64::NAN),
                dpar::data::shards::entropy_path(&file).display()
            );
        }
    }
    println!("computed entropies of {images} code sequences in {:.1}s (H_0 stored as +inf)", t.elapsed().as_secs_f64());
    Ok(())
}

fn print_stats(label: &str, s: &PatchStats) {
    println!("{label}");
    println!("  mean patch length {:.3} (token-count reduction ×{:.3})", s.mean_len, s.mean_len);
    println!(
        "  patches per image: min {}, mean {:.1}, max {} (over {} images)",
        s.min_patches, s.mean_patches, s.max_patches, s.images
    );
    let total: usize = s.histogram.iter().sum();
    for (len, &count) in s.histogram.iter().enumerate().skip(1) {
        if count == 0 {
            continue;
        }
        let frac = count as f64 / total.max(1) as f64;
        println!("  length {len:>3}: {:>7.2}% {}", 100.0 * frac, "#".repeat((frac * 60.0).round() as usize));
    }
}

fn patchify(args: PatchifyArgs) -> Result<()> {
    let (mut shard, mut ent) = dpar::entropy::read_set(&args.codes, None)?;
    let l = shard.info.seq_len();
    let grid = shard.info.grid_size;
    if let Some(n) = args.max_images {
        let n = n.min(shard.len());
        shard.codes.truncate(n * l);
        shard.labels.truncate(n);
        ent.entropy.truncate(n * l);
    }
    let base = args.patch.apply(PatchConfig::dpar(f64::INFINITY, 4));
    let mut report = serde_json::Map::new();
    let config = match (args.target_mean_len, args.patch.threshold) {
        (Some(_), Some(_)) => bail!("give either --target-mean-len or --threshold"),
        (Some(target), None) => {
            let (theta, _) = patching::calibrate(&ent.entropy, grid, &base, target)?;
            println!("θ = {theta:.4} gives mean patch length closest to {target} (P = {})", base.max_patch_len);
            report.insert("calibrated_threshold".into(), theta.into());
            PatchConfig { threshold: theta, entropy_gate: true, ..base }
        }
        (None, _) => base,
    };
    config.validate()?;
    let stats = patching::stats(&ent.entropy, grid, &config)?;
    print_stats(&format!("{} over {}", config.label(), args.codes.display()), &stats);
    report.insert("config".into(), serde_json::to_value(config)?);
    report.insert("stats".into(), serde_json::to_value(&stats)?);
    if args.percentiles {
        let mut rows = Vec::new();
        for q in [0.3, 0.5, 0.7] {
            let theta = patching::percentile(&ent.entropy, q).context("no finite entropies")?;
            let c = PatchConfig { threshold: theta, entropy_gate: true, ..config };
            let s = patching::stats(&ent.entropy, grid, &c)?;
            println!(
                "  θ at the {:.0}th entropy percentile = {theta:.4}: mean length {:.3} at P = {}",
                q * 100.0,
                s.mean_len,
                c.max_patch_len
            );
            rows.push(serde_json::json!({"percentile": q, "threshold": theta, "mean_len": s.mean_len}));
        }
        report.insert("percentiles".into(), rows.into());
    }
    if let Some(n) = args.show {
        let device = args.device.device()?;
        let owner = format!("the codes {}", args.codes.display());
        let tok_path = dpar::parts::resolve(
            dpar::parts::Part::Tokenizer,
            args.tokenizer.as_deref(),
            Some(&shard.info.tokenizer_id),
            &args.codes,
            &owner,
            crate::common::allow_mismatch(),
        )?;
        let tok = dpar::tokenizer::train::Tokenizer::load(&tok_path, None, &device)?;
        let n = n.min(shard.len());
        let codes = candle_core::Tensor::from_slice(&shard.codes[..n * l], (n, l), &device)?;
        let images = dpar::viz::tensor_to_images(&tok.decode(&codes)?)?;
        let cell = (256 / grid as u32).max(4);
        let finite: Vec<f32> = ent.entropy.iter().copied().filter(|h| h.is_finite()).collect();
        let vmax = patching::percentile(&finite, 0.99).unwrap_or(1.0) as f32;
        let mut rows = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let h = &ent.entropy[i * l..(i + 1) * l];
            let lengths = patching::patch_lengths(h, grid, &config, l)?;
            let big = dpar::viz::upscale(img, cell * grid as u32 / img.width().max(1));
            let plain = big.clone();
            let overlay = dpar::viz::patch_overlay(&big, grid, &lengths);
            let heat = dpar::viz::patch_outline(&dpar::viz::heatmap(h, grid, cell, 0.0, vmax), grid, &lengths);
            rows.push(vec![dpar::viz::hstack(&[plain, overlay, heat, dpar::viz::colorbar(cell * grid as u32, 12)], 6)]);
        }
        dpar::viz::save_png(&dpar::viz::grid(&rows, 8), &args.out)?;
        println!(
            "wrote {}: per image, the decoded image, its patches (one colour per patch, white edges), and the entropy heat map with the same patch edges (0 → {vmax:.2} nats, viridis: dark = predictable, yellow = surprising; the bar on the right is the scale)",
            args.out.display()
        );
    }
    if let Some(path) = args.json {
        dpar::util::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

pub fn run_patchify(args: PatchifyArgs) -> Result<()> {
    patchify(args)
}
