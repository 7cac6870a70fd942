//! Multi-head attention (design §3): fused bias-free `wqkv` (rows q|k|v), RoPE on q and k,
//! softmax(qkᵀ/√d) with a mask, bias-free `wo`; a KV cache for incremental decoding.
//!
//! Masks ([`AttnMask`]): causal over the whole sequence, none (a cached decode step sees every
//! cached key), or causal within segments of one packed sequence (block-diagonal causal: packed
//! training of images with different lengths).
//!
//! # Shapes
//! x (B, T, D); q, k, v (B, H, T, d); cache (B, H, T_cache, d).

use candle_core::{Tensor, D};

use super::rope::{self, RopeRows};
use super::{Linear, NnError, Ops, Result, INIT_STD};
use crate::params::{Init, Pb};

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Query i sees keys ≤ its absolute position (cached keys count from 0).
    Causal,
    /// Every key (a one-token decode step over a cache).
    None,
    /// One packed sequence (B = 1) made of consecutive segments `(start, len)`; causal within
    /// each segment, nothing across: a block-diagonal causal mask.
    Segments(Vec<(usize, usize)>),
}

/// Cached keys and values of one attention layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: candle_nn::kv_cache::Cache,
    v: candle_nn::kv_cache::Cache,
}

impl KvCache {
    pub fn new(max_len: usize) -> Self {
        Self { k: candle_nn::kv_cache::Cache::new(2, max_len), v: candle_nn::kv_cache::Cache::new(2, max_len) }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.current_seq_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.k.append(&k.contiguous()?)?;
        self.v.append(&v.contiguous()?)?;
        let k = self.k.current_data()?.ok_or_else(|| NnError::BadConfig("empty cache after append".into()))?;
        let v = self.v.current_data()?.ok_or_else(|| NnError::BadConfig("empty cache after append".into()))?;
        Ok((k, v))
    }
}

/// A KV cache whose batch rows advance independently (DPAR's patch transformer: each image
/// closes patches at its own pace). Plain host memory: rows are written in place, and a step's
/// attention reads each row's own prefix. Keys are stored transposed (per row and head,
/// d × max_len), so the scores of a query against every cached key are d contiguous
/// multiply-adds over positions, with no horizontal sums. Inference only (no gradients).
///
/// [`RaggedKvCache::on_device`] keeps the keys and values in device tensors instead (the
/// device-native path: written in place with `scatter_set`, read with a fixed number of batch
/// ops per step); [`RaggedKvCache::step_tensors`] serves both.
#[derive(Debug, Clone)]
pub struct RaggedKvCache {
    heads: usize,
    head_dim: usize,
    max_len: usize,
    /// (row, head, d, max_len).
    kt: Vec<f32>,
    /// (row, head, max_len, d).
    v: Vec<f32>,
    lens: Vec<usize>,
    /// Device keys and values, each (row·max_len, H·d), when the cache lives on the device.
    device: Option<(Tensor, Tensor)>,
}

impl RaggedKvCache {
    pub fn new(batch: usize, heads: usize, head_dim: usize, max_len: usize) -> Self {
        let n = batch * heads * max_len * head_dim;
        Self { heads, head_dim, max_len, kt: vec![0.0; n], v: vec![0.0; n], lens: vec![0; batch], device: None }
    }

    /// A cache whose keys and values are tensors on `device` (f32).
    pub fn on_device(
        batch: usize,
        heads: usize,
        head_dim: usize,
        max_len: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let zeros = || Tensor::zeros((batch * max_len, heads * head_dim), candle_core::DType::F32, device);
        Ok(Self {
            heads,
            head_dim,
            max_len,
            kt: Vec::new(),
            v: Vec::new(),
            lens: vec![0; batch],
            device: Some((zeros()?, zeros()?)),
        })
    }

    /// The cache a model with kernels `ops` on `device` uses: host memory for the CPU kernels,
    /// device tensors for candle's ops (any device, and the CPU with `Ops::Stock`).
    pub fn for_ops(
        batch: usize,
        heads: usize,
        head_dim: usize,
        max_len: usize,
        ops: super::Ops,
        device: &candle_core::Device,
    ) -> Result<Self> {
        match ops {
            super::Ops::Stock => Self::on_device(batch, heads, head_dim, max_len, device),
            _ => Ok(Self::new(batch, heads, head_dim, max_len)),
        }
    }

    /// One step for the listed rows from tensors q, k, v (R, H, 1, d): appends k and v at each
    /// row's next position and returns the attention output (R, 1, H·d) over each row's prefix.
    pub fn step_tensors(&mut self, rows: &[usize], q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (r, h, _, d) = q.dims4()?;
        let (dim, dtype) = (h * d, q.dtype());
        let Some((kc, vc)) = self.device.clone() else {
            let host = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let out = self.step(rows, &host(q)?, &host(k)?, &host(v)?, dim)?;
            return Ok(Tensor::from_vec(out, (r, 1, dim), q.device())?.to_dtype(q.dtype())?);
        };
        let mut slots = Vec::with_capacity(r);
        for &row in rows {
            if row >= self.lens.len() {
                return Err(NnError::BadConfig(format!("ragged cache has no row {row}")));
            }
            let pos = self.lens[row];
            if pos >= self.max_len {
                return Err(NnError::BadConfig(format!("ragged cache row {row} is full ({} positions)", self.max_len)));
            }
            slots.push((row * self.max_len + pos) as u32);
            self.lens[row] = pos + 1;
        }
        let dev = q.device();
        // Write in place: cache[slot_i][j] = new_i[j].
        let index = Tensor::from_vec(slots.iter().flat_map(|&s| std::iter::repeat_n(s, dim)).collect(), (r, dim), dev)?;
        let flat = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(candle_core::DType::F32)?.transpose(1, 2)?.contiguous()?.reshape((r, dim))?)
        };
        kc.scatter_set(&index, &flat(k)?, 0)?;
        vc.scatter_set(&index, &flat(v)?, 0)?;
        // Each row's whole cache (R, H, max_len, d), padding beyond its length masked with −∞.
        let rows_t = Tensor::from_vec(rows.iter().map(|&x| x as u32).collect::<Vec<_>>(), r, dev)?;
        let gather = |c: &Tensor| -> Result<Tensor> {
            Ok(c.reshape((self.lens.len(), self.max_len, h, d))?
                .index_select(&rows_t, 0)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (ks, vs) = (gather(&kc)?, gather(&vc)?);
        let (max_len, lens) = (self.max_len, &self.lens);
        let bias: Vec<f32> = rows
            .iter()
            .flat_map(|&row| (0..max_len).map(move |p| if p < lens[row] { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let bias = Tensor::from_vec(bias, (r, 1, 1, self.max_len), dev)?;
        let q = q.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let scores = (q.matmul(&ks.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&bias)?; // (R, H, 1, L)
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&vs)?; // (R, H, 1, d)
        Ok(out.transpose(1, 2)?.contiguous()?.reshape((r, 1, dim))?.to_dtype(dtype)?)
    }

    /// Cached positions of batch row `row`.
    pub fn len_of(&self, row: usize) -> usize {
        self.lens[row]
    }

    fn at(&self, row: usize, head: usize, pos: usize) -> usize {
        ((row * self.heads + head) * self.max_len + pos) * self.head_dim
    }

    /// Appends one position per listed row and returns the attention output (R, H·d) of each
    /// query over its row's cached keys (itself included). Row i's q, k and v start at
    /// `q[i·stride]`, `k[i·stride]`, `v[i·stride]` (stride H·d for separate arrays, 3·H·d for a
    /// fused qkv buffer).
    pub fn step(&mut self, rows: &[usize], q: &[f32], k: &[f32], v: &[f32], stride: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; rows.len() * self.heads * self.head_dim];
        self.step_into(rows, q, k, v, stride, &mut out)?;
        Ok(out)
    }

    /// [`Self::step`] writing the output into `out` (R·H·d, overwritten), for callers that keep
    /// their buffers between steps.
    pub fn step_into(
        &mut self,
        rows: &[usize],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (h, d) = (self.heads, self.head_dim);
        if self.device.is_some() {
            return Err(NnError::BadConfig("a device ragged cache steps through step_tensors".into()));
        }
        if out.len() != rows.len() * h * d {
            return Err(NnError::BadConfig(format!(
                "ragged cache step: output of {} values for {} rows × {}",
                out.len(),
                rows.len(),
                h * d
            )));
        }
        let dim = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        for (i, &row) in rows.iter().enumerate() {
            if row >= self.lens.len() {
                return Err(NnError::BadConfig(format!("ragged cache has no row {row}")));
            }
            let pos = self.lens[row];
            if pos >= self.max_len {
                return Err(NnError::BadConfig(format!("ragged cache row {row} is full ({} positions)", self.max_len)));
            }
            for hi in 0..h {
                let src = i * stride + hi * d;
                let dst = self.at(row, hi, pos);
                self.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
                let kt = self.at(row, hi, 0);
                for (j, &kv) in k[src..src + d].iter().enumerate() {
                    self.kt[kt + j * self.max_len + pos] = kv;
                }
            }
            self.lens[row] = pos + 1;
        }
        // Each (row, head) attends over its own prefix; rows are independent.
        use rayon::prelude::*;
        let this = &*self;
        let attend = |(i, o): (usize, &mut [f32])| {
            let row = rows[i];
            let len = this.lens[row];
            let mut scores = vec![0f32; len];
            for hi in 0..h {
                let qv = &q[i * stride + hi * d..i * stride + (hi + 1) * d];
                let base = this.at(row, hi, 0);
                let block = this.max_len * d;
                attend_one(
                    qv,
                    &this.kt[base..base + block],
                    &this.v[base..base + block],
                    this.max_len,
                    scale,
                    &mut scores,
                    &mut o[hi * d..(hi + 1) * d],
                );
            }
        };
        // A decode step of a few rows is cheaper than waking the thread pool.
        let work: usize = rows.iter().map(|&r| self.lens[r]).sum::<usize>() * dim;
        if rows.len() > 1 && work >= ATTEND_PARALLEL_WORK && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(dim).enumerate().for_each(attend);
        } else {
            out.chunks_mut(dim).enumerate().for_each(attend);
        }
        Ok(())
    }
}

/// Cached positions × width, summed over the step's rows, from which a decode step's attention is
/// spread over the thread pool. Below it, waking the pool costs more than the split saves (the
/// same trade as `kernels::matmul`'s small-m threshold; README, "Small batches").
const ATTEND_PARALLEL_WORK: usize = 1 << 18;

/// Head dims per register block of the decode output (head dims other than 16, 32, 64).
const DB: usize = 16;

crate::kernels::isa::multiversion! {
    /// One query over one (row, head) of the cache. Scores: one sequential pass over each of the d
    /// rows of the transposed keys `kt` (d × max_len), fused multiply-adds into the scores (which
    /// stay in L1), so the cache streams front to back. Softmax. Output: one pass over the values
    /// with the whole head's accumulator in registers (head dims 16, 32, 64; other sizes in blocks
    /// of 16). `out` (d) is overwritten; `scores` has the row's length.
    fn attend_one<const FMA: bool>(
        q: &[f32],
        kt: &[f32],
        v: &[f32],
        max_len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        use crate::kernels::isa::fmadd;
        use crate::kernels::math;
        let (d, len) = (q.len(), scores.len());
        scores.fill(0.0);
        for (j, &qj) in q.iter().enumerate() {
            for (sc, &kv) in scores.iter_mut().zip(&kt[j * max_len..j * max_len + len]) {
                *sc = fmadd::<FMA>(qj, kv, *sc);
            }
        }
        let m = math::max(scores) * scale;
        for sc in scores.iter_mut() {
            *sc = math::exp(*sc * scale - m);
        }
        let inv = 1.0 / math::sum(scores);
        for sc in scores.iter_mut() {
            *sc *= inv;
        }
        match d {
            16 => values::<FMA, 16>(scores, v, out),
            32 => values::<FMA, 32>(scores, v, out),
            64 => values::<FMA, 64>(scores, v, out),
            _ => {
                for d0 in (0..d).step_by(DB) {
                    let n = DB.min(d - d0);
                    let mut acc = [0f32; DB];
                    for (t, &w) in scores.iter().enumerate() {
                        for (a, &x) in acc[..n].iter_mut().zip(&v[t * d + d0..t * d + d0 + n]) {
                            *a = fmadd::<FMA>(w, x, *a);
                        }
                    }
                    out[d0..d0 + n].copy_from_slice(&acc[..n]);
                }
            }
        }
    }
}

/// Σ_t w_t·v_t for a head of D dims, the accumulator in registers.
#[inline(always)]
fn values<const FMA: bool, const D: usize>(w: &[f32], v: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; D];
    for (t, &wt) in w.iter().enumerate() {
        let vr: &[f32; D] = v[t * D..(t + 1) * D].try_into().expect("D values");
        for (a, &x) in acc.iter_mut().zip(vr) {
            *a = crate::kernels::isa::fmadd::<FMA>(wt, x, *a);
        }
    }
    out[..D].copy_from_slice(&acc);
}

/// Additive causal mask (T_q, T_k) for queries at absolute positions offset..offset+T_q.
pub fn causal_mask(t_q: usize, t_k: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..t_q).flat_map(|i| (0..t_k).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(mask, (t_q, t_k), device)?)
}

/// softmax(q·kᵀ·scale + mask)·v, composed from differentiable candle ops.
/// `mask` is additive, broadcast over (B, H).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    // Half-precision scores (bf16 under mixed precision) go through the softmax in f32.
    let probs = candle_nn::ops::softmax(&crate::nn::widen(&scores)?, D::Minus1)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Causal attention within each segment of one packed sequence, as one padded batch of
/// differentiable candle ops (the device-native path: a fixed number of ops, however many
/// segments): rows gathered to (S, H, L_max, d), a causal mask plus −∞ on padded keys, and the
/// real rows gathered back.
/// # Shapes
/// q, k, v (1, H, T, d) with segments tiling T → (1, H, T, d)
pub fn segment_causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (_, h, t, d) = q.dims4()?;
    let s = segments.len();
    let padded = crate::kernels::segment::PaddedSegments::new(segments, q.device())?;
    let l = padded.max_len;
    let slots = |x: &Tensor| -> Result<Tensor> {
        // (1, H, T, d) → (H, S·L, d) → (H, S, L, d) → (S, H, L, d)
        Ok(x.squeeze(0)?.index_select(&padded.gather, 1)?.reshape((h, s, l, d))?.transpose(0, 1)?.contiguous()?)
    };
    let mask = causal_mask(l, l, 0, q.device())?.broadcast_add(&padded.bias.reshape((s, 1, l))?)?; // (S, L, L)
    let out = sdpa(&slots(q)?, &slots(k)?, &slots(v)?, Some(&mask.unsqueeze(1)?))?; // (S, H, L, d)
                                                                                    // Back to the packed rows: slot (i, j) of segment i holds row start_i + j.
    let back: Vec<u32> =
        segments.iter().enumerate().flat_map(|(i, &(_, len))| (0..len).map(move |j| (i * l + j) as u32)).collect();
    let back = Tensor::from_vec(back, t, q.device())?;
    let out = out.transpose(0, 1)?.contiguous()?.reshape((h, s * l, d))?.index_select(&back, 1)?; // (H, T, d)
    Ok(out.unsqueeze(0)?)
}

/// Multi-head self-attention with LlamaGen's parameter names (`wqkv`, `wo`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub wqkv: Linear,
    pub wo: Linear,
    pub n_head: usize,
    pub head_dim: usize,
    pub ops: Ops,
}

impl Attention {
    pub fn new(pb: &Pb, dim: usize, n_head: usize, ops: Ops) -> Result<Self> {
        if n_head == 0 || !dim.is_multiple_of(n_head) {
            return Err(NnError::BadConfig(format!("width {dim} is not divisible by {n_head} heads")));
        }
        Ok(Self {
            wqkv: Linear::new(&pb.pp("wqkv"), dim, 3 * dim, Init::Normal(INIT_STD))?.with_ops(ops),
            wo: Linear::new(&pb.pp("wo"), dim, dim, Init::Normal(INIT_STD))?.with_ops(ops),
            n_head,
            head_dim: dim / n_head,
            ops,
        })
    }

    /// (B, T, D) → q, k, v as (B, H, T, d), RoPE applied to q and k.
    fn qkv(&self, x: &Tensor, rope_rows: Option<&RopeRows>) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, dim) = x.dims3()?;
        let qkv = self.wqkv.forward(x)?; // (B, T, 3D)
        let split = |i: usize| -> Result<Tensor> {
            // (B, T, D) → (B, T, H, d) → (B, H, T, d)
            Ok(qkv
                .narrow(2, i * dim, dim)?
                .reshape((b, t, self.n_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (mut q, mut k, v) = (split(0)?, split(1)?, split(2)?);
        if let Some(rows) = rope_rows {
            q = rope::apply(&q, rows)?;
            k = rope::apply(&k, rows)?;
        }
        Ok((q, k, v))
    }

    /// One decoding step for a subset of the rows of a ragged cache: `x` holds one token for each
    /// of `rows` (in that order), `rope_rows` one rotation row per token.
    /// # Shapes
    /// x (R, 1, D) → (R, 1, D)
    pub fn forward_ragged(
        &self,
        x: &Tensor,
        rope_rows: &RopeRows,
        cache: &mut RaggedKvCache,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (r, t, _) = x.dims3()?;
        if t != 1 || r != rows.len() {
            return Err(NnError::BadConfig(format!(
                "ragged step takes one token for each of {} rows, got {:?}",
                rows.len(),
                x.dims()
            )));
        }
        let (q, k, v) = self.qkv(x, Some(rope_rows))?; // (R, H, 1, d)
        let out = cache.step_tensors(rows, &q, &k, &v)?.to_dtype(x.dtype())?; // (R, 1, H·d)
        self.wo.forward(&out)
    }

    /// # Shapes
    /// x (B, T, D) → (B, T, D)
    pub fn forward(
        &self,
        x: &Tensor,
        rope_rows: Option<&RopeRows>,
        mask: &AttnMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, dim) = x.dims3()?;
        // Full sequences without a cache go through the flash kernel on the fused qkv layout.
        if cache.is_none() && self.ops.fused_for(x) {
            let segments = match mask {
                AttnMask::Causal => Some(crate::kernels::attention::causal_segments(b, t)),
                AttnMask::Segments(s) if b == 1 => Some(s.clone()),
                _ => None,
            };
            if let Some(segments) = segments {
                let mut qkv = self.wqkv.forward(&x.reshape((b * t, dim))?)?; // (B·T, 3D)
                if let Some(rows) = rope_rows {
                    qkv = rope::apply_qkv(&qkv, rows, self.n_head)?;
                }
                let out = crate::kernels::attention::flash_attention(&qkv, self.n_head, &segments)?; // (B·T, D)
                return self.wo.forward(&out.reshape((b, t, dim))?);
            }
        }
        let (q, k, v) = self.qkv(x, rope_rows)?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let out = match mask {
            AttnMask::None => sdpa(&q, &k, &v, None)?,
            AttnMask::Causal => {
                let t_k = k.dim(2)?;
                let m = if t == 1 && t_k == offset + 1 { None } else { Some(causal_mask(t, t_k, offset, x.device())?) };
                sdpa(&q, &k, &v, m.as_ref())?
            }
            AttnMask::Segments(segments) => {
                if b != 1 || offset != 0 {
                    return Err(NnError::BadConfig(
                        "segment masks need one packed sequence (B = 1) and no cache".into(),
                    ));
                }
                let mut expected = 0;
                for &(start, len) in segments {
                    if start != expected {
                        return Err(NnError::BadConfig(format!(
                            "segments must tile the sequence: expected start {expected}, got {start}"
                        )));
                    }
                    expected = start + len;
                }
                if expected != t {
                    return Err(NnError::BadConfig(format!("segments cover {expected} of {t} positions")));
                }
                segment_causal_sdpa(&q, &k, &v, segments)?
            }
        };
        // (B, H, T, d) → (B, T, H·d)
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, t, dim))?;
        self.wo.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::tests::{check_gradient, rand_var};
    use crate::params::ParamStore;
    use candle_core::{DType, Device};

    fn attention_f64(dim: usize, heads: usize) -> Attention {
        let store = ParamStore::new(1, &Device::Cpu);
        let mut a = Attention::new(&store.root(), dim, heads, Ops::Stock).unwrap();
        a.wqkv.weight = rand_var(&[3 * dim, dim], 7).as_tensor().affine(0.3, 0.0).unwrap();
        a.wo.weight = rand_var(&[dim, dim], 8).as_tensor().affine(0.3, 0.0).unwrap();
        a
    }

    /// Attention (f64, composed reference rotation) and the f32 RoPE kernel pass finite
    /// differences.
    #[test]
    fn attention_and_rope_gradients_match_finite_differences() {
        let att = attention_f64(8, 2);
        let table = rope::table_2d(2, 4, 10000.0, 1);
        let probe = rand_var(&[2, 5, 8], 9);
        let x = rand_var(&[2, 5, 8], 10);
        check_gradient(
            &x,
            &|x| {
                (att.forward(x, Some(&table), &AttnMask::Causal, None).unwrap() * probe.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
            },
            2e-3,
        );

        let x32 = candle_core::Var::from_tensor(&rand_var(&[1, 2, 5, 4], 11).as_tensor().to_dtype(DType::F32).unwrap())
            .unwrap();
        let probe32 = rand_var(&[1, 2, 5, 4], 12).as_tensor().to_dtype(DType::F32).unwrap();
        check_gradient(&x32, &|x| (rope::apply(x, &table).unwrap() * &probe32).unwrap().sum_all().unwrap(), 2e-2);
    }

    /// Causal masking: perturbing the last token changes no earlier output.
    #[test]
    fn causal_attention_ignores_future_tokens() {
        let att = attention_f64(8, 2);
        let x = rand_var(&[1, 6, 8], 1).as_tensor().clone();
        let y = att.forward(&x, None, &AttnMask::Causal, None).unwrap();
        let mut v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[5 * 8] += 1.0;
        let x2 = Tensor::from_vec(v, (1, 6, 8), &Device::Cpu).unwrap();
        let y2 = att.forward(&x2, None, &AttnMask::Causal, None).unwrap();
        let d = (y.narrow(1, 0, 5).unwrap() - y2.narrow(1, 0, 5).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    /// A packed sequence with segment masks equals running each segment alone, and the cache
    /// gives the same outputs one token at a time.
    #[test]
    fn segments_equal_separate_sequences_and_cache_equals_full() {
        let att = attention_f64(8, 2);
        let a = rand_var(&[1, 3, 8], 2).as_tensor().clone();
        let b = rand_var(&[1, 4, 8], 3).as_tensor().clone();
        let packed = Tensor::cat(&[&a, &b], 1).unwrap();
        let ya = att.forward(&a, None, &AttnMask::Causal, None).unwrap();
        let yb = att.forward(&b, None, &AttnMask::Causal, None).unwrap();
        let yp = att.forward(&packed, None, &AttnMask::Segments(vec![(0, 3), (3, 4)]), None).unwrap();
        let d = (Tensor::cat(&[&ya, &yb], 1).unwrap() - &yp)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{d}");

        let mut cache = KvCache::new(8);
        let steps: Vec<Tensor> = (0..4)
            .map(|i| att.forward(&b.narrow(1, i, 1).unwrap(), None, &AttnMask::Causal, Some(&mut cache)).unwrap())
            .collect();
        let d = (Tensor::cat(&steps, 1).unwrap() - &yb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{d}");
        assert!(att.forward(&packed, None, &AttnMask::Segments(vec![(0, 3)]), None).is_err());
    }

    /// Rows of a ragged cache advancing at different times give each row's causal outputs.
    #[test]
    fn ragged_cache_rows_advance_independently() {
        let store = ParamStore::new(1, &Device::Cpu);
        let att = Attention::new(&store.root(), 8, 2, Ops::Fused).unwrap();
        let seq = |seed| rand_var(&[1, 3, 8], seed).as_tensor().to_dtype(DType::F32).unwrap();
        let (a, b) = (seq(20), seq(21));
        let table = rope::table_2d(2, 4, 10000.0, 1);
        let ya = att.forward(&a, Some(&table.narrow(0, 3)), &AttnMask::Causal, None).unwrap();
        let yb = att.forward(&b, Some(&table.narrow(0, 3)), &AttnMask::Causal, None).unwrap();
        // The host cache and the device-tensor cache (the device-native path) alike.
        for mut cache in [RaggedKvCache::new(2, 2, 4, 4), RaggedKvCache::on_device(2, 2, 4, 4, &Device::Cpu).unwrap()] {
            // Schedule: a0 b0 | a1 | a2 b1 | b2
            let mut got_a = Vec::new();
            let mut got_b = Vec::new();
            for (ia, ib) in [(Some(0), Some(0)), (Some(1), None), (Some(2), Some(1)), (None, Some(2))] {
                let mut rows = Vec::new();
                let mut xs = Vec::new();
                let mut rope_rows = Vec::new();
                if let Some(i) = ia {
                    rows.push(0);
                    xs.push(a.narrow(1, i, 1).unwrap());
                    rope_rows.push(i);
                }
                if let Some(i) = ib {
                    rows.push(1);
                    xs.push(b.narrow(1, i, 1).unwrap());
                    rope_rows.push(i);
                }
                let y = att
                    .forward_ragged(&Tensor::cat(&xs, 0).unwrap(), &table.select(&rope_rows), &mut cache, &rows)
                    .unwrap();
                for (j, &r) in rows.iter().enumerate() {
                    let yj = y.narrow(0, j, 1).unwrap();
                    if r == 0 {
                        got_a.push(yj)
                    } else {
                        got_b.push(yj)
                    }
                }
            }
            let diff = |g: &[Tensor], want: &Tensor| {
                (Tensor::cat(g, 1).unwrap() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(&got_a, &ya) < 1e-5 && diff(&got_b, &yb) < 1e-5);
            assert_eq!((cache.len_of(0), cache.len_of(1)), (3, 3));
        }
    }
}
