//! Sampling runs as `dpar sample` does them: class labels, generation in batches (image n of a
//! run draws from the stream of (seed, n), whatever the batch size), and the files a run leaves behind: `samples.png` (one grid row
//! per class), `samples-patches.png` for DPAR (each image's patches drawn), `codes.safetensors`
//! (a code shard with the requested labels) and `sample.json` (the settings and timings).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::dpar::generate::Generated;
use crate::dpar::Dpar;
use crate::gpt::Gpt;
use crate::patching::PatchConfig;
use crate::sample::SamplingConfig;
use crate::tokenizer::train::Tokenizer;

/// Errors of a sampling run.
#[derive(Debug, thiserror::Error)]
pub enum SampleSetError {
    /// A class list, count or folder is unusable.
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Sample(#[from] crate::sample::SampleError),
    /// (Boxed: a DPAR error is large, and it is rare.)
    #[error(transparent)]
    Dpar(Box<crate::dpar::DparError>),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Viz(#[from] crate::viz::VizError),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SampleSetError>;

impl From<crate::dpar::DparError> for SampleSetError {
    fn from(e: crate::dpar::DparError) -> Self {
        Self::Dpar(Box::new(e))
    }
}

/// Sampling settings as a file: what `dpar sample --config FILE.json` reads and what `dpar
/// serve`'s page downloads. Every field is optional; a command-line flag given explicitly wins
/// over the file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSettings {
    /// `dpar` or `gpt`: the shipped model of that kind when no `--ckpt` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Classes as `--classes` takes them (`3`, `0,3,7`, `0-9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// DPAR's inference patcher (θ, P and the rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchConfig>,
}

impl SampleSettings {
    /// Reads a settings file, naming it in every error.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SampleSetError::BadInput(format!("--config {}: {e}", path.display())))?;
        let settings: Self = serde_json::from_str(&text)
            .map_err(|e| SampleSetError::BadInput(format!("--config {}: {e}", path.display())))?;
        if let Some(model) = settings.model.as_deref().filter(|m| !matches!(*m, "dpar" | "gpt")) {
            return Err(SampleSetError::BadInput(format!(
                "--config {}: model `{model}` is neither `dpar` nor `gpt`",
                path.display()
            )));
        }
        Ok(settings)
    }
}

/// Parses `0,3,7`, `0-9`, class names (`cat,dog`, when the model records names) or a mix into
/// class indices (every class when `None`), checking them against `num_classes`.
pub fn parse_classes(spec: Option<&str>, class_names: &[String], num_classes: usize) -> Result<Vec<u32>> {
    let Some(spec) = spec else { return Ok((0..num_classes as u32).collect()) };
    let bad = |part: &str| {
        let known =
            if class_names.is_empty() { String::new() } else { format!(" or a class name ({})", preview(class_names)) };
        SampleSetError::BadInput(format!("--classes: `{part}` is not a class number{known}"))
    };
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(i) = class_names.iter().position(|n| n == part) {
            out.push(i as u32);
            continue;
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        let (lo, hi) = (lo.map_err(|_| bad(part))?, hi.map_err(|_| bad(part))?);
        for c in lo..=hi {
            if c as usize >= num_classes {
                return Err(SampleSetError::BadInput(format!(
                    "--classes: unknown class {c}; the model has {num_classes} classes (0-{})",
                    num_classes.saturating_sub(1)
                )));
            }
            out.push(c);
        }
    }
    if out.is_empty() {
        return Err(SampleSetError::BadInput("--classes: no classes given".into()));
    }
    Ok(out)
}

/// The first few names of a list, for messages.
fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > 5 { format!(", … {} in all", names.len()) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

/// `per_class` labels of each class in turn (the grid's rows).
pub fn class_labels(classes: &[u32], per_class: usize) -> Vec<u32> {
    classes.iter().flat_map(|&c| std::iter::repeat_n(c, per_class)).collect()
}

/// The labels of a `--npz` run: every class once, then every class again, `per_class` rounds.
/// Any contiguous part of the file then holds the classes equally, which evaluators that split
/// a file in order (the ADM suite's Inception Score) need: class by class, each of their splits
/// would hold a few classes only and the score would collapse.
pub fn interleaved_labels(classes: &[u32], per_class: usize) -> Vec<u32> {
    (0..per_class).flat_map(|_| classes.iter().copied()).collect()
}

/// The labels of the `count` images of a `.npz` that `dpar sample --npz` wrote, from the
/// settings beside it (`classes`, `per_class` and `order`: `interleaved`, or class by class in
/// files of earlier versions); `None` when the settings do not describe `count` images.
pub fn npz_labels(settings: &serde_json::Value, count: usize) -> Option<Vec<u32>> {
    let classes: Vec<u32> = serde_json::from_value(settings["classes"].clone()).ok()?;
    let per_class = settings["per_class"].as_u64()? as usize;
    let labels = match settings["order"].as_str() {
        Some("interleaved") => interleaved_labels(&classes, per_class),
        _ => class_labels(&classes, per_class),
    };
    Some(labels).filter(|l| l.len() == count)
}

/// The sampling settings of the batch of a run that starts at image `first` (every sampler of
/// a run draws batch by batch this way, so a run's images depend neither on the batch size nor
/// on how they are written out).
pub fn batch_sampling(config: &SamplingConfig, first: usize) -> SamplingConfig {
    config.from_image(first)
}

fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(SampleSetError::BadInput("--batch-size must be > 0".into()));
    }
    Ok(())
}

/// Codes for `labels` from the baseline, `batch` images at a time (image n of the run draws
/// from the stream of (`config.seed`, n)); `progress` is called with the images done.
pub fn sample_gpt(
    model: &Gpt,
    labels: &[u32],
    batch: usize,
    config: &SamplingConfig,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    check_batch(batch)?;
    let mut codes = Vec::with_capacity(labels.len());
    for (i, chunk) in labels.chunks(batch).enumerate() {
        codes.extend(crate::sample::generate_gpt(model, chunk, &batch_sampling(config, i * batch), device)?);
        progress(chunk.len());
    }
    Ok(codes)
}

/// Codes and patch lengths for `labels` from DPAR with the patcher `patch`, in batches as
/// [`sample_gpt`].
#[allow(clippy::too_many_arguments)]
pub fn sample_dpar(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    batch: usize,
    config: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Generated> {
    check_batch(batch)?;
    patch.validate().map_err(|e| SampleSetError::BadInput(format!("patcher: {e}")))?;
    let mut all = Generated { codes: Vec::with_capacity(labels.len()), lengths: Vec::with_capacity(labels.len()) };
    for (i, chunk) in labels.chunks(batch).enumerate() {
        let out = crate::dpar::generate::generate(
            model,
            entropy_model,
            chunk,
            &batch_sampling(config, i * batch),
            patch,
            device,
        )?;
        all.codes.extend(out.codes);
        all.lengths.extend(out.lengths);
        progress(chunk.len());
    }
    Ok(all)
}

/// Streams samples into a `.npz` for the ADM evaluator (`arr_0`, uint8 `[N, H, W, 3]`, as
/// LlamaGen's `sample_ddp.py` writes it): `sample_batch(first, labels)` draws the codes of the batch whose first image is image `first`
/// (as [`sample_gpt`]/[`sample_dpar`] do), which are decoded and appended
/// at once, so only one batch of images is ever in memory. Gray images are written as RGB.
/// `progress` is called with the images done. Returns the image height and width.
pub fn stream_npz(
    path: &Path,
    tokenizer: &Tokenizer,
    labels: &[u32],
    batch: usize,
    device: &Device,
    mut sample_batch: impl FnMut(usize, &[u32]) -> Result<Vec<Vec<u32>>>,
    mut progress: impl FnMut(usize),
) -> Result<(usize, usize)> {
    check_batch(batch)?;
    let side = tokenizer.config.image_size;
    let mut npz = crate::data::npz::ImageNpzWriter::create(path, labels.len(), side, side)?;
    let l = tokenizer.config.seq_len();
    for (i, chunk) in labels.chunks(batch).enumerate() {
        let codes = sample_batch(i * batch, chunk)?;
        if codes.len() != chunk.len() || codes.iter().any(|c| c.len() != l) {
            return Err(SampleSetError::BadInput(format!("batch {i}: the sampler returned codes of the wrong shape")));
        }
        let flat: Vec<u32> = codes.into_iter().flatten().collect();
        let codes = Tensor::from_vec(flat, (chunk.len(), l), device)?;
        for image in crate::viz::tensor_to_images(&tokenizer.decode(&codes)?)? {
            npz.push(image.as_raw())?;
        }
        progress(chunk.len());
    }
    npz.finish()?;
    Ok((side, side))
}

/// Generated samples of a few classes, `per_class` each (in [`class_labels`] order), ready to
/// be written.
pub struct SampleSet<'a> {
    pub tokenizer: &'a Tokenizer,
    /// The model's class names (label i is `class_names[i]`; empty: classes go by number).
    pub class_names: &'a [String],
    pub classes: &'a [u32],
    pub per_class: usize,
    pub codes: &'a [Vec<u32>],
    /// What `sample.json` records (settings, timings).
    pub record: serde_json::Value,
}

impl SampleSet<'_> {
    /// Decodes every sample to an RGB image, scaled up for viewing (to about 96 px).
    pub fn images(&self, device: &Device) -> Result<Vec<image::RgbImage>> {
        let l = self.tokenizer.config.seq_len();
        if let Some(bad) = self.codes.iter().find(|c| c.len() != l) {
            return Err(SampleSetError::BadInput(format!(
                "a sample holds {} codes; the tokenizer decodes {l}",
                bad.len()
            )));
        }
        let flat: Vec<u32> = self.codes.iter().flatten().copied().collect();
        let codes = Tensor::from_vec(flat, (self.codes.len(), l), device)?;
        let scale = (96 / self.tokenizer.config.image_size as u32).max(1);
        let mut images = Vec::with_capacity(self.codes.len());
        for start in (0..self.codes.len()).step_by(100) {
            let n = (self.codes.len() - start).min(100);
            images.extend(
                crate::viz::tensor_to_images(&self.tokenizer.decode(&codes.narrow(0, start, n)?)?)?
                    .iter()
                    .map(|i| crate::viz::upscale(i, scale)),
            );
        }
        Ok(images)
    }

    /// The name of class `label`: the model's name for it, else its number.
    fn name(&self, label: u32) -> String {
        self.class_names.get(label as usize).cloned().unwrap_or_else(|| label.to_string())
    }

    /// A grid with one row per class, each row labelled with the class's name; `decorate` may
    /// draw on each image (index, image).
    fn grid(
        &self,
        images: &[image::RgbImage],
        decorate: &dyn Fn(usize, image::RgbImage) -> image::RgbImage,
    ) -> Result<image::RgbImage> {
        let rows: Vec<Vec<image::RgbImage>> = (0..self.classes.len())
            .map(|r| {
                (0..self.per_class)
                    .map(|j| decorate(r * self.per_class + j, images[r * self.per_class + j].clone()))
                    .collect()
            })
            .collect();
        let pad = 4;
        let cell_h = rows.iter().flatten().map(|i| i.height()).max().unwrap_or(1);
        let names: Vec<String> = self.classes.iter().map(|&c| self.name(c)).collect();
        Ok(crate::plot::label_rows(&crate::viz::grid(&rows, pad), &names, cell_h, pad)?)
    }

    /// Writes `samples.png`, `codes.safetensors` and `sample.json` into `out` (created if
    /// needed), and with `patches` (grid size, each image's patch lengths) also
    /// `samples-patches.png`. Every file is written atomically. Returns the files written.
    pub fn write(&self, out: &Path, device: &Device, patches: Option<(usize, &[Vec<usize>])>) -> Result<Vec<PathBuf>> {
        if self.codes.len() != self.classes.len() * self.per_class {
            return Err(SampleSetError::BadInput(format!(
                "{} samples for {} classes × {}",
                self.codes.len(),
                self.classes.len(),
                self.per_class
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| {
            SampleSetError::BadInput(format!("--out {}: cannot create the output folder: {e}", out.display()))
        })?;
        let images = self.images(device)?;
        let png = out.join("samples.png");
        crate::viz::save_png(&self.grid(&images, &|_, img| img)?, &png)?;
        let mut written = vec![png];
        if let Some((grid, lengths)) = patches {
            let path = out.join("samples-patches.png");
            // Twice the size of samples.png, so that single-code patches stay visible.
            let picture = self
                .grid(&images, &|i, img| crate::viz::patch_overlay(&crate::viz::upscale(&img, 2), grid, &lengths[i]))?;
            crate::viz::save_png(&picture, &path)?;
            written.push(path);
        }
        let max_class = self.classes.iter().copied().max().unwrap_or(0) as usize;
        let num_classes = self.class_names.len().max(max_class + 1);
        let shard = crate::data::shards::CodeShard {
            info: crate::data::shards::ShardInfo {
                grid_size: self.tokenizer.config.grid_size(),
                codebook_size: self.tokenizer.config.codebook_size,
                num_classes,
                class_names: (0..num_classes as u32).map(|c| self.name(c)).collect(),
                tokenizer_id: self.tokenizer.id.clone(),
            },
            codes: self.codes.iter().flatten().copied().collect(),
            labels: class_labels(self.classes, self.per_class),
            flip_codes: None,
        };
        let codes_path = out.join("codes.safetensors");
        crate::data::shards::write_shard(&codes_path, &shard)?;
        let json = out.join("sample.json");
        let mut record = self.record.clone();
        if let Some(fields) = record.as_object_mut() {
            let names: Vec<String> = self.classes.iter().map(|&c| self.name(c)).collect();
            fields.insert("class_names".into(), serde_json::json!(names));
        }
        let text = serde_json::to_string_pretty(&record).unwrap_or_default();
        crate::util::write_atomic(&json, text.as_bytes())?;
        written.extend([codes_path, json]);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_as_lists_and_ranges_and_unknown_ones_are_named() {
        assert_eq!(parse_classes(Some("0,3-5, 9"), &[], 10).unwrap(), vec![0, 3, 4, 5, 9]);
        assert_eq!(parse_classes(None, &[], 3).unwrap(), vec![0, 1, 2]);
        let names: Vec<String> = ["cat", "dog", "eel"].map(String::from).into();
        assert_eq!(parse_classes(Some("eel, 0,dog"), &names, 3).unwrap(), vec![2, 0, 1]);
        let err = parse_classes(Some("cow"), &names, 3).unwrap_err().to_string();
        assert!(err.contains("`cow`") && err.contains("cat, dog, eel"), "{err}");
        let err = parse_classes(Some("10"), &[], 10).unwrap_err().to_string();
        assert!(err.contains("unknown class 10") && err.contains("0-9"), "{err}");
        assert!(parse_classes(Some("x"), &[], 10).unwrap_err().to_string().contains("`x`"));
        assert!(parse_classes(Some(","), &[], 10).is_err());
    }

    #[test]
    fn labels_come_in_grid_rows_and_npz_files_interleave_them() {
        assert_eq!(class_labels(&[7, 2], 3), vec![7, 7, 7, 2, 2, 2]);
        assert_eq!(interleaved_labels(&[7, 2], 3), vec![7, 2, 7, 2, 7, 2]);
        let settings = serde_json::json!({ "classes": [7, 2], "per_class": 3, "order": "interleaved" });
        assert_eq!(npz_labels(&settings, 6), Some(vec![7, 2, 7, 2, 7, 2]));
        assert_eq!(
            npz_labels(&serde_json::json!({ "classes": [7, 2], "per_class": 3 }), 6),
            Some(class_labels(&[7, 2], 3))
        );
        assert_eq!(npz_labels(&settings, 5), None);
    }
}
