//! `dpar eval {train-classifier, samples, real}`: the frozen classifier and the quality metrics
//! (FD in the classifier's features — not FID —, classifier IS, k = 3 precision/recall,
//! class accuracy).

use std::path::PathBuf;

use anyhow::{Context, Result};
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
    #[arg(long, default_value_t = 3000)]
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
    #[arg(long, default_value = "models/mnist/classifier")]
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
    /// Codes written by `dpar sample` (codes.safetensors or its folder).
    #[arg(long, default_value = "out/samples")]
    codes: PathBuf,
    /// Tokenizer to decode them. Default: the one the codes record (by hash), found beside the
    /// codes' folder, in models/mnist/tokenizer or in runs/tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Use at most this many samples (and as many reference images).
    #[arg(long, default_value_t = 10000)]
    n: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RealArgs {
    /// Real training images to score (and as many reference images).
    #[arg(long, default_value_t = 10000)]
    n: usize,
    #[command(flatten)]
    common: Common,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::TrainClassifier(args) => train_classifier(args),
        EvalCmd::Samples(args) => samples(args),
        EvalCmd::Real(args) => real(args),
    }
}

fn train_classifier(args: TrainClassifierArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut config = ClassifierTrainConfig::mnist(&args.data.data.display().to_string());
    config.train.steps = args.steps;
    config.seed = args.seed;
    let (s, c) = (config.model.image_size, config.model.in_channels);
    let train = args.data.load("train", s, c)?;
    let test = args.data.load("test", s, c)?;
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
    let device = common.device.device()?;
    let (model, _store, hash) = dpar::models::classifier(&common.classifier, &device)?;
    let c = model.config().clone();
    let data = common.data.load(&common.split, c.image_size, c.in_channels)?.take(n);
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
    let train = args.common.data.load("train", c.image_size, c.in_channels)?.take(args.n);
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
