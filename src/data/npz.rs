//! NumPy `.npy`/`.npz` files, written and read from the format's specification (NEP 1), for the
//! ImageNet evaluation protocol: LlamaGen's `sample_ddp.py` writes its samples as one `.npz` of
//! uint8 images `[N, H, W, 3]` under `arr_0`, and the ADM evaluator's reference batches hold
//! `arr_0` images and/or Inception statistics `mu` `[2048]`, `sigma` `[2048, 2048]`.
//!
//! - [`ImageNpzWriter`]: streams images into `arr_0` of a new `.npz`, so 50 000 images at 256²
//!   (9.8 GB) never sit in memory; ZIP64 records appear when the array passes 4 GiB.
//! - [`NpzReader`]: lists arrays, reads numeric arrays as `f64`, and streams uint8 image arrays
//!   batch by batch (stored archives as `np.savez` writes them; `np.savez_compressed` archives
//!   are inflated whole).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{DataError, Result};
use crate::zipfile::{StoredZipWriter, ZipError, ZipReader};

impl From<ZipError> for DataError {
    fn from(e: ZipError) -> Self {
        match e {
            ZipError::Io { path, source } => DataError::Io { path, source },
            ZipError::Bad { path, reason } | ZipError::Usage { path, reason } => DataError::BadShard { path, reason },
            ZipError::Missing { path, name } => DataError::BadShard {
                path,
                reason: format!("no array `{}` in the archive", name.trim_end_matches(".npy")),
            },
        }
    }
}

/// The header of one `.npy` array.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// The dtype string, e.g. `|u1`, `<f4`, `<f8`.
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
}

const MAGIC: &[u8] = b"\x93NUMPY";

impl NpyHeader {
    /// The header bytes: magic, version 1.0 (2.0 if the dict is long), dict padded with spaces
    /// and a newline so that the data starts at a multiple of 64 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!("({})", self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let order = if self.fortran_order { "True" } else { "False" };
        let dict = format!("{{'descr': '{}', 'fortran_order': {order}, 'shape': {shape}, }}", self.descr);
        let (version, len_bytes) = if dict.len() + 11 < 65536 { (1u8, 2) } else { (2u8, 4) };
        let prefix = MAGIC.len() + 2 + len_bytes;
        let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
        let header_len = total - prefix;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[version, 0]);
        match len_bytes {
            2 => out.extend_from_slice(&(header_len as u16).to_le_bytes()),
            _ => out.extend_from_slice(&(header_len as u32).to_le_bytes()),
        }
        out.extend_from_slice(dict.as_bytes());
        out.resize(total - 1, b' ');
        out.push(b'\n');
        out
    }

    /// Parses a header from the start of `bytes`; returns it and the offset of the data.
    pub fn parse(bytes: &[u8]) -> std::result::Result<(NpyHeader, usize), String> {
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err("not a .npy array (no \\x93NUMPY magic)".to_string());
        }
        let (len, start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12),
            v => return Err(format!(".npy format version {v} is not supported")),
        };
        let dict = bytes.get(start..start + len).ok_or("the .npy header is truncated")?;
        let dict = std::str::from_utf8(dict).map_err(|_| "the .npy header is not text")?;
        let field = |key: &str| -> std::result::Result<&str, String> {
            let at = dict.find(&format!("'{key}':")).ok_or(format!("the .npy header has no '{key}'"))?;
            Ok(dict[at + key.len() + 3..].trim_start())
        };
        let descr = field("descr")?;
        let descr =
            descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("bad 'descr' in the .npy header")?;
        let fortran_order = field("fortran_order")?.starts_with("True");
        let shape = field("shape")?;
        let shape =
            shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("bad 'shape' in the .npy header")?;
        let shape = shape
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                d.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad dimension `{d}` in the .npy shape"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((NpyHeader { descr: descr.to_string(), fortran_order, shape }, start + len))
    }

    /// Elements in the array.
    pub fn count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Streams uint8 images `[H, W, 3]` into `arr_0` of a new `.npz` (`np.load(f)["arr_0"]` gives
/// `[N, H, W, 3]`). The file appears, complete, only at [`finish`](Self::finish).
pub struct ImageNpzWriter {
    zip: StoredZipWriter,
    path: PathBuf,
    image_bytes: usize,
    expected: usize,
    written: usize,
}

impl ImageNpzWriter {
    /// A writer for exactly `count` images of `height × width` RGB.
    pub fn create(path: &Path, count: usize, height: usize, width: usize) -> Result<Self> {
        let header = NpyHeader { descr: "|u1".into(), fortran_order: false, shape: vec![count, height, width, 3] };
        let header = header.to_bytes();
        let image_bytes = height * width * 3;
        let mut zip = StoredZipWriter::create(path)?;
        zip.start_entry("arr_0.npy", (header.len() + count * image_bytes) as u64)?;
        zip.write(&header)?;
        Ok(ImageNpzWriter { zip, path: path.to_path_buf(), image_bytes, expected: count, written: 0 })
    }

    /// Appends one image, `H·W·3` bytes, row-major with channels last.
    pub fn push(&mut self, image: &[u8]) -> Result<()> {
        if image.len() != self.image_bytes {
            return Err(DataError::Invalid(format!(
                "{}: an image of {} bytes, expected {} (H × W × 3)",
                self.path.display(),
                image.len(),
                self.image_bytes
            )));
        }
        if self.written == self.expected {
            return Err(DataError::Invalid(format!(
                "{}: more than the {} announced images",
                self.path.display(),
                self.expected
            )));
        }
        self.zip.write(image)?;
        self.written += 1;
        Ok(())
    }

    /// Closes the archive and moves it into place; fails if fewer images came than announced.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(DataError::Invalid(format!(
                "{}: {} images written, {} announced",
                self.path.display(),
                self.written,
                self.expected
            )));
        }
        self.zip.finish_entry()?;
        self.zip.finish()?;
        Ok(())
    }
}

/// Writes float64 arrays (name, shape, row-major values) into a new `.npz`, as `np.savez` would.
pub fn write_f64_arrays(path: &Path, arrays: &[(&str, &[usize], &[f64])]) -> Result<()> {
    let mut zip = StoredZipWriter::create(path)?;
    for (name, shape, values) in arrays {
        if shape.iter().product::<usize>() != values.len() {
            return Err(DataError::Invalid(format!(
                "{}: array `{name}` of shape {shape:?} given {} values",
                path.display(),
                values.len()
            )));
        }
        let header = NpyHeader { descr: "<f8".into(), fortran_order: false, shape: shape.to_vec() }.to_bytes();
        zip.start_entry(&format!("{name}.npy"), (header.len() + 8 * values.len()) as u64)?;
        zip.write(&header)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write(&bytes)?;
        zip.finish_entry()?;
    }
    zip.finish()?;
    Ok(())
}

/// An open `.npz` archive.
pub struct NpzReader {
    zip: ZipReader,
}

impl NpzReader {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(NpzReader { zip: ZipReader::open(path)? })
    }

    pub fn path(&self) -> &Path {
        self.zip.path()
    }

    /// The arrays' names (`arr_0`, `mu`, …).
    pub fn names(&self) -> Vec<String> {
        self.zip.entries().iter().filter_map(|e| e.name.strip_suffix(".npy")).map(str::to_string).collect()
    }

    fn bad(&self, reason: String) -> DataError {
        DataError::BadShard { path: self.path().to_path_buf(), reason }
    }

    /// The header of array `name` and the offset of its data in its entry.
    pub fn header(&mut self, name: &str) -> Result<(NpyHeader, usize)> {
        let entry = format!("{name}.npy");
        let size = self.zip.entry(&entry)?.size.min(1 << 20);
        let mut head = Vec::new();
        if self.zip.entry(&entry)?.method == 0 {
            let path = self.path().to_path_buf();
            self.zip.stored_reader(&entry, 0)?.take(size).read_to_end(&mut head).map_err(super::io_err(&path))?;
        } else {
            head = self.zip.read(&entry)?;
        }
        let (header, offset) = NpyHeader::parse(&head).map_err(|e| self.bad(format!("array `{name}`: {e}")))?;
        if header.fortran_order && header.shape.len() > 1 {
            return Err(self.bad(format!("array `{name}` is in Fortran order, which is not supported")));
        }
        Ok((header, offset))
    }

    /// A numeric array (`f2`/`f4`/`f8`, `i`/`u` of any width, either byte order) as `f64`.
    pub fn read_f64(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let (header, offset) = self.header(name)?;
        let bytes = self.zip.read(&format!("{name}.npy"))?;
        let data = &bytes[offset..];
        let descr = header.descr.as_bytes();
        let (order, kind, width) = match descr {
            [o @ (b'<' | b'>' | b'|' | b'='), k, w @ ..] => {
                (*o, *k, std::str::from_utf8(w).ok().and_then(|w| w.parse::<usize>().ok()))
            }
            _ => (b'?', b'?', None),
        };
        let width = width
            .filter(|w| [1, 2, 4, 8].contains(w))
            .ok_or_else(|| self.bad(format!("array `{name}`: dtype `{}` is not supported", header.descr)))?;
        if data.len() < header.count() * width {
            return Err(self.bad(format!(
                "array `{name}` is truncated: {} bytes for {} elements of {width}",
                data.len(),
                header.count()
            )));
        }
        let big = order == b'>';
        let values = data[..header.count() * width]
            .chunks_exact(width)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                if big {
                    b[..width].reverse();
                }
                match (kind, width) {
                    (b'f', 2) => Ok(half::f16::from_le_bytes([b[0], b[1]]).to_f64()),
                    (b'f', 4) => Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
                    (b'f', 8) => Ok(f64::from_le_bytes(b)),
                    (b'u', _) => Ok(u64::from_le_bytes(b) as f64),
                    (b'i', w) => Ok((i64::from_le_bytes(b) << (64 - 8 * w) >> (64 - 8 * w)) as f64),
                    _ => Err(()),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| self.bad(format!("array `{name}`: dtype `{}` is not supported", header.descr)))?;
        Ok((header.shape, values))
    }

    /// Streams a uint8 image array `[N, H, W, 3]` (or `[N, H, W]`, gray): calls `each` with up to
    /// `batch` images at a time (`n × H × W × C` bytes) and returns `(N, H, W, C)`.
    pub fn for_each_image_batch(
        &mut self,
        name: &str,
        batch: usize,
        mut each: impl FnMut(&[u8], usize) -> Result<()>,
    ) -> Result<(usize, usize, usize, usize)> {
        let (header, offset) = self.header(name)?;
        let (n, h, w, c) = match header.shape[..] {
            [n, h, w, c] if c == 3 || c == 1 => (n, h, w, c),
            [n, h, w] => (n, h, w, 1),
            _ => {
                return Err(self.bad(format!("array `{name}` has shape {:?}; images are [N, H, W, 3]", header.shape)));
            }
        };
        if header.descr != "|u1" && header.descr != "<u1" {
            return Err(self.bad(format!("array `{name}` has dtype `{}`; images are uint8 (|u1)", header.descr)));
        }
        let image = h * w * c;
        let entry = format!("{name}.npy");
        let path = self.path().to_path_buf();
        let mut consume = |reader: &mut dyn Read| -> Result<()> {
            let mut buf = vec![0u8; batch.max(1) * image];
            let mut done = 0;
            while done < n {
                let take = batch.max(1).min(n - done);
                reader.read_exact(&mut buf[..take * image]).map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidData => {
                        DataError::BadShard { path: path.clone(), reason: e.to_string() }
                    }
                    _ => DataError::Truncated {
                        path: path.clone(),
                        expected: (n * image) as u64,
                        found: (done * image) as u64,
                    },
                })?;
                each(&buf[..take * image], take)?;
                done += take;
            }
            Ok(())
        };
        if self.zip.entry(&entry)?.method == 0 {
            // Read from the start, through the header, so that the entry's CRC-32 is checked.
            let mut reader = self.zip.verified_reader(&entry)?;
            let damaged = |e: std::io::Error| DataError::BadShard { path: path.clone(), reason: e.to_string() };
            std::io::copy(&mut (&mut reader).take(offset as u64), &mut std::io::sink()).map_err(damaged)?;
            consume(&mut reader)?;
            reader.finish().map_err(damaged)?;
        } else {
            let bytes = self.zip.read(&entry)?;
            consume(&mut &bytes[offset..])?;
        }
        Ok((n, h, w, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_64_byte_aligned_and_parse_back() {
        for shape in [vec![7], vec![0, 4], vec![50_000, 256, 256, 3], vec![2048, 2048]] {
            let header = NpyHeader { descr: "<f8".into(), fortran_order: false, shape };
            let bytes = header.to_bytes();
            assert_eq!(bytes.len() % 64, 0);
            assert_eq!(*bytes.last().unwrap(), b'\n');
            let (parsed, offset) = NpyHeader::parse(&bytes).unwrap();
            assert_eq!((parsed, offset), (header, bytes.len()));
        }
        // A header as numpy writes it, by hand: shape (3,) float32.
        let dict = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&((64 - 10) as u16).to_le_bytes());
        bytes.extend_from_slice(dict);
        bytes.resize(63, b' ');
        bytes.push(b'\n');
        let (parsed, offset) = NpyHeader::parse(&bytes).unwrap();
        assert_eq!((parsed.descr.as_str(), parsed.shape, offset), ("<f4", vec![3], 64));
    }

    #[test]
    fn images_written_stream_back_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.npz");
        let (n, h, w) = (5, 4, 3);
        let images: Vec<Vec<u8>> = (0..n).map(|i| (0..h * w * 3).map(|j| (i * 31 + j) as u8).collect()).collect();
        let mut writer = ImageNpzWriter::create(&path, n, h, w).unwrap();
        for image in &images {
            writer.push(image).unwrap();
        }
        writer.finish().unwrap();
        let mut reader = NpzReader::open(&path).unwrap();
        assert_eq!(reader.names(), ["arr_0"]);
        let mut back = Vec::new();
        let mut sizes = Vec::new();
        let dims = reader
            .for_each_image_batch("arr_0", 2, |bytes, k| {
                back.extend_from_slice(bytes);
                sizes.push(k);
                Ok(())
            })
            .unwrap();
        assert_eq!(dims, (n, h, w, 3));
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(back, images.concat());
        let (shape, values) = reader.read_f64("arr_0").unwrap();
        assert_eq!(shape, [n, h, w, 3]);
        assert_eq!(values[5], images[0][5] as f64);
    }

    #[test]
    fn float_arrays_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.npz");
        let sigma = [1.0, 0.5, 0.5, 2.0];
        write_f64_arrays(&path, &[("mu", &[2], &[0.25, -3.0]), ("sigma", &[2, 2], &sigma)]).unwrap();
        let mut npz = NpzReader::open(&path).unwrap();
        assert_eq!(npz.read_f64("mu").unwrap(), (vec![2], vec![0.25, -3.0]));
        assert_eq!(npz.read_f64("sigma").unwrap(), (vec![2, 2], sigma.to_vec()));
        assert!(write_f64_arrays(&path, &[("x", &[3], &[1.0])]).is_err());
    }

    #[test]
    fn a_short_or_overfull_image_stream_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.npz");
        let mut writer = ImageNpzWriter::create(&path, 2, 2, 2).unwrap();
        assert!(writer.push(&[0; 11]).unwrap_err().to_string().contains("expected 12"));
        writer.push(&[0; 12]).unwrap();
        let err = writer.finish().unwrap_err().to_string();
        assert!(err.contains("1 images written, 2 announced"), "{err}");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
