//! The parts of a model set, tied by hashes.
//!
//! A trained model records in its config the identity (SHA-256 of the weight file) of the
//! tokenizer whose codes it was trained on (`tokenizer_id`) and, for DPAR, of the entropy model
//! that cut its patches (`entropy_model_id`); code shards record their tokenizer too. Every
//! consumer checks the files it is given against these records ([`check`]): a mismatch is an
//! error naming both hashes, or, with `allow_mismatch`, a loud warning. When a part is not given,
//! [`resolve`] finds it from the record: the first of the usual places ([`candidates`]) whose
//! hash is the recorded one. So `sample --ckpt runs/dpar-s1` finds `runs/tokenizer` or
//! `models/mnist/tokenizer`, whichever made its codes, and every command uses the same search.

// The mismatch error carries both hashes and paths for its message; it is built once, on the
// way out of a command, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

/// Errors of finding and checking parts.
#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    /// The given part is not the one the model (or data) was made with.
    #[error("{path}: this {part} ({found}…) is not the one {owner} was made with ({expected}…); give the matching {flag}, or --allow-mismatch to go on anyway")]
    Mismatch { part: &'static str, flag: &'static str, path: PathBuf, owner: String, found: String, expected: String },
    /// No usual place holds the recorded part.
    #[error("no {part} given and none of the usual places holds the one {owner} was made with ({expected}…): {tried}; give it with {flag}")]
    NotFound { part: &'static str, flag: &'static str, owner: String, expected: String, tried: String },
    /// A weight file could not be read.
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    /// A weight file is not a usable file (missing, empty, a folder).
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
}

pub type Result<T> = std::result::Result<T, PartsError>;

/// A part of a model set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Tokenizer,
    EntropyModel,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Tokenizer => "tokenizer",
            Part::EntropyModel => "entropy model",
        }
    }

    /// The command-line flag that gives this part.
    pub fn flag(self) -> &'static str {
        match self {
            Part::Tokenizer => "--tokenizer",
            Part::EntropyModel => "--entropy-model",
        }
    }

    /// The usual folder name of this part (`models/mnist/<folder>`, `runs/<folder>`).
    pub fn folder(self) -> &'static str {
        match self {
            Part::Tokenizer => "tokenizer",
            Part::EntropyModel => "entropy",
        }
    }
}

/// The weight file of a run folder or weight file.
pub fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// The identity of a part: the SHA-256 of its weight file (which must be a non-empty file).
pub fn id_of(path: &Path) -> Result<String> {
    let file = crate::tensor_io::weight_file(path)?;
    Ok(crate::util::sha256_file(&file)?)
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// The ids a checkpoint records in its embedded config (`tokenizer_id`, `entropy_model_id`),
/// where it has them (LlamaGen weight files have none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    pub tokenizer_id: Option<String>,
    pub entropy_model_id: Option<String>,
}

impl Recorded {
    /// Reads the records of a run folder or weight file; a file without an embedded config
    /// records nothing.
    pub fn of(checkpoint: &Path) -> Self {
        let meta = crate::tensor_io::read_safetensors_metadata(&weights_file(checkpoint)).ok();
        let config: Option<serde_json::Value> = meta.and_then(|m| serde_json::from_str(m.get("config")?).ok());
        let get = |key: &str| {
            config.as_ref().and_then(|c| c.get(key)?.as_str()).filter(|s| !s.is_empty()).map(str::to_string)
        };
        Self { tokenizer_id: get("tokenizer_id"), entropy_model_id: get("entropy_model_id") }
    }

    pub fn id(&self, part: Part) -> Option<&str> {
        match part {
            Part::Tokenizer => self.tokenizer_id.as_deref(),
            Part::EntropyModel => self.entropy_model_id.as_deref(),
        }
    }
}

/// Checks that the part at `path` has the `expected` id. `owner` says who recorded it (e.g.
/// "the model runs/dpar"). With `allow_mismatch` a mismatch is a warning.
pub fn check(part: Part, path: &Path, expected: &str, owner: &str, allow_mismatch: bool) -> Result<()> {
    let found = id_of(path)?;
    if found == expected {
        return Ok(());
    }
    let err = PartsError::Mismatch {
        part: part.name(),
        flag: part.flag(),
        path: path.to_path_buf(),
        owner: owner.to_string(),
        found: short(&found),
        expected: short(expected),
    };
    if allow_mismatch {
        tracing::warn!("--allow-mismatch: going on although {err}; results may be garbage");
        return Ok(());
    }
    Err(err)
}

/// The usual places of a part for something stored at `near` (a run folder, weight file or
/// shard folder): the part's folder beside it (`models/mnist/dpar` → `models/mnist/tokenizer`,
/// `runs/dpar-s0` → `runs/tokenizer`), then the shipped `models/mnist/<folder>` (found as
/// [`crate::home::locate`] finds it), then `runs/<folder>`.
pub fn candidates(part: Part, near: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let near = if near.is_dir() { near.to_path_buf() } else { near.parent().unwrap_or(Path::new(".")).to_path_buf() };
    if let Some(parent) = near.parent() {
        out.push(parent.join(part.folder()));
    }
    let shipped = Path::new(crate::home::SHIPPED).join(part.folder());
    let shipped = crate::home::locate(&shipped).unwrap_or(shipped);
    for p in [shipped, Path::new("runs").join(part.folder())] {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The part to use: `given` (checked against `expected` when there is a record), or else the
/// first of [`candidates`] whose id is `expected` (with no record: the first that exists).
pub fn resolve(
    part: Part,
    given: Option<&Path>,
    expected: Option<&str>,
    near: &Path,
    owner: &str,
    allow_mismatch: bool,
) -> Result<PathBuf> {
    if let Some(path) = given {
        if let Some(expected) = expected {
            check(part, path, expected, owner, allow_mismatch)?;
        }
        return Ok(path.to_path_buf());
    }
    let candidates: Vec<PathBuf> = candidates(part, near).into_iter().filter(|c| weights_file(c).is_file()).collect();
    let Some(expected) = expected else {
        return candidates.into_iter().next().ok_or_else(|| PartsError::NotFound {
            part: part.name(),
            flag: part.flag(),
            owner: owner.to_string(),
            expected: "none recorded".into(),
            tried: self::candidates(part, near).iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        });
    };
    let mut tried = Vec::new();
    for c in &candidates {
        let id = id_of(c)?;
        if id == expected {
            tracing::info!("{}: {} (the one {owner} was made with)", part.name(), c.display());
            return Ok(c.clone());
        }
        tried.push(format!("{} is {}…", c.display(), short(&id)));
    }
    if allow_mismatch {
        if let Some(c) = candidates.first() {
            tracing::warn!(
                "--allow-mismatch: using the {} {} although it is not the one {owner} was made with ({}…)",
                part.name(),
                c.display(),
                short(expected)
            );
            return Ok(c.clone());
        }
    }
    let absent: Vec<String> = self::candidates(part, near)
        .iter()
        .filter(|c| !weights_file(c).is_file())
        .map(|c| format!("{} does not exist", c.display()))
        .collect();
    tried.extend(absent);
    Err(PartsError::NotFound {
        part: part.name(),
        flag: part.flag(),
        owner: owner.to_string(),
        expected: short(expected),
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(dir: &Path, bytes: &[u8]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        dir.to_path_buf()
    }

    #[test]
    fn a_part_is_found_by_its_hash_and_a_wrong_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let model = weights(&root.path().join("runs/dpar-s0"), b"model");
        let right = weights(&root.path().join("runs/tokenizer"), b"tok-a");
        let wrong = weights(&root.path().join("elsewhere/tokenizer"), b"tok-b");
        let expected = id_of(&right).unwrap();
        let found = resolve(Part::Tokenizer, None, Some(&expected), &model, "the model", false).unwrap();
        assert_eq!(found, right);
        let err = resolve(Part::Tokenizer, Some(&wrong), Some(&expected), &model, "the model runs/dpar-s0", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&expected[..12])
                && err.contains(&id_of(&wrong).unwrap()[..12])
                && err.contains("--allow-mismatch"),
            "{err}"
        );
        assert_eq!(resolve(Part::Tokenizer, Some(&wrong), Some(&expected), &model, "m", true).unwrap(), wrong);
        // Nothing in the usual places matches: the error lists what was tried.
        let lonely = weights(&root.path().join("a/b/dpar"), b"m");
        let err = resolve(Part::Tokenizer, None, Some("f00d"), &lonely, "the model", false).unwrap_err().to_string();
        assert!(err.contains("--tokenizer") && err.contains("a/b/tokenizer does not exist"), "{err}");
    }
}
