//! Fused element-wise kernels with backward passes: RMSNorm, SwiGLU and softmax +
//! cross-entropy. Each replaces a chain of candle ops (one allocation and one pass over memory
//! per op) by one pass forward and one backward, parallel over rows.
//!
//! # Shapes
//! RMSNorm x (…, D), w (D). SwiGLU h (…, 2F) = [w1·x | w3·x] → (…, F). Cross-entropy logits
//! (N, V) f32, targets (N) u32 → scalar mean.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, with_f32};

/// Rows per rayon task: large enough to amortise scheduling.
fn chunk_rows(rows: usize) -> usize {
    (rows / (4 * rayon::current_num_threads()).max(1)).max(16)
}

// ---------------------------------------------------------------- RMSNorm

#[derive(Debug, Clone)]
struct RmsNormOp {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = super::math::dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

super::isa::multiversion! {
    /// RMSNorm of whole rows: `o` = x·r·w per row of `xi`.
    fn rms_rows<const _FMA: bool>(o: &mut [f32], xi: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for (orow, xrow) in o.chunks_mut(d).zip(xi.chunks(d)) {
            let r = inv_rms(xrow, eps);
            for ((y, &v), &g) in orow.iter_mut().zip(xrow).zip(w) {
                *y = v * r * g;
            }
        }
    }
}

super::isa::multiversion! {
    /// RMSNorm backward of whole rows: dx = r·(g∘w − x·r²·mean(g∘w∘x)) into `dxc`; returns this
    /// chunk's dw = Σ g∘x·r.
    fn rms_backward_rows<const _FMA: bool>(dxc: &mut [f32], xc: &[f32], gc: &[f32], wv: &[f32], eps: f32) -> Vec<f32> {
        let d = wv.len();
        let mut dw = vec![0f32; d];
        let mut gw = vec![0f32; d];
        for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
            let r = inv_rms(xr, eps);
            for j in 0..d {
                gw[j] = gr[j] * wv[j];
            }
            let k = r * r * super::math::dot(&gw, xr) / d as f32;
            for j in 0..d {
                dxr[j] = r * (gw[j] - xr[j] * k);
                dw[j] += gr[j] * xr[j] * r;
            }
        }
        dw
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "dpar-rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(xs, xl, "rms_norm input")?;
        let w = cpu_f32(ws, wl, "rms_norm weight")?;
        let d = w.len();
        if xl.dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: input {:?} does not end in {d}", xl.dims());
        }
        let rows = x.len() / d;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * chunk_rows(rows))
            .zip(x.par_chunks(d * chunk_rows(rows)))
            .for_each(|(o, xi)| rms_rows(o, xi, w, self.eps));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let rows = x.elem_count() / d;
        let chunk = chunk_rows(rows);
        let mut dx = vec![0f32; x.elem_count()];
        let mut dw_parts = Vec::new();
        with_f32(x, "rms_norm input", |xv| {
            with_f32(w, "rms_norm weight", |wv| {
                with_f32(grad, "rms_norm grad", |gv| {
                    dw_parts = dx
                        .par_chunks_mut(d * chunk)
                        .zip(xv.par_chunks(d * chunk).zip(gv.par_chunks(d * chunk)))
                        .map(|(dxc, (xc, gc))| rms_backward_rows(dxc, xc, gc, wv, self.eps))
                        .collect();
                    Ok(())
                })
            })
        })?;
        let mut dw = vec![0f32; d];
        for part in dw_parts {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, d, w.device())?)))
    }
}

/// x·rsqrt(mean(x²) + eps)·w over the last dim.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 });
    }
    rms_norm_reference(x, w, eps)
}

/// The composed reference (differentiable candle ops).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?.broadcast_mul(w)
}

// ---------------------------------------------------------------- SwiGLU

#[derive(Debug, Clone)]
struct SwiGlu;

fn silu_parts(a: f32) -> (f32, f32) {
    let s = super::math::sigmoid(a);
    (a * s, s * (1.0 + a * (1.0 - s)))
}

super::isa::multiversion! {
    /// silu(gate) ⊙ up for whole rows [gate | up] of 2f.
    fn swiglu_rows<const _FMA: bool>(o: &mut [f32], hc: &[f32], f: usize) {
        for (orow, hrow) in o.chunks_mut(f).zip(hc.chunks(2 * f)) {
            let (gate, up) = hrow.split_at(f);
            for j in 0..f {
                orow[j] = silu_parts(gate[j]).0 * up[j];
            }
        }
    }
}

super::isa::multiversion! {
    /// The SwiGLU backward of whole rows.
    fn swiglu_backward_rows<const _FMA: bool>(dc: &mut [f32], hc: &[f32], gc: &[f32], f: usize) {
        for ((drow, hrow), grow) in dc.chunks_mut(2 * f).zip(hc.chunks(2 * f)).zip(gc.chunks(f)) {
            for j in 0..f {
                let (silu, dsilu) = silu_parts(hrow[j]);
                drow[j] = grow[j] * hrow[f + j] * dsilu;
                drow[f + j] = grow[j] * silu;
            }
        }
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "dpar-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let two_f = *dims.last().unwrap_or(&0);
        if !two_f.is_multiple_of(2) || two_f == 0 {
            candle_core::bail!("swiglu: last dim {two_f} must be even (gate | up)");
        }
        let f = two_f / 2;
        let h = cpu_f32(s, l, "swiglu input")?;
        let rows = h.len() / two_f;
        let mut out = vec![0f32; rows * f];
        let chunk = chunk_rows(rows);
        out.par_chunks_mut(f * chunk).zip(h.par_chunks(two_f * chunk)).for_each(|(o, hc)| swiglu_rows(o, hc, f));
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked non-empty") = f;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let two_f = arg.dim(candle_core::D::Minus1)?;
        let f = two_f / 2;
        let rows = arg.elem_count() / two_f;
        let chunk = chunk_rows(rows);
        let mut dh = vec![0f32; arg.elem_count()];
        with_f32(arg, "swiglu input", |h| {
            with_f32(grad, "swiglu grad", |g| {
                dh.par_chunks_mut(two_f * chunk)
                    .zip(h.par_chunks(two_f * chunk).zip(g.par_chunks(f * chunk)))
                    .for_each(|(dc, (hc, gc))| swiglu_backward_rows(dc, hc, gc, f));
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dh, arg.shape(), arg.device())?))
    }
}

/// silu(gate) ⊙ up for h = [gate | up] along the last dim.
pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == candle_core::DType::F32 {
        return h.contiguous()?.apply_op1(SwiGlu);
    }
    swiglu_reference(h)
}

/// The composed reference.
pub fn swiglu_reference(h: &Tensor) -> Result<Tensor> {
    let f = h.dim(candle_core::D::Minus1)? / 2;
    let gate = h.narrow(candle_core::D::Minus1, 0, f)?;
    let up = h.narrow(candle_core::D::Minus1, f, f)?;
    gate.silu()? * up
}

// ---------------------------------------------------------------- softmax + cross-entropy

#[derive(Debug, Clone)]
struct CrossEntropy;

super::isa::multiversion! {
    fn row_lse<const _FMA: bool>(row: &[f32], scratch: &mut [f32]) -> f32 {
        super::math::log_sum_exp(row, scratch)
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "dpar-cross-entropy"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = *ll.dims().last().unwrap_or(&0);
        let n = ll.shape().elem_count() / v.max(1);
        let logits = cpu_f32(ls, ll, "cross_entropy logits")?;
        let targets = match ts {
            CpuStorage::U32(t) => match tl.contiguous_offsets() {
                Some((a, b)) => &t[a..b],
                None => candle_core::bail!("cross_entropy: targets must be contiguous"),
            },
            _ => candle_core::bail!("cross_entropy: targets must be u32"),
        };
        if targets.len() != n {
            candle_core::bail!("cross_entropy: {} targets for {n} rows", targets.len());
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross_entropy: target {t} outside {v} classes");
        }
        let rows_per = chunk_rows(n);
        let total: f64 = logits
            .par_chunks(v * rows_per)
            .zip(targets.par_chunks(rows_per))
            .map(|(rows, ts)| {
                let mut scratch = vec![0f32; v];
                rows.chunks(v)
                    .zip(ts)
                    .map(|(row, &t)| (row_lse(row, &mut scratch) - row[t as usize]) as f64)
                    .sum::<f64>()
            })
            .sum();
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let v = logits.dim(candle_core::D::Minus1)?;
        let n = logits.elem_count() / v;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / n as f32;
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        if t.len() != n {
            candle_core::bail!("cross_entropy backward: {} targets for {n} rows", t.len());
        }
        let mut d = Vec::<f32>::with_capacity(n * v);
        with_f32(logits, "cross_entropy logits", |l| {
            d.spare_capacity_mut()[..n * v]
                .par_chunks_mut(v)
                .zip(l.par_chunks(v))
                .zip(t.par_iter())
                .for_each(|((drow, row), &ti)| cross_entropy_grad_row(drow, row, ti as usize, g));
            Ok(())
        })?;
        // SAFETY: l holds the n·v logits (n = their count / v) and t the n targets (checked), so
        // the zip visited all n chunks of v slots of d, and `exp_shifted_uninit` wrote each whole
        // (it asserts that the chunk is as long as its row of v logits).
        unsafe { d.set_len(n * v) };
        Ok((Some(Tensor::from_vec(d, logits.shape(), logits.device())?), None))
    }
}

super::isa::multiversion! {
    /// Writes every element of `drow`: g·(softmax(row) − onehot(t)).
    fn cross_entropy_grad_row<const _FMA: bool>(drow: &mut [std::mem::MaybeUninit<f32>], row: &[f32], t: usize, g: f32) {
        // softmax = exp(x − max)/Σ; written into drow, then scaled.
        let m = super::math::max(row);
        let (drow, total) = super::math::exp_shifted_uninit(row, m, drow);
        let scale = g / total;
        drow.iter_mut().for_each(|o| *o *= scale);
        drow[t] -= g;
    }
}

/// Mean cross-entropy of logits (…, V) against u32 targets (…) (any matching leading shape).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        // The targets carry no gradient: the op's backward returns None for them.
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    let v = logits.dim(candle_core::D::Minus1)?;
    candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64, scale: f32) -> Var {
        let mut rng = crate::util::rng_for(seed, "fused-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| scale * rng.random_range(-1.0..1.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_rms_norm_matches_the_reference_forward_and_backward() {
        for (i, shape) in [vec![3, 7, 5], vec![1, 1, 64], vec![37, 256]].into_iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = rand_var(&shape, i as u64, 2.0);
            let w = rand_var(&[d], 10 + i as u64, 1.0);
            let probe = rand_var(&shape, 20 + i as u64, 1.0);
            let a = rms_norm(&x, &w, 1e-5).unwrap();
            let b = rms_norm_reference(&x, &w, 1e-5).unwrap();
            assert!(max_diff(&a, &b) < 1e-5);
            let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let diff = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(diff < 1e-4, "case {i}: {diff}");
            }
        }
    }

    #[test]
    fn fused_swiglu_matches_the_reference_forward_and_backward() {
        let h = rand_var(&[5, 3, 2 * 11], 1, 3.0);
        let probe = rand_var(&[5, 3, 11], 2, 1.0);
        let a = swiglu(&h).unwrap();
        let b = swiglu_reference(&h).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(h.as_tensor()).unwrap(), g2.get(h.as_tensor()).unwrap()) < 1e-5);
    }

    #[test]
    fn fused_cross_entropy_matches_the_reference_forward_and_backward() {
        let logits = rand_var(&[33, 17], 3, 4.0);
        let targets = Tensor::new((0..33u32).map(|i| (i * 7) % 17).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let a = cross_entropy(&logits, &targets).unwrap();
        let b = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * 3.0).unwrap().backward().unwrap();
        let gb = (b * 3.0).unwrap().backward().unwrap();
        assert!(max_diff(ga.get(logits.as_tensor()).unwrap(), gb.get(logits.as_tensor()).unwrap()) < 1e-6);
        let bad = Tensor::new(&[17u32; 33], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &bad).is_err());
    }
}
