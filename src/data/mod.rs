//! Data in: labelled images from IDX files or class folders, and code shards on disk.
//!
//! - [`idx`]: the IDX format of MNIST and friends (raw or gzipped), read and written.
//! - [`folder`]: a folder of class sub-folders of PNG/JPEG images (the ImageNet layout).
//! - [`npz`]: NumPy `.npz` archives (sample sets for the ADM evaluator, its reference batches).
//! - [`shards`]: the tokenised dataset: codes `[N, G·G]`, labels `[N]`, optional flip copy and
//!   per-code entropies, in safetensors files.
//!
//! Both image readers produce the same [`ImageDataset`], which [`ImageDataset::prepare`] pads or
//! resizes to the tokenizer's input size. Data never knows about models.

pub mod folder;
pub mod idx;
pub mod npz;
pub mod resample;
pub mod shards;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Errors of the data readers and writers. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An IDX file starts with the wrong magic number.
    #[error("{path}: wrong magic number 0x{found:08x}: {reason}")]
    BadMagic { path: PathBuf, found: u32, reason: String },
    /// A file is shorter than its header says.
    #[error("{path}: truncated: expected {expected} bytes, found {found}")]
    Truncated { path: PathBuf, expected: u64, found: u64 },
    /// A gzip stream is corrupt.
    #[error("{path}: corrupt gzip data: {reason}")]
    BadGzip { path: PathBuf, reason: String },
    /// Image and label files hold different numbers of items.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch { images: PathBuf, labels: PathBuf, n_images: usize, n_labels: usize },
    /// An image file could not be decoded.
    #[error("{path}: cannot decode image: {reason}")]
    Undecodable { path: PathBuf, reason: String },
    /// A class folder holds no images.
    #[error("{path}: class folder holds no PNG/JPEG images")]
    EmptyClassFolder { path: PathBuf },
    /// A data folder has neither IDX files nor class sub-folders.
    #[error("{path}: no dataset found: {reason}")]
    NoDataset { path: PathBuf, reason: String },
    /// A code shard is malformed or inconsistent with the others.
    #[error("{path}: {reason}")]
    BadShard { path: PathBuf, reason: String },
    /// A request does not fit the data (bad size, bad index, ...).
    #[error("{0}")]
    Invalid(String),
    /// A folder holds shards of an earlier shard set.
    #[error("{path}: {reason}")]
    StaleShards { path: PathBuf, reason: String },
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Labelled 8-bit images, all of one size, stored `N × C × H × W` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// One name per class; label `i` is `class_names[i]`.
    pub class_names: Vec<String>,
    /// Where the data came from (for messages and provenance).
    pub source: String,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i` (`C × H × W`).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` images (all of them if `n` is larger).
    pub fn take(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        ImageDataset {
            images: self.images[..n * self.image_len()].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..self.clone()
        }
    }

    /// Brings every image to `size × size` with `channels` channels (1 = grey, 3 = RGB).
    ///
    /// Images no larger than `size` are padded with black, centred (28×28 MNIST → 32×32).
    /// Larger images are resized so the shorter side is `size`, then centre-cropped.
    pub fn prepare(&self, size: usize, channels: usize) -> Result<ImageDataset> {
        let max = folder::MAX_IMAGE_SIDE as usize;
        if size == 0 || size > max || !(channels == 1 || channels == 3) {
            return Err(DataError::Invalid(format!(
                "cannot prepare images at size {size} with {channels} channels (need 1 ≤ size ≤ {max}, 1 or 3 channels)"
            )));
        }
        if self.height == size && self.width == size && self.channels == channels {
            return Ok(self.clone());
        }
        check_budget(Path::new(&self.source), self.len(), channels, size)?;
        let mut images = Vec::with_capacity(self.len() * channels * size * size);
        for i in 0..self.len() {
            let rgb = to_rgb_image(self.image(i), self.channels, self.height, self.width);
            let fitted = fit_square(&rgb, size);
            images.extend(from_rgb_image(&fitted, channels));
        }
        Ok(ImageDataset {
            images,
            labels: self.labels.clone(),
            channels,
            height: size,
            width: size,
            class_names: self.class_names.clone(),
            source: self.source.clone(),
        })
    }

    /// The five `size × size` crops of every image (top-left, top-right, bottom-left,
    /// bottom-right, centre, as torchvision's `FiveCrop`), each a separate image with the
    /// image's label: with a flip copy of each, the ten views of LlamaGen's `--ten-crop`.
    pub fn five_crops(&self, size: usize) -> Result<ImageDataset> {
        let (c, h, w) = (self.channels, self.height, self.width);
        if size == 0 || size > h || size > w {
            return Err(DataError::Invalid(format!("cannot take {size}×{size} crops of {h}×{w} images")));
        }
        // torchvision places the centre crop at int(round((side − size) / 2)): Python rounds
        // halves to even.
        let half = |d: usize| (d as f64 / 2.0).round_ties_even() as usize;
        let centre = (half(h - size), half(w - size));
        let corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), centre];
        let mut images = Vec::with_capacity(self.len() * 5 * c * size * size);
        let mut labels = Vec::with_capacity(self.len() * 5);
        for i in 0..self.len() {
            let image = self.image(i);
            for &(top, left) in &corners {
                for ch in 0..c {
                    for y in top..top + size {
                        let row = (ch * h + y) * w;
                        images.extend_from_slice(&image[row + left..row + left + size]);
                    }
                }
                labels.push(self.labels[i]);
            }
        }
        Ok(ImageDataset { images, labels, height: size, width: size, ..self.clone() })
    }

    /// A batch as a `(B, C, H, W)` f32 tensor scaled to [−1, 1] (LlamaGen's normalisation).
    /// With `flip`, every image is mirrored left-right.
    pub fn batch_tensor(&self, indices: &[usize], flip: bool, device: &Device) -> Result<Tensor> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut values = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            if i >= self.len() {
                return Err(DataError::Invalid(format!("image index {i} out of range (dataset has {})", self.len())));
            }
            let img = self.image(i);
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let sx = if flip { w - 1 - x } else { x };
                        values.push(img[(ch * h + y) * w + sx] as f32 / 127.5 - 1.0);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(values, (indices.len(), c, h, w), device)?)
    }
}

/// Converts a `C × H × W` image (C = 1 or 3) to an `image::RgbImage`.
pub fn to_rgb_image(pixels: &[u8], channels: usize, height: usize, width: usize) -> image::RgbImage {
    image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let at = |c: usize| pixels[(c * height + y as usize) * width + x as usize];
        if channels == 1 {
            image::Rgb([at(0); 3])
        } else {
            image::Rgb([at(0), at(1), at(2)])
        }
    })
}

/// Converts an RGB image to `C × H × W` bytes (grey = ITU-R 601 luma when `channels` is 1).
pub fn from_rgb_image(img: &image::RgbImage, channels: usize) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0u8; channels * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        if channels == 1 {
            let [r, g, b] = p.0;
            let luma = (299 * r as u32 + 587 * g as u32 + 114 * b as u32 + 500) / 1000;
            out[y * w + x] = luma as u8;
        } else {
            for c in 0..3 {
                out[(c * h + y) * w + x] = p.0[c];
            }
        }
    }
    out
}

/// Fits an image to `size × size`: one that fits inside is padded (centred, black; so small
/// images such as MNIST's keep their pixels), a larger one goes through LlamaGen's
/// preprocessing, ADM's `center_crop_arr` as Pillow computes it (BOX halving, BICUBIC resize,
/// centre crop; [`resample::center_crop_arr`]).
pub fn fit_square(img: &image::RgbImage, size: usize) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w <= size && h <= size {
        let mut out = image::RgbImage::new(size as u32, size as u32);
        let (ox, oy) = ((size - w) / 2, (size - h) / 2);
        image::imageops::overlay(&mut out, img, ox as i64, oy as i64);
        return out;
    }
    resample::center_crop_arr(img, size)
}

/// Where a split of a dataset lives.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// IDX image and label files.
    Idx { images: PathBuf, labels: PathBuf },
    /// A folder of class sub-folders.
    Folder { root: PathBuf },
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::Idx { images, labels } => {
                write!(f, "IDX files {} and {}", images.display(), labels.display())
            }
            DataSource::Folder { root } => write!(f, "class folders under {}", root.display()),
        }
    }
}

/// Finds the `split` (`train` or `test`) of the dataset in `dir`: IDX files named
/// `{split}-images-idx3-ubyte[.gz]` / `{split}-labels-idx1-ubyte[.gz]` (`test` also matches
/// MNIST's `t10k`), or a class-folder tree at `dir/{split}/` or `dir/` itself.
pub fn resolve(dir: &Path, split: &str) -> Result<DataSource> {
    if !dir.is_dir() {
        return Err(DataError::NoDataset {
            path: dir.to_path_buf(),
            reason: "not a folder (run scripts/fetch-mnist for MNIST)".to_string(),
        });
    }
    let prefixes: Vec<&str> = match split {
        "test" | "t10k" => vec!["t10k", "test"],
        other => vec![other],
    };
    for prefix in &prefixes {
        for ext in ["", ".gz"] {
            let images = dir.join(format!("{prefix}-images-idx3-ubyte{ext}"));
            let labels = dir.join(format!("{prefix}-labels-idx1-ubyte{ext}"));
            // Either file present means an IDX set: a missing or broken partner is then an
            // error about that file, not a search for class folders.
            if images.exists() || labels.exists() {
                return Ok(DataSource::Idx { images, labels });
            }
        }
    }
    let split_dir = dir.join(split);
    let root = if split_dir.is_dir() { split_dir } else { dir.to_path_buf() };
    let has_subdirs =
        std::fs::read_dir(&root).map_err(io_err(&root))?.filter_map(|e| e.ok()).any(|e| e.path().is_dir());
    if has_subdirs {
        return Ok(DataSource::Folder { root });
    }
    Err(DataError::NoDataset {
        path: dir.to_path_buf(),
        reason: format!("neither `{}-images-idx3-ubyte[.gz]` + labels nor class sub-folders found", prefixes[0]),
    })
}

/// Loads a split and prepares it to `size × size × channels`.
pub fn load(source: &DataSource, size: usize, channels: usize) -> Result<ImageDataset> {
    load_limited(source, size, channels, None)
}

/// [`load`] keeping only the first `max_images` images, before any is resized or decoded.
pub fn load_limited(
    source: &DataSource,
    size: usize,
    channels: usize,
    max_images: Option<usize>,
) -> Result<ImageDataset> {
    match source {
        DataSource::Idx { images, labels } => {
            let data = idx::load_idx(images, labels)?;
            let data = match max_images {
                Some(n) => data.take(n),
                None => data,
            };
            data.prepare(size, channels)
        }
        DataSource::Folder { root } => folder::load_image_folder_limited(root, size, channels, max_images),
    }
}

/// Refuses to prepare `images` images of `channels × size × size` bytes from `source` when
/// they would not fit in the memory budget ([`crate::util::memory_budget`]).
pub(crate) fn check_budget(source: &Path, images: usize, channels: usize, size: usize) -> Result<()> {
    let bytes = images as f64 * channels as f64 * size as f64 * size as f64;
    crate::util::check_memory(&format!("{}: {images} images of {channels}×{size}×{size}", source.display()), bytes)
        .map_err(DataError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_crops_are_the_corners_and_the_centre() {
        // One 1-channel 3×4 image with pixel value 10·y + x.
        let data = ImageDataset {
            images: (0..3).flat_map(|y| (0..4).map(move |x| 10 * y + x)).collect(),
            labels: vec![7],
            channels: 1,
            height: 3,
            width: 4,
            class_names: vec![],
            source: "t".into(),
        };
        let crops = data.five_crops(2).unwrap();
        assert_eq!(crops.labels, [7; 5]);
        let crop = |i: usize| crops.image(i).to_vec();
        assert_eq!(crop(0), [0, 1, 10, 11]);
        assert_eq!(crop(1), [2, 3, 12, 13]);
        assert_eq!(crop(2), [10, 11, 20, 21]);
        assert_eq!(crop(3), [12, 13, 22, 23]);
        // Centre: corner (round(0.5), round(1.0)) = (0, 1), halves rounding to even as in Python.
        assert_eq!(crop(4), [1, 2, 11, 12]);
        assert!(data.five_crops(4).is_err());
    }

    fn tiny() -> ImageDataset {
        // Two 2×3 grey images.
        ImageDataset {
            images: vec![1, 2, 3, 4, 5, 6, 10, 20, 30, 40, 50, 60],
            labels: vec![0, 1],
            channels: 1,
            height: 2,
            width: 3,
            class_names: vec!["a".into(), "b".into()],
            source: "test".into(),
        }
    }

    #[test]
    fn padding_centres_small_images() {
        let d = tiny().prepare(4, 1).unwrap();
        assert_eq!((d.height, d.width, d.channels), (4, 4, 1));
        // 2×3 in 4×4: offset x = 0, y = 1.
        let img = d.image(0);
        assert_eq!(&img[4..8], &[1, 2, 3, 0]);
        assert_eq!(&img[8..12], &[4, 5, 6, 0]);
        assert_eq!(&img[0..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn large_images_are_resized_and_cropped() {
        let big = ImageDataset {
            images: vec![200; 3 * 8 * 6],
            labels: vec![0],
            channels: 3,
            height: 8,
            width: 6,
            class_names: vec!["x".into()],
            source: "t".into(),
        };
        let d = big.prepare(3, 3).unwrap();
        assert_eq!(d.images.len(), 27);
        assert!(d.images.iter().all(|&p| p == 200));
    }

    #[test]
    fn batch_tensor_scales_and_flips() {
        let d = tiny();
        let t = d.batch_tensor(&[0], true, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (3.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((v[2] - (1.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!(d.batch_tensor(&[5], false, &Device::Cpu).is_err());
    }

    #[test]
    fn resolve_finds_idx_files_and_reports_missing_data() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(dir.path(), "train").unwrap_err().to_string();
        assert!(err.contains("no dataset found"), "{err}");
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), b"").unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), b"").unwrap();
        assert!(matches!(resolve(dir.path(), "test").unwrap(), DataSource::Idx { .. }));
    }
}
