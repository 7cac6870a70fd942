//! `dpar entropy {train, compute}` and `dpar patchify`: where DPAR's patches come from.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dpar::patching::{self, PatchConfig, PatchStats};

use crate::common::{DeviceArgs, EntropyTrainArgs, PatchArgs};

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum EntropyCmd {
    /// Train the unconditional entropy model.
    Train(EntropyTrainArgs),
    /// Run the entropy model once over shards and store H_k beside the codes.
    Compute(ComputeArgs),
    /// Entropies from a count table of the training codes (no network): store them beside
    /// other shards, to compare their patches with `dpar patchify --compare`.
    Count(CountArgs),
}

#[derive(Args)]
pub struct CountArgs {
    /// The codes to count (folder or file).
    #[arg(long, default_value = "data/codes/train")]
    train: PathBuf,
    /// What z_k is conditioned on: `left` (z_{k−1}, a bigram) or `left-above` (z_{k−1} and the
    /// code above it).
    #[arg(long, default_value = "left")]
    context: dpar::entropy::CountContext,
    /// Add-α smoothing of every context's counts.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Shards to store the table's entropies beside (use a copy: the sidecars replace those
    /// there).
    #[arg(long, required = true)]
    codes: Vec<PathBuf>,
}

/// `dpar entropy count`.
pub fn run_count(args: CountArgs) -> Result<()> {
    let train: Vec<_> = dpar::data::shards::read_set_shards(&args.train)
        .with_context(|| format!("--train {}", args.train.display()))?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let table = dpar::entropy::CountTable::fit(&train, args.context, args.alpha).context("--train")?;
    let hash = train.iter().map(dpar::data::shards::codes_hash).collect::<Vec<_>>().join("");
    let id = format!("count-table-{:?}-alpha{}-{}", args.context, args.alpha, &hash[..16.min(hash.len())]);
    for set in &args.codes {
        if args.train.canonicalize().ok() == set.canonicalize().ok() {
            bail!(
                "--codes {}: the same shards as --train; store the table's entropies beside a copy of other codes",
                set.display()
            );
        }
        let stored = dpar::entropy::store_with(set, &id, |file, shard| {
            let counted = &train[0].info;
            dpar::entropy::check_shape_fits("the count table", counted.grid_size, counted.codebook_size, shard, file)?;
            let of = |flip: bool| {
                (0..shard.len()).flat_map(|i| table.entropies(shard.codes_of(i, flip))).collect::<Vec<f32>>()
            };
            Ok((of(false), shard.flip_codes.as_ref().map(|_| of(true))))
        })
        .with_context(|| format!("--codes {}", set.display()))?;
        for s in stored {
            print_stored(&s, &format!("count-table entropies ({:?}, α {})", args.context, args.alpha));
        }
    }
    Ok(())
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
    #[arg(long, default_value_t = 50, value_parser = crate::common::positive_usize)]
    batch: usize,
    /// Store instead the self-entropies of this DPAR model (design §9): its decoder's entropy
    /// of each code as self-entropy patching at --threshold computes it, so that training on
    /// them cuts the patches that model would sample (the two-stage recipe). Point --codes at
    /// a copy of the shards: the sidecars replace those beside them. --model is then the
    /// DPAR's entropy model (default: the one it records).
    #[arg(long, value_parser = crate::common::model_path, requires = "threshold")]
    self_of: Option<PathBuf>,
    /// With --self-of: the θ of the self-entropy rule (train with the same θ).
    #[arg(long, requires = "self_of")]
    threshold: Option<f64>,
    #[command(flatten)]
    device: DeviceArgs,
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
    /// Architecture, for tokenizer weight files without an embedded config (LlamaGen `.pt`):
    /// `vq16`, or a JSON file with a whole tokenizer config.
    #[arg(long)]
    tokenizer_preset: Option<String>,
    /// Picture path for --show.
    #[arg(long, default_value = "out/patches.png")]
    out: PathBuf,
    /// Use only the first N images for the statistics.
    #[arg(long)]
    max_images: Option<usize>,
    /// Write the statistics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Another entropy set over the same codes (e.g. from a smaller entropy model): report how
    /// well its patch starts agree with those of --codes (precision, recall, F1 per code).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// θ for --compare's entropies (the other rules are those of --codes); with
    /// --compare-target-mean-len instead, calibrated like --target-mean-len.
    #[arg(long, requires = "compare")]
    compare_threshold: Option<f64>,
    /// Calibrate θ for --compare's entropies to this mean patch length.
    #[arg(long, requires = "compare", conflicts_with = "compare_threshold")]
    compare_target_mean_len: Option<f64>,
    /// Calibrate θ on images sampled from this DPAR model instead of on stored entropies: the
    /// θ at which its samples reach --target-mean-len (generated images get shorter patches
    /// than real codes at the training θ). With --patcher self, for self-entropy patching.
    #[arg(long, value_parser = crate::common::model_path, requires = "target_mean_len")]
    on_samples: Option<PathBuf>,
    /// With --on-samples: the entropy model (default: the one the model records, by hash). A
    /// model trained on self-entropies records its first stage instead: give the entropy model
    /// here with --allow-mismatch (with --patcher self it is loaded but never runs).
    #[arg(long, requires = "on_samples")]
    entropy_model: Option<PathBuf>,
    /// With --on-samples: where H_k comes from (`model`: the model's entropy model; `self`).
    #[arg(long, default_value = "model")]
    patcher: dpar::patching::EntropyFrom,
    /// With --on-samples: images per class sampled for each θ tried.
    #[arg(long, default_value_t = 20, value_parser = crate::common::positive_usize)]
    per_class: usize,
    /// With --on-samples: the seed of those images (the same images' draws at every θ).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --on-samples: store the θ found beside the model (sampling-thresholds.json), where
    /// `dpar sample --patcher self` (and `--sampling-threshold`) find it.
    #[arg(long, requires = "on_samples")]
    store: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `dpar entropy compute` (`dpar entropy train` is `dpar train --model entropy`, dispatched by
/// `main`).
pub fn run_compute(args: ComputeArgs) -> Result<()> {
    compute(args)
}

fn compute(args: ComputeArgs) -> Result<()> {
    if args.self_of.is_some() {
        return compute_self(args);
    }
    let device = args.device.device()?;
    let (model, _store) = dpar::models::gpt(&args.model, None, &device)?;
    let t = std::time::Instant::now();
    let mut images = 0;
    for set in &args.codes {
        // A set folder's manifest says how many sequences there are; a lone file shows a spinner.
        let total = dpar::data::shards::read_manifest(set).map(|m| m.images * if m.flip { 2 } else { 1 }).unwrap_or(0);
        let bar = dpar::util::progress_bar(total as u64, "entropy");
        let stored = dpar::entropy::store_for_set(
            &model,
            &args.model,
            set,
            args.batch,
            crate::common::allow_mismatch(),
            &device,
            |n| bar.inc(n as u64),
        )
        .with_context(|| format!("--codes {}", set.display()))?;
        bar.finish_and_clear();
        for s in stored {
            images += s.images * if s.flip { 2 } else { 1 };
            print_stored(&s, &format!("entropies (ln V = {:.3})", (model.config().vocab_size as f64).ln()));
        }
    }
    println!("computed entropies of {images} code sequences in {:.1}s (H_0 stored as +inf)", t.elapsed().as_secs_f64());
    Ok(())
}

/// `dpar entropy compute --self-of DPAR --threshold θ`: teacher-forced self-entropies.
fn compute_self(args: ComputeArgs) -> Result<()> {
    let device = args.device.device()?;
    let path = args.self_of.clone().expect("checked by the caller");
    let theta = args.threshold.expect("clap requires --threshold with --self-of");
    if !theta.is_finite() || theta < 0.0 {
        bail!("--threshold {theta}: θ must be a finite entropy ≥ 0 (nats)");
    }
    let (model, _store, config) = dpar::models::dpar(&path, &device)?;
    let recorded = dpar::parts::Recorded::of(&path);
    let part = dpar::parts::Part::EntropyModel;
    let given = (args.model != std::path::Path::new("runs/entropy")).then_some(args.model.as_path());
    let owner = format!("the model {}", path.display());
    let entropy_path =
        dpar::parts::resolve(part, given, recorded.id(part), &path, &owner, crate::common::allow_mismatch())?;
    let (entropy, _es) = dpar::models::gpt(&entropy_path, None, &device)?;
    let patch =
        PatchConfig { threshold: theta, entropy_from: dpar::patching::EntropyFrom::Decoder, ..config.model.patch };
    let id = dpar::parts::id_of(&path)?;
    let t = std::time::Instant::now();
    let mut images = 0;
    for set in &args.codes {
        let total = dpar::data::shards::read_manifest(set).map(|m| m.images * if m.flip { 2 } else { 1 }).unwrap_or(0);
        let bar = dpar::util::progress_bar(total as u64, "self-entropy");
        let stored = dpar::entropy::store_with(set, &id, |file, shard| {
            let c = model.config();
            dpar::entropy::check_shape_fits("the DPAR model", c.grid_size, c.vocab_size, shard, file)?;
            let of = |flip: bool| -> dpar::entropy::Result<Vec<f32>> {
                let mut out = Vec::with_capacity(shard.len() * c.seq_len());
                for start in (0..shard.len()).step_by(args.batch * 8) {
                    let idx = start..(start + args.batch * 8).min(shard.len());
                    let codes: Vec<Vec<u32>> = idx.clone().map(|i| shard.codes_of(i, flip).to_vec()).collect();
                    let h = dpar::dpar::decode::self_entropies(&model, &entropy, &codes, &shard.labels[idx], &patch)
                        .map_err(|e| dpar::entropy::EntropyError::BadModel(e.to_string()))?;
                    bar.inc(h.len() as u64);
                    out.extend(h.into_iter().flatten());
                }
                Ok(out)
            };
            let entropy = of(false)?;
            let flip = if shard.flip_codes.is_some() { Some(of(true)?) } else { None };
            Ok((entropy, flip))
        })
        .with_context(|| format!("--codes {}", set.display()))?;
        bar.finish_and_clear();
        for s in stored {
            images += s.images * if s.flip { 2 } else { 1 };
            print_stored(&s, &format!("self-entropies of {} at θ = {theta}", path.display()));
        }
    }
    println!(
        "computed self-entropies of {images} code sequences in {:.1}s; train on them with --threshold {theta} (other θ mean nothing for these values)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One line per stored entropy sidecar: images, what the entropies are, their mean and
/// percentiles, where they went.
fn print_stored(s: &dpar::entropy::Stored, what: &str) {
    println!(
        "{}: {} images{}, {what}: mean {:.3} nats, p30/p50/p70 {:.3}/{:.3}/{:.3} → wrote {}",
        s.shard.display(),
        s.images,
        if s.flip { " + flip copies" } else { "" },
        s.mean,
        s.p30,
        s.p50,
        s.p70,
        s.sidecar.display()
    );
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

/// `dpar patchify --on-samples DPAR --target-mean-len L`: bisection over θ, each probe a sampled
/// set (cfg 2, the same seeds) whose mean patch length is measured.
fn calibrate_on_samples(args: &PatchifyArgs, ckpt: &std::path::Path, target: f64) -> Result<()> {
    let device = args.device.device()?;
    let (model, _store, _) = dpar::models::dpar(ckpt, &device)?;
    let recorded = dpar::parts::Recorded::of(ckpt);
    let part = dpar::parts::Part::EntropyModel;
    let owner = format!("the model {}", ckpt.display());
    let entropy_path = dpar::parts::resolve(
        part,
        args.entropy_model.as_deref(),
        recorded.id(part),
        ckpt,
        &owner,
        crate::common::allow_mismatch(),
    )?;
    let (entropy, _es) = dpar::models::gpt(&entropy_path, None, &device)?;
    let c = model.config();
    let base = PatchConfig { entropy_from: args.patcher, ..args.patch.apply(c.patch) };
    base.validate()?;
    if !(target.is_finite() && target > 1.0 && target < base.max_patch_len as f64) {
        bail!("--target-mean-len {target}: must lie between 1 and P = {}", base.max_patch_len);
    }
    let classes: Vec<u32> = (0..c.num_classes as u32).collect();
    let labels = dpar::sample_set::class_labels(&classes, args.per_class);
    let sampling = dpar::sample::SamplingConfig { seed: args.seed, ..Default::default() };
    let mean_len = |theta: f64| -> Result<f64> {
        let patch = PatchConfig { threshold: theta, ..base };
        let out = dpar::sample_set::sample_dpar(&model, &entropy, &labels, 100, &sampling, &patch, &device, |_| {})?;
        let patches: usize = out.lengths.iter().map(Vec::len).sum();
        let mean = (labels.len() * c.seq_len()) as f64 / patches as f64;
        println!("  θ = {theta:.4}: mean patch length {mean:.4} over {} sampled images", labels.len());
        Ok(mean)
    };
    // The mean length grows with θ; bracket the target, then bisect.
    let (mut lo, mut hi) = (0.0f64, 2.0 * base.threshold.max(1.0));
    while mean_len(hi)? < target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e3 {
            bail!("no θ up to {hi} reaches a mean patch length of {target}");
        }
    }
    let mut best = (hi, f64::INFINITY);
    for _ in 0..8 {
        let mid = 0.5 * (lo + hi);
        let m = mean_len(mid)?;
        if (m - target).abs() < best.1 {
            best = (mid, (m - target).abs());
        }
        if m < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    println!(
        "θ = {:.4} gives sampled images a mean patch length closest to {target} ({} patcher, {} images, seed {}); use it with dpar sample --threshold",
        best.0,
        args.patcher.name(),
        labels.len(),
        args.seed
    );
    if args.store {
        let calibrated = dpar::patching::Calibrated {
            threshold: best.0,
            target_mean_len: target,
            images: labels.len(),
            seed: args.seed,
        };
        let path = dpar::patching::SamplingThresholds::store(ckpt, args.patcher, calibrated)?;
        println!("stored θ for the {} patcher in {}", args.patcher.name(), path.display());
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({"on_samples": ckpt, "patcher": args.patcher.name(), "threshold": best.0,
            "target_mean_len": target, "images": labels.len(), "seed": args.seed});
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

fn patchify(args: PatchifyArgs) -> Result<()> {
    if let (Some(ckpt), Some(target)) = (&args.on_samples, args.target_mean_len) {
        return calibrate_on_samples(&args, ckpt, target);
    }
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
            let (theta, _) = patching::calibrate(&ent.entropy, grid, &base, target)
                .with_context(|| format!("--target-mean-len {target}"))?;
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
    if let Some(other) = &args.compare {
        let (other_shard, mut other_ent) =
            dpar::entropy::read_set(other, None).with_context(|| format!("--compare {}", other.display()))?;
        other_ent.entropy.truncate(ent.entropy.len());
        if other_shard.codes[..shard.codes.len().min(other_shard.codes.len())] != shard.codes[..] {
            bail!("--compare {}: not the codes of --codes {}", other.display(), args.codes.display());
        }
        let theta = match (args.compare_threshold, args.compare_target_mean_len) {
            (Some(theta), _) => theta,
            (None, Some(target)) => {
                patching::calibrate(&other_ent.entropy, grid, &config, target)
                    .with_context(|| format!("--compare-target-mean-len {target}"))?
                    .0
            }
            (None, None) => bail!("--compare needs --compare-threshold or --compare-target-mean-len"),
        };
        let other_config = PatchConfig { threshold: theta, ..config };
        let a = patching::agreement((&ent.entropy, &config), (&other_ent.entropy, &other_config), grid)?;
        println!(
            "patch starts of {} (θ = {theta:.4}) against these: precision {:.4}, recall {:.4}, F1 {:.4} over {} codes",
            other.display(),
            a.precision,
            a.recall,
            a.f1,
            a.codes
        );
        report.insert("compare".into(), serde_json::json!({"set": other, "threshold": theta, "agreement": a}));
    }
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
        let tok = dpar::models::tokenizer(&tok_path, args.tokenizer_preset.as_deref(), &device)?;
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
