//! The VQ image tokenizer (design §2): LlamaGen's VQ-VAE architecture, configurable from the
//! released VQ-16 down to a small CPU preset for 28×28 digits.
//!
//! - [`VqConfig`]: the architecture, with presets [`VqConfig::vq16`] and [`VqConfig::mnist`].
//! - [`model::VqModel`]: encoder → `quant_conv` → L2-normalised quantizer → `post_quant_conv` →
//!   decoder, with parameter names equal to LlamaGen's checkpoint keys.
//! - [`train`]: the training task (straight-through estimator, codebook + commitment + MSE
//!   losses, dead-code restarts) for the shared training loop.

pub mod model;
pub mod train;

pub use model::VqModel;

/// Errors of the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The configuration is impossible.
    #[error("tokenizer config: {0}")]
    BadConfig(String),
    /// Input of the wrong shape or range.
    #[error("tokenizer input: {0}")]
    BadInput(String),
    /// A tokenizer folder or file is missing or malformed.
    #[error("{path}: {reason}")]
    BadFile { path: std::path::PathBuf, reason: String },
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// The VQ architecture. Field names follow LlamaGen's `ModelArgs` / `Encoder` arguments.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VqConfig {
    /// Image channels (3 for RGB, 1 for grey digits).
    pub in_channels: usize,
    /// Square input size in pixels; images are padded or resized to it.
    pub image_size: usize,
    /// Base channel count C.
    pub ch: usize,
    /// Channel multiplier per level; there are `len − 1` ×2 downsamplings.
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Self-attention blocks at the lowest resolution level (the middle attention is always on).
    pub attn_at_lowest: bool,
    pub z_channels: usize,
    pub codebook_size: usize,
    pub codebook_dim: usize,
    /// L2-normalise latents and codebook rows (LlamaGen: true).
    pub l2_norm: bool,
    /// GroupNorm groups (LlamaGen: 32).
    pub norm_groups: usize,
    /// Commitment loss weight β.
    pub commit_beta: f64,
}

impl VqConfig {
    /// LlamaGen's VQ-16 (256 px → 16×16 codes, 16384 codes of dimension 8), as released.
    pub fn vq16() -> Self {
        Self {
            in_channels: 3,
            image_size: 256,
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_at_lowest: true,
            z_channels: 256,
            codebook_size: 16384,
            codebook_dim: 8,
            l2_norm: true,
            norm_groups: 32,
            commit_beta: 0.25,
        }
    }

    /// Our CPU preset for 28×28 grey digits padded to 32×32: one ×2 downsampling gives a
    /// 16×16 grid = 256 codes per image, the sequence length of ImageNet-256 with VQ-16.
    /// 512 codes of dimension 8 (L2-normalised, as VQ-16). Channels are kept small (32/64) so
    /// that training takes minutes on two cores; the middle attention block stays, the per-level
    /// attention at 16×16 is off.
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            image_size: 32,
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_at_lowest: false,
            z_channels: 32,
            codebook_size: 512,
            codebook_dim: 8,
            l2_norm: true,
            norm_groups: 32,
            commit_beta: 0.25,
        }
    }

    /// A preset by name (`vq16` or `mnist`), or a JSON file holding a whole config (for
    /// checkpoints of another size, e.g. VQ-16's layout at fewer channels).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "vq16" => Ok(Self::vq16()),
            "mnist" => Ok(Self::mnist()),
            file if file.ends_with(".json") => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| TokenizerError::BadConfig(format!("tokenizer config {file}: {e}")))?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TokenizerError::BadConfig(format!("tokenizer config {file}: not JSON: {e}")))?;
                let config: Self = crate::util::from_json_strict(value, &[])
                    .map_err(|e| TokenizerError::BadConfig(format!("tokenizer config {file}: {e}")))?;
                config.validate().map_err(|e| TokenizerError::BadConfig(format!("tokenizer config {file}: {e}")))?;
                Ok(config)
            }
            other => Err(TokenizerError::BadConfig(format!(
                "unknown tokenizer preset `{other}` (known: vq16, mnist, or a config FILE.json)"
            ))),
        }
    }

    /// Side G of the code grid.
    pub fn grid_size(&self) -> usize {
        self.image_size >> (self.ch_mult.len().saturating_sub(1))
    }

    /// Codes per image.
    pub fn seq_len(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Checks that the architecture can be built.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TokenizerError::BadConfig(m));
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(format!("ch_mult must be non-empty with positive entries, got {:?}", self.ch_mult));
        }
        if !(self.in_channels == 1 || self.in_channels == 3) {
            return bad(format!("in_channels must be 1 or 3, got {}", self.in_channels));
        }
        if self.ch_mult.len() > 16 {
            return bad(format!("ch_mult has {} levels; at most 16 are supported", self.ch_mult.len()));
        }
        if self.image_size > crate::data::folder::MAX_IMAGE_SIDE as usize {
            return bad(format!(
                "image_size {} is larger than the largest supported side, {} pixels",
                self.image_size,
                crate::data::folder::MAX_IMAGE_SIDE
            ));
        }
        let down = 1usize << (self.ch_mult.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(down) {
            return bad(format!(
                "image_size {} must be a positive multiple of {down} (2^(len(ch_mult) − 1))",
                self.image_size
            ));
        }
        if self.norm_groups == 0 {
            return bad("norm_groups must be > 0".into());
        }
        for &m in &self.ch_mult {
            let Some(channels) = self.ch.checked_mul(m) else {
                return bad(format!("channel count ch {} × {m} does not fit in a machine word", self.ch));
            };
            if !channels.is_multiple_of(self.norm_groups) {
                return bad(format!(
                    "channel count {channels} (ch {} × {m}) is not divisible by norm_groups {}",
                    self.ch, self.norm_groups
                ));
            }
        }
        if self.z_channels == 0 || self.codebook_size < 2 || self.codebook_dim == 0 {
            return bad("z_channels, codebook_dim must be > 0 and codebook_size ≥ 2".into());
        }
        if self.codebook_size > u32::MAX as usize {
            return bad("codebook_size must fit in u32".into());
        }
        let widest = self.ch as f64 * self.ch_mult.iter().copied().max().unwrap_or(1) as f64;
        let params = self.codebook_size as f64 * self.codebook_dim as f64
            + (self.ch_mult.len() as f64) * (self.num_res_blocks as f64 + 1.0) * 2.0 * 18.0 * widest * widest;
        if let Err(m) = crate::util::check_memory(
            &format!(
                "a tokenizer with codebook {} × {} and width {widest} ({params:.3e} parameters)",
                self.codebook_size, self.codebook_dim
            ),
            4.0 * params,
        ) {
            return bad(m);
        }
        if !(self.commit_beta >= 0.0 && self.commit_beta.is_finite()) {
            return bad(format!("commit_beta must be finite and ≥ 0, got {}", self.commit_beta));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_grids() {
        assert_eq!(VqConfig::vq16().grid_size(), 16);
        assert_eq!(VqConfig::mnist().grid_size(), 16);
        assert_eq!(VqConfig::mnist().seq_len(), 256);
        VqConfig::vq16().validate().unwrap();
        VqConfig::mnist().validate().unwrap();
    }

    #[test]
    fn impossible_configs_are_rejected() {
        let mut c = VqConfig::mnist();
        c.image_size = 31;
        assert!(c.validate().unwrap_err().to_string().contains("multiple of 2"));
        let mut c = VqConfig::mnist();
        c.ch = 20;
        assert!(c.validate().unwrap_err().to_string().contains("norm_groups"));
        assert!(VqConfig::preset("vq32").is_err());
    }
}
