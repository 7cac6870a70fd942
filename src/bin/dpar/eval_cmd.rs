//! `dpar eval {train-classifier, samples, real}`: the frozen classifier and the quality metrics
//! (FD in the classifier's features — not FID —, classifier IS, k = 3 precision/recall,
//! class accuracy); `dpar eval fid`: FID with InceptionV3 for ImageNet-scale sample sets.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dpar::eval::classifier::{self, ClassifierTask, ClassifierTrainConfig};

use crate::common::{DataArgs, DeviceArgs};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Train the small CNN whose features the metrics use, and report its test accuracy.
    TrainClassifier(TrainClassifierArgs),
    /// Metrics of generated samples (a codes file from `dpar sample`) against the test split.
    Samples(SamplesArgs),
    /// The floor: real train images against the test split.
    Real(RealArgs),
    /// FID with InceptionV3 (pytorch-fid's FID weights, which you download) of a sample `.npz`
    /// or image folder against a reference (ADM batch, statistics, `.npz` or folder).
    Fid(FidArgs),
}

#[derive(Args)]
pub struct FidArgs {
    /// InceptionV3 weights by pytorch-fid's key names: its `pt_inception-2015-12-05-6726825d.pth`
    /// (or a safetensors copy). With other weights the result is reported as an FD, not FID.
    #[arg(long)]
    inception: PathBuf,
    /// Samples: a `.npz` with uint8 `arr_0` `[N, H, W, 3]` (`dpar sample --npz`, LlamaGen's
    /// sample_ddp.py) or a folder of PNG/JPEG images (searched recursively).
    #[arg(long)]
    samples: PathBuf,
    /// Reference: an ADM reference batch or any `.npz` with `mu` and `sigma` (statistics), a
    /// `.npz` of pool activations `[N, 2048]`, a `.npz` of images, or an image folder.
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Images per InceptionV3 forward pass.
    #[arg(long, default_value_t = 50, value_parser = crate::common::positive_usize)]
    batch: usize,
    /// Also the Inception Score from the logits (1008-way softmax, 10 splits).
    #[arg(long)]
    inception_score: bool,
    /// Also k = 3 precision/recall in pool feature space (needs reference images or activations).
    #[arg(long)]
    precision_recall: bool,
    /// Write the reference's statistics (`mu`, `sigma`) to this `.npz`, to reuse as --ref.
    #[arg(long)]
    save_ref_stats: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct TrainClassifierArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Run folder of the classifier.
    #[arg(long, default_value = "runs/classifier")]
    out: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 3000, value_parser = crate::common::positive_u64)]
    steps: u64,
    /// Seed of the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in --out.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Delete the run already in --out and start over.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
pub struct Common {
    /// The classifier (run folder or weights).
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/classifier", value_parser = crate::common::model_path)]
    pub classifier: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Reference split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct SamplesArgs {
    /// Codes written by `dpar sample` (codes.safetensors or its folder), or images in a `.npz`
    /// (`dpar sample --npz`; labels come from the settings file beside it, when there is one).
    #[arg(long, default_value = "out/samples")]
    codes: PathBuf,
    /// Tokenizer to decode them. Default: the one the codes record (by hash), found beside the
    /// codes' folder, in models/mnist/tokenizer or in runs/tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Use at most this many samples (and as many reference images).
    #[arg(long, default_value_t = 10000, value_parser = crate::common::positive_usize)]
    n: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RealArgs {
    /// Real training images to score (and as many reference images).
    #[arg(long, default_value_t = 10000, value_parser = crate::common::positive_usize)]
    n: usize,
    #[command(flatten)]
    common: Common,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::TrainClassifier(args) => train_classifier(args),
        EvalCmd::Samples(args) => samples(args),
        EvalCmd::Real(args) => real(args),
        EvalCmd::Fid(args) => fid(args),
    }
}

fn train_classifier(args: TrainClassifierArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut config = ClassifierTrainConfig::mnist(&args.data.data.display().to_string());
    config.train.steps = args.steps;
    config.seed = args.seed;
    let (s, c) = (config.model.image_size, config.model.in_channels);
    let train = args.data.load("train", s, c, None)?;
    let test = args.data.load("test", s, c, None)?;
    config.model.num_classes = train.num_classes();
    let mut task = ClassifierTask::new(config.clone(), train, Some(test.clone()), &device)?;
    let report =
        dpar::train::run(&mut task, &config.train, &args.out, crate::common::start(args.resume, args.overwrite))?;
    let acc = classifier::accuracy(task.model(), &test, usize::MAX, &device)?;
    let hash = dpar::util::sha256_file(&args.out.join("model.safetensors"))?;
    println!(
        "trained the classifier in {}: test accuracy {:.2}% on {} images",
        dpar::util::human_duration(report.seconds),
        100.0 * acc,
        test.len()
    );
    println!("classifier sha256 {hash}");
    let record = serde_json::json!({ "test_accuracy": acc, "test_images": test.len(), "sha256": hash, "seconds": report.seconds });
    dpar::util::write_atomic(&args.out.join("accuracy.json"), serde_json::to_string_pretty(&record)?.as_bytes())?;
    println!("wrote {}/{{model.safetensors, config.json, accuracy.json}}", args.out.display());
    Ok(())
}

/// Loads the classifier and the reference features of `n` images of the split.
pub fn reference(common: &Common, n: usize) -> Result<(classifier::Classifier, String, Vec<f32>, candle_core::Device)> {
    if n < 2 {
        bail!("--n {n}: a Fréchet distance needs at least 2 images on each side");
    }
    let device = common.device.device()?;
    let (model, _store, hash) = dpar::models::classifier(&common.classifier, &device)?;
    let c = model.config().clone();
    let data = common.data.load(&common.split, c.image_size, c.in_channels, Some(n))?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let (mut feats, mut probs) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(1000) {
        let (f, p) = model.features_and_probs(&data.batch_tensor(chunk, false, &device)?)?;
        feats.extend(f);
        probs.extend(p);
    }
    classifier::check_reference_data(
        &probs,
        &data.labels,
        c.num_classes,
        classifier::recorded_accuracy(&common.classifier),
        &data.source,
    )?;
    Ok((model, hash, feats, device))
}

fn print_report(what: &str, r: &dpar::eval::QualityReport) {
    println!("{what}: {} samples vs {} reference images", r.samples, r.reference_samples);
    println!("  FD (classifier features, not FID) {:.3}", r.fd);
    println!("  classifier IS {:.3} ± {:.3}", r.is_mean, r.is_std);
    println!("  precision {:.3}, recall {:.3} (k = 3)", r.precision, r.recall);
    if let Some(a) = r.accuracy {
        println!("  class accuracy {:.2}%", 100.0 * a);
    }
    println!("  classifier sha256 {}", &r.classifier_sha256[..16]);
}

fn samples(args: SamplesArgs) -> Result<()> {
    if args.n < 2 {
        bail!("--n {}: a Fréchet distance needs at least 2 images on each side", args.n);
    }
    if args.codes.extension().is_some_and(|e| e == "npz") {
        return npz_samples(args);
    }
    let file = if args.codes.is_dir() { args.codes.join("codes.safetensors") } else { args.codes.clone() };
    let shard = dpar::data::shards::read_shard(&file).with_context(|| format!("reading samples {}", file.display()))?;
    let (model, hash, refs, device) = reference(&args.common, args.n)?;
    let owner = format!("the samples {}", file.display());
    let tok_path = dpar::parts::resolve(
        dpar::parts::Part::Tokenizer,
        args.tokenizer.as_deref(),
        Some(&shard.info.tokenizer_id),
        &file,
        &owner,
        crate::common::allow_mismatch(),
    )?;
    let tok = dpar::models::tokenizer(&tok_path, None, &device)?;
    let n = shard.len().min(args.n);
    let images = decode(&tok, &shard, n, &device)?;
    let report = dpar::eval::quality(&model, &hash, &images, Some(&shard.labels[..n]), &refs)?;
    print_report(&format!("samples {}", file.display()), &report);
    if let Some(path) = &args.common.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `dpar eval samples --codes FILE.npz`: images from a `.npz`, fitted to the classifier's input.
fn npz_samples(args: SamplesArgs) -> Result<()> {
    let (model, hash, refs, device) = reference(&args.common, args.n)?;
    let c = model.config().clone();
    let mut data = dpar::data::ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 0,
        width: 0,
        class_names: Vec::new(),
        source: args.codes.display().to_string(),
    };
    dpar::eval::fid::for_each_image_batch(&args.codes, 100, |bytes, n, h, w| {
        // (n, H, W, 3) → (n, 3, H, W), the dataset's layout.
        for image in bytes.chunks(h * w * 3).take(n) {
            let rgb = image::RgbImage::from_raw(w as u32, h as u32, image.to_vec()).ok_or_else(|| {
                dpar::eval::EvalError::Bad(format!("an image of {} bytes is not {h}×{w}×3", image.len()))
            })?;
            data.images.extend(dpar::data::from_rgb_image(&rgb, 3));
        }
        (data.height, data.width) = (h, w);
        Ok(())
    })
    .with_context(|| format!("--codes {}", args.codes.display()))?;
    let count = data.images.len() / (3 * data.height * data.width).max(1);
    let n = count.min(args.n);
    // The labels `dpar sample --npz` requested, from the settings beside the file.
    let settings = std::fs::read_to_string(args.codes.with_extension("json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let labels = settings.and_then(|v| dpar::sample_set::npz_labels(&v, count));
    data.labels = labels.clone().unwrap_or_else(|| vec![0; count]);
    let data = data.take(n).prepare(c.image_size, c.in_channels)?;
    let idx: Vec<usize> = (0..n).collect();
    let images = data.batch_tensor(&idx, false, &device)?;
    let report = dpar::eval::quality(&model, &hash, &images, labels.as_ref().map(|l| &l[..n]), &refs)?;
    print_report(&format!("samples {}", args.codes.display()), &report);
    if let Some(path) = &args.common.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Decodes the first `n` code sequences of a shard into images clamped to [−1, 1].
pub fn decode(
    tok: &dpar::tokenizer::train::Tokenizer,
    shard: &dpar::data::shards::CodeShard,
    n: usize,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let l = shard.info.seq_len();
    let mut parts = Vec::new();
    for start in (0..n).step_by(200) {
        let len = 200.min(n - start);
        let codes = candle_core::Tensor::from_slice(&shard.codes[start * l..(start + len) * l], (len, l), device)?;
        parts.push(tok.decode(&codes)?.clamp(-1f32, 1f32)?);
    }
    Ok(candle_core::Tensor::cat(&parts, 0)?)
}

fn real(args: RealArgs) -> Result<()> {
    let (model, hash, refs, device) = reference(&args.common, args.n)?;
    let c = model.config().clone();
    let train = args.common.data.load("train", c.image_size, c.in_channels, Some(args.n))?;
    let idx: Vec<usize> = (0..train.len()).collect();
    let images = train.batch_tensor(&idx, false, &device)?;
    let report = dpar::eval::quality(&model, &hash, &images, Some(&train.labels), &refs)?;
    print_report("real train images (the floor)", &report);
    if let Some(path) = &args.common.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn fid(args: FidArgs) -> Result<()> {
    use dpar::eval::fid;
    let device = args.device.device()?;
    for (flag, path) in [("--inception", &args.inception), ("--samples", &args.samples), ("--ref", &args.reference)] {
        if !path.exists() {
            anyhow::bail!("{flag} {}: no such file or folder", path.display());
        }
    }
    let model = dpar::eval::inception::InceptionV3::load(&args.inception, &device)
        .with_context(|| format!("--inception {}", args.inception.display()))?;
    let hash = dpar::util::sha256_file(&args.inception)?;
    let bar = dpar::util::progress_bar(fid::count_images(&args.reference).unwrap_or(0) as u64, "reference features");
    let reference = fid::reference(&args.reference, &model, args.batch, &device, |n| bar.inc(n as u64))
        .with_context(|| format!("--ref {}", args.reference.display()))?;
    bar.finish_and_clear();
    if let (Some(path), fid::Reference::Features { features, .. }) = (&args.save_ref_stats, &reference) {
        fid::save_stats(path, features)?;
        println!("wrote {} (mu, sigma of {} reference images)", path.display(), features.len());
    }
    if let fid::Reference::Stats { .. } = &reference {
        println!(
            "reference statistics read from {} (ADM's reference batches hold TensorFlow-Inception statistics; \
             see the README on how they relate to these features)",
            args.reference.display()
        );
    }
    let bar = dpar::util::progress_bar(fid::count_images(&args.samples).unwrap_or(0) as u64, "sample features");
    let samples = fid::features(&model, &args.samples, args.batch, &device, |n| bar.inc(n as u64))
        .with_context(|| format!("--samples {}", args.samples.display()))?;
    bar.finish_and_clear();
    let report = fid::report(&samples, &reference, &hash, args.inception_score, args.precision_recall)?;
    println!(
        "{}: {:.4} ({} samples vs {})",
        report.metric,
        report.value,
        report.samples,
        if report.reference_images > 0 {
            format!("{} reference images", report.reference_images)
        } else {
            "reference statistics".into()
        }
    );
    if let Some((mean, std)) = report.inception_score {
        println!("  Inception Score {mean:.3} ± {std:.3}");
    }
    if let Some((p, r)) = report.precision_recall {
        println!("  precision {p:.3}, recall {r:.3} (k = 3)");
    }
    if let Some(path) = &args.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
