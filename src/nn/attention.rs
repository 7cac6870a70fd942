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

/// The precision of a host KV cache's keys and values. The attention over them computes in
/// f32 either way; bf16 halves the bytes a decode step streams (design §6, "Sampling cost").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvPrecision {
    /// Keys and values as computed.
    #[default]
    F32,
    /// Keys and values rounded to bf16 (round to nearest even) when appended.
    Bf16,
}

impl KvPrecision {
    pub fn name(self) -> &'static str {
        match self {
            KvPrecision::F32 => "f32",
            KvPrecision::Bf16 => "bf16",
        }
    }

    /// Bytes per cached key or value element.
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for KvPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvPrecision::F32),
            "bf16" => Ok(KvPrecision::Bf16),
            other => Err(format!("unknown KV-cache precision `{other}`: expected f32 or bf16")),
        }
    }
}

/// Positions per key block of a host [`RaggedKvCache`]: one 16-lane f32 vector of scores.
pub const KEY_BLOCK: usize = 16;

/// A cached key or value element: f32, or bf16 bits.
pub(crate) trait KvElem: Copy + Default + Send + Sync + 'static {
    fn load(self) -> f32;
    fn store(x: f32) -> Self;
    /// One query row (all heads) over one cache row: `kb` holds ⌈len/16⌉ key blocks
    /// (head, d, 16), `v` len positions (head, d). Scores of a block are 16-lane fused
    /// multiply-add chains over d (element by element, the chain of a dot product in order),
    /// then a softmax per head, then the values in one pass over the positions with the
    /// output accumulated in registers. `scores` holds H × (len rounded up to a block); `out`
    /// (H·d) is overwritten. Compiled per ISA level, chosen once per row.
    #[allow(clippy::too_many_arguments)]
    fn attend_row(
        q: &[f32],
        kb: &[Self],
        v: &[Self],
        heads: usize,
        len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    );
}

impl KvElem for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
    fn attend_row(q: &[f32], kb: &[f32], v: &[f32], h: usize, len: usize, s: f32, sc: &mut [f32], out: &mut [f32]) {
        attend_row_f32(q, kb, v, (h, len, s), sc, out)
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        crate::kernels::bf16::to_bf16(x)
    }
    fn attend_row(q: &[f32], kb: &[u16], v: &[u16], h: usize, len: usize, s: f32, sc: &mut [f32], out: &mut [f32]) {
        attend_row_bf16(q, kb, v, (h, len, s), sc, out)
    }
}

/// Host keys and values of every row: keys in blocks of [`KEY_BLOCK`] positions, each block
/// (head, d, 16) so that a block's scores for one head are d multiply-adds of 16-lane vectors;
/// values (position, head, d). Per row, both are contiguous from position 0, so a step reads
/// each row's cache front to back, all heads in one pass.
#[derive(Debug, Clone)]
enum HostKv {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<u16>, v: Vec<u16> },
}

/// A KV cache whose batch rows advance independently (DPAR's patch transformer: each image
/// closes patches at its own pace; every decode step of a batch). Plain host memory, f32 or
/// bf16 ([`KvPrecision`]): rows are written in place, and a step's attention reads each row's
/// own prefix, all heads in one contiguous pass (layout in [`HostKv`]). Inference only (no
/// gradients).
///
/// [`RaggedKvCache::on_device`] keeps the keys and values in device tensors instead (the
/// device-native path: written in place with `scatter_set`, read with a fixed number of batch
/// ops per step); [`RaggedKvCache::step_tensors`] serves both.
#[derive(Debug, Clone)]
pub struct RaggedKvCache {
    heads: usize,
    head_dim: usize,
    max_len: usize,
    host: HostKv,
    lens: Vec<usize>,
    /// Scores of one row (H × max_len rounded up to whole key blocks), for serial steps.
    scores: Vec<f32>,
    /// Device keys and values, each (row·max_len, H·d), when the cache lives on the device.
    device: Option<(Tensor, Tensor)>,
}

impl RaggedKvCache {
    /// An f32 host cache.
    pub fn new(batch: usize, heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self::with_precision(batch, heads, head_dim, max_len, KvPrecision::F32)
    }

    /// A host cache whose keys and values are stored at `precision`.
    pub fn with_precision(batch: usize, heads: usize, head_dim: usize, max_len: usize, precision: KvPrecision) -> Self {
        let padded = max_len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let (nk, nv) = (batch * padded * heads * head_dim, batch * max_len * heads * head_dim);
        let host = match precision {
            KvPrecision::F32 => HostKv::F32 { k: vec![0.0; nk], v: vec![0.0; nv] },
            KvPrecision::Bf16 => HostKv::Bf16 { k: vec![0; nk], v: vec![0; nv] },
        };
        Self { heads, head_dim, max_len, host, lens: vec![0; batch], scores: vec![0.0; heads * padded], device: None }
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
            host: HostKv::F32 { k: Vec::new(), v: Vec::new() },
            lens: vec![0; batch],
            scores: Vec::new(),
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

    /// The precision of the host keys and values.
    pub fn precision(&self) -> KvPrecision {
        match self.host {
            HostKv::F32 { .. } => KvPrecision::F32,
            HostKv::Bf16 { .. } => KvPrecision::Bf16,
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

    /// Rows the cache holds.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Forgets row `row`'s positions (a new sequence starts there; `dpar serve` reuses rows).
    pub fn clear_row(&mut self, row: usize) {
        if let Some(len) = self.lens.get_mut(row) {
            *len = 0;
        }
    }

    /// Keeps only the first `len` positions of row `row` (no-op when it holds fewer): a step
    /// taken speculatively is undone, and the next step writes over it.
    pub fn truncate_row(&mut self, row: usize, len: usize) {
        if let Some(n) = self.lens.get_mut(row) {
            *n = (*n).min(len);
        }
    }

    /// Key and value elements per row (padded key blocks included).
    fn row_sizes(&self) -> (usize, usize) {
        let dim = self.heads * self.head_dim;
        (self.max_len.div_ceil(KEY_BLOCK) * KEY_BLOCK * dim, self.max_len * dim)
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
    /// their buffers between steps. Rows are spread over the thread pool when there is enough
    /// work and [`crate::kernels::threads`] allows it; otherwise the step allocates nothing.
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
        for &row in rows {
            if row >= self.lens.len() {
                return Err(NnError::BadConfig(format!("ragged cache has no row {row}")));
            }
            if self.lens[row] >= self.max_len {
                return Err(NnError::BadConfig(format!("ragged cache row {row} is full ({} positions)", self.max_len)));
            }
        }
        let (rk, rv) = self.row_sizes();
        for (i, &row) in rows.iter().enumerate() {
            let pos = self.lens[row];
            let (kr, vr) = (&k[i * stride..i * stride + dim], &v[i * stride..i * stride + dim]);
            let kb = row * rk + (pos / KEY_BLOCK) * KEY_BLOCK * dim + pos % KEY_BLOCK;
            let vb = row * rv + pos * dim;
            match &mut self.host {
                HostKv::F32 { k, v } => append(k, v, kb, vb, kr, vr),
                HostKv::Bf16 { k, v } => append(k, v, kb, vb, kr, vr),
            }
            self.lens[row] = pos + 1;
        }
        let positions: usize = rows.iter().map(|&r| self.lens[r]).sum();
        let work = positions * dim;
        // Keys and values read, and the products qkᵀ and pv (2 FLOPs per multiply-add each).
        crate::kernels::count_traffic(0, (2 * work * self.precision().bytes()) as u64, (4 * work) as u64);
        let parallel = rows.len() > 1 && work >= ATTEND_PARALLEL_WORK && crate::kernels::threads() > 1;
        let scale = 1.0 / (d as f32).sqrt();
        let (lens, max_len) = (&self.lens, self.max_len);
        match &self.host {
            HostKv::F32 { k, v } => {
                attend_rows(k, v, lens, rows, q, stride, (h, d, max_len, scale), parallel, &mut self.scores, out)
            }
            HostKv::Bf16 { k, v } => {
                attend_rows(k, v, lens, rows, q, stride, (h, d, max_len, scale), parallel, &mut self.scores, out)
            }
        }
        Ok(())
    }
}

/// Writes one position's key (into its block's lane) and value.
fn append<E: KvElem>(kc: &mut [E], vc: &mut [E], kb: usize, vb: usize, k: &[f32], v: &[f32]) {
    for (j, &x) in k.iter().enumerate() {
        kc[kb + j * KEY_BLOCK] = E::store(x);
    }
    for (o, &x) in vc[vb..vb + v.len()].iter_mut().zip(v) {
        *o = E::store(x);
    }
}

/// Every listed row's attention, serially (into `scratch`) or spread over the pool.
#[allow(clippy::too_many_arguments)]
fn attend_rows<E: KvElem>(
    kc: &[E],
    vc: &[E],
    lens: &[usize],
    rows: &[usize],
    q: &[f32],
    stride: usize,
    (h, d, max_len, scale): (usize, usize, usize, f32),
    parallel: bool,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dim = h * d;
    let padded = max_len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
    let (rk, rv) = (padded * dim, max_len * dim);
    let one = |i: usize, o: &mut [f32], scores: &mut [f32]| {
        let (row, len) = (rows[i], lens[rows[i]]);
        let blocks = len.div_ceil(KEY_BLOCK);
        E::attend_row(
            &q[i * stride..i * stride + dim],
            &kc[row * rk..row * rk + blocks * KEY_BLOCK * dim],
            &vc[row * rv..row * rv + len * dim],
            h,
            len,
            scale,
            &mut scores[..h * blocks * KEY_BLOCK],
            o,
        );
    };
    if parallel {
        use rayon::prelude::*;
        out.par_chunks_mut(dim)
            .enumerate()
            .for_each_init(|| vec![0f32; h * padded], |scores, (i, o)| one(i, o, scores));
    } else {
        scratch.resize(h * padded, 0.0);
        for (i, o) in out.chunks_mut(dim).enumerate() {
            one(i, o, scratch);
        }
    }
}

/// Cached positions × width, summed over the step's rows, from which a decode step's attention is
/// spread over the thread pool. Below it, waking the pool costs more than the split saves (the
/// same trade as `kernels::matmul`'s small-m threshold).
const ATTEND_PARALLEL_WORK: usize = 1 << 18;

crate::kernels::isa::multiversion! {
    /// [`KvElem::attend_row`] over an f32 cache.
    fn attend_row_f32<const FMA: bool>(
        q: &[f32], kb: &[f32], v: &[f32], shape: (usize, usize, f32), scores: &mut [f32], out: &mut [f32],
    ) {
        let (heads, len, scale) = shape;
        attend_row_body::<FMA, f32>(q, kb, v, heads, len, scale, scores, out)
    }
}

crate::kernels::isa::multiversion! {
    /// [`KvElem::attend_row`] over a bf16 cache.
    fn attend_row_bf16<const FMA: bool>(
        q: &[f32], kb: &[u16], v: &[u16], shape: (usize, usize, f32), scores: &mut [f32], out: &mut [f32],
    ) {
        let (heads, len, scale) = shape;
        attend_row_body::<FMA, u16>(q, kb, v, heads, len, scale, scores, out)
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_row_body<const FMA: bool, E: KvElem>(
    q: &[f32],
    kb: &[E],
    v: &[E],
    heads: usize,
    len: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use crate::kernels::isa::fmadd;
    use crate::kernels::math;
    let dim = q.len();
    let d = dim / heads;
    let blocks = len.div_ceil(KEY_BLOCK);
    let span = blocks * KEY_BLOCK;
    // Scores: per block, per head, d broadcast-and-FMA steps over 16 positions.
    for b in 0..blocks {
        let block = &kb[b * KEY_BLOCK * dim..(b + 1) * KEY_BLOCK * dim];
        for hi in 0..heads {
            let mut acc = [0f32; KEY_BLOCK];
            let qh = &q[hi * d..(hi + 1) * d];
            let kh = &block[hi * d * KEY_BLOCK..(hi + 1) * d * KEY_BLOCK];
            for (j, &qj) in qh.iter().enumerate() {
                let kr: &[E; KEY_BLOCK] = kh[j * KEY_BLOCK..(j + 1) * KEY_BLOCK].try_into().expect("a key block row");
                for (a, &kx) in acc.iter_mut().zip(kr) {
                    *a = fmadd::<FMA>(qj, kx.load(), *a);
                }
            }
            scores[hi * span + b * KEY_BLOCK..hi * span + (b + 1) * KEY_BLOCK].copy_from_slice(&acc);
        }
    }
    // Softmax per head over the row's length.
    for hi in 0..heads {
        let sc = &mut scores[hi * span..hi * span + len];
        let m = math::max(sc) * scale;
        for x in sc.iter_mut() {
            *x = math::exp(*x * scale - m);
        }
        let inv = 1.0 / math::sum(sc);
        for x in sc.iter_mut() {
            *x *= inv;
        }
    }
    // Values: one pass over the positions per chunk of whole heads, accumulators in registers.
    match d {
        16 => values_chunks::<FMA, E, 16, 8>(scores, span, v, heads, len, out),
        32 => values_chunks::<FMA, E, 32, 4>(scores, span, v, heads, len, out),
        64 => values_chunks::<FMA, E, 64, 2>(scores, span, v, heads, len, out),
        128 => values_chunks::<FMA, E, 128, 1>(scores, span, v, heads, len, out),
        _ => {
            // Other head sizes (e.g. GPT-3B's 100): 16 dims of one head at a time.
            for hi in 0..heads {
                for d0 in (0..d).step_by(16) {
                    let n = 16.min(d - d0);
                    let mut acc = [0f32; 16];
                    for t in 0..len {
                        let w = scores[hi * span + t];
                        let at = t * dim + hi * d + d0;
                        for (a, x) in acc[..n].iter_mut().zip(&v[at..at + n]) {
                            *a = fmadd::<FMA>(w, x.load(), *a);
                        }
                    }
                    out[hi * d + d0..hi * d + d0 + n].copy_from_slice(&acc[..n]);
                }
            }
        }
    }
}

/// The values of one row for heads of D dims, HC heads (HC·D ≤ 128 accumulators) per pass:
/// out[h] = Σ_t w_{h,t}·v_{t,h}, each element one fused multiply-add chain over t in order.
#[inline(always)]
fn values_chunks<const FMA: bool, E: KvElem, const D: usize, const HC: usize>(
    scores: &[f32],
    span: usize,
    v: &[E],
    heads: usize,
    len: usize,
    out: &mut [f32],
) {
    let dim = heads * D;
    let mut h0 = 0;
    while h0 < heads {
        let hc = HC.min(heads - h0);
        if hc == HC {
            let mut acc = [[0f32; D]; HC];
            for t in 0..len {
                for (hh, a) in acc.iter_mut().enumerate() {
                    let w = scores[(h0 + hh) * span + t];
                    let at = t * dim + (h0 + hh) * D;
                    let vr: &[E; D] = v[at..at + D].try_into().expect("a head of values");
                    for (x, &y) in a.iter_mut().zip(vr) {
                        *x = crate::kernels::isa::fmadd::<FMA>(w, y.load(), *x);
                    }
                }
            }
            for (hh, a) in acc.iter().enumerate() {
                out[(h0 + hh) * D..(h0 + hh + 1) * D].copy_from_slice(a);
            }
        } else {
            for hi in h0..heads {
                let mut acc = [0f32; D];
                for t in 0..len {
                    let w = scores[hi * span + t];
                    let at = t * dim + hi * D;
                    let vr: &[E; D] = v[at..at + D].try_into().expect("a head of values");
                    for (x, &y) in acc.iter_mut().zip(vr) {
                        *x = crate::kernels::isa::fmadd::<FMA>(w, y.load(), *x);
                    }
                }
                out[hi * D..(hi + 1) * D].copy_from_slice(&acc);
            }
        }
        h0 += hc;
    }
}

/// The largest |kernel − reference| / max(1, |reference|) of [`RaggedKvCache`] steps at
/// precision `kv` against attention computed in f64 (on the keys and values the cache holds,
/// i.e. rounded to bf16 for a bf16 cache), over ragged rows (each row advancing at its own
/// pace, several rows per step, lengths up to `max_len`) at head sizes 8, 16, 32, 64 and 100.
/// For tests: run at every ISA level by `tests/isa_fallback.rs`.
pub fn ragged_attention_error(kv: KvPrecision, seed: u64) -> f64 {
    use rand::Rng;
    let mut rng = crate::util::rng_for(seed, "ragged-attention-check", 0);
    let mut worst = 0f64;
    for (heads, d, max_len) in [(3usize, 8usize, 37usize), (8, 16, 40), (4, 32, 33), (2, 64, 70), (2, 100, 20)] {
        let rows = 5;
        let dim = heads * d;
        let mut cache = RaggedKvCache::with_precision(rows, heads, d, max_len, kv);
        let round = |x: f32| match kv {
            KvPrecision::F32 => x,
            KvPrecision::Bf16 => crate::kernels::bf16::from_bf16(crate::kernels::bf16::to_bf16(x)),
        };
        let mut keys: Vec<Vec<f32>> = vec![Vec::new(); rows];
        let mut values: Vec<Vec<f32>> = vec![Vec::new(); rows];
        let mut step = 0;
        while (0..rows).any(|r| cache.len_of(r) < max_len) {
            step += 1;
            // A ragged subset of the rows that still have room.
            let active: Vec<usize> =
                (0..rows).filter(|&r| cache.len_of(r) < max_len && (r + step) % (r % 3 + 1) == 0).collect();
            if active.is_empty() {
                continue;
            }
            let draw = |rng: &mut rand_chacha::ChaCha8Rng, n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
            };
            let (q, k, v) = (
                draw(&mut rng, active.len() * dim),
                draw(&mut rng, active.len() * dim),
                draw(&mut rng, active.len() * dim),
            );
            let got = cache.step(&active, &q, &k, &v, dim).expect("a ragged step");
            for (i, &r) in active.iter().enumerate() {
                keys[r].extend(k[i * dim..(i + 1) * dim].iter().map(|&x| round(x)));
                values[r].extend(v[i * dim..(i + 1) * dim].iter().map(|&x| round(x)));
                let len = keys[r].len() / dim;
                for h in 0..heads {
                    let qh = &q[i * dim + h * d..i * dim + (h + 1) * d];
                    let scores: Vec<f64> = (0..len)
                        .map(|t| {
                            let kt = &keys[r][t * dim + h * d..t * dim + (h + 1) * d];
                            qh.iter().zip(kt).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..d {
                        let want: f64 = (0..len).map(|t| e[t] / z * values[r][t * dim + h * d + j] as f64).sum();
                        let g = got[i * dim + h * d + j] as f64;
                        worst = worst.max((g - want).abs() / want.abs().max(1.0));
                    }
                }
            }
        }
    }
    worst
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

    /// The decode-step attention over ragged rows (all heads in one pass, keys in blocks of
    /// 16) equals attention computed in f64, for f32 and bf16 caches and head sizes with and
    /// without a register-blocked path (other ISA levels: tests/isa_fallback.rs).
    #[test]
    fn ragged_cache_attention_equals_the_f64_reference() {
        for kv in [KvPrecision::F32, KvPrecision::Bf16] {
            let err = ragged_attention_error(kv, 3);
            assert!(err < 1e-5, "{kv:?}: {err:e}");
        }
    }

    /// Rows keep their own positions: a row cleared for a new sequence attends only to what
    /// it was given since.
    #[test]
    fn a_cleared_row_starts_afresh_without_disturbing_the_others() {
        let (h, d) = (2, 8);
        let dim = h * d;
        let x = |seed: u32| -> Vec<f32> {
            (0..dim).map(|i| ((i as u32 * 7 + seed * 13) % 11) as f32 / 5.0 - 1.0).collect()
        };
        let mut a = RaggedKvCache::new(2, h, d, 8);
        let mut b = RaggedKvCache::new(2, h, d, 8);
        for t in 0..3 {
            a.step(
                &[0, 1],
                &[x(t), x(t + 10)].concat(),
                &[x(t + 1), x(t + 11)].concat(),
                &[x(t + 2), x(t + 12)].concat(),
                dim,
            )
            .unwrap();
        }
        a.clear_row(0);
        // b's row 0 sees only the new sequence; row 1 of both has the same history.
        for t in 0..3 {
            b.step(&[1], &x(t + 10), &x(t + 11), &x(t + 12), dim).unwrap();
        }
        let oa = a.step(&[0, 1], &[x(5), x(6)].concat(), &[x(7), x(8)].concat(), &[x(9), x(10)].concat(), dim).unwrap();
        let ob = b.step(&[0, 1], &[x(5), x(6)].concat(), &[x(7), x(8)].concat(), &[x(9), x(10)].concat(), dim).unwrap();
        assert_eq!(oa, ob);
        assert_eq!((a.len_of(0), a.len_of(1)), (1, 4));
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
