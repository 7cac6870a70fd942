//! The DPAR model (design §5): patch encoder → patch transformer → patch decoder.
//!
//! - [`DparConfig`]: widths, depths (encoder + global + decoder), patch RoPE mode, patcher.
//! - [`layout::PatchLayout`]: a batch's patch lengths turned into segments, RoPE rows and the
//!   decoder's g-index (`pid`) for the packed and padded forwards.
//! - [`model::Dpar`]: the parameters (authors' key layout) and the training forward, packed
//!   (one flat sequence per stage, block-diagonal masks) or padded (for tests).
//! - [`generate`]: the incremental, fully cached generation of design §6, and its full-recompute
//!   reference.
//! - [`train`]: the training task for the shared loop.

pub mod decode;
pub mod generate;
pub mod layout;
pub mod model;
pub mod streams;
pub mod train;

pub use model::Dpar;

use crate::nn::rope::PatchRope;
use crate::nn::TransformerConfig;
use crate::patching::PatchConfig;

/// Errors of the DPAR model.
#[derive(Debug, thiserror::Error)]
pub enum DparError {
    /// Impossible settings.
    #[error("DPAR config: {0}")]
    BadConfig(String),
    /// Inputs that do not fit (patch lengths, codes, classes).
    #[error("DPAR input: {0}")]
    BadInput(String),
    /// A weight file that cannot be used.
    #[error("{path}: {reason}")]
    BadFile { path: std::path::PathBuf, reason: String },
    #[error(transparent)]
    Nn(#[from] crate::nn::NnError),
    #[error(transparent)]
    Patch(#[from] crate::patching::PatchError),
    #[error(transparent)]
    Gpt(#[from] crate::gpt::GptError),
    #[error(transparent)]
    Sample(#[from] crate::sample::SampleError),
    #[error(transparent)]
    Entropy(#[from] crate::entropy::EntropyError),
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DparError>;

/// The DPAR architecture, its regularisation and its training patcher: the shared
/// [`TransformerConfig`] (reached through `Deref`: `config.dim`; its dropouts are the patch
/// transformer's, the encoder and decoder have none) plus the three depths, the patch
/// transformer's position encoding and the patcher. The file format is flat, as before.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DparConfig {
    #[serde(flatten)]
    pub core: TransformerConfig,
    /// Layers of the patch encoder (self-attention blocks before the one cross-attention).
    pub encoder_layers: usize,
    /// Layers of the patch transformer.
    pub global_layers: usize,
    /// Layers of the patch decoder.
    pub decoder_layers: usize,
    /// Position encoding of the patch transformer (Table 9).
    pub patch_rope: PatchRope,
    /// The patcher used for training (θ, P, switches).
    pub patch: PatchConfig,
}

crate::nn::config::embeds_transformer_config!(DparConfig);

impl DparConfig {
    fn paper(dim: usize, n_head: usize, enc: usize, global: usize, dec: usize) -> Self {
        Self {
            core: TransformerConfig::llamagen(dim, n_head),
            encoder_layers: enc,
            global_layers: global,
            decoder_layers: dec,
            patch_rope: PatchRope::Dynamic4d,
            // Paper defaults at 256 px with VQ-16 (design §4).
            patch: PatchConfig::dpar(7.8, 4),
        }
    }

    /// DPAR-B: 1 + 8 + 3 layers, width 768, 12 heads (paper Table 1).
    pub fn dpar_b() -> Self {
        Self::paper(768, 12, 1, 8, 3)
    }
    /// DPAR-L: 1 + 19 + 4, width 1024, 16 heads.
    pub fn dpar_l() -> Self {
        Self::paper(1024, 16, 1, 19, 4)
    }
    /// DPAR-XL: 1 + 30 + 5, width 1280, 20 heads.
    pub fn dpar_xl() -> Self {
        Self::paper(1280, 20, 1, 30, 5)
    }
    /// DPAR-XXL: 1 + 41 + 6, width 1536, 24 heads.
    pub fn dpar_xxl() -> Self {
        Self::paper(1536, 24, 1, 41, 6)
    }

    /// Our MNIST model: 1 + 4 + 1 = 6 layers, the width (128), heads (4) and depth of the `mnist`
    /// GPT baseline, 512 codes, 10 classes, no dropout (as the baseline). θ is set by
    /// calibration on the stored entropies.
    pub fn mnist() -> Self {
        Self::paper(128, 4, 1, 4, 1).with(|c| {
            (c.vocab_size, c.num_classes) = (512, 10);
            c.patch = PatchConfig::dpar(f64::INFINITY, 4);
            (c.token_dropout, c.resid_dropout, c.ffn_dropout) = (0.0, 0.0, 0.0);
        })
    }

    /// A preset by name: `dpar-b`, `dpar-l`, `dpar-xl`, `dpar-xxl`, `mnist`, each optionally
    /// with an encoder/decoder split suffix `-eXdY` that keeps X + Y (Table 10: `dpar-l-e2d3`).
    pub fn preset(name: &str) -> Result<Self> {
        let (base, split) = match name.rfind("-e") {
            Some(i) if name[i + 2..].contains('d') => (&name[..i], Some(&name[i + 2..])),
            _ => (name, None),
        };
        let mut c = match base {
            "dpar-b" | "b" => Self::dpar_b(),
            "dpar-l" | "l" => Self::dpar_l(),
            "dpar-xl" | "xl" => Self::dpar_xl(),
            "dpar-xxl" | "xxl" => Self::dpar_xxl(),
            "mnist" => Self::mnist(),
            other => return Err(DparError::BadConfig(format!("unknown DPAR preset `{other}` (known: dpar-b, dpar-l, dpar-xl, dpar-xxl, mnist; add -eXdY for a split)"))),
        };
        if let Some(split) = split {
            let (e, d) = split.split_once('d').ok_or_else(|| DparError::BadConfig(format!("bad split `{split}`")))?;
            let (e, d): (usize, usize) = (
                e.parse().map_err(|_| DparError::BadConfig(format!("bad split `{split}`")))?,
                d.parse().map_err(|_| DparError::BadConfig(format!("bad split `{split}`")))?,
            );
            if e + d != c.encoder_layers + c.decoder_layers || e == 0 || d == 0 {
                return Err(DparError::BadConfig(format!(
                    "split e{e}d{d} must keep encoder + decoder = {} with both ≥ 1",
                    c.encoder_layers + c.decoder_layers
                )));
            }
            c.encoder_layers = e;
            c.decoder_layers = d;
        }
        Ok(c)
    }

    /// Total depth (encoder + patch transformer + decoder).
    pub fn depth(&self) -> usize {
        self.encoder_layers + self.global_layers + self.decoder_layers
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DparError::BadConfig(m));
        self.core.validate(16, "Dynamic RoPE").map_err(DparError::BadConfig)?;
        if self.encoder_layers == 0 || self.global_layers == 0 || self.decoder_layers == 0 {
            return bad("encoder, patch transformer and decoder need at least one layer each".into());
        }
        if self.num_classes == 0 {
            return bad("a DPAR model needs num_classes > 0".into());
        }
        let (d, v) = (self.dim as f64, self.vocab_size as f64);
        let ffn = self.ffn_hidden.map_or(4.0 * self.dim as f64, |h| h as f64);
        let layers = self.encoder_layers as f64 + self.global_layers as f64 + self.decoder_layers as f64;
        let params = layers * (6.0 * d * d + 3.0 * d * ffn) + 2.0 * v * d + (self.num_classes as f64 + 1.0) * d;
        crate::util::check_memory(
            &format!(
                "a DPAR model of {}+{}+{} layers, width {}, vocabulary {}, {} classes ({params:.3e} parameters)",
                self.encoder_layers,
                self.global_layers,
                self.decoder_layers,
                self.dim,
                self.vocab_size,
                self.num_classes
            ),
            4.0 * params,
        )
        .map_err(DparError::BadConfig)?;
        self.patch.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_keep_the_baseline_depth_and_splits_keep_the_sum() {
        assert_eq!(DparConfig::dpar_b().depth(), 12);
        assert_eq!(DparConfig::dpar_l().depth(), 24);
        assert_eq!(DparConfig::dpar_xl().depth(), 36);
        assert_eq!(DparConfig::dpar_xxl().depth(), 48);
        assert_eq!(DparConfig::mnist().depth(), crate::gpt::GptConfig::mnist().n_layer);
        let c = DparConfig::preset("dpar-l-e2d3").unwrap();
        assert_eq!((c.encoder_layers, c.global_layers, c.decoder_layers), (2, 19, 3));
        assert!(DparConfig::preset("dpar-l-e3d3").is_err());
        assert!(DparConfig::preset("dpar-q").is_err());
        assert_eq!(DparConfig::preset("dpar-b-e2d2").unwrap().encoder_layers, 2);
        // mnist is 1 + 4 + 1: the only split that keeps encoder + decoder = 2 is e1d1.
        assert!(DparConfig::preset("mnist-e2d1").is_err());
        assert_eq!(DparConfig::preset("mnist-e1d1").unwrap(), DparConfig::mnist());
    }
}
