//! A folder of class sub-folders of images (the ImageNet layout):
//! `root/<class name>/<anything>.{png,jpg,jpeg}`. Classes are the sub-folder names in sorted
//! order; label `i` is the `i`-th name. Each image is decoded and brought to the target size as it
//! is read, so the whole split is held in memory at the tokenizer's resolution only.

use std::path::{Path, PathBuf};

use super::{fit_square, from_rgb_image, io_err, DataError, ImageDataset, Result};

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// The largest side of an image that a class folder may hold, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most memory one decoded image may take.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// Decoder limits: a small file that declares a huge image (a 97 KB PNG of 100 000 000 × 1
/// pixels) is an error naming the file, not an allocation failure that aborts the process.
fn image_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    limits
}

/// Loads every image under `root/<class>/`, prepared to `size × size × channels`.
/// Errors: an undecodable image (named), a class folder without images, no class folders.
pub fn load_image_folder(root: &Path, size: usize, channels: usize) -> Result<ImageDataset> {
    load_image_folder_limited(root, size, channels, None)
}

/// [`load_image_folder`] decoding only the first `max_images` images (in class, then file-name
/// order). The memory the prepared images take is checked against the budget before any is
/// decoded.
pub fn load_image_folder_limited(
    root: &Path,
    size: usize,
    channels: usize,
    max_images: Option<usize>,
) -> Result<ImageDataset> {
    if size == 0 || size > MAX_IMAGE_SIDE as usize || !(channels == 1 || channels == 3) {
        return Err(DataError::Invalid(format!(
            "cannot load images at size {size} with {channels} channels (need 1 ≤ size ≤ {MAX_IMAGE_SIDE}, 1 or 3 channels)"
        )));
    }
    let class_dirs: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(DataError::NoDataset { path: root.to_path_buf(), reason: "no class sub-folders".to_string() });
    }
    let mut listing = Vec::with_capacity(class_dirs.len());
    for dir in &class_dirs {
        let files: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect();
        if files.is_empty() {
            return Err(DataError::EmptyClassFolder { path: dir.clone() });
        }
        listing.push(files);
    }
    let total = listing.iter().map(Vec::len).sum::<usize>().min(max_images.unwrap_or(usize::MAX));
    super::check_budget(root, total, channels, size)?;
    let mut images = Vec::with_capacity(total * channels * size * size);
    let mut labels = Vec::with_capacity(total);
    let mut class_names = Vec::with_capacity(class_dirs.len());
    for (label, (dir, files)) in class_dirs.iter().zip(listing).enumerate() {
        class_names.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        for file in files {
            if labels.len() == total {
                break;
            }
            let mut reader =
                image::ImageReader::open(&file).map_err(io_err(&file))?.with_guessed_format().map_err(io_err(&file))?;
            reader.limits(image_limits());
            let decoded =
                reader.decode().map_err(|e| DataError::Undecodable { path: file.clone(), reason: e.to_string() })?;
            let fitted = fit_square(&decoded.to_rgb8(), size);
            images.extend(from_rgb_image(&fitted, channels));
            labels.push(label as u32);
        }
    }
    Ok(ImageDataset {
        images,
        labels,
        channels,
        height: size,
        width: size,
        class_names,
        source: root.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, value: u8) {
        image::RgbImage::from_pixel(w, h, image::Rgb([value, value, value])).save(path).unwrap();
    }

    #[test]
    fn classes_are_sorted_folders_and_images_are_fitted() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("cat", 10u8), ("ant", 200u8)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            write_png(&dir.path().join(class).join("a.png"), 40, 50, value);
            write_png(&dir.path().join(class).join("b.PNG"), 4, 4, value);
            std::fs::write(dir.path().join(class).join("notes.txt"), "ignored").unwrap();
        }
        let d = load_image_folder(dir.path(), 8, 1).unwrap();
        assert_eq!(d.class_names, vec!["ant".to_string(), "cat".to_string()]);
        assert_eq!(d.labels, vec![0, 0, 1, 1]);
        assert_eq!((d.height, d.width, d.channels, d.len()), (8, 8, 1, 4));
        assert!(d.image(0).iter().all(|&p| p == 200)); // resized 40×50 → fills 8×8
        assert_eq!(d.image(1)[0], 0); // 4×4 padded with black
        assert_eq!(d.image(1)[2 * 8 + 2], 200);
        assert_eq!(d.image(2)[27], 10);
    }

    #[test]
    fn empty_class_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        write_png(&dir.path().join("a").join("x.png"), 2, 2, 0);
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let err = load_image_folder(dir.path(), 4, 3).unwrap_err().to_string();
        assert!(
            err.contains("class folder holds no PNG/JPEG images")
                && err.ends_with("b: class folder holds no PNG/JPEG images"),
            "{err}"
        );
    }

    #[test]
    fn undecodable_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a").join("broken.jpg"), b"definitely not a jpeg").unwrap();
        let err = load_image_folder(dir.path(), 4, 3).unwrap_err().to_string();
        assert!(err.contains("broken.jpg: cannot decode image"), "{err}");
    }

    #[test]
    fn a_folder_without_classes_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_image_folder(dir.path(), 4, 3).unwrap_err().to_string();
        assert!(err.contains("no class sub-folders"), "{err}");
    }
}
