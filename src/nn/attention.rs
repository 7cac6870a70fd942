//! Multi-head attention (spec §3): fused bias-free `wqkv` (rows q|k|v), RoPE on q and k,
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
use super::{Linear, NnError, Result, INIT_STD};
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

/// Additive causal mask (T_q, T_k) for queries at absolute positions offset..offset+T_q.
pub fn causal_mask(t_q: usize, t_k: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t_q)
        .flat_map(|i| (0..t_k).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
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
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Multi-head self-attention with LlamaGen's parameter names (`wqkv`, `wo`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub wqkv: Linear,
    pub wo: Linear,
    pub n_head: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn new(pb: &Pb, dim: usize, n_head: usize) -> Result<Self> {
        if n_head == 0 || dim % n_head != 0 {
            return Err(NnError::BadConfig(format!("width {dim} is not divisible by {n_head} heads")));
        }
        Ok(Self {
            wqkv: Linear::new(&pb.pp("wqkv"), dim, 3 * dim, Init::Normal(INIT_STD))?,
            wo: Linear::new(&pb.pp("wo"), dim, dim, Init::Normal(INIT_STD))?,
            n_head,
            head_dim: dim / n_head,
        })
    }

    /// (B, T, D) → q, k, v as (B, H, T, d), RoPE applied to q and k.
    fn qkv(&self, x: &Tensor, rope_rows: Option<&RopeRows>) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, dim) = x.dims3()?;
        let qkv = self.wqkv.forward(x)?; // (B, T, 3D)
        let split = |i: usize| -> Result<Tensor> {
            // (B, T, D) → (B, T, H, d) → (B, H, T, d)
            Ok(qkv.narrow(2, i * dim, dim)?.reshape((b, t, self.n_head, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (mut q, mut k, v) = (split(0)?, split(1)?, split(2)?);
        if let Some(rows) = rope_rows {
            q = rope::apply(&q, rows)?;
            k = rope::apply(&k, rows)?;
        }
        Ok((q, k, v))
    }

    /// # Shapes
    /// x (B, T, D) → (B, T, D)
    pub fn forward(&self, x: &Tensor, rope_rows: Option<&RopeRows>, mask: &AttnMask, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t, dim) = x.dims3()?;
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
                    return Err(NnError::BadConfig("segment masks need one packed sequence (B = 1) and no cache".into()));
                }
                let mut outs = Vec::with_capacity(segments.len());
                let mut expected = 0;
                for &(start, len) in segments {
                    if start != expected {
                        return Err(NnError::BadConfig(format!("segments must tile the sequence: expected start {expected}, got {start}")));
                    }
                    expected = start + len;
                    let (qs, ks, vs) = (q.narrow(2, start, len)?, k.narrow(2, start, len)?, v.narrow(2, start, len)?);
                    let m = causal_mask(len, len, 0, x.device())?;
                    outs.push(sdpa(&qs.contiguous()?, &ks.contiguous()?, &vs, Some(&m))?);
                }
                if expected != t {
                    return Err(NnError::BadConfig(format!("segments cover {expected} of {t} positions")));
                }
                Tensor::cat(&outs, 2)?
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
        let mut a = Attention::new(&store.root(), dim, heads).unwrap();
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
        check_gradient(&x, &|x| (att.forward(x, Some(&table), &AttnMask::Causal, None).unwrap() * probe.as_tensor()).unwrap().sum_all().unwrap(), 2e-3);

        let x32 = candle_core::Var::from_tensor(&rand_var(&[1, 2, 5, 4], 11).as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
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
        let d = (y.narrow(1, 0, 5).unwrap() - y2.narrow(1, 0, 5).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
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
        let d = (Tensor::cat(&[&ya, &yb], 1).unwrap() - &yp).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "{d}");

        let mut cache = KvCache::new(8);
        let steps: Vec<Tensor> = (0..4)
            .map(|i| att.forward(&b.narrow(1, i, 1).unwrap(), None, &AttnMask::Causal, Some(&mut cache)).unwrap())
            .collect();
        let d = (Tensor::cat(&steps, 1).unwrap() - &yb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "{d}");
        assert!(att.forward(&packed, None, &AttnMask::Segments(vec![(0, 3)]), None).is_err());
    }
}
