//! Analytic FLOP counts (multiply-adds count 2), the way the paper's Table 8 counts them:
//! every matmul of the forward pass, attention counted as dense over its causal window's full
//! square (T² per head-dim, as the bench issue specifies), training = 3 × forward.

use crate::gpt::GptConfig;

/// Forward FLOPs of one sequence of `t` positions through `layers` LlamaGen blocks of width `d`
/// with SwiGLU hidden `hidden` (attention dense over T×T).
pub fn blocks_forward(layers: usize, d: usize, hidden: usize, t: usize) -> f64 {
    let (t, d, hidden) = (t as f64, d as f64, hidden as f64);
    let matmuls = 2.0 * t * (4.0 * d * d + 3.0 * d * hidden);
    let attention = 2.0 * 2.0 * t * t * d;
    layers as f64 * (matmuls + attention)
}

/// Forward FLOPs of the GPT on one image: blocks over the input sequence plus the output head.
pub fn gpt_forward(c: &GptConfig) -> f64 {
    let t = c.input_len();
    blocks_forward(c.n_layer, c.dim, c.hidden(), t) + 2.0 * (t * c.dim * c.vocab_size) as f64
}

/// Forward FLOPs of DPAR on one image with `patches` patch-transformer positions (class slot
/// included): encoder blocks over L − 1 codes, the cross-attention (q/k/v/o projections; the
/// per-patch attention is negligible), the patch transformer over the patches, the decoder's
/// per-layer injection and blocks over L positions, and the head.
pub fn dpar_forward(c: &crate::dpar::DparConfig, patches: f64) -> f64 {
    let l = c.seq_len() as f64;
    let (d, h) = (c.dim as f64, c.hidden() as f64);
    let blocks = |layers: usize, t: f64| layers as f64 * (2.0 * t * (4.0 * d * d + 3.0 * d * h) + 4.0 * t * t * d);
    let encoder = blocks(c.encoder_layers, l - 1.0);
    let cross = 2.0 * (l - 1.0) * 2.0 * d * d + 2.0 * (patches - 1.0) * 2.0 * d * d;
    let global = blocks(c.global_layers, patches);
    let decoder = blocks(c.decoder_layers, l) + c.decoder_layers as f64 * 2.0 * patches * d * d;
    let head = 2.0 * l * d * c.vocab_size as f64;
    encoder + cross + global + decoder + head
}

/// Training FLOPs (forward + backward ≈ 3 × forward).
pub fn training(forward: f64) -> f64 {
    3.0 * forward
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench model of issue 6: "a training step is about 97 GFLOP" for 16 × 256 codes.
    #[test]
    fn bench_model_step_is_about_97_gflop() {
        let c = GptConfig { cls_token_num: 0, grid_size: 16, ..GptConfig::bench() };
        // The bench runs 256 positions per sequence.
        let fwd = blocks_forward(c.n_layer, c.dim, c.hidden(), 256) + 2.0 * 256.0 * 256.0 * 1024.0;
        let step = training(fwd) * 16.0 / 1e9;
        assert!((step - 97.0).abs() < 1.0, "{step}");
    }
}
