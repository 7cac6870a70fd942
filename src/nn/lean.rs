//! Lean inference steps on the CPU: a stack of LlamaGen blocks whose weights are
//! copied out of their tensors once, with KV caches and every scratch buffer allocated once, so
//! that a decode step runs on plain slices (no tensor graph, no allocation per step).
//!
//! A step is the fused path's `Block::forward_ragged`, operation by operation: RMSNorm + qkv
//! (one GEMM), RoPE on q and k, the ragged cache's attention, wo + residual, RMSNorm + [w1; w3],
//! SwiGLU + w2 + residual. Same GEMM, same shapes, same order of every sum, so the outputs are
//! bit for bit those of the tensor path. The GPT's decoder ([`crate::gpt::decode`]) and every
//! DPAR stage ([`crate::dpar::decode`]) are built on it.
//!
//! # Shapes
//! R rows stepped, D width, H heads, d = D/H, F SwiGLU hidden.

use super::{Block, KvPrecision, NnError, RaggedKvCache, Result};
use crate::kernels::math;
use crate::kernels::matmul::{small_m_gemm, small_m_weights, Gemm, SMALL_M};

/// A tensor's values as f32 on the host.
pub fn host(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `out = x·r·g` per row, r = 1/√(mean(x²) + ε): the arithmetic of the fused RMSNorm.
pub fn rms_norm_rows(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    for (o, xr) in out.chunks_mut(d).zip(x.chunks(d)) {
        let r = 1.0 / (math::dot(xr, xr) / d as f32 + eps).sqrt();
        for j in 0..d {
            o[j] = xr[j] * r * g[j];
        }
    }
}

/// A row-wise linear layer on the host, `out (R, out) = x (R, in)·Wᵀ`, with W kept in both
/// layouts: as stored (for the packed GEMM of many rows) and transposed once for
/// [`small_m_gemm`] (a decode step's few rows), so no call packs W. The arithmetic is that of
/// [`Gemm::run`] on the same rows, to the bit.
pub struct LeanLinear {
    pub weight: Vec<f32>,
    transposed: Vec<f32>,
    gemm: Gemm,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl LeanLinear {
    pub fn from(linear: &super::Linear, gemm: Gemm) -> Result<Self> {
        let (out_dim, in_dim) = linear.weight.dims2()?;
        Self::new(host(&linear.weight)?, out_dim, in_dim, gemm)
    }

    /// From a row-major (out, in) weight.
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize, gemm: Gemm) -> Result<Self> {
        if weight.len() != out_dim * in_dim {
            return Err(NnError::BadConfig(format!("lean linear: {} weights for {out_dim} × {in_dim}", weight.len())));
        }
        let transposed = small_m_weights(&weight, out_dim, in_dim, gemm == Gemm::Bf16);
        Ok(Self { weight, transposed, gemm, out_dim, in_dim })
    }

    /// `out = x·Wᵀ` for `rows` rows. Rows go through [`small_m_gemm`] in chunks of at most
    /// [`SMALL_M`], so each row's result is the same fused multiply-add chain at any batch size
    /// (a decode step's output for an image never depends on what else is in the batch).
    pub fn run(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        for r0 in (0..rows).step_by(SMALL_M) {
            let m = SMALL_M.min(rows - r0);
            crate::kernels::count_traffic((self.transposed.len() * 4) as u64, 0, 0);
            small_m_gemm(
                &mut out[r0 * n..(r0 + m) * n],
                m,
                n,
                k,
                &x[r0 * k..(r0 + m) * k],
                &self.transposed,
                false,
                self.gemm == Gemm::Bf16,
            );
        }
    }
}

/// An RMSNorm on the host.
pub struct LeanNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl LeanNorm {
    pub fn from(norm: &super::RmsNorm) -> Result<Self> {
        Ok(Self { weight: host(&norm.weight)?, eps: norm.eps as f32 })
    }

    pub fn run(&self, x: &[f32], out: &mut [f32]) {
        rms_norm_rows(x, &self.weight, self.eps, out);
    }
}

struct LeanBlock {
    attn_norm: LeanNorm,
    wqkv: LeanLinear,
    wo: LeanLinear,
    ffn_norm: LeanNorm,
    /// `[w1; w3]` (2F, D).
    w13: LeanLinear,
    w2: LeanLinear,
}

/// Blocks, their ragged KV caches and the scratch of one step. The blocks' weights are shared
/// ([`Self::sharing`]) by every stack made from the same one: decode groups on several threads
/// copy the weights out of the tensors once.
pub struct LeanStack {
    dim: usize,
    heads: usize,
    hidden: usize,
    blocks: std::sync::Arc<Vec<LeanBlock>>,
    caches: Vec<RaggedKvCache>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    h13: Vec<f32>,
    act: Vec<f32>,
}

impl LeanStack {
    /// Copies `blocks` (width `dim`, `heads` heads) with f32 caches for `cache_rows` sequences
    /// of up to `max_len` positions.
    pub fn new(
        blocks: &[Block],
        dim: usize,
        heads: usize,
        gemm: Gemm,
        cache_rows: usize,
        max_len: usize,
    ) -> Result<Self> {
        Self::with_cache(blocks, dim, heads, gemm, cache_rows, max_len, KvPrecision::F32)
    }

    /// [`Self::new`] with caches of the given precision.
    pub fn with_cache(
        blocks: &[Block],
        dim: usize,
        heads: usize,
        gemm: Gemm,
        cache_rows: usize,
        max_len: usize,
        kv: KvPrecision,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) || !(dim / heads).is_multiple_of(2) {
            return Err(NnError::BadConfig(format!(
                "lean stack: width {dim} does not split into {heads} heads of even size"
            )));
        }
        let hidden = blocks.first().map(|b| b.feed_forward.w2.weight.dims()[1]).unwrap_or(0);
        let mut lean = Vec::with_capacity(blocks.len());
        for b in blocks {
            let mut w13 = host(&b.feed_forward.w1.weight)?;
            w13.extend(host(&b.feed_forward.w3.weight)?);
            lean.push(LeanBlock {
                attn_norm: LeanNorm::from(&b.attention_norm)?,
                wqkv: LeanLinear::from(&b.attention.wqkv, gemm)?,
                wo: LeanLinear::from(&b.attention.wo, gemm)?,
                ffn_norm: LeanNorm::from(&b.ffn_norm)?,
                w13: LeanLinear::new(w13, 2 * hidden, dim, gemm)?,
                w2: LeanLinear::from(&b.feed_forward.w2, gemm)?,
            });
        }
        let empty = Self {
            dim,
            heads,
            hidden,
            blocks: std::sync::Arc::new(lean),
            caches: Vec::new(),
            xn: Vec::new(),
            qkv: Vec::new(),
            att: Vec::new(),
            h13: Vec::new(),
            act: Vec::new(),
        };
        Ok(empty.sharing(cache_rows, max_len, kv))
    }

    /// A stack with the same weights (shared, not copied) and fresh caches for `cache_rows`
    /// sequences of up to `max_len` positions.
    pub fn sharing(&self, cache_rows: usize, max_len: usize, kv: KvPrecision) -> Self {
        let (dim, heads, hidden) = (self.dim, self.heads, self.hidden);
        let buf = |width: usize| Vec::with_capacity(cache_rows * width);
        Self {
            dim,
            heads,
            hidden,
            caches: (0..self.blocks.len())
                .map(|_| RaggedKvCache::with_precision(cache_rows, heads, dim / heads, max_len, kv))
                .collect(),
            blocks: self.blocks.clone(),
            xn: buf(dim),
            qkv: buf(3 * dim),
            att: buf(dim),
            h13: buf(2 * hidden),
            act: buf(hidden),
        }
    }

    /// Forgets sequence `row` in every layer (a new sequence starts in that row).
    pub fn clear_row(&mut self, row: usize) {
        for c in &mut self.caches {
            c.clear_row(row);
        }
    }

    /// Keeps only the first `len` positions of sequence `row` in every layer (undoes steps).
    pub fn truncate_row(&mut self, row: usize, len: usize) {
        for c in &mut self.caches {
            c.truncate_row(row, len);
        }
    }

    /// Cached positions of sequence `row` (the same in every layer).
    pub fn len_of(&self, row: usize) -> usize {
        self.caches.first().map_or(0, |c| c.len_of(row))
    }

    /// One step of the listed cache rows: `x` (R, D) is replaced by the stack's output. Each
    /// row appends one position to its own cache. `cos`/`sin` hold the RoPE row of each stepped
    /// row (R·d/2 values), or one row shared by all (d/2 values). With `injections` (one (R, D)
    /// slab per block, back to back), block ℓ's input is `x + injections[ℓ]` (DPAR's decoder).
    pub fn step(
        &mut self,
        x: &mut Vec<f32>,
        rows: &[usize],
        cos: &[f32],
        sin: &[f32],
        injections: Option<&[f32]>,
    ) -> Result<()> {
        let (r, d, f) = (rows.len(), self.dim, self.hidden);
        let half = d / self.heads / 2;
        if x.len() != r * d || (cos.len() != half && cos.len() != r * half) || sin.len() != cos.len() {
            return Err(NnError::BadConfig(format!(
                "lean step: {} inputs and {} RoPE values for {r} rows of width {d} (half head {half})",
                x.len(),
                cos.len()
            )));
        }
        if let Some(inj) = injections {
            if inj.len() != self.blocks.len() * r * d {
                return Err(NnError::BadConfig(format!(
                    "lean step: {} injected values for {} blocks × {r} rows × {d}",
                    inj.len(),
                    self.blocks.len()
                )));
            }
        }
        let table = cos.len() / half;
        self.xn.resize(r * d, 0.0);
        self.qkv.resize(r * 3 * d, 0.0);
        self.att.resize(r * d, 0.0);
        self.h13.resize(r * 2 * f, 0.0);
        self.act.resize(r * f, 0.0);
        for (li, (w, cache)) in self.blocks.iter().zip(self.caches.iter_mut()).enumerate() {
            if let Some(inj) = injections {
                for (a, b) in x.iter_mut().zip(&inj[li * r * d..(li + 1) * r * d]) {
                    *a += b;
                }
            }
            // RMSNorm + qkv.
            w.attn_norm.run(x, &mut self.xn);
            w.wqkv.run(&self.xn, r, &mut self.qkv);
            // RoPE on q and k, in place.
            for (tok, row) in self.qkv.chunks_mut(3 * d).enumerate() {
                let t = tok % table;
                let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                for head in row[..2 * d].chunks_mut(2 * half) {
                    for i in 0..half {
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = x0 * c[i] - x1 * s[i];
                        head[2 * i + 1] = x1 * c[i] + x0 * s[i];
                    }
                }
            }
            // Append k, v; attend over each row's cache.
            cache.step_into(rows, &self.qkv, &self.qkv[d..], &self.qkv[2 * d..], 3 * d, &mut self.att)?;
            // Output projection + residual.
            w.wo.run(&self.att, r, &mut self.xn);
            for (a, b) in self.xn.iter_mut().zip(x.iter()) {
                *a += b;
            }
            std::mem::swap(x, &mut self.xn);
            // RMSNorm + [w1; w3], SwiGLU, w2 + residual.
            w.ffn_norm.run(x, &mut self.xn);
            w.w13.run(&self.xn, r, &mut self.h13);
            for (o, hr) in self.act.chunks_mut(f).zip(self.h13.chunks(2 * f)) {
                let (a, g) = hr.split_at(f);
                for j in 0..f {
                    o[j] = a[j] * math::sigmoid(a[j]) * g[j];
                }
            }
            w.w2.run(&self.act, r, &mut self.xn);
            for (a, b) in self.xn.iter_mut().zip(x.iter()) {
                *a += b;
            }
            std::mem::swap(x, &mut self.xn);
        }
        Ok(())
    }
}
