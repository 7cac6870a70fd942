//! Block-level fused ops: a LlamaGen block in five graph nodes instead of about thirteen.
//!
//! candle's backward gives every graph node a zero-initialised gradient buffer and adds into
//! it (`or_insert` + `add`), so each intermediate activation costs a memset, an allocation and
//! an extra pass over memory in the backward (about 10 % of a bench step). These ops recompute
//! cheap intermediates in their backward instead of keeping them as nodes:
//!
//! - [`norm_linear`]: `RMSNorm(x)·Wᵀ` (the normalised input is rebuilt in the backward);
//! - [`rope_attention`]: RoPE on q and k, then causal flash attention over segments;
//! - [`linear_residual`]: `r + mask ⊙ (x·Wᵀ)` (attention output projection + residual, with
//!   optional dropout);
//! - [`swiglu_linear_residual`]: `r + mask ⊙ (silu(a) ⊙ b)·W₂ᵀ` for `[a | b]`.
//!
//! Every op accepts activations of any leading shape (…, D) and treats them as rows.
//!
//! # Shapes
//! rows N = product of the leading dims; D width; F SwiGLU hidden; H heads.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::Gemm;
use super::rope_rows::RopeRows;
use super::{cpu_f32, with_f32};

fn rows_of(layout: &Layout, last: usize) -> Result<usize> {
    let dims = layout.dims();
    if dims.last() != Some(&last) {
        candle_core::bail!("expected a last dim of {last}, got {dims:?}");
    }
    Ok(layout.shape().elem_count() / last.max(1))
}

fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(x) = d.last_mut() {
        *x = last;
    }
    Shape::from(d)
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (super::math::dot(row, row) / row.len() as f32 + eps).sqrt()
}

super::isa::multiversion! {
    /// Writes every element of `o` = x·r·g for one row and returns r = 1/√(mean(x²) + ε).
    fn norm_row<const _FMA: bool>(o: &mut [std::mem::MaybeUninit<f32>], xr: &[f32], g: &[f32], eps: f32) -> f32 {
        let r = inv_rms(xr, eps);
        for ((o, &x), &g) in o.iter_mut().zip(xr).zip(g) {
            o.write(x * r * g);
        }
        r
    }
}

/// xn = x·r·g for every row; also returns r per row. New buffers, written once (no zero fill).
fn normalize(x: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = g.len();
    let rows = x.len() / d;
    assert_eq!(x.len(), rows * d, "normalize: {} values are not rows of {d}", x.len());
    let (mut xn, mut r) = (Vec::<f32>::with_capacity(x.len()), Vec::<f32>::with_capacity(rows));
    xn.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(r.spare_capacity_mut()[..rows].par_iter_mut())
        .for_each(|((o, xr), ri)| {
            ri.write(norm_row(o, xr, g, eps));
        });
    // SAFETY: x is exactly `rows` rows of d (asserted), so xn's first rows·d slots form `rows`
    // chunks of d, zipped with the `rows` rows of x and the `rows` slots of r: the loop wrote
    // r[i] and all d elements of row i of xn for every row.
    unsafe {
        xn.set_len(x.len());
        r.set_len(rows);
    }
    (xn, r)
}

// ---------------------------------------------------------------- RMSNorm + linear

super::isa::multiversion! {
    /// RMSNorm backward over a chunk of rows, in place: `dxc` holds dxn on entry and dx on exit;
    /// returns this chunk's part of dg. xn = x·r·g: dg += dxn·x·r; dx = r·(dxn·g − x·r²·mean(dxn·g·x)).
    fn norm_backward_rows<const _FMA: bool>(dxc: &mut [f32], xc: &[f32], rc: &[f32], gv: &[f32]) -> Vec<f32> {
        let d = gv.len();
        let mut dg = vec![0f32; d];
        let mut tmp = vec![0f32; d];
        for ((dxr, xr), &ri) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(rc) {
            for j in 0..d {
                dg[j] += dxr[j] * xr[j] * ri;
                tmp[j] = dxr[j] * gv[j];
            }
            let k = ri * ri * super::math::dot(&tmp, xr) / d as f32;
            for j in 0..d {
                dxr[j] = ri * (tmp[j] - xr[j] * k);
            }
        }
        dg
    }
}

#[derive(Debug, Clone)]
struct NormLinear {
    eps: f32,
    gemm: Gemm,
}

impl CustomOp3 for NormLinear {
    fn name(&self) -> &'static str {
        "dpar-norm-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, d) = wl.shape().dims2()?;
        let n = rows_of(xl, d)?;
        let (x, g, w) = (cpu_f32(xs, xl, "x")?, cpu_f32(gs, gl, "norm weight")?, cpu_f32(ws, wl, "weight")?);
        let (xn, _) = normalize(x, g, self.eps);
        let y = self.gemm.run_new(n, out, d, &xn, false, w, true);
        Ok((CpuStorage::F32(y), with_last(xl.dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, d) = w.dims2()?;
        let n = x.elem_count() / d;
        let (dx, dw, dg_parts) = with_f32(x, "x", |xv| {
            with_f32(g, "norm weight", |gv| {
                with_f32(w, "weight", |wv| {
                    with_f32(dy, "grad", |dyv| {
                        let (xn, r) = normalize(xv, gv, self.eps);
                        let dw = self.gemm.run_new(out, d, n, dyv, true, &xn, false);
                        drop(xn);
                        // dxn = dy·W, a new buffer written whole by the GEMM, then turned into dx
                        // in place.
                        let mut dx = self.gemm.run_new(n, d, out, dyv, false, wv, false);
                        let chunk = (n / (4 * rayon::current_num_threads())).max(16);
                        let dg_parts: Vec<Vec<f32>> = dx
                            .par_chunks_mut(d * chunk)
                            .zip(xv.par_chunks(d * chunk).zip(r.par_chunks(chunk)))
                            .map(|(dxc, (xc, rc))| norm_backward_rows(dxc, xc, rc, gv))
                            .collect();
                        Ok((dx, dw, dg_parts))
                    })
                })
            })
        })?;
        let mut dg = vec![0f32; d];
        for p in dg_parts {
            dg.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, d, dev)?),
            Some(Tensor::from_vec(dw, (out, d), dev)?),
        ))
    }
}

/// `RMSNorm(x; g)·Wᵀ`: x (…, D), g (D), W (out, D) → (…, out).
pub fn norm_linear(x: &Tensor, g: &Tensor, w: &Tensor, eps: f64, gemm: Gemm) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&g.contiguous()?, &w.contiguous()?, NormLinear { eps: eps as f32, gemm })
}

// ---------------------------------------------------------------- RoPE + flash attention

#[derive(Debug)]
struct RopeAttention {
    rope: Option<RopeRows>,
    segments: Arc<Vec<(usize, usize)>>,
    heads: usize,
    lse: Mutex<Vec<f32>>,
}

/// Rotates the q and k columns of a (N, 3D) row-major qkv buffer in place (`sign` −1 inverts).
fn rotate_qkv(qkv: &mut [f32], rows: &RopeRows, dim: usize, sign: f32) {
    let half = rows.half;
    let table = rows.rows.max(1);
    qkv.par_chunks_mut(3 * dim).enumerate().for_each(|(tok, row)| {
        let r = tok % table;
        let (cos, sin) = (&rows.cos[r * half..(r + 1) * half], &rows.sin[r * half..(r + 1) * half]);
        rotate_row(&mut row[..2 * dim], cos, sin, sign);
    });
}

super::isa::multiversion! {
    /// Rotates consecutive heads of `half` pairs each (the q and k of one token) by the angles
    /// whose cosines and sines are `cos`, `sign`·`sin`.
    fn rotate_row<const _FMA: bool>(qk: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
        let half = cos.len();
        for head in qk.chunks_mut(2 * half) {
            for i in 0..half {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                let (c, s) = (cos[i], sign * sin[i]);
                head[2 * i] = x0 * c - x1 * s;
                head[2 * i + 1] = x1 * c + x0 * s;
            }
        }
    }
}

impl CustomOp1 for RopeAttention {
    fn name(&self) -> &'static str {
        "dpar-rope-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let three_dim = *l.dims().last().unwrap_or(&0);
        let dim = three_dim / 3;
        let n = rows_of(l, three_dim)?;
        let mut qkv = cpu_f32(s, l, "qkv")?.to_vec();
        if let Some(rows) = &self.rope {
            if rows.rows != n && (rows.rows == 0 || n % rows.rows != 0) {
                candle_core::bail!("rope_attention: table of {} rows for {n} tokens", rows.rows);
            }
            rotate_qkv(&mut qkv, rows, dim, 1.0);
        }
        let (out, lse) = super::attention::flash_forward(&qkv, n, self.heads, dim / self.heads, &self.segments)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), with_last(l.dims(), dim)))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let three_dim = arg.dim(candle_core::D::Minus1)?;
        let dim = three_dim / 3;
        let n = arg.elem_count() / three_dim;
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut dqkv = with_f32(arg, "qkv", |qkv| {
            with_f32(res, "out", |out| {
                with_f32(grad, "grad", |g| {
                    let mut rotated = qkv.to_vec();
                    if let Some(rows) = &self.rope {
                        rotate_qkv(&mut rotated, rows, dim, 1.0);
                    }
                    super::attention::flash_backward(
                        &rotated,
                        out,
                        g,
                        &lse,
                        n,
                        self.heads,
                        dim / self.heads,
                        &self.segments,
                    )
                })
            })
        })?;
        if let Some(rows) = &self.rope {
            rotate_qkv(&mut dqkv, rows, dim, -1.0);
        }
        Ok(Some(Tensor::from_vec(dqkv, arg.shape(), arg.device())?))
    }
}

/// RoPE (rows per token, or a shared table of T rows) on q and k of `qkv` (…, 3·H·d), then
/// causal attention within `segments` of the rows → (…, H·d).
pub fn rope_attention(
    qkv: &Tensor,
    rope: Option<&RopeRows>,
    heads: usize,
    segments: &[(usize, usize)],
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(RopeAttention {
        rope: rope.cloned(),
        segments: Arc::new(segments.to_vec()),
        heads,
        lse: Mutex::new(Vec::new()),
    })
}

// ---------------------------------------------------------------- linear + residual

/// A dropout mask (0 or 1/(1 − p) per element), or none.
pub type Mask = Option<Arc<Vec<f32>>>;

#[derive(Debug, Clone)]
struct LinearResidual {
    mask: Mask,
    gemm: Gemm,
}

fn apply_mask(v: &mut [f32], mask: &Mask) {
    if let Some(m) = mask {
        v.par_iter_mut().zip(m.par_iter()).for_each(|(x, k)| *x *= k);
    }
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "dpar-linear-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, k) = wl.shape().dims2()?;
        let n = rows_of(xl, k)?;
        if rows_of(rl, out)? != n {
            candle_core::bail!("linear_residual: residual {:?} does not match {n} rows × {out}", rl.dims());
        }
        let (x, w, r) = (cpu_f32(xs, xl, "x")?, cpu_f32(ws, wl, "weight")?, cpu_f32(rs, rl, "residual")?);
        let mut y = self.gemm.run_new(n, out, k, x, false, w, true);
        apply_mask(&mut y, &self.mask);
        y.par_iter_mut().zip(r.par_iter()).for_each(|(a, b)| *a += b);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let n = x.elem_count() / k;
        let (dx, dw) = with_f32(dy, "grad", |g| {
            let masked;
            let g = match &self.mask {
                Some(_) => {
                    let mut v = g.to_vec();
                    apply_mask(&mut v, &self.mask);
                    masked = v;
                    &masked[..]
                }
                None => g,
            };
            let dx = with_f32(w, "weight", |wv| Ok(self.gemm.run_new(n, k, out, g, false, wv, false)))?;
            let dw = with_f32(x, "x", |xv| Ok(self.gemm.run_new(out, k, n, g, true, xv, false)))?;
            Ok((dx, dw))
        })?;
        let dev = x.device();
        Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), Some(Tensor::from_vec(dw, (out, k), dev)?), Some(dy.clone())))
    }
}

/// `r + mask ⊙ (x·Wᵀ)`: x (…, in), W (out, in), r (…, out).
pub fn linear_residual(x: &Tensor, w: &Tensor, r: &Tensor, mask: Mask, gemm: Gemm) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &r.contiguous()?, LinearResidual { mask, gemm })
}

// ---------------------------------------------------------------- SwiGLU + linear + residual

#[derive(Debug, Clone)]
struct SwiGluLinearResidual {
    mask: Mask,
    gemm: Gemm,
}

super::isa::multiversion! {
    /// Writes every element of `o` (f) = silu(a) ⊙ b for one row [a | b] of 2f.
    fn swiglu_row<const _FMA: bool>(o: &mut [std::mem::MaybeUninit<f32>], hr: &[f32]) {
        let (a, b) = hr.split_at(o.len());
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            o.write(a * super::math::sigmoid(a) * b);
        }
    }
}

super::isa::multiversion! {
    /// Writes every element of `dr` (2f), the SwiGLU backward of one row [a | b] of `hr` for
    /// the gradient `dsr` (f) of silu(a) ⊙ b.
    fn swiglu_backward_row<const _FMA: bool>(dr: &mut [std::mem::MaybeUninit<f32>], hr: &[f32], dsr: &[f32]) {
        let f = dsr.len();
        let (da, db) = dr.split_at_mut(f);
        for j in 0..f {
            let a = hr[j];
            let sg = super::math::sigmoid(a);
            da[j].write(dsr[j] * hr[f + j] * sg * (1.0 + a * (1.0 - sg)));
            db[j].write(dsr[j] * a * sg);
        }
    }
}

/// silu(a) ⊙ b for every row of [a | b]. A new buffer, written once (no zero fill).
fn swiglu_rows(h: &[f32], f: usize) -> Vec<f32> {
    let rows = h.len() / (2 * f);
    assert_eq!(h.len(), rows * 2 * f, "swiglu: {} values are not rows of 2·{f}", h.len());
    let mut s = Vec::<f32>::with_capacity(rows * f);
    s.spare_capacity_mut()[..rows * f].par_chunks_mut(f).zip(h.par_chunks(2 * f)).for_each(|(o, hr)| swiglu_row(o, hr));
    // SAFETY: h is exactly `rows` rows of 2f (asserted), so the `rows` chunks of f slots are
    // each zipped with a whole row of h and the loop wrote all f elements of every one.
    unsafe { s.set_len(rows * f) };
    s
}

impl CustomOp3 for SwiGluLinearResidual {
    fn name(&self) -> &'static str {
        "dpar-swiglu-linear-residual"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, f) = wl.shape().dims2()?;
        let n = rows_of(hl, 2 * f)?;
        if rows_of(rl, out)? != n {
            candle_core::bail!("swiglu_linear_residual: residual {:?} does not match {n} rows × {out}", rl.dims());
        }
        let (h, w, r) = (cpu_f32(hs, hl, "h")?, cpu_f32(ws, wl, "weight")?, cpu_f32(rs, rl, "residual")?);
        let s = swiglu_rows(h, f);
        let mut y = self.gemm.run_new(n, out, f, &s, false, w, true);
        apply_mask(&mut y, &self.mask);
        y.par_iter_mut().zip(r.par_iter()).for_each(|(a, b)| *a += b);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, f) = w.dims2()?;
        let n = h.elem_count() / (2 * f);
        let mut dh = Vec::<f32>::with_capacity(n * 2 * f);
        let dw = with_f32(h, "h", |hv| {
            with_f32(w, "weight", |wv| {
                with_f32(dy, "grad", |g| {
                    let masked;
                    let g = match &self.mask {
                        Some(_) => {
                            let mut v = g.to_vec();
                            apply_mask(&mut v, &self.mask);
                            masked = v;
                            &masked[..]
                        }
                        None => g,
                    };
                    let s = swiglu_rows(hv, f);
                    let dw = self.gemm.run_new(out, f, n, g, true, &s, false);
                    drop(s);
                    let ds = self.gemm.run_new(n, f, out, g, false, wv, false);
                    dh.spare_capacity_mut()[..n * 2 * f]
                        .par_chunks_mut(2 * f)
                        .zip(hv.par_chunks(2 * f).zip(ds.par_chunks(f)))
                        .for_each(|(dr, (hr, dsr))| swiglu_backward_row(dr, hr, dsr));
                    Ok(dw)
                })
            })
        })?;
        // SAFETY: dh's first n·2f slots form n chunks of 2f; ds has n rows of f and hv (all of h,
        // n = its length / 2f) at least n rows of 2f, so the zip visited every chunk, and the
        // loop wrote elements j and f + j of each for every j < f: all 2f.
        unsafe { dh.set_len(n * 2 * f) };
        let dev = h.device();
        Ok((Some(Tensor::from_vec(dh, h.shape(), dev)?), Some(Tensor::from_vec(dw, (out, f), dev)?), Some(dy.clone())))
    }
}

/// `r + mask ⊙ (silu(a) ⊙ b)·W₂ᵀ` for h = [a | b] (…, 2F), W₂ (out, F), r (…, out).
pub fn swiglu_linear_residual(h: &Tensor, w2: &Tensor, r: &Tensor, mask: Mask, gemm: Gemm) -> Result<Tensor> {
    h.contiguous()?.apply_op3(&w2.contiguous()?, &r.contiguous()?, SwiGluLinearResidual { mask, gemm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::{rms_norm_reference, swiglu_reference};
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64, scale: f32) -> Var {
        let mut rng = crate::util::rng_for(seed, "block-test", 0);
        let n: usize = shape.iter().product();
        Var::from_tensor(
            &Tensor::from_vec(
                (0..n).map(|_| scale * rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn check(ours: &Tensor, reference: &Tensor, vars: &[&Var], seed: u64, tol: f32) {
        assert!(max_diff(ours, reference) < tol, "forward {}", max_diff(ours, reference));
        let probe = rand_var(ours.dims(), seed, 1.0);
        let g1 = (ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(d < tol, "gradient {i}: {d}");
        }
    }

    #[test]
    fn norm_linear_matches_composed_ops() {
        let x = rand_var(&[3, 5, 16], 1, 2.0);
        let g = rand_var(&[16], 2, 1.0);
        let w = rand_var(&[7, 16], 3, 0.5);
        let ours = norm_linear(&x, &g, &w, 1e-5, Gemm::F32).unwrap();
        let reference = rms_norm_reference(&x, &g, 1e-5).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        check(&ours, &reference, &[&x, &g, &w], 4, 1e-4);
    }

    /// The bf16 path: every fused matmul op equals the f32 composed reference within bf16
    /// tolerance (relative 2e-2 of the output scale; bf16 keeps 8 significant bits).
    #[test]
    fn bf16_ops_match_composed_ops_within_bf16_tolerance() {
        let rel = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            max_diff(a, b) / scale
        };
        let x = rand_var(&[4, 9, 32], 21, 2.0);
        let g = rand_var(&[32], 22, 1.0);
        let w = rand_var(&[24, 32], 23, 0.5);
        let ours = norm_linear(&x, &g, &w, 1e-5, Gemm::Bf16).unwrap();
        let reference = rms_norm_reference(&x, &g, 1e-5).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(rel(&ours, &reference) < 2e-2, "{}", rel(&ours, &reference));
        let probe = rand_var(&[4, 9, 24], 24, 1.0);
        let g1 = (&ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &g, &w] {
            let r = rel(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(r < 2e-2, "gradient: {r}");
        }
        let r = rand_var(&[4, 9, 24], 25, 1.0);
        let hh = rand_var(&[4, 9, 2 * 16], 26, 2.0);
        let w2 = rand_var(&[24, 16], 27, 0.5);
        let ours = swiglu_linear_residual(&hh, &w2, &r, None, Gemm::Bf16).unwrap();
        let reference =
            (r.as_tensor() + swiglu_reference(&hh).unwrap().broadcast_matmul(&w2.t().unwrap()).unwrap()).unwrap();
        assert!(rel(&ours, &reference) < 2e-2);
        let ours = linear_residual(&x, &w, &r, None, Gemm::Bf16).unwrap();
        let reference = (r.as_tensor() + x.broadcast_matmul(&w.t().unwrap()).unwrap()).unwrap();
        assert!(rel(&ours, &reference) < 2e-2);
    }

    #[test]
    fn rope_attention_matches_composed_ops() {
        let (h, d) = (2, 8);
        let segs = vec![(0, 1), (1, 9), (10, 5)];
        let qkv = rand_var(&[15, 3 * h * d], 5, 1.0);
        let table = crate::nn::rope::table_2d(4, d, 10000.0, 0);
        let rows = RopeRows::concat(&[table.narrow(0, 1), table.narrow(0, 9), table.narrow(3, 5)]);
        let ours = rope_attention(&qkv, Some(&rows), h, &segs).unwrap();
        let rotated = crate::nn::rope::apply_qkv(&qkv, &rows, h).unwrap();
        let reference = super::super::attention::attention_reference(&rotated, h, &segs).unwrap();
        check(&ours, &reference, &[&qkv], 6, 1e-4);
    }

    #[test]
    fn linear_residual_and_swiglu_linear_residual_match_composed_ops() {
        let x = rand_var(&[2, 6, 12], 7, 1.0);
        let w = rand_var(&[10, 12], 8, 0.5);
        let r = rand_var(&[2, 6, 10], 9, 1.0);
        let mut rng = crate::util::rng_for(1, "mask", 0);
        let mask: Vec<f32> = (0..120).map(|_| if rng.random::<f32>() < 0.2 { 0.0 } else { 1.25 }).collect();
        let mask_t = Tensor::from_vec(mask.clone(), (2, 6, 10), &Device::Cpu).unwrap();
        let ours = linear_residual(&x, &w, &r, Some(Arc::new(mask.clone())), Gemm::F32).unwrap();
        let reference = (r.as_tensor() + (x.broadcast_matmul(&w.t().unwrap()).unwrap() * &mask_t).unwrap()).unwrap();
        check(&ours, &reference, &[&x, &w, &r], 10, 1e-4);

        let hh = rand_var(&[2, 6, 2 * 9], 11, 2.0);
        let w2 = rand_var(&[10, 9], 12, 0.5);
        let ours = swiglu_linear_residual(&hh, &w2, &r, Some(Arc::new(mask)), Gemm::F32).unwrap();
        let reference = (r.as_tensor()
            + (swiglu_reference(&hh).unwrap().broadcast_matmul(&w2.t().unwrap()).unwrap() * &mask_t).unwrap())
        .unwrap();
        check(&ours, &reference, &[&hh, &w2, &r], 13, 1e-4);
        let ours = swiglu_linear_residual(&hh, &w2, &r, None, Gemm::F32).unwrap();
        let reference =
            (r.as_tensor() + swiglu_reference(&hh).unwrap().broadcast_matmul(&w2.t().unwrap()).unwrap()).unwrap();
        check(&ours, &reference, &[&hh, &w2, &r], 14, 1e-4);
    }
}
