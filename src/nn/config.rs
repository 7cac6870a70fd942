//! The settings every transformer here shares (the LlamaGen GPT and DPAR's three stacks): width,
//! heads, FFN size, vocabulary, classes, code grid, RoPE base, norm ε, dropouts and kernels.
//! [`crate::gpt::GptConfig`] and [`crate::dpar::DparConfig`] embed it (`#[serde(flatten)]`, so
//! their files keep the flat layout of earlier versions) and reach its fields through `Deref`,
//! and both validate these fields with [`TransformerConfig::validate`].

use super::{Ops, Precision};

/// Keys that model configs read but do not always write back: the run-time kernel and
/// precision choices of earlier versions, and an empty class-name list. Strict parsing
/// ([`crate::util::from_json_strict`]) tolerates them.
pub const TOLERATED_KEYS: &[&str] = &["ops", "precision", "class_names"];

/// The shared transformer settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransformerConfig {
    pub dim: usize,
    pub n_head: usize,
    /// SwiGLU hidden size; `None` = round_up(⌊8D/3⌋, 256) as in LlamaGen.
    pub ffn_hidden: Option<usize>,
    pub vocab_size: usize,
    pub num_classes: usize,
    /// Side G of the code grid (L = G²).
    pub grid_size: usize,
    pub rope_base: f64,
    pub norm_eps: f64,
    /// Dropout on the input sequence.
    pub token_dropout: f64,
    /// Dropout after `wo`.
    pub resid_dropout: f64,
    /// Dropout after w2.
    pub ffn_dropout: f64,
    /// Probability of replacing a label by the null class in training.
    pub class_dropout: f64,
    /// The dataset's class names (label i is `class_names[i]`), carried from the code shards
    /// into the model so that sample grids, `sample.json` and `dpar serve` can name the
    /// classes. Empty for unconditional models and for configs of earlier versions: classes are
    /// then named by their number ([`TransformerConfig::class_name`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
    /// The kernels requested: fused CPU kernels, bf16 GEMM operands, or stock candle ops (same
    /// maths; see [`Ops`]). A run-time choice (`--ops`), resolved against the device and the
    /// CPU by [`Ops::resolve`] when a model is built. Never written to a saved config; files of
    /// earlier versions that record it are still read, and their value is the default request.
    #[serde(default, skip_serializing)]
    pub ops: Ops,
    /// The training forward's arithmetic (`--dtype`): f32, or bf16 activations with f32
    /// master weights (see [`Precision`]). A run-time choice like `ops`, never saved.
    #[serde(default, skip_serializing)]
    pub precision: Precision,
}

impl TransformerConfig {
    /// LlamaGen's defaults at width `dim` with `n_head` heads: ImageNet's 16384 codes and 1000
    /// classes on a 16×16 grid, dropouts 0.1, fused kernels.
    pub fn llamagen(dim: usize, n_head: usize) -> Self {
        Self {
            dim,
            n_head,
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
            class_names: Vec::new(),
            ops: Ops::Fused,
            precision: Precision::F32,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head.max(1)
    }

    /// The SwiGLU hidden size.
    pub fn hidden(&self) -> usize {
        self.ffn_hidden.unwrap_or_else(|| super::ffn_hidden(self.dim, 256))
    }

    /// The name of class `label`: its recorded name, else its number.
    pub fn class_name(&self, label: u32) -> String {
        self.class_names.get(label as usize).cloned().unwrap_or_else(|| label.to_string())
    }

    /// Codes per image.
    pub fn seq_len(&self) -> usize {
        self.grid_size * self.grid_size
    }

    /// Checks the shared settings: width a positive multiple of the heads, a head dim divisible
    /// by `head_multiple` (what the model's RoPE needs: `rope`, for the message), grid and
    /// vocabulary sizes, dropouts in [0, 1), a finite RoPE base > 1 and norm ε > 0 (NaN fails).
    pub fn validate(&self, head_multiple: usize, rope: &str) -> Result<(), String> {
        if self.dim == 0 || self.n_head == 0 || !self.dim.is_multiple_of(self.n_head) {
            return Err(format!("width {} must be a positive multiple of the {} heads", self.dim, self.n_head));
        }
        if !self.head_dim().is_multiple_of(head_multiple) {
            return Err(format!("{rope} needs a head dim divisible by {head_multiple}, got {}", self.head_dim()));
        }
        if self.grid_size < 2 || self.vocab_size < 2 || self.grid_size > 4096 {
            return Err(format!(
                "grid_size must lie in [2, 4096] and vocab_size be ≥ 2, got {} and {}",
                self.grid_size, self.vocab_size
            ));
        }
        for (name, p) in [
            ("token_dropout", self.token_dropout),
            ("resid_dropout", self.resid_dropout),
            ("ffn_dropout", self.ffn_dropout),
            ("class_dropout", self.class_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} must lie in [0, 1), got {p}"));
            }
        }
        if !self.class_names.is_empty() && self.class_names.len() != self.num_classes {
            return Err(format!("class_names lists {} names for {} classes", self.class_names.len(), self.num_classes));
        }
        // Written so that NaN fails every comparison and is refused.
        if !(self.rope_base.is_finite() && self.rope_base > 1.0 && self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!(
                "rope_base must be finite and > 1 and norm_eps finite and > 0, got {} and {}",
                self.rope_base, self.norm_eps
            ));
        }
        Ok(())
    }
}

/// `Deref` to the shared settings and a `with` builder for a config that embeds them as `core`.
macro_rules! embeds_transformer_config {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = $crate::nn::TransformerConfig;
            fn deref(&self) -> &Self::Target {
                &self.core
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.core
            }
        }

        impl $t {
            /// This config changed by `f` (e.g. `GptConfig::mnist().with(|c| c.dim = 64)`).
            pub fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
                f(&mut self);
                self
            }
        }
    };
}

pub(crate) use embeds_transformer_config;
