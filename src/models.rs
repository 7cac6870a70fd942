//! One place to load every model file the project reads: the LlamaGen GPT and the entropy
//! model, DPAR, the VQ tokenizer and the evaluation classifier, from a run folder or a weight
//! file (ours, with the config embedded; LlamaGen's `.pt`/`.safetensors` with a preset). Each
//! model's own module keeps the details of its format; this module is the entry point, and
//! [`load`] picks the loader from the kind a file records.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::dpar::train::DparTrainConfig;
use crate::dpar::Dpar;
use crate::eval::classifier::Classifier;
use crate::gpt::Gpt;
use crate::params::ParamStore;
use crate::tokenizer::train::Tokenizer;

/// Errors of loading a model: the model module's own error, or a file of an unknown kind.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error(transparent)]
    Gpt(#[from] crate::gpt::GptError),
    /// (Boxed: a DPAR error is large.)
    #[error(transparent)]
    Dpar(Box<crate::dpar::DparError>),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    /// The file records no kind (or one this project does not write); a LlamaGen file needs its
    /// typed loader and a preset.
    #[error("{}: {reason}", path.display())]
    UnknownKind { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, ModelsError>;

impl From<crate::dpar::DparError> for ModelsError {
    fn from(e: crate::dpar::DparError) -> Self {
        Self::Dpar(Box::new(e))
    }
}

/// What a model file holds, by the `kind` its embedded config records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The class-conditional LlamaGen baseline.
    Gpt,
    /// The unconditional GPT whose next-code entropies cut DPAR's patches.
    Entropy,
    Dpar,
    Tokenizer,
    Classifier,
}

/// The kind recorded in the config embedded in `path` (a run folder or weight file), if any.
pub fn kind_of(path: &Path) -> Option<Kind> {
    let meta = crate::tensor_io::read_safetensors_metadata(&crate::parts::weights_file(path)).ok()?;
    let config: serde_json::Value = serde_json::from_str(meta.get("config")?).ok()?;
    Some(match config.get("kind")?.as_str()? {
        "gpt" => Kind::Gpt,
        "entropy" => Kind::Entropy,
        "dpar" => Kind::Dpar,
        "tokenizer" => Kind::Tokenizer,
        "classifier" => Kind::Classifier,
        _ => return None,
    })
}

/// A GPT or entropy model; `preset` for LlamaGen files without an embedded config.
pub fn gpt(path: &Path, preset: Option<&str>, device: &Device) -> Result<(Gpt, ParamStore)> {
    Ok(crate::gpt::load(path, preset, device)?)
}

/// A DPAR model with the training config it records.
pub fn dpar(path: &Path, device: &Device) -> Result<(Dpar, ParamStore, DparTrainConfig)> {
    Ok(crate::dpar::train::load(path, device)?)
}

/// A VQ tokenizer; `preset` for LlamaGen checkpoints (e.g. `vq16`).
pub fn tokenizer(path: &Path, preset: Option<&str>, device: &Device) -> Result<Tokenizer> {
    Ok(Tokenizer::load(path, preset, device)?)
}

/// The evaluation classifier and its weights' SHA-256.
pub fn classifier(path: &Path, device: &Device) -> Result<(Classifier, ParamStore, String)> {
    Ok(crate::eval::classifier::load(path, device)?)
}

/// Any model this project wrote, loaded by the kind it records.
pub enum Loaded {
    Gpt(Gpt, ParamStore),
    Dpar(Box<(Dpar, ParamStore, DparTrainConfig)>),
    Tokenizer(Box<Tokenizer>),
    Classifier(Classifier, ParamStore, String),
}

impl Loaded {
    pub fn kind(&self) -> &'static str {
        match self {
            Loaded::Gpt(g, _) if g.config().cls_token_num == 0 => "entropy",
            Loaded::Gpt(..) => "gpt",
            Loaded::Dpar(_) => "dpar",
            Loaded::Tokenizer(_) => "tokenizer",
            Loaded::Classifier(..) => "classifier",
        }
    }
}

/// Loads whatever `path` holds, by the kind its embedded config records.
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let kind = kind_of(path).ok_or_else(|| ModelsError::UnknownKind {
        path: path.to_path_buf(),
        reason: "no embedded config with a known `kind` (a LlamaGen file? load it with its typed loader and a preset)"
            .into(),
    })?;
    Ok(match kind {
        Kind::Gpt | Kind::Entropy => {
            let (m, s) = gpt(path, None, device)?;
            Loaded::Gpt(m, s)
        }
        Kind::Dpar => Loaded::Dpar(Box::new(dpar(path, device)?)),
        Kind::Tokenizer => Loaded::Tokenizer(Box::new(tokenizer(path, None, device)?)),
        Kind::Classifier => {
            let (m, s, h) = classifier(path, device)?;
            Loaded::Classifier(m, s, h)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_model_loads_by_its_recorded_kind() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mnist");
        for (dir, kind) in [
            ("gpt", Kind::Gpt),
            ("entropy", Kind::Entropy),
            ("dpar", Kind::Dpar),
            ("tokenizer", Kind::Tokenizer),
            ("classifier", Kind::Classifier),
        ] {
            assert_eq!(kind_of(&root.join(dir)), Some(kind), "{dir}");
            let loaded = load(&root.join(dir), &Device::Cpu).unwrap();
            assert_eq!(loaded.kind(), dir);
        }
        let err = load(&root.join("no-such-model"), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("no-such-model") && err.contains("kind"), "{err}");
    }
}
