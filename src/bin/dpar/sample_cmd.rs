//! `dpar sample`: class-conditional generation with a trained model, decoded to a PNG grid.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dpar::parts::Part;
use dpar::sample::SamplingConfig;
use dpar::sample_set::SampleSet;

use crate::common::DeviceArgs;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Model run folder or weight file (a DPAR or a LlamaGen/GPT model; the kind is read from
    /// its config). The default is the small DPAR model shipped with the repository.
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/dpar", value_parser = crate::common::model_path)]
    pub ckpt: PathBuf,
    /// Architecture preset, for LlamaGen weight files without an embedded config.
    #[arg(long)]
    pub preset: Option<String>,
    /// Tokenizer run folder or weight file, to decode the codes. Default: the one the model
    /// records (by hash) found beside the model, in models/mnist/tokenizer or in runs/tokenizer.
    /// A tokenizer other than the recorded one is an error (see --allow-mismatch).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Architecture preset, for tokenizer weight files without an embedded config.
    #[arg(long)]
    pub tokenizer_preset: Option<String>,
    /// Classes to draw, by number or by the names the model records: `0,3,7`, `0-9`, `cat,dog`
    /// (default: every class).
    #[arg(long)]
    pub classes: Option<String>,
    /// Images per class (one grid row per class).
    #[arg(long, default_value_t = 8, value_parser = crate::common::positive_usize)]
    pub per_class: usize,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    pub cfg: f64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Keep the k most likely codes (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated together.
    #[arg(long, default_value_t = 100, value_parser = crate::common::positive_usize)]
    pub batch_size: usize,
    /// Precision of the KV caches on the CPU: f32, or bf16 (half the memory traffic of a
    /// decode step; docs/speed.md measures both, and the sample quality of each).
    #[arg(long, default_value = "f32")]
    pub kv_cache: dpar::nn::KvPrecision,
    /// Output folder (samples.png, codes.safetensors, sample.json).
    #[arg(long, default_value = "out/samples")]
    pub out: PathBuf,
    /// Refuse to draw more images than this in one call (a guard against a slip such as
    /// `--per-class 100000`; raise it on purpose for large sample sets).
    #[arg(long, default_value_t = 10_000, value_parser = crate::common::positive_usize)]
    pub max_images: usize,
    /// DPAR: the entropy model that decides patches while sampling. Default: the one the model
    /// was trained with (by hash), found beside the model, in models/mnist/entropy or in
    /// runs/entropy. Another entropy model is an error (see --allow-mismatch).
    #[arg(long)]
    pub entropy_model: Option<PathBuf>,
    /// DPAR: inference patcher overrides (θ and P may differ from training).
    #[command(flatten)]
    pub patch: crate::common::PatchArgs,
    /// DPAR: where the entropy that opens patches comes from: `model` (the entropy model, as in
    /// training) or `self` (the DPAR decoder's own prediction; no entropy model runs; its θ is
    /// the one stored beside the model by `dpar patchify --on-samples --patcher self --store`,
    /// unless --threshold is given).
    #[arg(long, default_value = "model")]
    pub patcher: dpar::patching::EntropyFrom,
    /// DPAR: θ calibrated on the model's own samples for the chosen patcher, stored beside it
    /// by `dpar patchify --on-samples … --store` (with --patcher self that θ is the default).
    #[arg(long, conflicts_with = "threshold")]
    pub sampling_threshold: bool,
    /// Write the images as one NumPy `.npz` here instead (uint8 `[N, H, W, 3]` under `arr_0`, as
    /// LlamaGen's sample_ddp.py writes them for the ADM evaluator and `dpar eval fid`), streamed
    /// batch by batch, --per-class of each class, class-interleaved (every class once, then
    /// again), so that evaluators that split the file in order see every class in every split;
    /// the settings go to the same name with `.json`. No PNG grid or codes file is written.
    #[arg(long, value_name = "FILE")]
    pub npz: Option<PathBuf>,
    /// DPAR: skip samples-patches.png (the samples with their patch boundaries drawn).
    #[arg(long)]
    pub no_patch_picture: bool,
    /// Settings file (JSON, as `dpar serve`'s page downloads it): model, classes, per_class,
    /// seed, cfg, temperature, top_k, top_p and the patcher. Flags given explicitly win.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl SampleArgs {
    /// Fills every setting the command line did not give explicitly from `--config`.
    pub fn apply_config(&mut self, matches: &clap::ArgMatches) -> Result<()> {
        let Some(path) = self.config.clone() else { return Ok(()) };
        let settings = dpar::sample_set::SampleSettings::read(&path)?;
        let given = |id: &str| {
            matches.try_get_raw(id).ok().flatten().is_some()
                && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        };
        if let Some(model) = &settings.model {
            if !given("ckpt") {
                self.ckpt = dpar::home::shipped(model)?;
            }
        }
        if settings.classes.is_some() && !given("classes") {
            self.classes = settings.classes.clone();
        }
        macro_rules! fill {
            ($($field:ident),*) => {$(
                if let Some(v) = settings.$field {
                    if !given(stringify!($field)) {
                        self.$field = v;
                    }
                }
            )*};
        }
        fill!(per_class, seed, temperature, top_k, top_p);
        if let Some(cfg) = settings.cfg {
            if !given("cfg") {
                self.cfg = cfg;
            }
        }
        if let Some(patch) = settings.patch {
            let p = &mut self.patch;
            if !given("threshold") {
                p.threshold = Some(patch.threshold);
            }
            if !given("max_patch_len") {
                p.max_patch_len = Some(patch.max_patch_len);
            }
            if !given("no_entropy_gate") {
                p.no_entropy_gate = !patch.entropy_gate;
            }
            if !given("no_max_len") {
                p.no_max_len = !patch.max_len_rule;
            }
            if !given("no_row_reset") {
                p.no_row_reset = !patch.row_reset;
            }
            if !given("patcher") {
                self.patcher = patch.entropy_from;
            }
        }
        Ok(())
    }
}

/// Fails now, not after the sampling, when `out` cannot be created or written.
fn check_writable(out: &std::path::Path, flag: &str) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("{flag}: cannot create the output folder {}", out.display()))?;
    let probe = out.join(format!(".write-check.{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag}: cannot write into the output folder {}", out.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// The tokenizer or entropy model to use with `--ckpt`: the given one, checked against the
/// hash the model records, or the recorded one found in the usual places.
fn find_part(args: &SampleArgs, part: Part, given: Option<&std::path::Path>) -> Result<PathBuf> {
    let recorded = dpar::parts::Recorded::of(&args.ckpt);
    let owner = format!("the model {}", args.ckpt.display());
    Ok(dpar::parts::resolve(part, given, recorded.id(part), &args.ckpt, &owner, crate::common::allow_mismatch())?)
}

/// The number of images `per_class` × the classes, within `--max-images`.
fn check_total(args: &SampleArgs, classes: usize) -> Result<()> {
    let total = args.per_class.saturating_mul(classes);
    if total > args.max_images {
        bail!("{} classes × --per-class {} = {total} images, more than --max-images {}; raise --max-images if you mean it", classes, args.per_class, args.max_images);
    }
    Ok(())
}

// The --npz sampling closures return the library's SampleSetError, which clippy finds large;
// it is built once per failed run, so its size does not matter.
#[allow(clippy::result_large_err)]
pub fn sample(args: SampleArgs) -> Result<()> {
    let device = args.device.device()?;
    let config = SamplingConfig {
        cfg_scale: args.cfg,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        first_image: 0,
        kv_cache: args.kv_cache,
    };
    config.validate()?;
    if args.per_class == 0 || args.batch_size == 0 {
        bail!("--per-class and --batch-size must be > 0");
    }
    if args.per_class > args.max_images {
        bail!(
            "--per-class {} asks for more than --max-images {} images; raise --max-images if you mean it",
            args.per_class,
            args.max_images
        );
    }
    match &args.npz {
        Some(npz) => {
            let folder = npz.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            check_writable(folder, &format!("--npz {}", npz.display()))?
        }
        None => check_writable(&args.out, "--out")?,
    }
    if dpar::models::kind_of(&args.ckpt) == Some(dpar::models::Kind::Dpar) {
        return sample_dpar(args, config, device);
    }
    let (model, _store) = dpar::models::gpt(&args.ckpt, args.preset.as_deref(), &device)?;
    let tokenizer_path = find_part(&args, Part::Tokenizer, args.tokenizer.as_deref())?;
    let tokenizer = dpar::models::tokenizer(&tokenizer_path, args.tokenizer_preset.as_deref(), &device)?;
    let mc = model.config();
    if tokenizer.config.grid_size() != mc.grid_size || tokenizer.config.codebook_size > mc.vocab_size {
        bail!(
            "tokenizer {} ({}×{} grid, {} codes) does not fit the model ({}×{} grid, vocabulary {})",
            tokenizer_path.display(),
            tokenizer.config.grid_size(),
            tokenizer.config.grid_size(),
            tokenizer.config.codebook_size,
            mc.grid_size,
            mc.grid_size,
            mc.vocab_size
        );
    }
    let classes = dpar::sample_set::parse_classes(args.classes.as_deref(), &mc.class_names, mc.num_classes)?;
    check_total(&args, classes.len())?;
    let labels = match args.npz {
        Some(_) => dpar::sample_set::interleaved_labels(&classes, args.per_class),
        None => dpar::sample_set::class_labels(&classes, args.per_class),
    };
    if let Some(npz) = &args.npz {
        let record = serde_json::json!({
            "model": "gpt",
            "checkpoint": args.ckpt.display().to_string(),
            "tokenizer": tokenizer_path.display().to_string(),
            "steps_per_image": mc.seq_len(),
        });
        return write_npz(&args, npz, &tokenizer, &classes, &labels, &config, &device, record, |first, chunk| {
            let batch_config = dpar::sample_set::batch_sampling(&config, first);
            Ok(dpar::sample::generate_gpt(&model, chunk, &batch_config, &device)?)
        });
    }
    let bar = dpar::util::progress_bar(labels.len() as u64, "sample");
    let t = Instant::now();
    let codes =
        dpar::sample_set::sample_gpt(&model, &labels, args.batch_size, &config, &device, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    let n = labels.len();
    let images_per_s = n as f64 / secs;
    let tokens_per_s = (n * mc.seq_len()) as f64 / secs;
    println!(
        "sampled {n} images ({} classes × {}) in {:.1}s: {images_per_s:.2} images/s, {tokens_per_s:.0} codes/s, {} model steps per image",
        classes.len(),
        args.per_class,
        secs,
        mc.seq_len()
    );
    let record = serde_json::json!({
        "model": "gpt",
        "checkpoint": args.ckpt.display().to_string(),
        "tokenizer": tokenizer_path.display().to_string(),
        "sampling": config,
        "classes": classes,
        "per_class": args.per_class,
        "batch_size": args.batch_size,
        "seconds": secs,
        "images_per_s": images_per_s,
        "codes_per_s": tokens_per_s,
        "steps_per_image": mc.seq_len(),
    });
    let set = SampleSet {
        tokenizer: &tokenizer,
        class_names: &mc.class_names,
        classes: &classes,
        per_class: args.per_class,
        codes: &codes,
        record,
    };
    print_written(set.write(&args.out, &device, None)?);
    Ok(())
}

/// `--npz`: streams the samples into one `.npz` and writes the settings beside it.
#[allow(clippy::too_many_arguments)]
fn write_npz(
    args: &SampleArgs,
    npz: &std::path::Path,
    tokenizer: &dpar::tokenizer::train::Tokenizer,
    classes: &[u32],
    labels: &[u32],
    config: &SamplingConfig,
    device: &candle_core::Device,
    mut record: serde_json::Value,
    sample_batch: impl FnMut(usize, &[u32]) -> dpar::sample_set::Result<Vec<Vec<u32>>>,
) -> Result<()> {
    let bar = dpar::util::progress_bar(labels.len() as u64, "sample");
    let t = Instant::now();
    let (h, w) = dpar::sample_set::stream_npz(npz, tokenizer, labels, args.batch_size, device, sample_batch, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    let n = labels.len();
    println!(
        "sampled {n} images ({} classes × {}) in {secs:.1}s: {:.2} images/s; wrote {} (arr_0: uint8 [{n}, {h}, {w}, 3])",
        classes.len(),
        args.per_class,
        n as f64 / secs,
        npz.display()
    );
    if let Some(fields) = record.as_object_mut() {
        for (k, v) in [
            ("npz", serde_json::json!(npz.display().to_string())),
            ("sampling", serde_json::json!(config)),
            ("classes", serde_json::json!(classes)),
            ("per_class", serde_json::json!(args.per_class)),
            ("order", serde_json::json!("interleaved")),
            ("batch_size", serde_json::json!(args.batch_size)),
            ("seconds", serde_json::json!(secs)),
            ("images_per_s", serde_json::json!(n as f64 / secs)),
        ] {
            fields.insert(k.to_string(), v);
        }
    }
    let json = npz.with_extension("json");
    dpar::util::write_atomic(&json, serde_json::to_string_pretty(&record)?.as_bytes())?;
    println!("wrote {}", json.display());
    Ok(())
}

fn print_written(paths: Vec<PathBuf>) {
    for p in paths {
        println!("wrote {}", p.display());
    }
}

#[allow(clippy::result_large_err)]
fn sample_dpar(args: SampleArgs, config: SamplingConfig, device: candle_core::Device) -> Result<()> {
    let (model, _store, _train_config) = dpar::models::dpar(&args.ckpt, &device)?;
    // The entropy model decides every patch boundary: another one (even the same model in
    // another precision) changes the patches the model was trained on, so it must be the one
    // recorded by hash.
    let entropy_path = find_part(&args, Part::EntropyModel, args.entropy_model.as_deref())?;
    let (entropy_model, _es) = dpar::models::gpt(&entropy_path, None, &device)?;
    let tokenizer_path = find_part(&args, Part::Tokenizer, args.tokenizer.as_deref())?;
    let tokenizer = dpar::models::tokenizer(&tokenizer_path, args.tokenizer_preset.as_deref(), &device)?;
    let mc = model.config();
    if tokenizer.config.grid_size() != mc.grid_size || tokenizer.config.codebook_size > mc.vocab_size {
        bail!(
            "tokenizer {} does not fit the DPAR model (grid {}, vocabulary {})",
            tokenizer_path.display(),
            mc.grid_size,
            mc.vocab_size
        );
    }
    let mut patch = dpar::patching::PatchConfig { entropy_from: args.patcher, ..args.patch.apply(mc.patch) };
    if let Some(theta) =
        crate::common::stored_threshold(&args.ckpt, args.patcher, args.patch.threshold, args.sampling_threshold)?
    {
        patch.threshold = theta;
    }
    patch.validate()?;
    let classes = dpar::sample_set::parse_classes(args.classes.as_deref(), &mc.class_names, mc.num_classes)?;
    check_total(&args, classes.len())?;
    let labels = match args.npz {
        Some(_) => dpar::sample_set::interleaved_labels(&classes, args.per_class),
        None => dpar::sample_set::class_labels(&classes, args.per_class),
    };
    if let Some(npz) = &args.npz {
        let mut steps = 0usize;
        let record = serde_json::json!({
            "model": "dpar",
            "checkpoint": args.ckpt.display().to_string(),
            "entropy_model": entropy_path.display().to_string(),
            "tokenizer": tokenizer_path.display().to_string(),
            "patch": patch,
        });
        write_npz(&args, npz, &tokenizer, &classes, &labels, &config, &device, record, |first, chunk| {
            let batch_config = dpar::sample_set::batch_sampling(&config, first);
            let out = dpar::dpar::generate::generate(&model, &entropy_model, chunk, &batch_config, &patch, &device)
                .map_err(dpar::sample_set::SampleSetError::from)?;
            steps += out.lengths.iter().map(Vec::len).sum::<usize>();
            Ok(out.codes)
        })?;
        println!(
            "patcher {}: patch-transformer steps per image: mean {:.1} vs {} codes",
            patch.label(),
            steps as f64 / labels.len() as f64,
            mc.seq_len()
        );
        return Ok(());
    }
    let bar = dpar::util::progress_bar(labels.len() as u64, "sample");
    let t = Instant::now();
    let dpar::dpar::generate::Generated { codes, lengths } = dpar::sample_set::sample_dpar(
        &model,
        &entropy_model,
        &labels,
        args.batch_size,
        &config,
        &patch,
        &device,
        |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    let n = labels.len();
    let steps: Vec<usize> = lengths.iter().map(|l| l.len()).collect();
    let mean_steps = steps.iter().sum::<usize>() as f64 / n as f64;
    println!(
        "sampled {n} images ({} classes × {}) in {:.1}s: {:.2} images/s, {:.0} codes/s; patcher {}; patch-transformer steps per image: mean {:.1} (min {}, max {}) vs {} codes, mean patch length {:.2}",
        classes.len(),
        args.per_class,
        secs,
        n as f64 / secs,
        (n * mc.seq_len()) as f64 / secs,
        patch.label(),
        mean_steps,
        steps.iter().min().copied().unwrap_or(0),
        steps.iter().max().copied().unwrap_or(0),
        mc.seq_len(),
        mc.seq_len() as f64 / mean_steps
    );
    let record = serde_json::json!({
        "model": "dpar",
        "checkpoint": args.ckpt.display().to_string(),
        "entropy_model": entropy_path.display().to_string(),
        "tokenizer": tokenizer_path.display().to_string(),
        "sampling": config,
        "patch": patch,
        "classes": classes,
        "per_class": args.per_class,
        "batch_size": args.batch_size,
        "seconds": secs,
        "images_per_s": n as f64 / secs,
        "codes_per_s": (n * mc.seq_len()) as f64 / secs,
        "patch_steps_per_image": mean_steps,
        "patch_lengths": lengths,
    });
    let set = SampleSet {
        tokenizer: &tokenizer,
        class_names: &mc.class_names,
        classes: &classes,
        per_class: args.per_class,
        codes: &codes,
        record,
    };
    let patches = (!args.no_patch_picture).then_some((mc.grid_size, lengths.as_slice()));
    print_written(set.write(&args.out, &device, patches)?);
    Ok(())
}
