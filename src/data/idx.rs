//! The IDX file format (MNIST, Fashion-MNIST, EMNIST, ...), raw or gzipped.
//!
//! Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one
//! big-endian u32 per dimension, then the data. Images have three dimensions `(N, rows, cols)`,
//! labels one `(N)`. Gzipped files are recognised by their magic bytes, not their name.

use std::io::Read;
use std::path::Path;

use super::{io_err, DataError, ImageDataset, Result};

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a file, transparently un-gzipping it. A gzipped file is inflated only as far as its
/// IDX header says the data goes (a gzip bomb stops there), never past
/// [`crate::util::memory_budget`], and must then end: its CRC is checked and bytes after the
/// declared data, inside the stream or after it, are an error. A raw file larger than the budget
/// is refused before it is read.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        return Err(DataError::Invalid(format!("{}: is a folder, not an IDX file", path.display())));
    }
    let budget = crate::util::memory_budget();
    let size = std::fs::metadata(path).map_err(io_err(path))?.len();
    let over_budget = |bytes: String| {
        DataError::Invalid(format!(
            "{}: {bytes} bytes of data, more than the memory budget of {budget} bytes (DPAR_MEMORY_BUDGET)",
            path.display()
        ))
    };
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if !(raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b) {
        if size > budget {
            return Err(over_budget(size.to_string()));
        }
        return Ok(raw);
    }
    let gz_err = |e: std::io::Error| DataError::BadGzip { path: path.to_path_buf(), reason: e.to_string() };
    // The bufread decoder leaves whatever follows the gzip member in `rest`.
    let mut decoder = flate2::bufread::GzDecoder::new(&raw[..]);
    let mut out = Vec::new();
    // The magic (4 bytes), then one u32 per dimension.
    (&mut decoder).take(4).read_to_end(&mut out).map_err(gz_err)?;
    if out.len() == 4 {
        (&mut decoder).take(4 * out[3] as u64).read_to_end(&mut out).map_err(gz_err)?;
    }
    let ndims = out.get(3).copied().unwrap_or(0) as usize;
    if out.len() < 4 || out.len() < 4 + 4 * ndims {
        return Ok(out); // parse_idx reports the truncation
    }
    let total = (0..ndims)
        .map(|i| u32::from_be_bytes([out[4 + 4 * i], out[5 + 4 * i], out[6 + 4 * i], out[7 + 4 * i]]) as u64)
        .try_fold(1u64, |acc, d| acc.checked_mul(d))
        .and_then(|c| c.checked_add(out.len() as u64));
    let total = match total {
        Some(total) if total <= budget => total,
        _ => return Err(over_budget(total.map_or("more than 2^64".to_string(), |t| t.to_string()))),
    };
    out.reserve((total as usize).saturating_sub(out.len()));
    (&mut decoder).take(total - out.len() as u64).read_to_end(&mut out).map_err(gz_err)?;
    if (out.len() as u64) < total {
        return Ok(out); // parse_idx reports the truncation
    }
    // The stream must end here: reading on checks the CRC and finds data the header left out.
    let mut extra = Vec::new();
    (&mut decoder).take(1 << 20).read_to_end(&mut extra).map_err(gz_err)?;
    if !extra.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: the gzip stream holds {}{} bytes after the data its IDX header declares",
            path.display(),
            if extra.len() == 1 << 20 { "at least " } else { "" },
            extra.len()
        )));
    }
    let rest = decoder.into_inner().len();
    if rest > 0 {
        return Err(DataError::BadGzip {
            path: path.to_path_buf(),
            reason: format!("{rest} bytes after the gzip stream"),
        });
    }
    Ok(out)
}

/// Parses IDX bytes read from `path`, requiring `want_dims` dimensions.
pub fn parse_idx(path: &Path, bytes: &[u8], want_dims: usize) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(DataError::Truncated { path: path.to_path_buf(), expected: 4, found: bytes.len() as u64 });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let bad = |reason: String| DataError::BadMagic { path: path.to_path_buf(), found: magic, reason };
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (the first two bytes must be zero)".to_string()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", bytes[2])));
    }
    let ndims = bytes[3] as usize;
    if ndims != want_dims {
        let what =
            if want_dims == 3 { "images (expected magic 0x00000803)" } else { "labels (expected magic 0x00000801)" };
        return Err(bad(format!("{ndims} dimension(s), but {what} need {want_dims}")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header as u64,
            found: bytes.len() as u64,
        });
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count =
        dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).and_then(|c| c.checked_add(header as u64));
    let Some(expected) = count else {
        return Err(DataError::Invalid(format!(
            "{}: the IDX header declares dimensions {dims:?}, more bytes than can exist",
            path.display()
        )));
    };
    if (bytes.len() as u64) < expected {
        return Err(DataError::Truncated { path: path.to_path_buf(), expected, found: bytes.len() as u64 });
    }
    if (bytes.len() as u64) > expected {
        return Err(DataError::Invalid(format!(
            "{}: {} bytes after the {expected} that its IDX header declares ({dims:?})",
            path.display(),
            bytes.len() as u64 - expected
        )));
    }
    Ok(IdxArray { dims, data: bytes[header..expected as usize].to_vec() })
}

/// Reads an IDX file (raw or gzipped) with `want_dims` dimensions.
pub fn read_idx(path: &Path, want_dims: usize) -> Result<IdxArray> {
    let bytes = read_maybe_gzip(path)?;
    parse_idx(path, &bytes, want_dims)
}

/// Loads an IDX image file and its label file. Class names are the label values `"0"`, `"1"`, …;
/// labels must then cover 0..=max without a gap (a stray 255 among 0–9 is an error, not a
/// 256-class dataset). See [`load_idx_with_classes`] to declare the classes.
pub fn load_idx(images_path: &Path, labels_path: &Path) -> Result<ImageDataset> {
    load_idx_with_classes(images_path, labels_path, None)
}

/// Like [`load_idx`], with the class names declared: every label must be below their count.
pub fn load_idx_with_classes(
    images_path: &Path,
    labels_path: &Path,
    declared: Option<&[String]>,
) -> Result<ImageDataset> {
    let images = read_idx(images_path, 3)?;
    let labels = read_idx(labels_path, 1)?;
    let (n_images, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    let n_labels = labels.dims[0];
    if n_images != n_labels {
        return Err(DataError::CountMismatch {
            images: images_path.to_path_buf(),
            labels: labels_path.to_path_buf(),
            n_images,
            n_labels,
        });
    }
    if n_images == 0 || rows == 0 || cols == 0 {
        return Err(DataError::Invalid(format!(
            "{}: empty IDX image file ({n_images} images of {rows}×{cols})",
            images_path.display()
        )));
    }
    let labels: Vec<u32> = labels.data.iter().map(|&l| l as u32).collect();
    let mut counts = [0usize; 256];
    for &l in &labels {
        counts[l as usize] += 1;
    }
    let class_names = match declared {
        Some(names) => {
            if let Some(i) = labels.iter().position(|&l| l as usize >= names.len()) {
                return Err(DataError::Invalid(format!(
                    "{}: label {} (item {i}) is outside the {} declared classes (--class-names)",
                    labels_path.display(),
                    labels[i],
                    names.len()
                )));
            }
            if let Some((i, name)) =
                names.iter().enumerate().find(|(i, n)| n.trim().is_empty() || names[..*i].contains(n))
            {
                return Err(DataError::Invalid(format!(
                    "--class-names: class {i} is named `{name}`, {}; every class needs a name of its own",
                    if name.trim().is_empty() { "an empty name" } else { "like an earlier one" }
                )));
            }
            names.to_vec()
        }
        None => {
            let num_classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
            let missing: Vec<usize> = (0..num_classes).filter(|&c| counts[c] == 0).collect();
            if !missing.is_empty() {
                let used: Vec<String> =
                    (0..num_classes).filter(|&c| counts[c] > 0).map(|c| format!("{c} ({}×)", counts[c])).collect();
                return Err(DataError::Invalid(format!(
                    "{}: the labels used are {}, so classes {} have no example: a damaged label, or a dataset whose classes must be declared (--class-names)",
                    labels_path.display(),
                    used.join(", "),
                    if missing.len() > 6 { format!("{}–{} and others", missing[0], missing[missing.len() - 1]) } else { format!("{missing:?}") }
                )));
            }
            (0..num_classes).map(|c| c.to_string()).collect()
        }
    };
    Ok(ImageDataset {
        images: images.data,
        labels,
        channels: 1,
        height: rows,
        width: cols,
        class_names,
        source: images_path.display().to_string(),
    })
}

/// Encodes an IDX file of unsigned bytes.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Writes a dataset's grey images and labels as IDX files (gzipped when the name ends in `.gz`).
pub fn write_idx(dataset: &ImageDataset, images_path: &Path, labels_path: &Path) -> Result<()> {
    if dataset.channels != 1 {
        return Err(DataError::Invalid("IDX export needs single-channel images".into()));
    }
    let images = encode_idx(&[dataset.len(), dataset.height, dataset.width], &dataset.images);
    let labels_u8: Vec<u8> = dataset.labels.iter().map(|&l| l as u8).collect();
    let labels = encode_idx(&[dataset.len()], &labels_u8);
    for (path, bytes) in [(images_path, images), (labels_path, labels)] {
        let bytes = if path.extension().is_some_and(|e| e == "gz") {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&bytes).map_err(io_err(path))?;
            enc.finish().map_err(io_err(path))?
        } else {
            bytes
        };
        crate::util::write_atomic(path, &bytes).map_err(|e| DataError::Invalid(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageDataset {
        ImageDataset {
            images: (0..2 * 3 * 4).map(|v| v as u8).collect(),
            labels: vec![7, 2],
            channels: 1,
            height: 3,
            width: 4,
            class_names: (0..8).map(|c| c.to_string()).collect(),
            source: String::new(),
        }
    }

    #[test]
    fn idx_round_trips_raw_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        for ext in ["", ".gz"] {
            let img = dir.path().join(format!("x-images-idx3-ubyte{ext}"));
            let lab = dir.path().join(format!("x-labels-idx1-ubyte{ext}"));
            write_idx(&sample(), &img, &lab).unwrap();
            // Labels 7 and 2 only: undeclared, classes 0, 1, 3–6 would have no example.
            assert!(load_idx(&img, &lab).unwrap_err().to_string().contains("have no example"));
            let names: Vec<String> = (0..8).map(|c| c.to_string()).collect();
            let back = load_idx_with_classes(&img, &lab, Some(&names)).unwrap();
            assert_eq!(back.images, sample().images);
            assert_eq!(back.labels, vec![7, 2]);
            assert_eq!((back.height, back.width, back.num_classes()), (3, 4, 8));
        }
    }

    #[test]
    fn wrong_magic_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad");
        std::fs::write(&path, [0x89, b'P', b'N', b'G', 0, 0, 0, 0]).unwrap();
        let err = read_idx(&path, 3).unwrap_err().to_string();
        assert!(err.contains("wrong magic number 0x89504e47"), "{err}");
        assert!(err.contains("bad"), "{err}");
        // A label file given where images are expected.
        std::fs::write(&path, encode_idx(&[2], &[1, 2])).unwrap();
        let err = read_idx(&path, 3).unwrap_err().to_string();
        assert!(err.contains("1 dimension(s)"), "{err}");
        // A float IDX file.
        std::fs::write(&path, [0, 0, 0x0d, 1, 0, 0, 0, 0]).unwrap();
        assert!(read_idx(&path, 1).unwrap_err().to_string().contains("0x0d"));
    }

    #[test]
    fn a_header_whose_size_overflows_is_an_error_not_a_panic() {
        // A header that declares 2^16 × 2^24 × 2^24 bytes in a 16-byte file.
        let mut bytes = vec![0u8, 0, 0x08, 3];
        for d in [1u32 << 16, 1 << 24, 1 << 24] {
            bytes.extend(d.to_be_bytes());
        }
        let err = parse_idx(Path::new("bomb-idx3-ubyte"), &bytes, 3).unwrap_err().to_string();
        assert!(err.contains("bomb-idx3-ubyte") && err.contains("16777216"), "{err}");
    }

    #[test]
    fn truncated_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short-images-idx3-ubyte");
        let mut bytes = encode_idx(&[2, 3, 4], &[0; 24]);
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, &bytes).unwrap();
        let err = read_idx(&path, 3).unwrap_err().to_string();
        assert!(err.contains("truncated: expected 40 bytes, found 35"), "{err}");
        std::fs::write(&path, [0, 0, 8]).unwrap();
        assert!(read_idx(&path, 3).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&path, [0, 0, 8, 3, 0, 0]).unwrap();
        assert!(read_idx(&path, 3).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn corrupt_gzip_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        let err = read_idx(&path, 1).unwrap_err().to_string();
        assert!(err.contains("corrupt gzip"), "{err}");
    }

    #[test]
    fn image_label_count_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i");
        let lab = dir.path().join("l");
        std::fs::write(&img, encode_idx(&[2, 1, 1], &[0, 0])).unwrap();
        std::fs::write(&lab, encode_idx(&[3], &[0, 1, 2])).unwrap();
        let err = load_idx(&img, &lab).unwrap_err().to_string();
        assert!(err.contains("holds 2 images but") && err.contains("holds 3 labels"), "{err}");
    }
}
