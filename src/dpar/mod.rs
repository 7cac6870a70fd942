//! The DPAR model (spec §5): patch encoder → patch transformer → patch decoder.
//!
//! - [`DparConfig`]: widths, depths (encoder + global + decoder), patch RoPE mode, patcher.
//! - [`layout::PatchLayout`]: a batch's patch lengths turned into segments, RoPE rows and the
//!   decoder's g-index (`pid`) for the packed and padded forwards.
//! - [`model::Dpar`]: the parameters (authors' key layout) and the training forward, packed
//!   (one flat sequence per stage, block-diagonal masks) or padded (for tests).
//! - [`generate`]: the incremental, fully cached generation of spec §6, and its full-recompute
//!   reference.
//! - [`train`]: the training task for the shared loop.

pub mod decode;
pub mod generate;
pub mod layout;
pub mod model;
pub mod train;

pub use model::Dpar;

use crate::nn::rope::PatchRope;
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

/// The DPAR architecture, its regularisation and its training patcher.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DparConfig {
    pub dim: usize,
    pub n_head: usize,
    /// Layers of the patch encoder (self-attention blocks before the one cross-attention).
    pub encoder_layers: usize,
    /// Layers of the patch transformer.
    pub global_layers: usize,
    /// Layers of the patch decoder.
    pub decoder_layers: usize,
    /// SwiGLU hidden size; `None` = round_up(⌊8D/3⌋, 256).
    pub ffn_hidden: Option<usize>,
    pub vocab_size: usize,
    pub num_classes: usize,
    pub grid_size: usize,
    pub rope_base: f64,
    pub norm_eps: f64,
    /// Patch-transformer dropouts (the encoder and decoder have none).
    pub token_dropout: f64,
    pub resid_dropout: f64,
    pub ffn_dropout: f64,
    pub class_dropout: f64,
    /// Position encoding of the patch transformer (Table 9).
    pub patch_rope: PatchRope,
    /// The patcher used for training (θ, P, switches).
    pub patch: PatchConfig,
    /// Fused CPU kernels or stock candle ops (same maths; see `nn::Ops`).
    #[serde(default)]
    pub ops: crate::nn::Ops,
}

impl DparConfig {
    fn paper(dim: usize, n_head: usize, enc: usize, global: usize, dec: usize) -> Self {
        Self {
            dim,
            n_head,
            encoder_layers: enc,
            global_layers: global,
            decoder_layers: dec,
            ffn_hidden: None,
            vocab_size: 16384,
            num_classes: 1000,
            grid_size: 16,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            token_dropout: 0.1,
            resid_dropout: 0.1,
            ffn_dropout: 0.1,
            class_dropout: 0.1,
            patch_rope: PatchRope::Dynamic4d,
            // Paper defaults at 256 px with VQ-16 (spec §4).
            patch: PatchConfig::dpar(7.8, 4),
            ops: crate::nn::Ops::Fused,
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
        Self {
            vocab_size: 512,
            num_classes: 10,
            patch: PatchConfig::dpar(f64::INFINITY, 4),
            token_dropout: 0.0,
            resid_dropout: 0.0,
            ffn_dropout: 0.0,
            ..Self::paper(128, 4, 1, 4, 1)
        }
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

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head.max(1)
    }

    pub fn hidden(&self) -> usize {
        self.ffn_hidden.unwrap_or_else(|| crate::nn::ffn_hidden(self.dim, 256))
    }

    pub fn seq_len(&self) -> usize {
        self.grid_size * self.grid_size
    }

    /// Total depth (encoder + patch transformer + decoder).
    pub fn depth(&self) -> usize {
        self.encoder_layers + self.global_layers + self.decoder_layers
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DparError::BadConfig(m));
        if self.dim == 0 || self.n_head == 0 || !self.dim.is_multiple_of(self.n_head) {
            return bad(format!("width {} must be a positive multiple of the {} heads", self.dim, self.n_head));
        }
        if !self.head_dim().is_multiple_of(16) {
            return bad(format!("Dynamic RoPE needs a head dim divisible by 16, got {}", self.head_dim()));
        }
        if self.encoder_layers == 0 || self.global_layers == 0 || self.decoder_layers == 0 {
            return bad("encoder, patch transformer and decoder need at least one layer each".into());
        }
        if self.grid_size < 2 || self.vocab_size < 2 || self.num_classes == 0 {
            return bad("grid_size and vocab_size must be ≥ 2 and num_classes > 0".into());
        }
        for (name, p) in [
            ("token_dropout", self.token_dropout),
            ("resid_dropout", self.resid_dropout),
            ("ffn_dropout", self.ffn_dropout),
            ("class_dropout", self.class_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must lie in [0, 1), got {p}"));
            }
        }
        // Written so that NaN fails every comparison and is refused.
        if !(self.rope_base.is_finite() && self.rope_base > 1.0 && self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!(
                "rope_base must be finite and > 1 and norm_eps finite and > 0, got {} and {}",
                self.rope_base, self.norm_eps
            ));
        }
        if self.grid_size > 4096 {
            return bad(format!("grid_size must be ≤ 4096, got {}", self.grid_size));
        }
        let (d, v) = (self.dim as f64, self.vocab_size as f64);
        let ffn = self.ffn_hidden.unwrap_or(4 * self.dim) as f64;
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
