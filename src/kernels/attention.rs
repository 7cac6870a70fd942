//! Causal self-attention as a tiled, online-softmax CPU kernel (FlashAttention-2's schedule),
//! forward and backward, that never materialises a T×T score matrix: it works on tiles of
//! 64 queries × 64 keys, keeping a running maximum and sum per query row.
//!
//! It reads q, k and v straight from the fused projection `qkv` (N, 3D) — rows q | k | v, heads
//! side by side — and writes the output as (N, D), the layout `wo` takes, so no transposes or
//! contiguous copies surround it. Sequences are given as causal segments of the N rows: B
//! sequences of T tokens, or one packed sequence of images with different lengths (a
//! block-diagonal causal mask). Work is spread over (segment, head) pairs with rayon.
//!
//! The backward recomputes the scores tile by tile from the saved log-sum-exp of every row.
//!
//! # Shapes
//! qkv (N, 3·H·d) → out (N, H·d); N = Σ segment lengths.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::sgemm_ld;
use super::{cpu_f32, with_f32};

const BQ: usize = 64;
const BK: usize = 64;

/// Which rows attend to which: causal segments `(start, len)` of the token rows.
pub fn causal_segments(batch: usize, seq: usize) -> Vec<(usize, usize)> {
    (0..batch).map(|b| (b * seq, seq)).collect()
}

#[derive(Debug)]
struct Flash {
    segments: Arc<Vec<(usize, usize)>>,
    heads: usize,
    head_dim: usize,
    /// Log-sum-exp of every (row, head), saved by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

super::isa::multiversion! {
    /// Forward of one (segment, head): output rows (len × d) and their log-sum-exp.
    fn forward_one<const _FMA: bool>(
        qkv: &[f32],
        dim: usize,
        h: usize,
        d: usize,
        start: usize,
        len: usize,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let ld = 3 * dim;
        let mut out = vec![0f32; len * d];
        let mut lse = vec![0f32; len];
        let mut s = vec![0f32; BQ * BK];
        for qb in (0..len).step_by(BQ) {
            let qn = BQ.min(len - qb);
            let mut m = vec![f32::NEG_INFINITY; qn];
            let mut l = vec![0f32; qn];
            let acc = &mut out[qb * d..(qb + qn) * d];
            let q = &qkv[(start + qb) * ld + h * d..];
            for kb in (0..qb + qn).step_by(BK) {
                let kn = BK.min(qb + qn - kb);
                let k = &qkv[(start + kb) * ld + dim + h * d..];
                let v = &qkv[(start + kb) * ld + 2 * dim + h * d..];
                sgemm_ld(&mut s, kn, q, ld, k, ld, qn, kn, d, false, true, false, scale);
                for i in 0..qn {
                    let row = &mut s[i * kn..(i + 1) * kn];
                    // Causal: key kb + j is visible to query qb + i iff kb + j ≤ qb + i.
                    let visible = (qb + i + 1).saturating_sub(kb).min(kn);
                    row[visible..].fill(f32::NEG_INFINITY);
                    let block_max = super::math::max(&row[..visible]);
                    let new_m = m[i].max(block_max);
                    let correction = if m[i] == f32::NEG_INFINITY { 0.0 } else { super::math::exp(m[i] - new_m) };
                    for x in row.iter_mut() {
                        *x = super::math::exp(*x - new_m);
                    }
                    let sum = super::math::sum(row);
                    l[i] = l[i] * correction + sum;
                    m[i] = new_m;
                    acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= correction);
                }
                sgemm_ld(acc, d, &s, kn, v, ld, qn, d, kn, false, false, true, 1.0);
            }
            for i in 0..qn {
                let inv = 1.0 / l[i];
                acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= inv);
                lse[qb + i] = m[i] + l[i].ln();
            }
        }
        (out, lse)
    }
}

super::isa::multiversion! {
    /// Backward of one (segment, head): (dq, dk, dv) rows (len × d each).
    #[allow(clippy::too_many_arguments)]
    fn backward_one<const _FMA: bool>(
        qkv: &[f32],
        out: &[f32],
        grad: &[f32],
        lse: &[f32],
        dim: usize,
        h: usize,
        d: usize,
        start: usize,
        len: usize,
        scale: f32,
    ) -> [Vec<f32>; 3] {
        let ld = 3 * dim;
        let (mut dq, mut dk, mut dv) = (vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d]);
        // D_i = rowsum(dO_i ∘ O_i)
        let delta: Vec<f32> = (0..len)
            .map(|i| {
                let r = (start + i) * dim + h * d;
                super::math::dot(&grad[r..r + d], &out[r..r + d])
            })
            .collect();
        let mut p = vec![0f32; BQ * BK];
        let mut dp = vec![0f32; BQ * BK];
        for kb in (0..len).step_by(BK) {
            let kn = BK.min(len - kb);
            let k = &qkv[(start + kb) * ld + dim + h * d..];
            let v = &qkv[(start + kb) * ld + 2 * dim + h * d..];
            for qb in ((kb / BQ) * BQ..len).step_by(BQ) {
                let qn = BQ.min(len - qb);
                let q = &qkv[(start + qb) * ld + h * d..];
                let go = &grad[(start + qb) * dim + h * d..];
                sgemm_ld(&mut p, kn, q, ld, k, ld, qn, kn, d, false, true, false, scale);
                for i in 0..qn {
                    let visible = (qb + i + 1).saturating_sub(kb).min(kn);
                    let row = &mut p[i * kn..(i + 1) * kn];
                    let li = lse[qb + i];
                    for x in &mut row[..visible] {
                        *x = super::math::exp(*x - li);
                    }
                    row[visible..].fill(0.0);
                }
                // dV_j += Pᵀ dO_i
                sgemm_ld(&mut dv[kb * d..], d, &p, kn, go, dim, kn, d, qn, true, false, true, 1.0);
                // dP = dO_i V_jᵀ; dS = P ∘ (dP − D_i)·scale
                sgemm_ld(&mut dp, kn, go, dim, v, ld, qn, kn, d, false, true, false, 1.0);
                for i in 0..qn {
                    let di = delta[qb + i];
                    for j in 0..kn {
                        dp[i * kn + j] = p[i * kn + j] * (dp[i * kn + j] - di) * scale;
                    }
                }
                // dQ_i += dS K_j ; dK_j += dSᵀ Q_i
                sgemm_ld(&mut dq[qb * d..], d, &dp, kn, k, ld, qn, d, kn, false, false, true, 1.0);
                sgemm_ld(&mut dk[kb * d..], d, &dp, kn, q, ld, kn, d, qn, true, false, true, 1.0);
            }
        }
        [dq, dk, dv]
    }
}

/// Whether the segments cover the rows 0..n exactly once each (in any order; empty segments
/// inside the range allowed).
fn tiles(segments: &[(usize, usize)], n: usize) -> bool {
    let mut sorted = segments.to_vec();
    sorted.sort_unstable();
    let mut next = 0;
    for (start, len) in sorted {
        if start != next {
            return false;
        }
        next += len;
    }
    next == n
}

/// Flash-attention forward over host data: qkv (n, 3·H·d) → (out (n, H·d), lse (n, H)).
pub fn flash_forward(
    qkv: &[f32],
    n: usize,
    heads: usize,
    d: usize,
    segments: &[(usize, usize)],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dim = heads * d;
    if qkv.len() != n * 3 * dim {
        candle_core::bail!("flash attention: qkv holds {} values, expected {n} × 3·{heads}·{d}", qkv.len());
    }
    let covered: usize = segments.iter().map(|s| s.1).sum();
    if covered != n || segments.iter().any(|&(s, len)| s + len > n) {
        candle_core::bail!("flash attention: segments cover {covered} of {n} rows");
    }
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..segments.len()).flat_map(|s| (0..heads).map(move |h| (s, h))).collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, hi)| {
            let (start, len) = segments[s];
            forward_one(qkv, dim, hi, d, start, len, scale)
        })
        .collect();
    let (mut out, mut lse) = (Vec::<f32>::with_capacity(n * dim), Vec::<f32>::with_capacity(n * heads));
    let (ob, lb) = (&mut out.spare_capacity_mut()[..n * dim], &mut lse.spare_capacity_mut()[..n * heads]);
    if !tiles(segments, n) {
        // Overlapping segments (the checks above allow them) leave rows that no segment writes.
        super::zero_fill(ob);
        super::zero_fill(lb);
    }
    for (&(s, hi), (o, ls)) in tasks.iter().zip(results) {
        let (start, len) = segments[s];
        for i in 0..len {
            let row = (start + i) * dim;
            super::write_slice(&mut ob[row + hi * d..row + (hi + 1) * d], &o[i * d..(i + 1) * d]);
            lb[(start + i) * heads + hi].write(ls[i]);
        }
    }
    // SAFETY: either both buffers were zero-filled, or the segments tile the rows 0..n; then for
    // every row, the tasks of its segment (one per head hi < heads) wrote its d columns
    // hi·d..(hi + 1)·d of out (all dim = heads·d) and its entry hi of lse (all heads).
    unsafe {
        out.set_len(n * dim);
        lse.set_len(n * heads);
    }
    Ok((out, lse))
}

/// Flash-attention backward over host data: the gradient of qkv (n, 3·H·d).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    qkv: &[f32],
    out: &[f32],
    grad: &[f32],
    lse_all: &[f32],
    n: usize,
    heads: usize,
    d: usize,
    segments: &[(usize, usize)],
) -> Result<Vec<f32>> {
    let dim = heads * d;
    if lse_all.len() != n * heads {
        candle_core::bail!("flash attention backward before forward");
    }
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..segments.len()).flat_map(|s| (0..heads).map(move |h| (s, h))).collect();
    let results: Vec<[Vec<f32>; 3]> = tasks
        .par_iter()
        .map(|&(s, hi)| {
            let (start, len) = segments[s];
            let lse: Vec<f32> = (0..len).map(|i| lse_all[(start + i) * heads + hi]).collect();
            backward_one(qkv, out, grad, &lse, dim, hi, d, start, len, scale)
        })
        .collect();
    let mut dqkv = Vec::<f32>::with_capacity(n * 3 * dim);
    let buf = &mut dqkv.spare_capacity_mut()[..n * 3 * dim];
    if !tiles(segments, n) {
        // Segments that overlap or leave rows out (nothing here checks them) leave rows that no
        // task writes.
        super::zero_fill(buf);
    }
    for (&(s, hi), parts) in tasks.iter().zip(results) {
        let (start, len) = segments[s];
        for (which, part) in parts.iter().enumerate() {
            for i in 0..len {
                let o = (start + i) * 3 * dim + which * dim + hi * d;
                super::write_slice(&mut buf[o..o + d], &part[i * d..(i + 1) * d]);
            }
        }
    }
    // SAFETY: either the buffer was zero-filled, or the segments tile the rows 0..n; then for
    // every row, the tasks of its segment (one per head hi < heads) wrote d columns of each of
    // q, k and v (which = 0, 1, 2) at which·dim + hi·d: all 3·dim = 3·heads·d.
    unsafe { dqkv.set_len(n * 3 * dim) };
    Ok(dqkv)
}

impl CustomOp1 for Flash {
    fn name(&self) -> &'static str {
        "dpar-flash-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, three_dim) = l.shape().dims2()?;
        let (h, d) = (self.heads, self.head_dim);
        if three_dim != 3 * h * d {
            candle_core::bail!("flash attention: qkv has {three_dim} columns, expected 3·{h}·{d}");
        }
        let (out, lse) = flash_forward(cpu_f32(st, l, "qkv")?, n, h, d, &self.segments)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from((n, h * d))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, three_dim) = arg.dims2()?;
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let dqkv = with_f32(arg, "qkv", |qkv| {
            with_f32(res, "out", |out| {
                with_f32(grad, "grad", |g| {
                    flash_backward(qkv, out, g, &lse, n, self.heads, self.head_dim, &self.segments)
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dqkv, (n, three_dim), arg.device())?))
    }
}

/// Causal attention over segments of the rows of a fused `qkv` (N, 3·H·d) → (N, H·d).
pub fn flash_attention(qkv: &Tensor, heads: usize, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (_, three_dim) = qkv.dims2()?;
    let head_dim = three_dim / 3 / heads.max(1);
    if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
        return qkv.contiguous()?.apply_op1(Flash {
            segments: Arc::new(segments.to_vec()),
            heads,
            head_dim,
            lse: Mutex::new(Vec::new()),
        });
    }
    attention_reference(qkv, heads, segments)
}

/// The composed reference: per segment, split q/k/v, masked softmax(qkᵀ/√d)·v with candle ops.
pub fn attention_reference(qkv: &Tensor, heads: usize, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (_, three_dim) = qkv.dims2()?;
    let dim = three_dim / 3;
    let d = dim / heads;
    let mut outs = Vec::with_capacity(segments.len());
    for &(start, len) in segments {
        let rows = qkv.narrow(0, start, len)?;
        let part = |i: usize| -> Result<Tensor> {
            rows.narrow(1, i * dim, dim)?.reshape((len, heads, d))?.transpose(0, 1)?.contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?); // (H, len, d)
        let mask: Vec<f32> =
            (0..len).flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (len, len), qkv.device())?.to_dtype(qkv.dtype())?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
        let p = candle_nn::ops::softmax(&scores, 2)?;
        outs.push(p.matmul(&v)?.transpose(0, 1)?.reshape((len, dim))?);
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::util::rng_for(seed, "flash-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward and the qkv gradient equal the composed reference (f32, tolerance 1e-4) on odd
    /// lengths, one-token segments, several images packed, and sequences longer than one tile.
    #[test]
    fn flash_attention_matches_the_composed_reference() {
        type Case = (usize, usize, Vec<(usize, usize)>); // (heads, head dim, segments)
        let cases: Vec<Case> = vec![
            (2, 8, causal_segments(3, 7)),
            (4, 16, vec![(0, 1), (1, 5), (6, 1), (7, 70), (77, 3)]),
            (1, 32, causal_segments(1, 150)),
            (3, 16, causal_segments(2, 64)),
        ];
        for (i, (heads, d, segs)) in cases.into_iter().enumerate() {
            let n: usize = segs.iter().map(|s| s.1).sum();
            let qkv = rand_var(&[n, 3 * heads * d], i as u64);
            let probe = rand_var(&[n, heads * d], 100 + i as u64);
            let ours = flash_attention(&qkv, heads, &segs).unwrap();
            let reference = attention_reference(&qkv, heads, &segs).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "forward case {i}: {}", max_diff(&ours, &reference));
            let g1 = (&ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            let diff = max_diff(g1.get(qkv.as_tensor()).unwrap(), g2.get(qkv.as_tensor()).unwrap());
            assert!(diff < 1e-4, "grad case {i}: {diff}");
        }
    }

    /// Segments that do not tile the rows (overlapping ones pass the forward's checks) leave
    /// the rows no segment covers zero, in the output, the log-sum-exp and the gradient; rows
    /// that are covered equal those of a proper tiling.
    #[test]
    fn segments_that_do_not_tile_the_rows_leave_zeros() {
        assert!(tiles(&[(3, 2), (0, 3), (5, 0)], 5));
        assert!(tiles(&[], 0));
        assert!(!tiles(&[(0, 2), (0, 2)], 4));
        assert!(!tiles(&[(0, 2), (3, 1)], 4));
        assert!(!tiles(&[(0, 5)], 4));
        let (h, d, n) = (2, 4, 4);
        let dim = h * d;
        let qkv: Vec<f32> = (0..n * 3 * dim).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let (out, lse) = flash_forward(&qkv, n, h, d, &[(0, 2), (0, 2)]).unwrap();
        let (full, full_lse) = flash_forward(&qkv, n, h, d, &[(0, 2), (2, 2)]).unwrap();
        assert_eq!(out[..2 * dim], full[..2 * dim]);
        assert_eq!(lse[..2 * h], full_lse[..2 * h]);
        assert!(out[2 * dim..].iter().chain(&lse[2 * h..]).all(|&v| v == 0.0));
        let grad: Vec<f32> = (0..n * dim).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
        let dqkv = flash_backward(&qkv, &full, &grad, &full_lse, n, h, d, &[(0, 2)]).unwrap();
        let want = flash_backward(&qkv, &full, &grad, &full_lse, n, h, d, &[(0, 2), (2, 2)]).unwrap();
        assert_eq!(dqkv[..2 * 3 * dim], want[..2 * 3 * dim]);
        assert!(dqkv[2 * 3 * dim..].iter().all(|&v| v == 0.0));
    }
}
