//! Per-patch operations over contiguous row segments of a packed token matrix, with backward
//! passes: DPAR's patch encoder max-pools each patch's code states into a query and lets that
//! query attend to its own codes only (design §5, step 2).
//!
//! A segment is `(start, len)`: rows `start .. start + len` of the token matrix. Segments must
//! be non-empty and may not overlap (patches are disjoint); they need not cover every row.
//!
//! # Shapes
//! tokens (T, D); per-segment output (M, D). Attention: q (M, H, d), k and v (T, H, d).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, with_f32};

/// Checks segments against `rows` rows: non-empty, in range, non-overlapping (sorted by start).
pub fn check_segments(segments: &[(usize, usize)], rows: usize) -> Result<()> {
    let mut sorted: Vec<(usize, usize)> = segments.to_vec();
    sorted.sort();
    let mut end = 0;
    for &(start, len) in &sorted {
        if len == 0 || start + len > rows {
            candle_core::bail!("segment ({start}, {len}) is empty or beyond the {rows} rows");
        }
        if start < end {
            candle_core::bail!("segments overlap at row {start}");
        }
        end = start + len;
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct SegmentMax {
    segments: Arc<Vec<(usize, usize)>>,
}

impl CustomOp1 for SegmentMax {
    fn name(&self) -> &'static str {
        "dpar-segment-max"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, d) = l.shape().dims2()?;
        check_segments(&self.segments, t)?;
        let x = cpu_f32(s, l, "segment_max input")?;
        let mut out = vec![0f32; self.segments.len() * d];
        out.par_chunks_mut(d).zip(self.segments.par_iter()).for_each(|(o, &(start, len))| {
            o.copy_from_slice(&x[start * d..(start + 1) * d]);
            for r in start + 1..start + len {
                for (m, &v) in o.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                    if v > *m {
                        *m = v;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((self.segments.len(), d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (t, d) = arg.dims2()?;
        let mut dx = vec![0f32; t * d];
        with_f32(arg, "segment_max input", |x| {
            with_f32(grad, "segment_max grad", |g| {
                // Segments are disjoint, so each one writes its own rows of dx.
                for (m, &(start, len)) in self.segments.iter().enumerate() {
                    for j in 0..d {
                        // The gradient goes to the first maximal row (PyTorch's convention).
                        let mut best = start;
                        for r in start + 1..start + len {
                            if x[r * d + j] > x[best * d + j] {
                                best = r;
                            }
                        }
                        dx[best * d + j] += g[m * d + j];
                    }
                }
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (t, d), arg.device())?))
    }
}

/// Element-wise maximum over each segment's rows: (T, D) → (M, D).
pub fn segment_max(x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    segment_max_with(x, segments, true)
}

/// [`segment_max`] with the CPU kernel allowed or not: without it (other devices, or the
/// device-native path forced on the CPU), the padded batch [`segment_max_padded`].
pub fn segment_max_with(x: &Tensor, segments: &[(usize, usize)], cpu_kernel: bool) -> Result<Tensor> {
    if cpu_kernel && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(SegmentMax { segments: Arc::new(segments.to_vec()) });
    }
    segment_max_padded(x, segments)
}

/// Segments laid out as a padded batch `(S, L_max)`: for every slot, the row it reads (padding
/// reads the segment's first row) and an additive bias (0, or −∞ for padding). Built on the host
/// once per call; the batch ops then run on the tensors' device, a fixed number of them however
/// many segments there are.
pub struct PaddedSegments {
    pub max_len: usize,
    /// Row of each slot, (S·L_max) u32.
    pub gather: Tensor,
    /// 0 for a real slot, −∞ for padding, (S, L_max) f32.
    pub bias: Tensor,
}

impl PaddedSegments {
    pub fn new(segments: &[(usize, usize)], device: &candle_core::Device) -> Result<Self> {
        let max_len = segments.iter().map(|s| s.1).max().unwrap_or(0).max(1);
        if let Some(&(start, _)) = segments.iter().find(|s| s.1 == 0) {
            candle_core::bail!("an empty segment at row {start}");
        }
        let mut gather = Vec::with_capacity(segments.len() * max_len);
        let mut bias = Vec::with_capacity(segments.len() * max_len);
        for &(start, len) in segments {
            for j in 0..max_len {
                gather.push((start + if j < len { j } else { 0 }) as u32);
                bias.push(if j < len { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(Self {
            max_len,
            gather: Tensor::from_vec(gather, segments.len() * max_len, device)?,
            bias: Tensor::from_vec(bias, (segments.len(), max_len), device)?,
        })
    }
}

/// [`segment_max`] as a padded batch: gather (S, L_max, D), −∞ on padding, max over the slots.
pub fn segment_max_padded(x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (s, dim) = (segments.len(), x.dim(1)?);
    let p = PaddedSegments::new(segments, x.device())?;
    let rows = x.index_select(&p.gather, 0)?.reshape((s, p.max_len, dim))?; // (S, L, D)
    rows.broadcast_add(&p.bias.to_dtype(x.dtype())?.unsqueeze(2)?)?.max(1)
}

/// Composed reference: one narrow + max per segment.
pub fn segment_max_reference(x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let rows: Vec<Tensor> = segments.iter().map(|&(s, l)| x.narrow(0, s, l)?.max_keepdim(0)).collect::<Result<_>>()?;
    Tensor::cat(&rows, 0)
}

#[derive(Debug, Clone)]
struct SegmentAttention {
    segments: Arc<Vec<(usize, usize)>>,
    scale: f32,
}

/// Softmax weights of one (segment, head): p_t ∝ exp(scale·q·k_t).
pub(crate) fn weights(
    q: &[f32],
    k: &[f32],
    rows: std::ops::Range<usize>,
    stride: usize,
    offset: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let scores: Vec<f32> = rows
        .map(|r| {
            let kr = &k[r * stride + offset..r * stride + offset + d];
            scale * q.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>()
        })
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

impl CustomOp3 for SegmentAttention {
    fn name(&self) -> &'static str {
        "dpar-segment-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, h, d) = ql.shape().dims3()?;
        let (t, h2, d2) = kl.shape().dims3()?;
        if vl.dims() != kl.dims() || h != h2 || d != d2 || m != self.segments.len() {
            candle_core::bail!(
                "segment_attention: q {:?}, k {:?}, v {:?} for {} segments",
                ql.dims(),
                kl.dims(),
                vl.dims(),
                self.segments.len()
            );
        }
        check_segments(&self.segments, t)?;
        let (q, k, v) = (cpu_f32(qs, ql, "q")?, cpu_f32(ks, kl, "k")?, cpu_f32(vs, vl, "v")?);
        let mut out = vec![0f32; m * h * d];
        out.par_chunks_mut(h * d).zip(self.segments.par_iter()).enumerate().for_each(|(mi, (o, &(start, len)))| {
            for hi in 0..h {
                let qv = &q[(mi * h + hi) * d..(mi * h + hi + 1) * d];
                let p = weights(qv, k, start..start + len, h * d, hi * d, d, self.scale);
                let oh = &mut o[hi * d..(hi + 1) * d];
                for (j, r) in (start..start + len).enumerate() {
                    let vr = &v[r * h * d + hi * d..r * h * d + (hi + 1) * d];
                    for (x, y) in oh.iter_mut().zip(vr) {
                        *x += p[j] * y;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((m, h, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, h, d) = q.dims3()?;
        let t = k.dim(0)?;
        let mut dq = vec![0f32; m * h * d];
        let mut dk = vec![0f32; t * h * d];
        let mut dv = vec![0f32; t * h * d];
        with_f32(q, "q", |qv| {
            with_f32(k, "k", |kv| {
                with_f32(v, "v", |vv| {
                    with_f32(grad, "grad", |g| {
                        for (mi, &(start, len)) in self.segments.iter().enumerate() {
                            for hi in 0..h {
                                let qo = (mi * h + hi) * d;
                                let p = weights(&qv[qo..qo + d], kv, start..start + len, h * d, hi * d, d, self.scale);
                                let go = &g[qo..qo + d];
                                // dp_t = dout·v_t; ds_t = p_t(dp_t − Σ p·dp)
                                let dp: Vec<f32> = (start..start + len)
                                    .map(|r| {
                                        go.iter()
                                            .zip(&vv[r * h * d + hi * d..r * h * d + (hi + 1) * d])
                                            .map(|(a, b)| a * b)
                                            .sum()
                                    })
                                    .collect();
                                let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                                for (j, r) in (start..start + len).enumerate() {
                                    let ds = p[j] * (dp[j] - dot) * self.scale;
                                    let ro = r * h * d + hi * d;
                                    for x in 0..d {
                                        dq[qo + x] += ds * kv[ro + x];
                                        dk[ro + x] += ds * qv[qo + x];
                                        dv[ro + x] += p[j] * go[x];
                                    }
                                }
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (m, h, d), dev)?),
            Some(Tensor::from_vec(dk, (t, h, d), dev)?),
            Some(Tensor::from_vec(dv, (t, h, d), dev)?),
        ))
    }
}

/// Attention of each segment's query over its own rows: q (M, H, d), k and v (T, H, d) → (M, H, d),
/// scaled by 1/√d, no mask beyond the segment.
pub fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    segment_attention_with(q, k, v, segments, true)
}

/// [`segment_attention`] with the CPU kernel allowed or not: without it, the padded batch
/// [`segment_attention_padded`].
pub fn segment_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    cpu_kernel: bool,
) -> Result<Tensor> {
    let d = q.dim(2)?;
    let scale = 1.0 / (d as f32).sqrt();
    if !cpu_kernel || !q.device().is_cpu() || q.dtype() != candle_core::DType::F32 {
        return segment_attention_padded(q, k, v, segments);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        SegmentAttention { segments: Arc::new(segments.to_vec()), scale },
    )
}

/// [`segment_attention`] as one padded batch of differentiable candle ops (any device): k and v
/// gathered to (M, H, L_max, d), the padding masked with −∞, one query per segment.
/// # Shapes
/// q (M, H, d), k and v (T, H, d) → (M, H, d)
pub fn segment_attention_padded(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (m, h, d) = q.dims3()?;
    let p = PaddedSegments::new(segments, q.device())?;
    let slots = |x: &Tensor| -> Result<Tensor> {
        // (T, H, d) → (M·L, H, d) → (M, L, H, d) → (M, H, L, d)
        x.index_select(&p.gather, 0)?.reshape((m, p.max_len, h, d))?.transpose(1, 2)?.contiguous()
    };
    let (ks, vs) = (slots(k)?, slots(v)?);
    let qm = q.unsqueeze(2)?.contiguous()?; // (M, H, 1, d)
    let scores = (qm.matmul(&ks.t()?)? * (1.0 / (d as f64).sqrt()))?; // (M, H, 1, L)
    let bias = p.bias.to_dtype(scores.dtype())?.reshape((m, 1, 1, p.max_len))?;
    // Half-precision scores (bf16 under mixed precision) go through the softmax in f32.
    let probs = candle_nn::ops::softmax(&crate::nn::widen(&scores.broadcast_add(&bias)?)?, 3)?.to_dtype(v.dtype())?;
    probs.matmul(&vs)?.squeeze(2) // (M, H, d)
}

/// Composed reference: one small softmax attention per segment.
pub fn segment_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let d = q.dim(2)?;
    let mut outs = Vec::with_capacity(segments.len());
    for (mi, &(start, len)) in segments.iter().enumerate() {
        let qm = q.narrow(0, mi, 1)?.transpose(0, 1)?; // (H, 1, d)
        let km = k.narrow(0, start, len)?.transpose(0, 1)?; // (H, len, d)
        let vm = v.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
        let scores = (qm.contiguous()?.matmul(&km.contiguous()?.t()?)? / (d as f64).sqrt())?; // (H, 1, len)
        let p = candle_nn::ops::softmax(&scores, 2)?;
        outs.push(p.matmul(&vm)?.transpose(0, 1)?); // (1, H, d)
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::util::rng_for(seed, "seg-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    // Segments of lengths 1 (one-code patches), 3, 4, with rows 8..9 uncovered.
    const SEGS: [(usize, usize); 4] = [(0, 1), (1, 3), (4, 4), (9, 2)];

    /// The padded batches (the device-native path) equal the per-segment references, values and
    /// gradients, including one-row segments and uncovered rows.
    #[test]
    fn padded_segment_ops_match_the_references_with_gradients() {
        let x = rand_var(&[11, 5], 1);
        let probe = rand_var(&[4, 5], 2);
        let (a, b) = (segment_max_padded(&x, &SEGS).unwrap(), segment_max_reference(&x, &SEGS).unwrap());
        assert_eq!(max_diff(&a, &b), 0.0);
        let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-6);

        let (q, k, v) = (rand_var(&[4, 2, 3], 3), rand_var(&[11, 2, 3], 4), rand_var(&[11, 2, 3], 5));
        let probe = rand_var(&[4, 2, 3], 6);
        let a = segment_attention_padded(&q, &k, &v, &SEGS).unwrap();
        let b = segment_attention_reference(&q, &k, &v, &SEGS).unwrap();
        assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
        let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&q, &k, &v] {
            let (ga, gb) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
            assert!(max_diff(ga, gb) < 1e-5, "{}", max_diff(ga, gb));
        }
        assert!(segment_max_padded(&x, &[(0, 2), (2, 0)]).is_err(), "an empty segment is an error");
    }

    #[test]
    fn segment_max_matches_the_composed_reference_with_gradients() {
        let x = rand_var(&[11, 5], 1);
        let probe = rand_var(&[4, 5], 2);
        let ours = segment_max(&x, &SEGS).unwrap();
        let reference = segment_max_reference(&x, &SEGS).unwrap();
        assert_eq!(max_diff(&ours, &reference), 0.0);
        let g1 = (&ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-6);
    }

    #[test]
    fn segment_attention_matches_the_composed_reference_with_gradients() {
        let (h, d) = (2, 4);
        let q = rand_var(&[4, h, d], 3);
        let k = rand_var(&[11, h, d], 4);
        let v = rand_var(&[11, h, d], 5);
        let probe = rand_var(&[4, h, d], 6);
        let ours = segment_attention(&q, &k, &v, &SEGS).unwrap();
        let reference = segment_attention_reference(&q, &k, &v, &SEGS).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-6);
        let g1 = (&ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_diff(g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
            assert!(diff < 1e-5, "d{name}: {diff}");
        }
        // A one-code segment returns that code's value exactly.
        let first = ours.narrow(0, 0, 1).unwrap();
        assert!(max_diff(&first, &v.as_tensor().narrow(0, 0, 1).unwrap()) < 1e-6);
    }

    #[test]
    fn bad_segments_are_errors() {
        let x = rand_var(&[5, 2], 1);
        assert!(segment_max(&x, &[(0, 0)]).is_err());
        assert!(segment_max(&x, &[(3, 3)]).is_err());
        assert!(segment_max(&x, &[(0, 3), (2, 2)]).is_err());
    }
}
