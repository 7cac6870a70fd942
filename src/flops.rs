//! Analytic FLOP counts (multiply-adds count 2), the way the paper's Table 8 counts them:
//! every matmul of the forward pass, attention counted as dense over its causal window's full
//! square (T² per head-dim, as the bench issue specifies), training = 3 × forward.

use crate::gpt::GptConfig;

/// Linear-layer (weight matmul) FLOPs of `t` positions through `layers` LlamaGen blocks.
pub fn blocks_linear(layers: usize, d: usize, hidden: usize, t: usize) -> f64 {
    let (t, d, hidden) = (t as f64, d as f64, hidden as f64);
    layers as f64 * 2.0 * t * (4.0 * d * d + 3.0 * d * hidden)
}

/// Attention FLOPs (q·kᵀ and p·v) of `t` positions, counted dense over T×T.
pub fn blocks_attention(layers: usize, d: usize, t: usize) -> f64 {
    layers as f64 * 2.0 * 2.0 * (t * t * d) as f64
}

/// Forward FLOPs of one sequence of `t` positions through `layers` LlamaGen blocks of width `d`
/// with SwiGLU hidden `hidden` (attention dense over T×T).
pub fn blocks_forward(layers: usize, d: usize, hidden: usize, t: usize) -> f64 {
    blocks_linear(layers, d, hidden, t) + blocks_attention(layers, d, t)
}

/// Linear-layer FLOPs of the GPT on one image (blocks + head).
pub fn gpt_linear(c: &GptConfig) -> f64 {
    let t = c.input_len();
    blocks_linear(c.n_layer, c.dim, c.hidden(), t) + 2.0 * (t * c.dim * c.vocab_size) as f64
}

/// Forward FLOPs of the GPT on one image: blocks over the input sequence plus the output head.
pub fn gpt_forward(c: &GptConfig) -> f64 {
    gpt_linear(c) + blocks_attention(c.n_layer, c.dim, c.input_len())
}

/// Forward FLOPs of DPAR on one image with `patches` patch-transformer positions (class slot
/// included): encoder blocks over L − 1 codes, the cross-attention (q/k/v/o projections; the
/// per-patch attention is negligible), the patch transformer over the patches, the decoder's
/// per-layer injection and blocks over L positions, and the head.
pub fn dpar_forward(c: &crate::dpar::DparConfig, patches: f64) -> f64 {
    let l = c.seq_len() as f64;
    let d = c.dim as f64;
    let attention = |layers: usize, t: f64| layers as f64 * 4.0 * t * t * d;
    dpar_linear(c, patches)
        + attention(c.encoder_layers, l - 1.0)
        + attention(c.global_layers, patches)
        + attention(c.decoder_layers, l)
}

/// Linear-layer FLOPs of DPAR on one image with `patches` patch-transformer positions: encoder,
/// patch transformer and decoder blocks, the cross-attention's q (patches − 1 queries), k and v
/// (L − 1 codes) and o projections, the decoder's per-layer injection of g, and the head.
pub fn dpar_linear(c: &crate::dpar::DparConfig, patches: f64) -> f64 {
    let l = c.seq_len() as f64;
    let (d, h) = (c.dim as f64, c.hidden() as f64);
    let blocks = |layers: usize, t: f64| layers as f64 * 2.0 * t * (4.0 * d * d + 3.0 * d * h);
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

    /// The analytic linear-layer FLOPs equal the GEMM shapes counted during one forward pass of
    /// a batch (GPT, and DPAR with its actual patch lengths).
    #[test]
    fn flops_formula_matches_counted_shapes() {
        use candle_core::{Device, Tensor};
        let c = GptConfig::mnist().with(|it| {
            it.dim = 32;
            it.n_layer = 2;
            it.n_head = 2;
            it.ffn_hidden = Some(48);
            it.vocab_size = 11;
            it.num_classes = 3;
            it.grid_size = 4;
        });
        let store = crate::params::ParamStore::new(0, &Device::Cpu);
        let model = crate::gpt::Gpt::new(&c, &store.root()).unwrap();
        let codes =
            Tensor::from_vec((0..3 * 16).map(|i| (i % 11) as u32).collect::<Vec<_>>(), (3, 16), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        crate::kernels::matmul::take_flop_count();
        model.forward::<rand_chacha::ChaCha8Rng>(&codes, Some(&labels), None).unwrap();
        let counted = crate::kernels::matmul::take_flop_count() as f64;
        assert_eq!(counted, 3.0 * gpt_linear(&c));

        let dc = crate::dpar::DparConfig::mnist().with(|it| {
            it.dim = 32;
            it.n_head = 2;
            it.encoder_layers = 1;
            it.global_layers = 2;
            it.decoder_layers = 2;
            it.ffn_hidden = Some(48);
            it.vocab_size = 11;
            it.num_classes = 3;
            it.grid_size = 4;
        });
        let dstore = crate::params::ParamStore::new(0, &Device::Cpu);
        let dmodel = crate::dpar::Dpar::new(&dc, &dstore.root()).unwrap();
        let lengths = vec![vec![1, 3, 1, 3, 3, 1, 3, 1], vec![1, 3, 4, 4, 2, 2], vec![1; 16]];
        let layout = dmodel.layout(lengths.clone(), 16).unwrap();
        crate::kernels::matmul::take_flop_count();
        dmodel
            .forward::<rand_chacha::ChaCha8Rng>(
                &codes,
                &labels,
                &layout,
                crate::dpar::model::GlobalLayout::Packed,
                None,
            )
            .unwrap();
        let counted = crate::kernels::matmul::take_flop_count() as f64;
        let analytic: f64 = lengths.iter().map(|l| dpar_linear(&dc, l.len() as f64)).sum();
        assert_eq!(counted, analytic);
    }

    /// The bench model (`GptConfig::bench`): a training step of 16 × 256 codes is about 97 GFLOP.
    #[test]
    fn bench_model_step_is_about_97_gflop() {
        let c = GptConfig::bench().with(|it| {
            it.cls_token_num = 0;
            it.grid_size = 16;
        });
        // The bench runs 256 positions per sequence.
        let fwd = blocks_forward(c.n_layer, c.dim, c.hidden(), 256) + 2.0 * 256.0 * 256.0 * 1024.0;
        let step = training(fwd) * 16.0 / 1e9;
        assert!((step - 97.0).abs() < 1.0, "{step}");
    }
}
