//! 2-D convolution (NCHW, square kernel, no dilation, groups = 1) as im2col + GEMM, forward and
//! backward, with asymmetric zero padding (LlamaGen's downsample pads right/bottom only).
//!
//! Per image `b`: `cols_b (C·k·k × Ho·Wo) = im2col(x_b)`, `y_b (O × Ho·Wo) = W (O × C·k·k) · cols_b`.
//! Backward: `dW = Σ_b dy_b · cols_bᵀ`, `dx_b = col2im(Wᵀ · dy_b)`. Images are spread over rayon's
//! threads, each running a single-threaded GEMM; a batch of one uses a threaded GEMM instead.
//!
//! # Shapes
//! x (B, C, H, W), w (O, C, k, k) → y (B, O, Ho, Wo)

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_f32;
use super::gemm::{sgemm, threads};

/// Geometry of a convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvParams {
    pub stride: usize,
    /// Zero padding (top, bottom, left, right).
    pub pad: (usize, usize, usize, usize),
}

impl ConvParams {
    /// Symmetric padding `p` on every side.
    pub fn symmetric(stride: usize, p: usize) -> Self {
        Self { stride, pad: (p, p, p, p) }
    }

    fn out_size(&self, h: usize, w: usize, k: usize) -> Result<(usize, usize)> {
        let (pt, pb, pl, pr) = self.pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if self.stride == 0 || hp < k || wp < k {
            candle_core::bail!("conv2d: kernel {k} does not fit the padded input {hp}×{wp} (stride {})", self.stride);
        }
        Ok(((hp - k) / self.stride + 1, (wp - k) / self.stride + 1))
    }

    fn is_pointwise(&self, k: usize) -> bool {
        k == 1 && self.stride == 1 && self.pad == (0, 0, 0, 0)
    }
}

/// Geometry of one call, derived from the input shapes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn cols_len(&self) -> usize {
        self.c * self.k * self.k * self.ho * self.wo
    }
}

/// The output columns `[lo, hi)` whose input column `ox·stride + kx − pl` lies inside the image.
fn valid_range(out_len: usize, in_len: usize, stride: usize, offset: isize) -> (usize, usize) {
    // ix = ox·stride + offset ∈ [0, in_len)
    let lo = if offset >= 0 { 0 } else { ((-offset) as usize).div_ceil(stride) };
    let hi_num = in_len as isize - offset; // ox·stride < hi_num
    let hi = if hi_num <= 0 { 0 } else { ((hi_num as usize).div_ceil(stride)).min(out_len) };
    (lo.min(hi), hi)
}

/// cols (C·k·k × Ho·Wo) of one image.
fn im2col(x: &[f32], g: &Geometry, p: &ConvParams, cols: &mut [f32]) {
    let (pt, _, pl, _) = p.pad;
    let n = g.ho * g.wo;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut cols[((c * g.k + ky) * g.k + kx) * n..][..n];
                let offset = kx as isize - pl as isize;
                let (lo, hi) = valid_range(g.wo, g.w, p.stride, offset);
                for oy in 0..g.ho {
                    let iy = (oy * p.stride + ky) as isize - pt as isize;
                    let out = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let start = (lo as isize * p.stride as isize + offset) as usize;
                    if p.stride == 1 {
                        out[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                    } else {
                        for (o, s) in out[lo..hi].iter_mut().zip(src[start..].iter().step_by(p.stride)) {
                            *o = *s;
                        }
                    }
                }
            }
        }
    }
}

/// Adds cols (C·k·k × Ho·Wo) back into one image's gradient (the adjoint of [`im2col`]).
fn col2im(cols: &[f32], g: &Geometry, p: &ConvParams, dx: &mut [f32]) {
    let (pt, _, pl, _) = p.pad;
    let n = g.ho * g.wo;
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &cols[((c * g.k + ky) * g.k + kx) * n..][..n];
                let offset = kx as isize - pl as isize;
                let (lo, hi) = valid_range(g.wo, g.w, p.stride, offset);
                for oy in 0..g.ho {
                    let iy = (oy * p.stride + ky) as isize - pt as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let start = (lo as isize * p.stride as isize + offset) as usize;
                    let src = &row[oy * g.wo + lo..oy * g.wo + hi];
                    for (d, v) in dst[start..].iter_mut().step_by(p.stride).zip(src) {
                        *d += v;
                    }
                }
            }
        }
    }
}

fn geometry(x_shape: &[usize], w_shape: &[usize], p: &ConvParams) -> Result<Geometry> {
    let (&[b, c, h, w], &[o, cw, k, k2]) = (x_shape, w_shape) else {
        candle_core::bail!("conv2d: expected 4-D input and kernel, got {x_shape:?} and {w_shape:?}");
    };
    if c != cw || k != k2 {
        candle_core::bail!("conv2d: input {x_shape:?} does not fit kernel {w_shape:?} (square kernels only)");
    }
    let (ho, wo) = p.out_size(h, w, k)?;
    Ok(Geometry { b, c, h, w, o, k, ho, wo })
}

/// Per-image work split: images over threads, single-threaded GEMMs; one image: threaded GEMM.
fn gemm_threads(batch: usize) -> usize {
    if batch >= threads() {
        1
    } else {
        threads()
    }
}

struct Conv2dFwd(ConvParams);

impl CustomOp2 for Conv2dFwd {
    fn name(&self) -> &'static str {
        "dpar-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = geometry(xl.dims(), wl.dims(), &self.0)?;
        let x = cpu_f32(xs, xl, "conv2d input")?;
        let w = cpu_f32(ws, wl, "conv2d kernel")?;
        let (kk, n) = (g.c * g.k * g.k, g.ho * g.wo);
        let mut out = vec![0f32; g.b * g.o * n];
        let pointwise = self.0.is_pointwise(g.k);
        let t = gemm_threads(g.b);
        out.par_chunks_mut(g.o * n).enumerate().for_each_init(
            || if pointwise { Vec::new() } else { vec![0f32; g.cols_len()] },
            |cols, (bi, y)| {
                let xb = &x[bi * g.c * g.h * g.w..(bi + 1) * g.c * g.h * g.w];
                let cols: &[f32] = if pointwise {
                    xb
                } else {
                    im2col(xb, &g, &self.0, cols);
                    cols
                };
                sgemm(y, w, cols, g.o, n, kk, false, false, false, t);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &Conv2dBwdInput { params: self.0, x_shape: x.dims().to_vec() })?;
        let dw = x.apply_op2_no_bwd(&grad, &Conv2dBwdKernel { params: self.0, w_shape: w.dims().to_vec() })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx from (dy, w).
struct Conv2dBwdInput {
    params: ConvParams,
    x_shape: Vec<usize>,
}

impl CustomOp2 for Conv2dBwdInput {
    fn name(&self) -> &'static str {
        "dpar-conv2d-bwd-input"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = geometry(&self.x_shape, wl.dims(), &self.params)?;
        let dy = cpu_f32(gs, gl, "conv2d grad")?;
        let w = cpu_f32(ws, wl, "conv2d kernel")?;
        let (kk, n) = (g.c * g.k * g.k, g.ho * g.wo);
        let mut dx = vec![0f32; g.b * g.c * g.h * g.w];
        let pointwise = self.params.is_pointwise(g.k);
        let t = gemm_threads(g.b);
        dx.par_chunks_mut(g.c * g.h * g.w).enumerate().for_each_init(
            || if pointwise { Vec::new() } else { vec![0f32; g.cols_len()] },
            |cols, (bi, dxb)| {
                let dyb = &dy[bi * g.o * n..(bi + 1) * g.o * n];
                if pointwise {
                    sgemm(dxb, w, dyb, kk, n, g.o, true, false, false, t);
                } else {
                    sgemm(cols, w, dyb, kk, n, g.o, true, false, false, t);
                    col2im(cols, &g, &self.params, dxb);
                }
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from(self.x_shape.clone())))
    }
}

/// dW from (x, dy).
struct Conv2dBwdKernel {
    params: ConvParams,
    w_shape: Vec<usize>,
}

impl CustomOp2 for Conv2dBwdKernel {
    fn name(&self) -> &'static str {
        "dpar-conv2d-bwd-kernel"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = geometry(xl.dims(), &self.w_shape, &self.params)?;
        let x = cpu_f32(xs, xl, "conv2d input")?;
        let dy = cpu_f32(gs, gl, "conv2d grad")?;
        let (kk, n) = (g.c * g.k * g.k, g.ho * g.wo);
        let pointwise = self.params.is_pointwise(g.k);
        let workers = threads().min(g.b).max(1);
        let per = g.b.div_ceil(workers);
        let t = gemm_threads(g.b);
        let partials: Vec<Vec<f32>> = (0..workers)
            .into_par_iter()
            .map(|wi| {
                let mut acc = vec![0f32; g.o * kk];
                let mut cols = if pointwise { Vec::new() } else { vec![0f32; g.cols_len()] };
                for bi in wi * per..((wi + 1) * per).min(g.b) {
                    let xb = &x[bi * g.c * g.h * g.w..(bi + 1) * g.c * g.h * g.w];
                    let colsb: &[f32] = if pointwise {
                        xb
                    } else {
                        im2col(xb, &g, &self.params, &mut cols);
                        &cols
                    };
                    let dyb = &dy[bi * g.o * n..(bi + 1) * g.o * n];
                    sgemm(&mut acc, dyb, colsb, g.o, kk, n, false, true, true, t);
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; g.o * kk];
        for part in partials {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(dw), Shape::from(self.w_shape.clone())))
    }
}

/// Convolution of `x` (B, C, H, W) with `w` (O, C, k, k). On CPU f32 it runs our im2col + GEMM
/// kernels (forward and backward); elsewhere it falls back to candle's `conv2d` (with explicit
/// zero padding for the asymmetric case).
pub fn conv2d(x: &Tensor, w: &Tensor, params: ConvParams) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dFwd(params));
    }
    let (pt, pb, pl, pr) = params.pad;
    if pt == pb && pl == pr && pt == pl {
        return x.conv2d(w, pt, params.stride, 1, 1);
    }
    x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?.conv2d(w, 0, params.stride, 1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::util::rng_for(seed, "conv-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward and both gradients equal candle's composed reference (explicit padding + stock
    /// conv2d), for 3×3 same, 3×3 stride-2 with right/bottom padding, and 1×1 convolutions.
    #[test]
    fn conv_matches_candle_forward_and_backward() {
        let cases = [
            ((3, 5, 9, 7), (4, 5, 3, 3), ConvParams::symmetric(1, 1)),
            ((2, 4, 8, 8), (4, 4, 3, 3), ConvParams { stride: 2, pad: (0, 1, 0, 1) }),
            ((2, 6, 5, 3), (3, 6, 1, 1), ConvParams::symmetric(1, 0)),
            ((1, 3, 6, 6), (2, 3, 3, 3), ConvParams::symmetric(1, 1)),
        ];
        for (i, (xs, ws, p)) in cases.into_iter().enumerate() {
            let x = Var::from_tensor(&rand_tensor(&[xs.0, xs.1, xs.2, xs.3], i as u64)).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[ws.0, ws.1, ws.2, ws.3], 100 + i as u64)).unwrap();
            let probe = rand_tensor(&[xs.0, ws.0, 1, 1], 200 + i as u64);
            let (pt, pb, pl, pr) = p.pad;
            let reference = x
                .pad_with_zeros(2, pt, pb)
                .unwrap()
                .pad_with_zeros(3, pl, pr)
                .unwrap()
                .conv2d(&w, 0, p.stride, 1, 1)
                .unwrap();
            let ours = conv2d(&x, &w, p).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "case {i}");
            assert!(max_diff(&ours, &reference) < 1e-5, "forward case {i}");
            let loss = |y: &Tensor| y.broadcast_mul(&probe).unwrap().sum_all().unwrap();
            let g_ref = loss(&reference).backward().unwrap();
            let g_ours = loss(&ours).backward().unwrap();
            for (name, var) in [("x", &x), ("w", &w)] {
                let a = g_ref.get(var.as_tensor()).unwrap();
                let b = g_ours.get(var.as_tensor()).unwrap();
                assert!(max_diff(a, b) < 1e-4, "grad {name} case {i}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = rand_tensor(&[1, 3, 4, 4], 0);
        let w = rand_tensor(&[2, 4, 3, 3], 1);
        assert!(conv2d(&x, &w, ConvParams::symmetric(1, 1)).is_err());
        let w = rand_tensor(&[2, 3, 5, 5], 1);
        assert!(conv2d(&x, &w, ConvParams::symmetric(1, 0)).is_err());
    }
}
