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
//! A *shard set* is a folder of such files (`shard-00000.safetensors`, …) with a
//! [`MANIFEST`] written last, or a single shard file. The manifest lists every shard with its
//! image count and codes hash, so a set that a killed `dpar tokenize` left half-written (no
//! manifest yet), a stale shard from an earlier run, or a shard replaced by hand is refused
//! rather than trained on. [`ShardSetWriter`] writes sets: it refuses (or, asked to, clears) a
//! folder that already holds one. Per-code entropies live in a sidecar beside each shard (see
//! [`ENTROPY_SUFFIX`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{io_err, DataError, Result};
use crate::tensor_io;

/// The format tag written in every shard.
pub const FORMAT: &str = "dpar-codes-v1";
/// File-name suffix of the per-code entropy sidecar of a shard (`shard-00000.entropy.safetensors`).
pub const ENTROPY_SUFFIX: &str = ".entropy.safetensors";

/// The most classes a shard may declare.
pub const MAX_CLASSES: usize = 1 << 24;

/// File name of a shard set's manifest, written after every shard.
pub const MANIFEST: &str = "manifest.json";
/// The format tag of the manifest.
pub const SET_FORMAT: &str = "dpar-code-set-v1";

/// One shard of a set, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// File name inside the set's folder.
    pub file: String,
    pub images: usize,
    /// [`codes_hash`] of the shard.
    pub codes_hash: String,
}

/// The manifest of a shard set: what it holds, written once every shard is on disk.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub info: ShardInfo,
    /// Whether the shards hold a flip copy.
    pub flip: bool,
    /// Images in the whole set.
    pub images: usize,
    pub shards: Vec<ManifestEntry>,
}

/// Hash of a shard's codes (and flip codes): ties a manifest entry or an entropy sidecar to
/// its shard.
pub fn codes_hash(shard: &CodeShard) -> String {
    let mut bytes = Vec::with_capacity((shard.codes.len() + shard.flip_codes.as_ref().map_or(0, Vec::len)) * 4);
    for c in shard.codes.iter().chain(shard.flip_codes.iter().flatten()) {
        bytes.extend(c.to_le_bytes());
    }
    crate::util::sha256_hex(&bytes)[..32].to_string()
}

/// Whether a file name belongs to a shard set (a shard, an entropy sidecar or the manifest).
fn is_set_file(name: &str) -> bool {
    name == MANIFEST || name.ends_with(".safetensors")
}

/// Writes a shard set into a folder: shards one by one, then the manifest.
pub struct ShardSetWriter {
    dir: PathBuf,
    entries: Vec<ManifestEntry>,
    first: Option<(ShardInfo, bool)>,
}

impl ShardSetWriter {
    /// Prepares `dir`. A folder that already holds a shard set, complete or not (shards,
    /// entropy sidecars or a manifest), is refused unless `overwrite`, which deletes those files
    /// (the manifest first, so that a kill during the clean-up leaves no set that looks complete).
    pub fn create(dir: &Path, overwrite: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut old: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| is_set_file(&n.to_string_lossy())))
            .collect();
        if !old.is_empty() {
            if !overwrite {
                return Err(DataError::StaleShards {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "already holds {} file(s) of a shard set ({}, e.g. {}); pass --overwrite to replace them, or choose an empty --out",
                        old.len(),
                        if dir.join(MANIFEST).is_file() { "a complete set" } else { "no manifest: an interrupted run" },
                        old[0].file_name().unwrap_or_default().to_string_lossy()
                    ),
                });
            }
            old.sort_by_key(|p| !p.ends_with(MANIFEST));
            for p in old {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        crate::util::remove_stale_temp_files(dir);
        Ok(Self { dir: dir.to_path_buf(), entries: Vec::new(), first: None })
    }

    /// Writes the next shard (`shard-00000.safetensors`, …); every shard must share the first
    /// one's [`ShardInfo`] and flip copy.
    pub fn add(&mut self, shard: &CodeShard) -> Result<PathBuf> {
        let path = self.dir.join(format!("shard-{:05}.safetensors", self.entries.len()));
        let key = (shard.info.clone(), shard.flip_codes.is_some());
        match &self.first {
            None => self.first = Some(key),
            Some(first) if *first != key => {
                return Err(DataError::BadShard {
                    path,
                    reason:
                        "differs from the first shard of the set in grid, codebook, classes, tokenizer or flip copy"
                            .into(),
                })
            }
            Some(_) => {}
        }
        write_shard(&path, shard)?;
        self.entries.push(ManifestEntry {
            file: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            images: shard.len(),
            codes_hash: codes_hash(shard),
        });
        Ok(path)
    }

    /// Writes the manifest, which makes the set readable. A set needs at least one shard.
    pub fn finish(self) -> Result<PathBuf> {
        let Some((info, flip)) = self.first else {
            return Err(DataError::Invalid(format!("{}: a shard set needs at least one shard", self.dir.display())));
        };
        let manifest = Manifest {
            format: SET_FORMAT.into(),
            info,
            flip,
            images: self.entries.iter().map(|e| e.images).sum(),
            shards: self.entries,
        };
        let path = self.dir.join(MANIFEST);
        let json = serde_json::to_string_pretty(&manifest)
            .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
        crate::util::write_atomic(&path, json.as_bytes())?;
        Ok(path)
    }
}

/// Writes `shards` as a complete set in `dir` (see [`ShardSetWriter`]).
pub fn write_shard_set(dir: &Path, shards: &[CodeShard], overwrite: bool) -> Result<Vec<PathBuf>> {
    let mut w = ShardSetWriter::create(dir, overwrite)?;
    let files = shards.iter().map(|s| w.add(s)).collect::<Result<Vec<_>>>()?;
    w.finish()?;
    Ok(files)
}

/// Reads and checks the manifest of a shard-set folder.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(DataError::NoDataset {
            path: dir.to_path_buf(),
            reason: "no such shard file or folder (make one with `dpar tokenize`)".into(),
        });
    }
    let path = dir.join(MANIFEST);
    let bad = |reason: String| DataError::BadShard { path: path.clone(), reason };
    if !path.is_file() {
        let has_shards = std::fs::read_dir(dir)
            .map(|r| r.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")))
            .unwrap_or(false);
        return Err(DataError::NoDataset {
            path: dir.to_path_buf(),
            reason: if has_shards {
                format!("holds shards but no {MANIFEST}: the set is incomplete (an interrupted `dpar tokenize`) or was written by an older dpar; run `dpar tokenize --overwrite` into it again")
            } else {
                "no code shards in this folder (make them with `dpar tokenize`)".into()
            },
        });
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(format!("not a shard-set manifest: {e}")))?;
    if manifest.format != SET_FORMAT {
        return Err(bad(format!("format {:?}, expected {SET_FORMAT:?}", manifest.format)));
    }
    if manifest.shards.is_empty() {
        return Err(bad("lists no shards".into()));
    }
    for e in &manifest.shards {
        let name = Path::new(&e.file);
        if name.components().count() != 1 || !matches!(name.components().next(), Some(std::path::Component::Normal(_)))
        {
            return Err(bad(format!("shard name {:?} is not a plain file name", e.file)));
        }
        if e.images == 0 {
            return Err(bad(format!("lists {} with 0 images; a shard holds at least one", e.file)));
        }
    }
    let mut names: Vec<&str> = manifest.shards.iter().map(|e| e.file.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("lists {} twice; every shard would be read as often as it is listed", w[0])));
    }
    if manifest.shards.iter().try_fold(0usize, |a, e| a.checked_add(e.images)) != Some(manifest.images) {
        return Err(bad(format!("the shards' image counts do not add up to {}", manifest.images)));
    }
    Ok(manifest)
}

/// Reads every shard of a set, each checked against the manifest (for a folder).
pub fn read_set_shards(path: &Path) -> Result<Vec<(PathBuf, CodeShard)>> {
    if path.is_file() {
        return Ok(vec![(path.to_path_buf(), read_shard(path)?)]);
    }
    let manifest = read_manifest(path)?;
    let files = manifest_files(path, &manifest)?;
    let mut out = Vec::with_capacity(files.len());
    for (file, entry) in files.into_iter().zip(&manifest.shards) {
        let shard = read_shard(&file)?;
        let bad = |reason: String| DataError::BadShard { path: file.clone(), reason };
        if shard.info != manifest.info || shard.flip_codes.is_some() != manifest.flip {
            return Err(bad(format!("does not match {MANIFEST} (grid, codebook, classes, tokenizer or flip copy differ); re-run `dpar tokenize --overwrite`")));
        }
        if shard.len() != entry.images || codes_hash(&shard) != entry.codes_hash {
            return Err(bad(format!(
                "is not the shard {MANIFEST} lists ({} images, codes hash {}; found {} images, {}): it was changed or replaced after tokenizing; re-run `dpar tokenize --overwrite`",
                entry.images,
                entry.codes_hash,
                shard.len(),
                codes_hash(&shard)
            )));
        }
        out.push((file, shard));
    }
    Ok(out)
}

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
        // Bounds far beyond any real dataset: a header declaring more is damaged, and trusting it
        // would size tables and models from it.
        if self.info.grid_size > 4096
            || self.info.num_classes > MAX_CLASSES
            || self.info.codebook_size > u32::MAX as usize
        {
            return bad(format!(
                "declares a {}-wide grid, {} classes and {} codes; at most 4096, {MAX_CLASSES} and 2^32 − 1 are accepted",
                self.info.grid_size, self.info.num_classes, self.info.codebook_size
            ));
        }
        if !self.info.class_names.is_empty() && self.info.class_names.len() != self.info.num_classes {
            return bad(format!(
                "names {} classes but declares {}",
                self.info.class_names.len(),
                self.info.num_classes
            ));
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
    let class_names: Vec<String> = serde_json::from_str(file.meta("class_names")?)
        .map_err(|e| DataError::BadShard { path: path.to_path_buf(), reason: format!("class_names: {e}") })?;
    let info = ShardInfo {
        grid_size: file.meta_parse("grid_size")?,
        codebook_size: file.meta_parse("codebook_size")?,
        num_classes: file.meta_parse("num_classes")?,
        class_names,
        tokenizer_id: file.meta("tokenizer_id")?.to_string(),
    };
    let flip_codes =
        if file.tensors.contains_key("codes_flip") { Some(u32_values(&file, "codes_flip")?) } else { None };
    let shard =
        CodeShard { info, codes: u32_values(&file, "codes")?, labels: u32_values(&file, "labels")?, flip_codes };
    shard.check(path)?;
    if shard.is_empty() {
        return Err(DataError::BadShard { path: path.to_path_buf(), reason: "holds no images".into() });
    }
    Ok(shard)
}

/// The shard files of a set: `path` itself if it is a file, else the shards that the folder's
/// [`MANIFEST`] lists (a folder without one is refused: its set is incomplete). Other
/// `*.safetensors` files in the folder are not part of the set.
pub fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    manifest_files(path, &read_manifest(path)?)
}

/// The files a folder's manifest lists, each checked to exist.
fn manifest_files(dir: &Path, manifest: &Manifest) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = manifest.shards.iter().map(|e| dir.join(&e.file)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(DataError::BadShard {
            path: missing.clone(),
            reason: format!("listed in {MANIFEST} but missing; re-run `dpar tokenize --overwrite`"),
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

/// Reads every shard of a set and concatenates them (see [`read_set_shards`]).
pub fn read_shard_set(path: &Path) -> Result<(CodeShard, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut merged: Option<CodeShard> = None;
    for (file, shard) in read_set_shards(path)? {
        match &mut merged {
            None => merged = Some(shard),
            Some(all) => {
                all.codes.extend(&shard.codes);
                all.labels.extend(&shard.labels);
                if let (Some(a), Some(b)) = (&mut all.flip_codes, &shard.flip_codes) {
                    a.extend(b);
                }
            }
        }
        files.push(file);
    }
    merged
        .map(|m| (m, files))
        .ok_or_else(|| DataError::NoDataset { path: path.to_path_buf(), reason: "the set holds no shards".into() })
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
        write_shard_set(dir.path(), &[shard(3, true), shard(2, true)], false).unwrap();
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
        let mut w = ShardSetWriter::create(dir.path(), false).unwrap();
        w.add(&shard(2, false)).unwrap();
        let mut other = shard(2, false);
        other.info.grid_size = 1;
        other.codes.truncate(2);
        let err = w.add(&other).unwrap_err().to_string();
        assert!(err.contains("shard-00001.safetensors") && err.contains("differs from the first shard"), "{err}");

        let mut bad = shard(1, false);
        bad.codes[0] = 10;
        assert!(write_shard(&dir.path().join("c.safetensors"), &bad).unwrap_err().to_string().contains("code 10"));
    }

    /// A set that a killed tokenize left without its manifest is refused, and
    /// so is writing a new set over an old one, unless asked to replace it.
    #[test]
    fn a_set_without_manifest_or_over_stale_shards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Killed after the first shard: no manifest yet.
        let mut w = ShardSetWriter::create(dir.path(), false).unwrap();
        w.add(&shard(3, false)).unwrap();
        drop(w);
        let err = read_shard_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no manifest.json") && err.contains("--overwrite"), "{err}");
        // A new set over it is refused, then replaces it when asked.
        let err = ShardSetWriter::create(dir.path(), false).err().unwrap().to_string();
        assert!(err.contains("already holds 1 file") && err.contains("--overwrite"), "{err}");
        write_shard_set(dir.path(), &[shard(2, false), shard(2, false)], false).unwrap_err();
        write_shard_set(dir.path(), &[shard(2, false), shard(1, false)], true).unwrap();
        assert_eq!(read_shard_set(dir.path()).unwrap().0.len(), 3);
        // A smaller set over a bigger one leaves no stale shard behind.
        std::fs::write(dir.path().join("shard-00001.entropy.safetensors"), b"x").unwrap();
        write_shard_set(dir.path(), &[shard(4, false)], true).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(read_shard_set(dir.path()).unwrap().0.len(), 4);
        // A shard replaced after tokenizing no longer matches the manifest.
        write_shard(&dir.path().join("shard-00000.safetensors"), &shard(5, false)).unwrap();
        let err = read_shard_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("shard-00000.safetensors") && err.contains("changed or replaced"), "{err}");
        // A shard the manifest lists but the folder lacks.
        std::fs::remove_file(dir.path().join("shard-00000.safetensors")).unwrap();
        let err = read_shard_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("listed in manifest.json but missing"), "{err}");
        // An empty set is not a set.
        let empty = tempfile::tempdir().unwrap();
        assert!(write_shard_set(empty.path(), &[], false).unwrap_err().to_string().contains("at least one shard"));
        assert!(read_shard_set(empty.path()).unwrap_err().to_string().contains("no code shards"));
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
