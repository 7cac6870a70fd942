//! `dpar sample`: class-conditional generation with a trained model, decoded to a PNG grid.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dpar::parts::Part;
use dpar::sample::SamplingConfig;
use dpar::tokenizer::train::Tokenizer;

use crate::common::DeviceArgs;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Model run folder or weight file (a DPAR or a LlamaGen/GPT model; the kind is read from
    /// its config). The default is the small DPAR model shipped with the repository.
    #[arg(long, default_value = "models/mnist/dpar")]
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
    /// Classes to draw, e.g. `0,3,7` or `0-9` (default: every class).
    #[arg(long)]
    pub classes: Option<String>,
    /// Images per class (one grid row per class).
    #[arg(long, default_value_t = 8)]
    pub per_class: usize,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Keep the k most likely codes (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated together.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Output folder (samples.png, codes.safetensors, sample.json).
    #[arg(long, default_value = "out/samples")]
    pub out: PathBuf,
    /// Refuse to draw more images than this in one call (a guard against a slip such as
    /// `--per-class 100000`; raise it on purpose for large sample sets).
    #[arg(long, default_value_t = 10_000)]
    pub max_images: usize,
    /// DPAR: the entropy model that decides patches while sampling. Default: the one the model
    /// was trained with (by hash), found beside the model, in models/mnist/entropy or in
    /// runs/entropy. Another entropy model is an error (see --allow-mismatch).
    #[arg(long)]
    pub entropy_model: Option<PathBuf>,
    /// DPAR: inference patcher overrides (θ and P may differ from training).
    #[command(flatten)]
    pub patch: crate::patch_cmd::PatchArgs,
    /// DPAR: skip samples-patches.png (the samples with their patch boundaries drawn).
    #[arg(long)]
    pub no_patch_picture: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The `kind` recorded in a checkpoint's config (`gpt`, `entropy`, `dpar`), if any.
pub fn checkpoint_kind(path: &std::path::Path) -> Option<String> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
    let meta = dpar::tensor_io::read_safetensors_metadata(&file).ok()?;
    let config: serde_json::Value = serde_json::from_str(meta.get("config")?).ok()?;
    config.get("kind")?.as_str().map(str::to_string)
}

/// Parses `0,3,7`, `0-9` or a mix into class indices, checking them against `num_classes`.
pub fn parse_classes(spec: Option<&str>, num_classes: usize) -> Result<Vec<u32>> {
    let Some(spec) = spec else { return Ok((0..num_classes as u32).collect()) };
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        let (lo, hi) = (
            lo.with_context(|| format!("--classes: `{part}` is not a class number"))?,
            hi.with_context(|| format!("--classes: `{part}` is not a class number"))?,
        );
        for c in lo..=hi {
            if c as usize >= num_classes {
                bail!("--classes: unknown class {c}; the model has {num_classes} classes (0-{})", num_classes - 1);
            }
            out.push(c);
        }
    }
    if out.is_empty() {
        bail!("--classes: no classes given");
    }
    Ok(out)
}

/// What a sampling run produced.
pub struct SampleOutput<'a> {
    pub out: &'a std::path::Path,
    pub tokenizer: &'a Tokenizer,
    pub classes: &'a [u32],
    pub per_class: usize,
    pub codes: &'a [Vec<u32>],
    pub record: serde_json::Value,
}

impl SampleOutput<'_> {
    /// Decodes every sample to an RGB image, scaled up for viewing.
    fn images(&self, device: &candle_core::Device) -> Result<Vec<image::RgbImage>> {
        let l = self.tokenizer.config.seq_len();
        let flat: Vec<u32> = self.codes.iter().flatten().copied().collect();
        let codes = candle_core::Tensor::from_vec(flat, (self.codes.len(), l), device)?;
        let scale = (96 / self.tokenizer.config.image_size as u32).max(1);
        let mut images = Vec::with_capacity(self.codes.len());
        for start in (0..self.codes.len()).step_by(100) {
            let n = (self.codes.len() - start).min(100);
            images.extend(
                dpar::viz::tensor_to_images(&self.tokenizer.decode(&codes.narrow(0, start, n)?)?)?
                    .iter()
                    .map(|i| dpar::viz::upscale(i, scale)),
            );
        }
        Ok(images)
    }

    /// A grid with one row per class; `decorate` may draw on each image (index, image).
    fn write_grid(
        &self,
        images: &[image::RgbImage],
        path: &std::path::Path,
        decorate: &dyn Fn(usize, image::RgbImage) -> image::RgbImage,
    ) -> Result<()> {
        let rows: Vec<Vec<image::RgbImage>> = (0..self.classes.len())
            .map(|r| {
                (0..self.per_class)
                    .map(|j| decorate(r * self.per_class + j, images[r * self.per_class + j].clone()))
                    .collect()
            })
            .collect();
        dpar::viz::save_png(&dpar::viz::grid(&rows, 4), path)?;
        Ok(())
    }

    /// Writes samples.png, codes.safetensors (a code shard with the requested labels) and
    /// sample.json; with `patches`, also samples-patches.png with each image's patches drawn.
    pub fn write(&self, device: &candle_core::Device, patches: Option<(usize, &[Vec<usize>])>) -> Result<()> {
        std::fs::create_dir_all(self.out).with_context(|| format!("creating {}", self.out.display()))?;
        let images = self.images(device)?;
        let png = self.out.join("samples.png");
        self.write_grid(&images, &png, &|_, img| img)?;
        let mut written = vec![png];
        if let Some((grid, lengths)) = patches {
            let path = self.out.join("samples-patches.png");
            // Twice the size of samples.png, so that single-code patches stay visible.
            self.write_grid(&images, &path, &|i, img| {
                dpar::viz::patch_overlay(&dpar::viz::upscale(&img, 2), grid, &lengths[i])
            })?;
            written.push(path);
        }
        let max_class = self.classes.iter().copied().max().unwrap_or(0);
        let shard = dpar::data::shards::CodeShard {
            info: dpar::data::shards::ShardInfo {
                grid_size: self.tokenizer.config.grid_size(),
                codebook_size: self.tokenizer.config.codebook_size,
                num_classes: max_class as usize + 1,
                class_names: (0..=max_class).map(|c| c.to_string()).collect(),
                tokenizer_id: self.tokenizer.id.clone(),
            },
            codes: self.codes.iter().flatten().copied().collect(),
            labels: self.classes.iter().flat_map(|&c| std::iter::repeat_n(c, self.per_class)).collect(),
            flip_codes: None,
        };
        let codes_path = self.out.join("codes.safetensors");
        dpar::data::shards::write_shard(&codes_path, &shard)?;
        let json = self.out.join("sample.json");
        dpar::util::write_atomic(&json, serde_json::to_string_pretty(&self.record)?.as_bytes())?;
        written.extend([codes_path, json]);
        for p in written {
            println!("wrote {}", p.display());
        }
        Ok(())
    }
}

/// Fails now, not after the sampling, when `out` cannot be created or written.
fn check_writable(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the output folder", out.display()))?;
    let probe = out.join(format!(".write-check.{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: cannot write into the output folder", out.display()))?;
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

pub fn sample(args: SampleArgs) -> Result<()> {
    let device = args.device.device()?;
    let config = SamplingConfig {
        cfg_scale: args.cfg,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
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
    check_writable(&args.out)?;
    if checkpoint_kind(&args.ckpt).as_deref() == Some("dpar") {
        return sample_dpar(args, config, device);
    }
    let (model, _store) = dpar::gpt::load(&args.ckpt, args.preset.as_deref(), &device)?;
    let tokenizer_path = find_part(&args, Part::Tokenizer, args.tokenizer.as_deref())?;
    let tokenizer = Tokenizer::load(&tokenizer_path, args.tokenizer_preset.as_deref(), &device)?;
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
    let classes = parse_classes(args.classes.as_deref(), mc.num_classes)?;
    check_total(&args, classes.len())?;
    let labels: Vec<u32> = classes.iter().flat_map(|&c| std::iter::repeat_n(c, args.per_class)).collect();
    let bar = dpar::util::progress_bar(labels.len() as u64, "sample");
    let t = Instant::now();
    let mut codes = Vec::with_capacity(labels.len());
    for (i, chunk) in labels.chunks(args.batch_size).enumerate() {
        let chunk_config = SamplingConfig { seed: args.seed.wrapping_add(i as u64), ..config.clone() };
        codes.extend(dpar::sample::generate_gpt(&model, chunk, &chunk_config, &device)?);
        bar.inc(chunk.len() as u64);
    }
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
    SampleOutput {
        out: &args.out,
        tokenizer: &tokenizer,
        classes: &classes,
        per_class: args.per_class,
        codes: &codes,
        record,
    }
    .write(&device, None)
}

fn sample_dpar(args: SampleArgs, config: SamplingConfig, device: candle_core::Device) -> Result<()> {
    let (model, _store, _train_config) = dpar::dpar::train::load(&args.ckpt, &device)?;
    // The entropy model decides every patch boundary: another one (even the same model in
    // another precision) changes the patches the model was trained on, so it must be the one
    // recorded by hash.
    let entropy_path = find_part(&args, Part::EntropyModel, args.entropy_model.as_deref())?;
    let (entropy_model, _es) = dpar::gpt::load(&entropy_path, None, &device)?;
    let tokenizer_path = find_part(&args, Part::Tokenizer, args.tokenizer.as_deref())?;
    let tokenizer = Tokenizer::load(&tokenizer_path, args.tokenizer_preset.as_deref(), &device)?;
    let mc = model.config();
    if tokenizer.config.grid_size() != mc.grid_size || tokenizer.config.codebook_size > mc.vocab_size {
        bail!(
            "tokenizer {} does not fit the DPAR model (grid {}, vocabulary {})",
            tokenizer_path.display(),
            mc.grid_size,
            mc.vocab_size
        );
    }
    let patch = args.patch.apply(mc.patch);
    patch.validate()?;
    let classes = parse_classes(args.classes.as_deref(), mc.num_classes)?;
    check_total(&args, classes.len())?;
    let labels: Vec<u32> = classes.iter().flat_map(|&c| std::iter::repeat_n(c, args.per_class)).collect();
    let bar = dpar::util::progress_bar(labels.len() as u64, "sample");
    let t = Instant::now();
    let mut codes = Vec::with_capacity(labels.len());
    let mut lengths = Vec::with_capacity(labels.len());
    for (i, chunk) in labels.chunks(args.batch_size).enumerate() {
        let chunk_config = SamplingConfig { seed: args.seed.wrapping_add(i as u64), ..config.clone() };
        let out = dpar::dpar::generate::generate(&model, &entropy_model, chunk, &chunk_config, &patch, &device)?;
        codes.extend(out.codes);
        lengths.extend(out.lengths);
        bar.inc(chunk.len() as u64);
    }
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
    let output = SampleOutput {
        out: &args.out,
        tokenizer: &tokenizer,
        classes: &classes,
        per_class: args.per_class,
        codes: &codes,
        record,
    };
    output.write(&device, (!args.no_patch_picture).then_some((mc.grid_size, lengths.as_slice())))?;
    Ok(())
}
