//! DPAR's parameters and forward pass (design §5).
//!
//! Parameter names follow the authors' layout: `cls_embedding.embedding_table`,
//! `tok_embeddings`, `local_encoder.layers.{i}` + `local_encoder.cross_attn_layers.0.{…}`,
//! `layers.{i}`, `local_decoder.layers.{i}` + `local_decoder.cross_attn_layers.{i}.{…}`,
//! `decoder_start_embedding`, `norm`, `output`.
//!
//! With several encoder layers (Table 10 splits), the self-attention blocks run in sequence and
//! the single cross-attention (`cross_attn_layers.0`) follows the last one, as in BLT's local
//! encoder with cross-attention at the last layer only.
//!
//! # Shapes
//! B images, n positions per image (L in training), D width, H heads, d head dim,
//! M patch vectors, S packed patch-transformer rows, V vocabulary.

use candle_core::{DType, Tensor};
use rand::Rng;

use super::layout::PatchLayout;
use super::{DparConfig, DparError, Result};
use crate::batch::TrainNoise;
use crate::kernels::segment::{segment_attention_with, segment_max_with};
use crate::nn::rope::{self, RopeRows};
use crate::nn::{self, AttnMask, Block, BlockCache, DropoutCtx, Linear, RaggedKvCache, RmsNorm, INIT_STD};
use crate::params::{Init, Pb};

/// The patch encoder's cross-attention: each patch's max-pooled query attends to its own codes.
pub(super) struct EncoderCross {
    pub(super) norm_q: RmsNorm,
    pub(super) norm_kv: RmsNorm,
    pub(super) wq: Linear,
    pub(super) wk: Linear,
    pub(super) wv: Linear,
    pub(super) wo: Linear,
    pub(super) n_head: usize,
    /// `Stock`: the padded-batch (device-native) segment ops instead of the CPU kernels.
    pub(super) ops: crate::nn::Ops,
}

impl EncoderCross {
    fn new(pb: &Pb, dim: usize, n_head: usize, eps: f64, ops: crate::nn::Ops) -> Result<Self> {
        let lin = |name: &str| Linear::new(&pb.pp(name), dim, dim, Init::Normal(INIT_STD)).map(|l| l.with_ops(ops));
        Ok(Self {
            norm_q: RmsNorm::new(&pb.pp("cross_attn_norm_q"), dim, eps, ops)?,
            norm_kv: RmsNorm::new(&pb.pp("cross_attn_norm_kv"), dim, eps, ops)?,
            wq: lin("wq")?,
            wk: lin("wk")?,
            wv: lin("wv")?,
            wo: lin("wo")?,
            n_head,
            ops,
        })
    }

    /// Patch vectors = query + wo(attention), query = max over the patch's code states.
    /// # Shapes
    /// states (T, D), M segments → (M, D)
    fn forward(&self, states: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
        let (t, dim) = states.dims2()?;
        let m = segments.len();
        let d = dim / self.n_head;
        let cpu_kernels = self.ops != crate::nn::Ops::Stock;
        let queries = segment_max_with(states, segments, cpu_kernels)?; // (M, D)
        let q = self.wq.forward(&self.norm_q.forward(&queries)?)?.reshape((m, self.n_head, d))?;
        let kv = self.norm_kv.forward(states)?;
        let k = self.wk.forward(&kv)?.reshape((t, self.n_head, d))?;
        let v = self.wv.forward(&kv)?.reshape((t, self.n_head, d))?;
        let attn = segment_attention_with(&q, &k, &v, segments, cpu_kernels)?.reshape((m, dim))?;
        Ok((queries + self.wo.forward(&attn)?)?)
    }
}

/// The decoder's per-layer injection of the global state: wo(RMSNorm(g)).
pub(super) struct DecoderProj {
    pub(super) norm: RmsNorm,
    pub(super) wo: Linear,
}

/// How the patch transformer batches images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalLayout {
    /// One flat sequence of every image's patches, block-diagonal causal mask (training).
    Packed,
    /// Images padded to the longest patch count (reference for tests).
    Padded,
}

/// The DPAR model.
pub struct Dpar {
    config: DparConfig,
    pub(super) cls_embedding: Tensor,
    pub(super) tok_embeddings: Tensor,
    pub(super) enc_layers: Vec<Block>,
    pub(super) enc_cross: EncoderCross,
    pub(super) layers: Vec<Block>,
    pub(super) dec_layers: Vec<Block>,
    pub(super) dec_proj: Vec<DecoderProj>,
    pub(super) start: Tensor,
    pub(super) norm: RmsNorm,
    pub(super) output: Linear,
    /// Encoder RoPE: code k at its grid position, no class slot.
    pub(super) rope_enc: RopeRows,
    /// Decoder RoPE: position 0 (start) zero, position p ≥ 1 at the grid position of z_{p−1}.
    pub(super) rope_dec: RopeRows,
}

/// The KV caches of every stage for incremental generation.
pub struct StepCaches {
    pub encoder: Vec<RaggedKvCache>,
    pub global: Vec<RaggedKvCache>,
    pub decoder: Vec<RaggedKvCache>,
    /// `[w1; w3]` of every block, stacked once per generation: encoder, global, decoder.
    w13: [Vec<Tensor>; 3],
}

impl Dpar {
    pub fn new(config: &DparConfig, pb: &Pb) -> Result<Self> {
        config.validate()?;
        let config = &config.clone().with(|c| c.ops = c.precision.kernels(c.ops).resolve(pb.device()));
        let c = config;
        let block = |p: Pb, i: usize| Block::new(&p.pp(i), c.dim, c.n_head, c.hidden(), c.norm_eps, c.ops);
        let enc = pb.pp("local_encoder");
        let dec = pb.pp("local_decoder");
        Ok(Self {
            config: c.clone(),
            cls_embedding: pb.pp("cls_embedding").pp("embedding_table").get(
                (c.num_classes + 1, c.dim),
                "weight",
                Init::Normal(INIT_STD),
            )?,
            tok_embeddings: pb.pp("tok_embeddings").get((c.vocab_size, c.dim), "weight", Init::Normal(INIT_STD))?,
            enc_layers: (0..c.encoder_layers).map(|i| block(enc.pp("layers"), i)).collect::<nn::Result<_>>()?,
            enc_cross: EncoderCross::new(&enc.pp("cross_attn_layers").pp(0), c.dim, c.n_head, c.norm_eps, c.ops)?,
            layers: (0..c.global_layers).map(|i| block(pb.pp("layers"), i)).collect::<nn::Result<_>>()?,
            dec_layers: (0..c.decoder_layers).map(|i| block(dec.pp("layers"), i)).collect::<nn::Result<_>>()?,
            dec_proj: (0..c.decoder_layers)
                .map(|i| {
                    let p = dec.pp("cross_attn_layers").pp(i);
                    Ok(DecoderProj {
                        norm: RmsNorm::new(&p.pp("cross_attn_norm_kv"), c.dim, c.norm_eps, c.ops)?,
                        wo: Linear::new(&p.pp("wo"), c.dim, c.dim, Init::Normal(INIT_STD))?.with_ops(c.ops),
                    })
                })
                .collect::<Result<_>>()?,
            start: pb.pp("decoder_start_embedding").get((1, c.dim), "weight", Init::Normal(INIT_STD))?,
            norm: RmsNorm::new(&pb.pp("norm"), c.dim, c.norm_eps, c.ops)?,
            output: Linear::new(&pb.pp("output"), c.dim, c.vocab_size, Init::Const(0.0))?.with_ops(c.ops),
            rope_enc: rope::table_2d(c.grid_size, c.head_dim(), c.rope_base, 0),
            rope_dec: rope::table_2d(c.grid_size, c.head_dim(), c.rope_base, 1),
        })
    }

    pub fn config(&self) -> &DparConfig {
        &self.config
    }

    /// A layout for this model's geometry.
    pub fn layout(&self, lengths: Vec<Vec<usize>>, n: usize) -> Result<PatchLayout> {
        let c = &self.config;
        PatchLayout::new(lengths, n, c.grid_size, c.head_dim(), c.rope_base, c.patch_rope)
    }

    fn check_inputs(&self, codes: &Tensor, labels: &Tensor, layout: &PatchLayout) -> Result<()> {
        let (b, n) = codes.dims2()?;
        if n != layout.n || b != layout.batch() {
            return Err(DparError::BadInput(format!(
                "codes {:?} do not match a layout of {} images × {} codes",
                codes.dims(),
                layout.batch(),
                layout.n
            )));
        }
        if n > self.config.seq_len() {
            return Err(DparError::BadInput(format!(
                "{n} codes per image, the model takes at most {}",
                self.config.seq_len()
            )));
        }
        if labels.dims() != [b] {
            return Err(DparError::BadInput(format!("expected {b} labels, got shape {:?}", labels.dims())));
        }
        let max_code = codes.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max_code >= self.config.vocab_size {
            return Err(DparError::BadInput(format!(
                "code {max_code} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let max_label = labels.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max_label > self.config.num_classes {
            return Err(DparError::BadInput(format!(
                "unknown class {max_label}: the model has {} classes (index {} is the null class)",
                self.config.num_classes, self.config.num_classes
            )));
        }
        Ok(())
    }

    /// The dtype of the training forward's activations (bf16 under mixed precision).
    fn activations(&self) -> DType {
        self.config.precision.activations(self.config.ops)
    }

    /// Token embeddings of codes (B, t) → (B, t, D).
    pub fn embed(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, t) = codes.dims2()?;
        Ok(self.tok_embeddings.index_select(&codes.flatten_all()?, 0)?.reshape((b, t, self.config.dim))?)
    }

    /// Class embeddings (B, D); label `num_classes` is the null class.
    pub fn class_embeddings(&self, labels: &Tensor) -> Result<Tensor> {
        Ok(self.cls_embedding.index_select(labels, 0)?)
    }

    /// Encoder blocks over the inputs z_0 … z_{t−1}: (B, t) → (B, t, D).
    fn encode(&self, inputs: &Tensor) -> Result<Tensor> {
        let t = inputs.dim(1)?;
        let rows = self.rope_enc.narrow(0, t);
        let mut h = self.embed(inputs)?.to_dtype(self.activations())?;
        for layer in &self.enc_layers {
            h = layer.forward::<rand_chacha::ChaCha8Rng>(&h, Some(&rows), &AttnMask::Causal, BlockCache::None, None)?;
        }
        Ok(h)
    }

    /// Patch vectors of the given segments of flat code states (T, D) → (M, D).
    pub fn patch_vectors(&self, states: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
        self.enc_cross.forward(states, segments)
    }

    /// The training forward: logits for every position of every image, and the patch
    /// transformer's outputs g (packed or padded rows).
    /// # Shapes
    /// codes (B, n) u32 (z_{n−1} is only a target), labels (B) → logits (B, n, V), g (S or B·N_max, D)
    pub fn forward_with_global<R: Rng>(
        &self,
        codes: &Tensor,
        labels: &Tensor,
        layout: &PatchLayout,
        mode: GlobalLayout,
        noise: Option<TrainNoise<'_, R>>,
    ) -> Result<(Tensor, Tensor)> {
        self.check_inputs(codes, labels, layout)?;
        let c = &self.config;
        let (b, n) = codes.dims2()?;
        let dim = c.dim;
        let mut noise = noise;
        let labels = match noise.as_mut() {
            Some(nz) if c.class_dropout > 0.0 => {
                crate::batch::drop_classes(labels, c.class_dropout, c.num_classes as u32, nz)?
            }
            _ => labels.clone(),
        };
        // 1–2. Encoder over z_0 … z_{n−2}.
        let h = if n > 1 { Some(self.encode(&codes.narrow(1, 0, n - 1)?)?) } else { None };
        // 3. Patch vectors of patches 0 … N_b − 2.
        let m = layout.enc_segments.len();
        let cls = self.class_embeddings(&labels)?.to_dtype(self.activations())?; // (B, D)
        let pool = match (&h, m) {
            (Some(h), m) if m > 0 => {
                Tensor::cat(&[cls, self.patch_vectors(&h.reshape((b * (n - 1), dim))?, &layout.enc_segments)?], 0)?
            }
            _ => cls,
        }; // (B + M, D)
           // 4. Patch transformer.
        let mut offsets = Vec::with_capacity(b);
        let mut acc = 0;
        for &count in &layout.patch_counts {
            offsets.push(acc);
            acc += count - 1;
        }
        let (mut x, rope_rows, mask, rows) = match mode {
            GlobalLayout::Packed => {
                let idx: Vec<u32> = (0..b)
                    .flat_map(|bi| {
                        let off = offsets[bi];
                        std::iter::once(bi as u32)
                            .chain((0..layout.patch_counts[bi] - 1).map(move |j| (b + off + j) as u32))
                    })
                    .collect();
                let s = idx.len();
                let seq = pool.index_select(&Tensor::new(idx, pool.device())?, 0)?.reshape((1, s, dim))?;
                (seq, layout.packed_rope.clone(), AttnMask::Segments(layout.packed_segments.clone()), s)
            }
            GlobalLayout::Padded => {
                let pad_row = (b + m) as u32;
                let pool_padded =
                    Tensor::cat(&[pool.clone(), Tensor::zeros((1, dim), pool.dtype(), pool.device())?], 0)?;
                let nmax = layout.max_patches;
                let idx: Vec<u32> = (0..b)
                    .flat_map(|bi| {
                        let (count, off) = (layout.patch_counts[bi], offsets[bi]);
                        (0..nmax).map(move |j| {
                            if j == 0 {
                                bi as u32
                            } else if j < count {
                                (b + off + j - 1) as u32
                            } else {
                                pad_row
                            }
                        })
                    })
                    .collect();
                let seq = pool_padded.index_select(&Tensor::new(idx, pool.device())?, 0)?.reshape((b, nmax, dim))?;
                (seq, layout.padded_rope.clone(), AttnMask::Causal, b * nmax)
            }
        };
        match noise {
            Some(nz) => {
                x = nn::dropout(&x, c.token_dropout, nz.rng)?;
                let mut ctx = DropoutCtx { rng: nz.rng, resid: c.resid_dropout, ffn: c.ffn_dropout };
                for layer in &self.layers {
                    x = layer.forward(&x, Some(&rope_rows), &mask, BlockCache::None, Some(&mut ctx))?;
                }
            }
            None => {
                for layer in &self.layers {
                    x = layer.forward::<R>(&x, Some(&rope_rows), &mask, BlockCache::None, None)?;
                }
            }
        }
        let g = x.reshape((rows, dim))?;
        // 5. Decoder over [start, h_0, …, h_{n−2}].
        let start =
            self.start.to_dtype(self.activations())?.reshape((1, 1, dim))?.broadcast_as((b, 1, dim))?.contiguous()?;
        let mut y = match h {
            Some(h) => Tensor::cat(&[start, h], 1)?,
            None => start,
        };
        let gather = match mode {
            GlobalLayout::Packed => &layout.packed_gather,
            GlobalLayout::Padded => &layout.padded_gather,
        };
        let gather = Tensor::new(gather.as_slice(), g.device())?;
        let rows_dec = self.rope_dec.narrow(0, n);
        for (layer, proj) in self.dec_layers.iter().zip(&self.dec_proj) {
            let injected = proj.wo.forward(&proj.norm.forward(&g)?)?.index_select(&gather, 0)?.reshape((b, n, dim))?;
            y = layer.forward::<R>(&(y + injected)?, Some(&rows_dec), &AttnMask::Causal, BlockCache::None, None)?;
        }
        // 6. Head.
        let logits = self.norm.then_linear(&y, &self.output)?;
        Ok((logits, g))
    }

    /// Logits (B, n, V) of the training forward.
    pub fn forward<R: Rng>(
        &self,
        codes: &Tensor,
        labels: &Tensor,
        layout: &PatchLayout,
        mode: GlobalLayout,
        noise: Option<TrainNoise<'_, R>>,
    ) -> Result<Tensor> {
        Ok(self.forward_with_global(codes, labels, layout, mode, noise)?.0)
    }

    /// Mean cross-entropy over the n targets z_0 … z_{n−1} of every image.
    pub fn loss<R: Rng>(
        &self,
        codes: &Tensor,
        labels: &Tensor,
        layout: &PatchLayout,
        mode: GlobalLayout,
        noise: Option<TrainNoise<'_, R>>,
    ) -> Result<Tensor> {
        let logits = self.forward(codes, labels, layout, mode, noise)?;
        Ok(nn::cross_entropy(&logits, codes, self.config.ops)?)
    }

    // ---- Incremental steps for generation (design §6) ----

    /// Empty caches: the encoder's for one stream per image, the patch transformer's and the
    /// decoder's for `rows` sequences (2 per image with guidance).
    pub fn new_caches(&self, images: usize, rows: usize) -> Result<StepCaches> {
        let c = &self.config;
        let l = c.seq_len();
        let device = self.tok_embeddings.device();
        let cache = |n: usize| RaggedKvCache::for_ops(n, c.n_head, c.head_dim(), l + 1, c.ops, device);
        let stack = |layers: &[Block]| layers.iter().map(|b| b.stacked_w13()).collect::<nn::Result<Vec<_>>>();
        Ok(StepCaches {
            encoder: (0..c.encoder_layers).map(|_| cache(images)).collect::<nn::Result<_>>()?,
            global: (0..c.global_layers).map(|_| cache(rows)).collect::<nn::Result<_>>()?,
            decoder: (0..c.decoder_layers).map(|_| cache(rows)).collect::<nn::Result<_>>()?,
            w13: [stack(&self.enc_layers)?, stack(&self.layers)?, stack(&self.dec_layers)?],
        })
    }

    /// One cached encoder step: code z_{pos} of every image → its state h_{pos} (R, D).
    pub fn encoder_step(&self, caches: &mut StepCaches, codes: &Tensor, pos: usize) -> Result<Tensor> {
        let rope_rows = self.rope_enc.narrow(pos, 1);
        let mut h = self.embed(codes)?;
        let rows: Vec<usize> = (0..h.dim(0)?).collect();
        for ((layer, cache), w13) in self.enc_layers.iter().zip(caches.encoder.iter_mut()).zip(&caches.w13[0]) {
            h = layer.forward::<rand_chacha::ChaCha8Rng>(
                &h,
                Some(&rope_rows),
                &AttnMask::Causal,
                BlockCache::Ragged { cache, rows: &rows, w13: Some(w13) },
                None,
            )?;
        }
        Ok(h.squeeze(1)?)
    }

    /// One cached patch-transformer step for the listed rows: inputs x (R, D) (class embeddings
    /// or patch vectors) with one RoPE row each → g (R, D).
    pub fn global_step(
        &self,
        caches: &mut StepCaches,
        rows: &[usize],
        x: &Tensor,
        rope_rows: &RopeRows,
    ) -> Result<Tensor> {
        let (r, dim) = x.dims2()?;
        let mut h = x.reshape((r, 1, dim))?;
        for ((layer, cache), w13) in self.layers.iter().zip(caches.global.iter_mut()).zip(&caches.w13[1]) {
            h = layer.forward::<rand_chacha::ChaCha8Rng>(
                &h,
                Some(rope_rows),
                &AttnMask::Causal,
                BlockCache::Ragged { cache, rows, w13: Some(w13) },
                None,
            )?;
        }
        Ok(h.reshape((r, dim))?)
    }

    /// RoPE row of the patch covering codes `start ..= end`.
    pub fn patch_rope(&self, spans: &[(usize, usize)]) -> RopeRows {
        let c = &self.config;
        let rows: Vec<Option<Vec<f32>>> = spans
            .iter()
            .map(|&(s, e)| Some(rope::patch_angles(s, e, c.grid_size, c.head_dim(), c.rope_base, c.patch_rope)))
            .collect();
        RopeRows::from_angles(&rows, c.head_dim() / 2)
    }

    /// The class slot's RoPE rows (zero rotations) for `r` rows.
    pub fn class_rope(&self, r: usize) -> RopeRows {
        RopeRows::from_angles(&vec![None; r], self.config.head_dim() / 2)
    }

    /// Per-layer projections wo_ℓ(RMSNorm_ℓ(g)) of the current global states g (R, D).
    pub fn decoder_injections(&self, g: &Tensor) -> Result<Vec<Tensor>> {
        self.dec_proj.iter().map(|p| Ok(p.wo.forward(&p.norm.forward(g)?)?)).collect()
    }

    /// One cached decoder step at position `pos`: input x (R, D) (the start vector at 0, else
    /// h_{pos−1}) plus the per-layer injections (R, D) → logits for z_{pos} (R, V).
    pub fn decoder_step(
        &self,
        caches: &mut StepCaches,
        x: &Tensor,
        injections: &[Tensor],
        pos: usize,
    ) -> Result<Tensor> {
        let (r, dim) = x.dims2()?;
        let rope_rows = self.rope_dec.narrow(pos, 1);
        let rows: Vec<usize> = (0..r).collect();
        let mut y = x.reshape((r, 1, dim))?;
        for (((layer, cache), inj), w13) in
            self.dec_layers.iter().zip(caches.decoder.iter_mut()).zip(injections).zip(&caches.w13[2])
        {
            y = layer.forward::<rand_chacha::ChaCha8Rng>(
                &(y + inj.reshape((r, 1, dim))?)?,
                Some(&rope_rows),
                &AttnMask::Causal,
                BlockCache::Ragged { cache, rows: &rows, w13: Some(w13) },
                None,
            )?;
        }
        Ok(self.norm.then_linear(&y, &self.output)?.squeeze(1)?)
    }

    /// The decoder start vector for `r` rows (R, D).
    pub fn start_vectors(&self, r: usize) -> Result<Tensor> {
        Ok(self.start.broadcast_as((r, self.config.dim))?.contiguous()?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::Device;

    pub(crate) fn tiny() -> DparConfig {
        DparConfig::mnist().with(|it| {
            it.dim = 32;
            it.n_head = 2;
            it.encoder_layers = 1;
            it.global_layers = 2;
            it.decoder_layers = 2;
            it.ffn_hidden = Some(48);
            it.vocab_size = 13;
            it.num_classes = 3;
            it.grid_size = 4;
        })
    }

    /// A model with non-zero output head and embeddings, so that every path carries signal.
    pub(crate) fn model(seed: u64) -> (Dpar, ParamStore) {
        let store = ParamStore::new(seed, &Device::Cpu);
        let m = Dpar::new(&tiny(), &store.root()).unwrap();
        for name in ["output.weight", "cls_embedding.embedding_table.weight"] {
            let v = store.var(name).unwrap();
            v.set(&Tensor::randn(0f32, 0.5, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        (m, store)
    }

    pub(crate) fn codes(b: usize, n: usize, seed: u64) -> Tensor {
        let mut rng = crate::util::rng_for(seed, "codes", 0);
        Tensor::from_vec((0..b * n).map(|_| rng.random_range(0..13u32)).collect::<Vec<_>>(), (b, n), &Device::Cpu)
            .unwrap()
    }

    fn lengths() -> Vec<Vec<usize>> {
        // 4×4 grid, 16 codes: different patch counts (9, 6, 16) including one-code patches and
        // a last patch that starts at z_15.
        vec![vec![1, 3, 1, 3, 3, 1, 3, 1], vec![1, 3, 4, 4, 2, 2], vec![1; 16]]
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn packed_forward_matches_padded_forward() {
        let (m, _s) = model(1);
        let layout = m.layout(lengths(), 16).unwrap();
        let codes = codes(3, 16, 2);
        let labels = Tensor::new(&[0u32, 2, 3], &Device::Cpu).unwrap();
        let packed =
            m.forward::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None).unwrap();
        let padded =
            m.forward::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Padded, None).unwrap();
        assert_eq!(packed.dims(), &[3, 16, 13]);
        assert!(max_diff(&packed, &padded) < 1e-5, "{}", max_diff(&packed, &padded));
        let l1 = m
            .loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l2 = m
            .loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Padded, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l1 - l2).abs() < 1e-5);
        // One image alone gives the same logits as inside the batch.
        let alone = m.layout(vec![lengths()[1].clone()], 16).unwrap();
        let single = m
            .forward::<rand_chacha::ChaCha8Rng>(
                &codes.narrow(0, 1, 1).unwrap(),
                &labels.narrow(0, 1, 1).unwrap(),
                &alone,
                GlobalLayout::Packed,
                None,
            )
            .unwrap();
        assert!(max_diff(&single, &packed.narrow(0, 1, 1).unwrap()) < 1e-5);
    }

    /// Perturbing z_k leaves the logits at positions ≤ k unchanged (and changes some later one):
    /// catches an off-by-one in the g-index rule or the encoder's inputs.
    #[test]
    fn logits_depend_only_on_earlier_codes() {
        let (m, _s) = model(3);
        let lens = lengths();
        let layout = m.layout(lens, 16).unwrap();
        let base = codes(3, 16, 4);
        let labels = Tensor::new(&[1u32, 0, 2], &Device::Cpu).unwrap();
        let y0 = m.forward::<rand_chacha::ChaCha8Rng>(&base, &labels, &layout, GlobalLayout::Packed, None).unwrap();
        for k in 0..15 {
            let mut v = base.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            for b in 0..3 {
                v[b * 16 + k] = (v[b * 16 + k] + 5) % 13;
            }
            let y1 = m
                .forward::<rand_chacha::ChaCha8Rng>(
                    &Tensor::from_vec(v, (3, 16), &Device::Cpu).unwrap(),
                    &labels,
                    &layout,
                    GlobalLayout::Packed,
                    None,
                )
                .unwrap();
            let unchanged = max_diff(&y0.narrow(1, 0, k + 1).unwrap(), &y1.narrow(1, 0, k + 1).unwrap());
            assert_eq!(unchanged, 0.0, "perturbing z_{k} changed a logit at a position ≤ {k}");
            assert!(max_diff(&y0.narrow(1, k + 1, 15 - k).unwrap(), &y1.narrow(1, k + 1, 15 - k).unwrap()) > 0.0);
        }
    }

    /// The device-native path (stock ops: padded batches of candle ops, no CPU kernels, forced
    /// here on the CPU) gives the fused CPU path's loss, every gradient, and generated codes.
    #[test]
    fn the_device_native_path_equals_the_fused_cpu_path() {
        let (fused, fused_store) = model(7);
        let stock_store = ParamStore::new(7, &Device::Cpu);
        let stock = Dpar::new(&tiny().with(|it| it.ops = crate::nn::Ops::Stock), &stock_store.root()).unwrap();
        for (name, var) in fused_store.vars() {
            stock_store.var(&name).unwrap().set(var.as_tensor()).unwrap();
        }
        assert_eq!(fused.config().ops, crate::nn::Ops::Fused);
        let layout = fused.layout(lengths(), 16).unwrap();
        let labels = Tensor::new(&[1u32, 0, 2], &Device::Cpu).unwrap();
        let codes = codes(3, 16, 8);
        let loss = |m: &Dpar| m.loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None);
        let (lf, ls) = (loss(&fused).unwrap(), loss(&stock).unwrap());
        let (a, b) = (lf.to_scalar::<f32>().unwrap(), ls.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "loss: fused {a}, device-native {b}");
        let (gf, gs) = (lf.backward().unwrap(), ls.backward().unwrap());
        let mut worst = 0f32;
        for (name, var) in fused_store.vars() {
            let want = gf.get(var.as_tensor()).unwrap();
            let got = gs.get(stock_store.var(&name).unwrap().as_tensor()).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            let rel = max_diff(want, got) / scale;
            assert!(rel < 1e-3, "{name}: gradients differ by {rel} of their scale");
            worst = worst.max(rel);
        }
        eprintln!("device-native vs fused: loss {a} vs {b}, worst gradient difference {worst:.1e} of scale");
        let (e, _es) = crate::dpar::generate::tests::entropy_model(9);
        let sampling = crate::sample::SamplingConfig { cfg_scale: 2.0, seed: 4, ..Default::default() };
        let patch = crate::patching::PatchConfig::dpar(2.5, 3);
        let gen =
            |m: &Dpar| crate::dpar::generate::generate(m, &e, &[0, 2, 1], &sampling, &patch, &Device::Cpu).unwrap();
        assert_eq!(gen(&stock), gen(&fused), "generated codes and patches");
    }

    /// Mixed precision on the device-native path (bf16 activations, f32 master weights; forced
    /// here on the CPU with stock ops): the loss is the f32 loss within bf16's rounding, every
    /// master weight gets an f32 gradient pointing the f32 gradient's way, and on the fused CPU
    /// path `--dtype bf16` means the bf16 GEMM kernels instead.
    #[test]
    fn mixed_precision_keeps_f32_masters_and_follows_the_f32_path() {
        let (f32_model, store) = model(7);
        let stock = |p: crate::nn::Precision| {
            let cfg = tiny().with(|it| {
                it.ops = crate::nn::Ops::Stock;
                it.precision = p;
            });
            Dpar::new(&cfg, &store.root()).unwrap()
        };
        let (reference, mixed) = (stock(crate::nn::Precision::F32), stock(crate::nn::Precision::Bf16));
        assert_eq!(mixed.activations(), DType::BF16);
        assert_eq!(reference.activations(), DType::F32);
        let fused_bf16 =
            Dpar::new(&tiny().with(|it| it.precision = crate::nn::Precision::Bf16), &store.root()).unwrap();
        assert_eq!(fused_bf16.activations(), DType::F32, "the fused CPU path keeps f32 activations");
        if crate::kernels::bf16::available() {
            assert_eq!(fused_bf16.config().ops, crate::nn::Ops::Bf16);
        }
        drop(f32_model);
        let layout = mixed.layout(lengths(), 16).unwrap();
        let labels = Tensor::new(&[1u32, 0, 2], &Device::Cpu).unwrap();
        let codes = codes(3, 16, 8);
        let loss = |m: &Dpar| m.loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None);
        let (l32, l16) = (loss(&reference).unwrap(), loss(&mixed).unwrap());
        assert_eq!(l16.dtype(), DType::F32, "the loss is computed in f32");
        let (a, b) = (l32.to_scalar::<f32>().unwrap(), l16.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 2e-2 * a.abs(), "loss: f32 {a}, bf16 {b}");
        assert_ne!(a, b, "bf16 arithmetic shows in the loss");
        let (g32, g16) = (l32.backward().unwrap(), l16.backward().unwrap());
        let mut worst = 1f64;
        for (name, var) in store.vars() {
            let want = g32.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no f32 gradient"));
            let got = g16.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient under bf16"));
            assert_eq!(got.dtype(), DType::F32, "{name}: the master's gradient is f32");
            let (w, g) = (
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
            let dot: f64 = w.iter().zip(&g).map(|(&x, &y)| x as f64 * y as f64).sum();
            let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (norm(&w) * norm(&g)).max(1e-30);
            assert!(cos > 0.95, "{name}: bf16 gradient at cosine {cos} from the f32 one");
            worst = worst.min(cos);
        }
        eprintln!("mixed precision vs f32: loss {b} vs {a}, lowest gradient cosine {worst:.4}");
    }

    #[test]
    fn every_trainable_parameter_gets_a_finite_nonzero_gradient() {
        let (m, store) = model(5);
        let layout = m.layout(lengths(), 16).unwrap();
        let mut rng = crate::util::rng_for(0, "t", 0);
        let labels = Tensor::new(&[1u32, 0, 2], &Device::Cpu).unwrap();
        let loss = m
            .loss(&codes(3, 16, 6), &labels, &layout, GlobalLayout::Packed, Some(TrainNoise { rng: &mut rng }))
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in store.vars() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
            assert!(v.iter().any(|&x| x != 0.0), "{name}: zero gradient");
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let (m, _s) = model(1);
        let err = m.layout(vec![vec![1, 3, 4]], 16).unwrap_err().to_string();
        assert!(err.contains("sum to 8") && err.contains("16 codes"), "{err}");
        let layout = m.layout(vec![vec![1, 15]], 16).unwrap();
        let err = m
            .forward::<rand_chacha::ChaCha8Rng>(
                &codes(1, 16, 1),
                &Tensor::new(&[4u32], &Device::Cpu).unwrap(),
                &layout,
                GlobalLayout::Packed,
                None,
            )
            .err()
            .unwrap();
        assert!(err.to_string().contains("unknown class 4"), "{err}");
        assert!(m
            .forward::<rand_chacha::ChaCha8Rng>(
                &codes(2, 16, 1),
                &Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
                &layout,
                GlobalLayout::Packed,
                None
            )
            .is_err());
    }
}
