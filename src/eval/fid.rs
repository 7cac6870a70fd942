//! FID with InceptionV3 (the ImageNet protocol): pool3 features of sample and reference images,
//! their Fréchet distance, and optionally the Inception Score from the logits and k-NN
//! precision/recall in the same feature space.
//!
//! Sources of images: a `.npz` holding uint8 `[N, H, W, 3]` under `arr_0` (LlamaGen's
//! `sample_ddp.py`, `dpar sample --npz`, the ADM reference batches), or a folder of PNG/JPEG
//! images (searched recursively, e.g. a class-folder tree). A reference can also be statistics:
//! a `.npz` with `mu` `[2048]` and `sigma` `[2048, 2048]` (ADM reference batches carry both
//! images and statistics: the statistics are used), or pool activations `[N, 2048]`.
//!
//! The value is called FID only when the weights are pytorch-fid's FID weights
//! (`pt_inception-2015-12-05-6726825d.pth`, recognised by their SHA-256); with any other weights
//! the same computation is reported as an FD in those weights' features.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use faer::Mat;

use super::inception::{InceptionV3, LOGITS, POOL_FEATURES};
use super::{metrics, EvalError, Result};
use crate::data::npz::NpzReader;

/// The first 8 hex digits of the SHA-256 of pytorch-fid's FID weights (torch hub names files
/// by this prefix).
pub const FID_WEIGHTS_SHA256_PREFIX: &str = "6726825d";

/// Whether a weight file is pytorch-fid's FID InceptionV3 (so that the distance is FID).
pub fn is_fid_weights(path: &Path) -> Result<bool> {
    let hash = crate::util::sha256_file(path).map_err(|e| EvalError::Bad(e.to_string()))?;
    Ok(hash.starts_with(FID_WEIGHTS_SHA256_PREFIX))
}

/// Pool features (N × 2048) and logits (N × 1008) of a set of images.
#[derive(Debug, Clone, Default)]
pub struct InceptionFeatures {
    pub pool: Vec<f32>,
    pub logits: Vec<f32>,
}

impl InceptionFeatures {
    pub fn len(&self) -> usize {
        self.pool.len() / POOL_FEATURES
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }
}

/// A reference set: statistics only, or features.
pub enum Reference {
    Stats { mu: Vec<f64>, sigma: Mat<f64>, source: String },
    Features { features: InceptionFeatures, source: String },
}

/// Calls `each` with batches of up to `batch` images from `source` (a `.npz` or an image
/// folder) as uint8 `n × H × W × 3` bytes; a folder's images of differing sizes go in separate
/// batches. Returns the number of images.
pub fn for_each_image_batch(
    source: &Path,
    batch: usize,
    mut each: impl FnMut(&[u8], usize, usize, usize) -> Result<()>,
) -> Result<usize> {
    if source.is_dir() {
        let files = image_files(source)?;
        if files.is_empty() {
            return Err(EvalError::Bad(format!("{}: no PNG/JPEG images in this folder", source.display())));
        }
        let mut pending: Vec<u8> = Vec::new();
        let (mut count, mut size) = (0usize, (0u32, 0u32));
        for file in &files {
            let image = image::open(file)
                .map_err(|e| EvalError::Bad(format!("{}: cannot decode image: {e}", file.display())))?
                .to_rgb8();
            if count > 0 && (image.dimensions() != size || count == batch) {
                each(&pending, count, size.1 as usize, size.0 as usize)?;
                pending.clear();
                count = 0;
            }
            size = image.dimensions();
            pending.extend_from_slice(image.as_raw());
            count += 1;
        }
        each(&pending, count, size.1 as usize, size.0 as usize)?;
        return Ok(files.len());
    }
    let mut npz = NpzReader::open(source)?;
    let (header, _) = npz.header("arr_0")?;
    let (h, w, c) = match header.shape[..] {
        [_, h, w, c] => (h, w, c),
        [_, h, w] => (h, w, 1),
        _ => (0, 0, 0), // for_each_image_batch names the bad shape
    };
    let mut rgb = Vec::new();
    let (n, ..) = npz.for_each_image_batch("arr_0", batch, |bytes, k| {
        let bytes = if c == 1 {
            rgb.clear();
            rgb.extend(bytes.iter().flat_map(|&v| [v, v, v]));
            &rgb[..]
        } else {
            bytes
        };
        each(bytes, k, h, w).map_err(|e| crate::data::DataError::Invalid(e.to_string()))
    })?;
    Ok(n)
}

/// The number of images in `source` (from the `.npz` header or the folder listing), for a
/// progress bar.
pub fn count_images(source: &Path) -> Result<usize> {
    if source.is_dir() {
        return Ok(image_files(source)?.len());
    }
    let (header, _) = NpzReader::open(source)?.header("arr_0")?;
    Ok(header.shape.first().copied().unwrap_or(0))
}

/// Every PNG/JPEG file under `dir`, recursively, in sorted order.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| EvalError::Bad(format!("{}: {e}", d.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Inception features of every image of `source` (a `.npz` or an image folder), `batch` at a
/// time; `progress` is called with the images done.
pub fn features(
    model: &InceptionV3,
    source: &Path,
    batch: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<InceptionFeatures> {
    if batch == 0 {
        return Err(EvalError::Bad("--batch must be > 0".into()));
    }
    let mut out = InceptionFeatures::default();
    for_each_image_batch(source, batch, |bytes, n, h, w| {
        // (n, H, W, 3) bytes → (n, 3, H, W) in [0, 1], as torchvision's ToTensor.
        let images = Tensor::from_slice(bytes, (n, h, w, 3), device)?
            .permute((0, 3, 1, 2))?
            .to_dtype(candle_core::DType::F32)?
            .affine(1.0 / 255.0, 0.0)?;
        let (pool, logits) = model.features(&images)?;
        out.pool.extend(pool.flatten_all()?.to_vec1::<f32>()?);
        out.logits.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        progress(n);
        Ok(())
    })?;
    Ok(out)
}

/// What a reference path holds: statistics (`mu`, `sigma`), pool activations (`[N, 2048]`), or
/// images (a `.npz` with `arr_0`, or a folder), whose features are computed with `model`.
pub fn reference(
    path: &Path,
    model: &InceptionV3,
    batch: usize,
    device: &Device,
    progress: impl FnMut(usize),
) -> Result<Reference> {
    let source = path.display().to_string();
    if path.is_file() {
        let mut npz = NpzReader::open(path)?;
        let names = npz.names();
        if names.iter().any(|n| n == "mu") && names.iter().any(|n| n == "sigma") {
            let (mu_shape, mu) = npz.read_f64("mu")?;
            let (sigma_shape, sigma) = npz.read_f64("sigma")?;
            let f = POOL_FEATURES;
            if mu_shape != [f] || sigma_shape != [f, f] {
                return Err(EvalError::Bad(format!(
                    "{source}: `mu` {mu_shape:?} and `sigma` {sigma_shape:?} must be [{f}] and [{f}, {f}]"
                )));
            }
            let sigma = Mat::from_fn(f, f, |i, j| sigma[i * f + j]);
            return Ok(Reference::Stats { mu, sigma, source });
        }
        for name in names.iter().filter(|n| *n != "arr_0") {
            let (header, _) = npz.header(name)?;
            if header.shape.len() == 2 && header.shape[1] == POOL_FEATURES && header.descr.contains('f') {
                let (_, values) = npz.read_f64(name)?;
                let pool = values.into_iter().map(|v| v as f32).collect();
                return Ok(Reference::Features { features: InceptionFeatures { pool, logits: Vec::new() }, source });
            }
        }
    }
    Ok(Reference::Features { features: features(model, path, batch, device, progress)?, source })
}

/// Writes the mean and covariance of `features` as a `.npz` (`mu` `[2048]`, `sigma`
/// `[2048, 2048]`, float64), the form ADM reference batches and pytorch-fid's `--save-stats` use.
pub fn save_stats(path: &Path, features: &InceptionFeatures) -> Result<()> {
    let (mu, sigma) = metrics::mean_cov(&features.pool, POOL_FEATURES)?;
    let f = POOL_FEATURES;
    let flat: Vec<f64> = (0..f * f).map(|k| sigma[(k / f, k % f)]).collect();
    crate::data::npz::write_f64_arrays(path, &[("mu", &[f][..], &mu[..]), ("sigma", &[f, f][..], &flat[..])])?;
    Ok(())
}

/// The metrics of a sample set against a reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FidReport {
    /// `FID` with pytorch-fid's FID weights; otherwise an FD named after the weights.
    pub metric: String,
    pub value: f64,
    pub samples: usize,
    /// Reference images (0 when the reference is statistics).
    pub reference_images: usize,
    pub reference: String,
    pub weights_sha256: String,
    /// Inception Score (mean, std over splits) from the 1008-way softmax of the logits.
    pub inception_score: Option<(f64, f64)>,
    /// k = 3 precision and recall in pool feature space (needs reference features).
    pub precision_recall: Option<(f64, f64)>,
}

/// The distance of `samples` to `reference`, with IS and precision/recall when asked.
pub fn report(
    samples: &InceptionFeatures,
    reference: &Reference,
    weights_sha256: &str,
    inception_score: bool,
    precision_recall: bool,
) -> Result<FidReport> {
    let f = POOL_FEATURES;
    let (mu, sigma) = metrics::mean_cov(&samples.pool, f)?;
    let (value, reference_images, source) = match reference {
        Reference::Stats { mu: rm, sigma: rs, source } => (metrics::frechet_distance(&mu, &sigma, rm, rs)?, 0, source),
        Reference::Features { features, source } => {
            let (rm, rs) = metrics::mean_cov(&features.pool, f)?;
            (metrics::frechet_distance(&mu, &sigma, &rm, &rs)?, features.len(), source)
        }
    };
    let metric = if weights_sha256.starts_with(FID_WEIGHTS_SHA256_PREFIX) {
        "FID".to_string()
    } else {
        format!(
            "FD in InceptionV3 features of weights {} (not pytorch-fid's FID weights, so not FID)",
            &weights_sha256[..8.min(weights_sha256.len())]
        )
    };
    let inception_score = if inception_score {
        let n = samples.len();
        let mut probs = Vec::with_capacity(samples.logits.len());
        for row in samples.logits.chunks(LOGITS) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp()).collect();
            let sum: f64 = exp.iter().sum();
            probs.extend(exp.iter().map(|e| (e / sum) as f32));
        }
        Some(metrics::inception_score(&probs, LOGITS, 10.min(n).max(1))?)
    } else {
        None
    };
    let precision_recall = match (precision_recall, reference) {
        (false, _) => None,
        (true, Reference::Features { features, .. }) => {
            Some(metrics::precision_recall(&features.pool, &samples.pool, f, 3)?)
        }
        (true, Reference::Stats { source, .. }) => {
            return Err(EvalError::Bad(format!(
                "{source} holds statistics only; precision/recall need reference images or activations"
            )))
        }
    };
    Ok(FidReport {
        metric,
        // The distance is ≥ 0; rounding can leave −1e−12 for a set against itself.
        value: value.max(0.0),
        samples: samples.len(),
        reference_images,
        reference: source.clone(),
        weights_sha256: weights_sha256.to_string(),
        inception_score,
        precision_recall,
    })
}
