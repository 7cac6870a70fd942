//! Shared transformer layers (design §3), every one with a working backward pass:
//! [`Linear`], [`RmsNorm`], SwiGLU [`FeedForward`], [`attention`] with masks and a KV cache,
//! [`rope`] (2D and dynamic), the LlamaGen [`Block`] and seeded [`dropout`].
//!
//! Initialisation follows LlamaGen: Linear/Embedding weights N(0, 0.02), RMSNorm weights 1.
//! candle's stock `RmsNorm` and `softmax_last_dim` return tensors without gradients; these
//! layers use differentiable compositions or our own kernels instead.
//!
//! # Shapes
//! B batch, T tokens, D width, H heads, d = D/H head dim.

pub mod attention;
pub mod config;
pub mod lean;
pub mod rope;

use candle_core::{Tensor, D};
use rand::Rng;

pub use attention::{Attention, AttnMask, KvCache, KvPrecision, RaggedKvCache};
pub use config::TransformerConfig;

use crate::params::{Init, Pb};

/// Errors of layer construction and use.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The configuration is impossible (e.g. width not divisible by heads).
    #[error("layer config: {0}")]
    BadConfig(String),
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, NnError>;

/// LlamaGen's weight init std.
pub const INIT_STD: f64 = 0.02;

/// Which implementation the layers run: our fused CPU kernels (default) or the stock composed
/// candle ops (the reference, kept for comparison and for devices without our kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ops {
    #[default]
    Fused,
    Stock,
    /// The fused kernels with bf16 matmul operands (f32 accumulation and master weights).
    Bf16,
}

impl Ops {
    /// The kernels that run for a request of `self` on `device`: the one place where the choice
    /// is made (models call it when they are built). Off the CPU, candle's ops (our kernels are
    /// CPU code); `Bf16` on a CPU without AVX512-BF16 (or capped below AVX-512 by `DPAR_ISA`),
    /// the f32 kernels, with a warning once per process; otherwise the request.
    pub fn resolve(self, device: &candle_core::Device) -> Ops {
        if !device.is_cpu() {
            return Ops::Stock;
        }
        if self == Ops::Bf16 && !crate::kernels::bf16::available() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("this CPU has no AVX512-BF16; --ops bf16 falls back to the f32 kernels (--ops fused)")
            });
            return Ops::Fused;
        }
        self
    }

    /// Whether the fused kernels apply to `x` (CPU f32 only).
    pub fn fused_for(self, x: &Tensor) -> bool {
        self != Ops::Stock && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
    }

    /// The GEMM precision of the fused kernels.
    pub fn gemm(self) -> crate::kernels::matmul::Gemm {
        if self == Ops::Bf16 {
            crate::kernels::matmul::Gemm::Bf16
        } else {
            crate::kernels::matmul::Gemm::F32
        }
    }
}

/// The arithmetic of the training forward (`--dtype`), a run-time choice like [`Ops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// Mixed precision: bf16 activations and matmul operands, f32 master weights (cast to bf16
    /// where they are used, so their gradients and the optimiser's moments stay f32), f32
    /// softmax, norms and loss.
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`, as the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The kernels to request for `ops` under this precision: on the CPU's fused kernels bf16
    /// means their bf16 GEMM operands (`--ops bf16`, the existing CPU path); other requests are
    /// kept.
    pub fn kernels(self, ops: Ops) -> Ops {
        if self == Precision::Bf16 && ops == Ops::Fused {
            Ops::Bf16
        } else {
            ops
        }
    }

    /// The dtype of the activations of a training forward run by `ops` (already resolved):
    /// bf16 only on candle's ops (every GPU, or `--ops stock` on the CPU), f32 otherwise.
    pub fn activations(self, ops: Ops) -> candle_core::DType {
        if self == Precision::Bf16 && ops == Ops::Stock {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }
    }
}

/// `x` in f32 when it is half precision (bf16, f16), else `x` itself: where mixed precision
/// keeps its sensitive arithmetic (softmax, norms, loss).
pub fn widen(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        candle_core::DType::BF16 | candle_core::DType::F16 => x.to_dtype(candle_core::DType::F32),
        _ => Ok(x.clone()),
    }
}

/// A bias-free linear layer, weight stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    /// Fused: our faer GEMM op on CPU f32; stock: candle's matmul.
    pub ops: Ops,
}

impl Linear {
    pub fn new(pb: &Pb, in_dim: usize, out_dim: usize, init: Init) -> Result<Self> {
        Ok(Self { weight: pb.get((out_dim, in_dim), "weight", init)?, ops: Ops::Fused })
    }

    /// The same layer run by `ops`.
    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// # Shapes
    /// (…, in) → (…, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = if self.ops.fused_for(&x2) && self.weight.dtype() == candle_core::DType::F32 {
            crate::kernels::matmul::linear(&x2, &self.weight, self.ops.gemm())?
        } else {
            // Mixed precision: the f32 master weight meets bf16 activations as a bf16 copy (a
            // differentiable cast; a no-op when the dtypes agree).
            x2.matmul(&self.weight.to_dtype(x2.dtype())?.t()?)?
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// RMSNorm: x·rsqrt(mean(x²) + eps)·w (design §3), composed from differentiable ops.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub ops: Ops,
}

impl RmsNorm {
    pub fn new(pb: &Pb, dim: usize, eps: f64, ops: Ops) -> Result<Self> {
        Ok(Self { weight: pb.get(dim, "weight", Init::Const(1.0))?, eps, ops })
    }

    /// `linear(RMSNorm(x))`, as one fused op when possible.
    pub fn then_linear(&self, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        if self.ops.fused_for(x) && linear.ops != Ops::Stock {
            return Ok(crate::kernels::block::norm_linear(
                x,
                &self.weight,
                &linear.weight,
                self.eps,
                linear.ops.gemm(),
            )?);
        }
        linear.forward(&self.forward(x)?)
    }

    /// # Shapes
    /// (…, D) → (…, D)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.ops.fused_for(x) {
            return Ok(crate::kernels::fused::rms_norm(x, &self.weight, self.eps)?);
        }
        // Half-precision activations are normalised in f32 (as LlamaGen's
        // `_norm(x.float()).type_as(x)`); f32 and f64 as they are.
        let dtype = x.dtype();
        let x32 = widen(x)?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        Ok(x32.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(&self.weight.to_dtype(dtype)?)?)
    }
}

/// SwiGLU feed-forward: w2(silu(w1 x) ⊙ w3 x).
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
    pub ops: Ops,
}

/// LlamaGen's hidden size: round_up(⌊2·4D/3⌋, multiple_of).
pub fn ffn_hidden(dim: usize, multiple_of: usize) -> usize {
    let hidden = 2 * 4 * dim / 3;
    hidden.div_ceil(multiple_of) * multiple_of
}

impl FeedForward {
    pub fn new(pb: &Pb, dim: usize, hidden: usize, ops: Ops) -> Result<Self> {
        Ok(Self {
            w1: Linear::new(&pb.pp("w1"), dim, hidden, Init::Normal(INIT_STD))?.with_ops(ops),
            w2: Linear::new(&pb.pp("w2"), hidden, dim, Init::Normal(INIT_STD))?.with_ops(ops),
            w3: Linear::new(&pb.pp("w3"), dim, hidden, Init::Normal(INIT_STD))?.with_ops(ops),
            ops,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.ops.fused_for(x) {
            // One matmul for gate and up ([w1; w3] stacked), then the fused silu(gate)·up.
            let w13 = Linear { weight: Tensor::cat(&[&self.w1.weight, &self.w3.weight], 0)?, ops: self.ops };
            let h = crate::kernels::fused::swiglu(&w13.forward(x)?)?;
            return self.w2.forward(&h);
        }
        let gate = self.w1.forward(x)?.silu()?;
        self.w2.forward(&(gate * self.w3.forward(x)?)?)
    }
}

/// Mean cross-entropy of logits (…, V) against u32 targets (…): fused kernel or candle's ops.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ops: Ops) -> Result<Tensor> {
    if ops.fused_for(logits) {
        return Ok(crate::kernels::fused::cross_entropy(logits, targets)?);
    }
    let v = logits.dim(D::Minus1)?;
    // Half-precision logits in f32.
    let logits = widen(logits)?;
    Ok(candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)?)
}

/// Inverted dropout with a mask drawn from `rng` (candle's CPU RNG cannot be seeded).
/// Identity when `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: &mut impl Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f32>() < p { 0.0 } else { scale }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// Dropout settings and the RNG to draw masks from, for a training forward.
pub struct DropoutCtx<'a, R: Rng> {
    pub rng: &'a mut R,
    /// After `wo` (resid_dropout_p).
    pub resid: f64,
    /// After w2 (ffn_dropout_p).
    pub ffn: f64,
}

/// A LlamaGen block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)).
#[derive(Debug, Clone)]
pub struct Block {
    pub attention: Attention,
    pub feed_forward: FeedForward,
    pub attention_norm: RmsNorm,
    pub ffn_norm: RmsNorm,
}

impl Block {
    /// Parameter names: `attention.{wqkv,wo}`, `feed_forward.{w1,w2,w3}`, `{attention,ffn}_norm`.
    pub fn new(pb: &Pb, dim: usize, n_head: usize, ffn_hidden: usize, norm_eps: f64, ops: Ops) -> Result<Self> {
        Ok(Self {
            attention: Attention::new(&pb.pp("attention"), dim, n_head, ops)?,
            feed_forward: FeedForward::new(&pb.pp("feed_forward"), dim, ffn_hidden, ops)?,
            attention_norm: RmsNorm::new(&pb.pp("attention_norm"), dim, norm_eps, ops)?,
            ffn_norm: RmsNorm::new(&pb.pp("ffn_norm"), dim, norm_eps, ops)?,
        })
    }

    /// The block's one forward; `cache` says what the attention runs against:
    /// - [`BlockCache::None`]: the whole sequence at once under `mask` (training, teacher
    ///   forcing; with fused ops on the CPU, five fused kernels);
    /// - [`BlockCache::Kv`]: appends to a per-batch KV cache (the reference cached path);
    /// - [`BlockCache::Ragged`]: one step of some rows over a ragged cache (generation; `mask`
    ///   is unused, `rope` is required and holds one row per stepped row).
    ///
    /// `dropout_ctx` (training) applies residual and FFN dropout; not with a cache.
    ///
    /// # Shapes
    /// x (B, T, D) → (B, T, D); with a ragged cache x (R, 1, D) → (R, 1, D)
    pub fn forward<R: Rng>(
        &self,
        x: &Tensor,
        rope: Option<&rope::RopeRows>,
        mask: &AttnMask,
        cache: BlockCache<'_>,
        dropout_ctx: Option<&mut DropoutCtx<'_, R>>,
    ) -> Result<Tensor> {
        let cache = match cache {
            BlockCache::None => None,
            BlockCache::Kv(c) => Some(c),
            BlockCache::Ragged { cache, rows, w13 } => {
                let rope = rope.ok_or_else(|| NnError::BadConfig("a ragged cache step needs RoPE rows".into()))?;
                if dropout_ctx.is_some() {
                    return Err(NnError::BadConfig("dropout applies to training, not to a cached step".into()));
                }
                return self.forward_ragged(x, rope, cache, rows, w13);
            }
        };
        if cache.is_none() && self.attention.ops.fused_for(x) {
            let (b, t, _) = x.dims3()?;
            let segments = match mask {
                AttnMask::Causal => Some(crate::kernels::attention::causal_segments(b, t)),
                AttnMask::Segments(s) if b == 1 => Some(s.clone()),
                _ => None,
            };
            if let Some(segments) = segments {
                return self.forward_fused(x, rope, &segments, dropout_ctx);
            }
        }
        let mut attn = self.attention.forward(&self.attention_norm.forward(x)?, rope, mask, cache)?;
        let mut ctx = dropout_ctx;
        if let Some(c) = ctx.as_deref_mut() {
            attn = dropout(&attn, c.resid, c.rng)?;
        }
        let h = (x + attn)?;
        let mut ffn = self.feed_forward.forward(&self.ffn_norm.forward(&h)?)?;
        if let Some(c) = ctx {
            ffn = dropout(&ffn, c.ffn, c.rng)?;
        }
        Ok((h + ffn)?)
    }
}

/// What a [`Block::forward`] runs its attention against.
pub enum BlockCache<'a> {
    /// No cache: the whole sequence at once.
    None,
    /// A per-batch KV cache the step appends to.
    Kv(&'a mut KvCache),
    /// One step of `rows` over a ragged cache; `w13` is [`Block::stacked_w13`], computed once
    /// per generation (computed per call when `None`).
    Ragged { cache: &'a mut RaggedKvCache, rows: &'a [usize], w13: Option<&'a Tensor> },
}

/// A dropout mask drawn exactly like [`dropout`] (same RNG draws in the same order).
pub fn dropout_mask(n: usize, p: f64, rng: &mut impl Rng) -> crate::kernels::block::Mask {
    if p <= 0.0 {
        return None;
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    Some(std::sync::Arc::new((0..n).map(|_| if rng.random::<f32>() < p { 0.0 } else { scale }).collect()))
}

impl Block {
    /// The block in five fused ops (see `kernels::block`): norm+qkv, RoPE+attention,
    /// wo+residual, norm+[w1;w3], SwiGLU+w2+residual.
    fn forward_fused<R: Rng>(
        &self,
        x: &Tensor,
        rope: Option<&rope::RopeRows>,
        segments: &[(usize, usize)],
        dropout_ctx: Option<&mut DropoutCtx<'_, R>>,
    ) -> Result<Tensor> {
        use crate::kernels::block;
        let n = x.elem_count();
        let a = &self.attention;
        let gemm = a.ops.gemm();
        let qkv = block::norm_linear(x, &self.attention_norm.weight, &a.wqkv.weight, self.attention_norm.eps, gemm)?;
        let o = block::rope_attention(&qkv, rope, a.n_head, segments)?;
        let mut ctx = dropout_ctx;
        let mask_a = match ctx.as_deref_mut() {
            Some(c) => dropout_mask(n, c.resid, c.rng),
            None => None,
        };
        let h = block::linear_residual(&o, &a.wo.weight, x, mask_a, gemm)?;
        let ff = &self.feed_forward;
        let w13 = Tensor::cat(&[&ff.w1.weight, &ff.w3.weight], 0)?;
        let h13 = block::norm_linear(&h, &self.ffn_norm.weight, &w13, self.ffn_norm.eps, gemm)?;
        let mask_f = match ctx {
            Some(c) => dropout_mask(n, c.ffn, c.rng),
            None => None,
        };
        Ok(block::swiglu_linear_residual(&h13, &ff.w2.weight, &h, mask_f, gemm)?)
    }

    /// `[w1; w3]` stacked, for the fused feed-forward. Inference loops compute it once per
    /// generation (weights do not change while sampling) and pass it to
    /// `Block::forward_ragged`.
    pub fn stacked_w13(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.feed_forward.w1.weight, &self.feed_forward.w3.weight], 0)?)
    }

    /// One inference step of a subset of rows over a ragged cache (see
    /// [`Attention::forward_ragged`]). With fused ops: norm+qkv, RoPE on the qkv rows, the cache
    /// kernel, wo+residual, norm+[w1;w3] (`w13`, see [`Block::stacked_w13`]) and SwiGLU+w2+residual.
    fn forward_ragged(
        &self,
        x: &Tensor,
        rope: &rope::RopeRows,
        cache: &mut RaggedKvCache,
        rows: &[usize],
        w13: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.attention.ops.fused_for(x) {
            use crate::kernels::block;
            let (r, _, dim) = x.dims3()?;
            let a = &self.attention;
            let gemm = a.ops.gemm();
            let qkv =
                block::norm_linear(x, &self.attention_norm.weight, &a.wqkv.weight, self.attention_norm.eps, gemm)?;
            let qkv = rope::apply_qkv(&qkv.reshape((r, 3 * dim))?, rope, a.n_head)?;
            let host = qkv.flatten_all()?.to_vec1::<f32>()?;
            let o = cache.step(rows, &host, &host[dim..], &host[2 * dim..], 3 * dim)?;
            let o = Tensor::from_vec(o, (r, 1, dim), x.device())?;
            let h = block::linear_residual(&o, &a.wo.weight, x, None, gemm)?;
            let stacked;
            let w13 = match w13 {
                Some(w) => w,
                None => {
                    stacked = self.stacked_w13()?;
                    &stacked
                }
            };
            let h13 = block::norm_linear(&h, &self.ffn_norm.weight, w13, self.ffn_norm.eps, gemm)?;
            return Ok(block::swiglu_linear_residual(&h13, &self.feed_forward.w2.weight, &h, None, gemm)?);
        }
        let h = (x + self.attention.forward_ragged(&self.attention_norm.forward(x)?, rope, cache, rows)?)?;
        Ok((&h + self.feed_forward.forward(&self.ffn_norm.forward(&h)?)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::{DType, Device, Var};

    #[test]
    fn ffn_hidden_follows_llamagen() {
        assert_eq!(ffn_hidden(768, 256), 2048);
        assert_eq!(ffn_hidden(1024, 256), 2816);
        assert_eq!(ffn_hidden(1280, 256), 3584);
        assert_eq!(ffn_hidden(256, 256), 768);
    }

    /// Central finite differences of a scalar function of `x` against its autograd gradient,
    /// in `x`'s dtype (f64 for composed ops, f32 for our f32-only kernels).
    pub(crate) fn check_gradient(x: &Var, f: &dyn Fn(&Tensor) -> Tensor, tol: f32) {
        let grads = f(x.as_tensor()).backward().unwrap();
        let analytic = grads
            .get(x.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = x.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = if x.dtype() == DType::F64 { 1e-4 } else { 1e-2 };
        for i in (0..base.len()).step_by((base.len() / 12).max(1)) {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap().to_dtype(x.dtype()).unwrap();
                f(&t).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = ((eval(eps) - eval(-eps)) / (2.0 * eps)) as f32;
            let err = (numeric - analytic[i]).abs() / (1e-2 + numeric.abs().max(analytic[i].abs()));
            assert!(err < tol, "element {i}: numeric {numeric}, analytic {}", analytic[i]);
        }
    }

    pub(crate) fn rand_var(shape: &[usize], seed: u64) -> Var {
        use rand::Rng;
        let mut rng = crate::util::rng_for(seed, "nn-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// A block's one forward gives the same outputs whatever it runs against: the whole
    /// sequence at once, step by step over a KV cache, or step by step over a ragged cache
    /// (stock and fused ops).
    #[test]
    fn block_forward_is_the_same_with_every_kind_of_cache() {
        let dev = Device::Cpu;
        let (b, t, dim, heads) = (2, 7, 32, 2);
        let table = rope::table_2d(3, dim / heads, 10000.0, 0);
        let x = rand_var(&[b, t, dim], 11).as_tensor().to_dtype(DType::F32).unwrap();
        for ops in [Ops::Stock, Ops::Fused] {
            let store = ParamStore::new(7, &dev);
            let block = Block::new(&store.root(), dim, heads, 48, 1e-5, ops).unwrap();
            let full = block
                .forward::<rand_chacha::ChaCha8Rng>(
                    &x,
                    Some(&table.narrow(0, t)),
                    &AttnMask::Causal,
                    BlockCache::None,
                    None,
                )
                .unwrap();
            let mut kv = KvCache::new(t);
            let mut ragged = RaggedKvCache::new(b, heads, dim / heads, t);
            let w13 = block.stacked_w13().unwrap();
            for pos in 0..t {
                let xt = x.narrow(1, pos, 1).unwrap();
                let want = full.narrow(1, pos, 1).unwrap();
                let by_kv = block
                    .forward::<rand_chacha::ChaCha8Rng>(
                        &xt,
                        Some(&table.select(&[pos])),
                        &AttnMask::None,
                        BlockCache::Kv(&mut kv),
                        None,
                    )
                    .unwrap();
                let by_ragged = block
                    .forward::<rand_chacha::ChaCha8Rng>(
                        &xt,
                        Some(&table.select(&[pos, pos])),
                        &AttnMask::Causal,
                        BlockCache::Ragged { cache: &mut ragged, rows: &[0, 1], w13: Some(&w13) },
                        None,
                    )
                    .unwrap();
                for (name, got) in [("kv", &by_kv), ("ragged", &by_ragged)] {
                    let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(err < 1e-4, "{ops:?} {name} step {pos}: off by {err}");
                }
            }
        }
    }

    /// RMSNorm's gradient (in f64) matches finite differences.
    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let store = ParamStore::new(0, &Device::Cpu);
        let norm = RmsNorm::new(&store.root(), 6, 1e-5, Ops::Stock).unwrap();
        let weight = rand_var(&[6], 3);
        let norm = RmsNorm { weight: weight.as_tensor().clone(), ..norm };
        let probe = rand_var(&[2, 3, 6], 4);
        let x = rand_var(&[2, 3, 6], 5);
        check_gradient(&x, &|x| (norm.forward(x).unwrap() * probe.as_tensor()).unwrap().sum_all().unwrap(), 1e-3);
    }

    #[test]
    fn dropout_is_identity_at_zero_and_preserves_the_mean() {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let mut rng = crate::util::rng_for(0, "d", 0);
        let same = dropout(&x, 0.0, &mut rng).unwrap();
        assert_eq!(same.sum_all().unwrap().to_scalar::<f32>().unwrap(), 10000.0);
        let dropped = dropout(&x, 0.1, &mut rng).unwrap();
        let mean = dropped.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        let zeros =
            dropped.eq(0f32).unwrap().to_dtype(DType::F32).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((zeros - 0.1).abs() < 0.02, "{zeros}");
    }
}
