//! Code shards: a tokenised dataset on disk.
//!
//! A shard is one safetensors file (format `dpar-codes-v1`):
//!
//! | tensor       | dtype | shape       | meaning                                              |
//! |--------------|-------|-------------|------------------------------------------------------|
//! | `codes`      | U32   | `[N, G·G]`  | VQ codes in raster order (row by row)                |
//! | `labels`     | U32   | `[N]`       | class labels                                         |
//! | `codes_flip` | U32   | `[N, G·G]`  | optional: codes of the horizontally flipped image    |
//!
//! with string metadata `format`, `grid_size`, `codebook_size`, `num_classes`, `class_names`
//! (JSON list) and `tokenizer_id` (the SHA-256 of the tokenizer weights that made the codes).
//!
//! A *shard set* is a folder of such files (`shard-00000.safetensors`, …) or a single file.
//! Per-code entropies live in a sidecar beside each shard (see [`ENTROPY_SUFFIX`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{io_err, DataError, Result};
use crate::tensor_io;

/// The format tag written in every shard.
pub const FORMAT: &str = "dpar-codes-v1";
/// File-name suffix of the per-code entropy sidecar of a shard (`shard-00000.entropy.safetensors`).
pub const ENTROPY_SUFFIX: &str = ".entropy.safetensors";

/// What every shard of a set shares.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// Side G of the code grid; a sequence holds G·G codes.
    pub grid_size: usize,
    /// Codebook size V: every code is < V.
    pub codebook_size: usize,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    /// Identity (weights SHA-256) of the tokenizer that produced the codes.
    pub tokenizer_id: String,
}

impl ShardInfo {
    /// Codes per image.
    pub fn seq_len(&self) -> usize {
        self.grid_size * self.grid_size
    }
}

/// Codes and labels of a set of images, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeShard {
    pub info: ShardInfo,
    /// `N × G·G`, raster order.
    pub codes: Vec<u32>,
    pub labels: Vec<u32>,
    /// Codes of the flipped images, when the flip augmentation was written.
    pub flip_codes: Option<Vec<u32>>,
}

impl CodeShard {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The codes of image `i` (`flip` selects the flip copy, when present).
    pub fn codes_of(&self, i: usize, flip: bool) -> &[u32] {
        let l = self.info.seq_len();
        let source = match (&self.flip_codes, flip) {
            (Some(f), true) => f,
            _ => &self.codes,
        };
        &source[i * l..(i + 1) * l]
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(DataError::BadShard { path: path.to_path_buf(), reason });
        let (n, l) = (self.len(), self.info.seq_len());
        if self.info.grid_size == 0 || self.info.codebook_size == 0 {
            return bad("grid_size and codebook_size must be > 0".into());
        }
        if self.codes.len() != n * l {
            return bad(format!("`codes` holds {} values, expected {n} × {l}", self.codes.len()));
        }
        for (name, codes) in [("codes", Some(&self.codes)), ("codes_flip", self.flip_codes.as_ref())] {
            let Some(codes) = codes else { continue };
            if codes.len() != n * l {
                return bad(format!("`{name}` holds {} values, expected {n} × {l}", codes.len()));
            }
            if let Some(&c) = codes.iter().find(|&&c| c as usize >= self.info.codebook_size) {
                return bad(format!("`{name}` holds code {c}, outside the codebook of {}", self.info.codebook_size));
            }
        }
        if let Some(&y) = self.labels.iter().find(|&&y| y as usize >= self.info.num_classes) {
            return bad(format!("label {y} is outside the {} classes", self.info.num_classes));
        }
        Ok(())
    }
}

fn u32_tensor(values: &[u32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, shape, &Device::Cpu)?)
}

/// Writes one shard, atomically.
pub fn write_shard(path: &Path, shard: &CodeShard) -> Result<()> {
    shard.check(path)?;
    let (n, l) = (shard.len(), shard.info.seq_len());
    let mut tensors = vec![
        ("codes".to_string(), u32_tensor(&shard.codes, &[n, l])?),
        ("labels".to_string(), u32_tensor(&shard.labels, &[n])?),
    ];
    if let Some(flip) = &shard.flip_codes {
        tensors.push(("codes_flip".to_string(), u32_tensor(flip, &[n, l])?));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("grid_size".to_string(), shard.info.grid_size.to_string());
    meta.insert("codebook_size".to_string(), shard.info.codebook_size.to_string());
    meta.insert("num_classes".to_string(), shard.info.num_classes.to_string());
    meta.insert(
        "class_names".to_string(),
        serde_json::to_string(&shard.info.class_names).unwrap_or_else(|_| "[]".into()),
    );
    meta.insert("tokenizer_id".to_string(), shard.info.tokenizer_id.clone());
    tensor_io::write_safetensors(path, &tensors, &meta)?;
    Ok(())
}

fn u32_values(file: &tensor_io::TensorFile, name: &str) -> Result<Vec<u32>> {
    let t = file.tensor(name)?;
    if t.dtype() != candle_core::DType::U32 {
        return Err(DataError::BadShard {
            path: file.path.clone(),
            reason: format!("`{name}` has dtype {:?}, expected u32", t.dtype()),
        });
    }
    Ok(t.flatten_all()?.to_vec1::<u32>()?)
}

/// Reads and validates one shard.
pub fn read_shard(path: &Path) -> Result<CodeShard> {
    let file = tensor_io::read_safetensors(path, &Device::Cpu)?;
    let format = file.meta("format").unwrap_or("");
    if format != FORMAT {
        return Err(DataError::BadShard {
            path: path.to_path_buf(),
            reason: format!("not a code shard (format {format:?}, expected {FORMAT:?}); make one with `dpar tokenize`"),
        });
    }
    let class_names: Vec<String> = serde_json::from_str(file.meta("class_names")?).map_err(|e| {
        DataError::BadShard { path: path.to_path_buf(), reason: format!("class_names: {e}") }
    })?;
    let info = ShardInfo {
        grid_size: file.meta_parse("grid_size")?,
        codebook_size: file.meta_parse("codebook_size")?,
        num_classes: file.meta_parse("num_classes")?,
        class_names,
        tokenizer_id: file.meta("tokenizer_id")?.to_string(),
    };
    let flip_codes = if file.tensors.contains_key("codes_flip") {
        Some(u32_values(&file, "codes_flip")?)
    } else {
        None
    };
    let shard = CodeShard { info, codes: u32_values(&file, "codes")?, labels: u32_values(&file, "labels")?, flip_codes };
    shard.check(path)?;
    Ok(shard)
}

/// The shard files of a set: `path` itself if it is a file, else the sorted `*.safetensors` in
/// the folder (entropy sidecars excluded).
pub fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(DataError::NoDataset {
            path: path.to_path_buf(),
            reason: "no such shard file or folder (make one with `dpar tokenize`)".into(),
        });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_err(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            p.is_file() && name.ends_with(".safetensors") && !name.ends_with(ENTROPY_SUFFIX)
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoDataset {
            path: path.to_path_buf(),
            reason: "no *.safetensors code shards in this folder".into(),
        });
    }
    Ok(files)
}

/// The entropy sidecar path of a shard file.
pub fn entropy_path(shard: &Path) -> PathBuf {
    let name = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    shard.with_file_name(format!("{stem}{ENTROPY_SUFFIX}"))
}

/// Reads every shard of a set and concatenates them. All shards must agree on their
/// [`ShardInfo`] and on whether they hold a flip copy.
pub fn read_shard_set(path: &Path) -> Result<(CodeShard, Vec<PathBuf>)> {
    let files = shard_files(path)?;
    let mut merged: Option<CodeShard> = None;
    for file in &files {
        let shard = read_shard(file)?;
        match &mut merged {
            None => merged = Some(shard),
            Some(all) => {
                if all.info != shard.info {
                    return Err(DataError::BadShard {
                        path: file.clone(),
                        reason: format!(
                            "differs from {}: grid {}/{}, codebook {}/{}, tokenizer {}/{}",
                            files[0].display(),
                            shard.info.grid_size, all.info.grid_size,
                            shard.info.codebook_size, all.info.codebook_size,
                            shard.info.tokenizer_id, all.info.tokenizer_id
                        ),
                    });
                }
                if all.flip_codes.is_some() != shard.flip_codes.is_some() {
                    return Err(DataError::BadShard {
                        path: file.clone(),
                        reason: "some shards of the set have a flip copy and others do not".into(),
                    });
                }
                all.codes.extend(&shard.codes);
                all.labels.extend(&shard.labels);
                if let (Some(a), Some(b)) = (&mut all.flip_codes, &shard.flip_codes) {
                    a.extend(b);
                }
            }
        }
    }
    // `shard_files` never returns an empty list.
    Ok((merged.expect("shard_files returned at least one file"), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(n: usize, flip: bool) -> CodeShard {
        let info = ShardInfo {
            grid_size: 2,
            codebook_size: 10,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            tokenizer_id: "abc".into(),
        };
        let codes: Vec<u32> = (0..n * 4).map(|i| (i % 10) as u32).collect();
        let flip_codes = flip.then(|| codes.iter().map(|c| 9 - c).collect());
        CodeShard { info, codes, labels: (0..n).map(|i| (i % 3) as u32).collect(), flip_codes }
    }

    #[test]
    fn shards_round_trip_and_concatenate() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("shard-00000.safetensors"), &shard(3, true)).unwrap();
        write_shard(&dir.path().join("shard-00001.safetensors"), &shard(2, true)).unwrap();
        std::fs::write(dir.path().join("shard-00000.entropy.safetensors"), b"x").unwrap();
        let (all, files) = read_shard_set(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(all.len(), 5);
        assert_eq!(all.codes_of(3, false), &[0, 1, 2, 3]);
        assert_eq!(all.codes_of(3, true), &[9, 8, 7, 6]);
    }

    #[test]
    fn mismatched_shards_and_bad_codes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("a.safetensors"), &shard(2, false)).unwrap();
        let mut other = shard(2, false);
        other.info.grid_size = 1;
        other.codes.truncate(2);
        write_shard(&dir.path().join("b.safetensors"), &other).unwrap();
        let err = read_shard_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("b.safetensors") && err.contains("grid 1/2"), "{err}");

        let mut bad = shard(1, false);
        bad.codes[0] = 10;
        assert!(write_shard(&dir.path().join("c.safetensors"), &bad).unwrap_err().to_string().contains("code 10"));
    }

    #[test]
    fn a_non_shard_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        tensor_io::write_safetensors(&path, &[("w".into(), t)], &BTreeMap::new()).unwrap();
        let err = read_shard(&path).unwrap_err().to_string();
        assert!(err.contains("not a code shard"), "{err}");
        assert_eq!(entropy_path(&path), dir.path().join("w.entropy.safetensors"));
    }
}
