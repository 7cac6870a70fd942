//! Linear layers (`y = x·Wᵀ`) as a CustomOp whose forward and backward GEMMs run on faer.
//!
//! Measured on the model's own shapes on this machine (two cores, `dpar bench speed
//! --matmul`), faer's GEMM ran 5–25 % faster than the `gemm` crate candle uses and on par with
//! or faster than OpenBLAS, without a C dependency; faer is already the project's linear-algebra
//! crate. The op also avoids candle's transposed copies in the backward pass.
//!
//! # Shapes
//! x (N, in), w (out, in) → y (N, out)

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use faer::{Accum, MatMut, MatRef, Par};

thread_local! {
    /// FLOPs (2·m·n·k) of every dense GEMM this thread ran through [`Gemm::run`] /
    /// [`faer_gemm`] since the last [`take_flop_count`] (ops run on the calling thread), so the
    /// analytic FLOP formulas can be checked against counted shapes.
    static GEMM_FLOPS: Cell<u64> = const { Cell::new(0) };
}

/// Returns the GEMM FLOPs this thread counted since the previous call and resets the counter.
pub fn take_flop_count() -> u64 {
    GEMM_FLOPS.with(|c| c.replace(0))
}

fn count(m: usize, n: usize, k: usize) {
    GEMM_FLOPS.with(|c| c.set(c.get() + 2 * (m * n * k) as u64));
}

use super::{cpu_f32, with_f32};

/// `dst (m×n) = [dst +] op(a)·op(b)` on row-major slices with faer: `a` is m×k (k×m when
/// `trans_a`), `b` is k×n (n×k when `trans_b`). Uses every rayon thread.
#[allow(clippy::too_many_arguments)]
pub fn faer_gemm(dst: &mut [f32], m: usize, n: usize, k: usize, a: &[f32], trans_a: bool, b: &[f32], trans_b: bool, accumulate: bool) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "faer_gemm: slices too small for {m}×{n}×{k}");
    count(m, n, k);
    let a = if trans_a { MatRef::from_row_major_slice(&a[..m * k], k, m).transpose() } else { MatRef::from_row_major_slice(&a[..m * k], m, k) };
    let b = if trans_b { MatRef::from_row_major_slice(&b[..k * n], n, k).transpose() } else { MatRef::from_row_major_slice(&b[..k * n], k, n) };
    let c = MatMut::from_row_major_slice_mut(&mut dst[..m * n], m, n);
    let accum = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(c, accum, a, b, 1.0f32, Par::rayon(rayon::current_num_threads()));
}

/// The precision of a GEMM: f32, or bf16 operands with f32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    F32,
    Bf16,
}

impl Gemm {
    /// `dst = [dst +] op(a)·op(b)` (see [`faer_gemm`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run(self, dst: &mut [f32], m: usize, n: usize, k: usize, a: &[f32], trans_a: bool, b: &[f32], trans_b: bool, accumulate: bool) {
        match self {
            Gemm::F32 => faer_gemm(dst, m, n, k, a, trans_a, b, trans_b, accumulate),
            Gemm::Bf16 => {
                count(m, n, k);
                super::bf16::bf16_gemm(dst, m, n, k, a, trans_a, b, trans_b, accumulate)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct LinearOp(Gemm);

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "dpar-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = xl.shape().dims2()?;
        let (out, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("linear: input {:?} does not fit weight {:?}", xl.dims(), wl.dims());
        }
        let x = cpu_f32(xs, xl, "linear input")?;
        let w = cpu_f32(ws, wl, "linear weight")?;
        let mut y = super::block::uninit(n * out);
        self.0.run(&mut y, n, out, k, x, false, w, true, false);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let out = w.dim(0)?;
        let mut dx = super::block::uninit(n * k);
        let mut dw = super::block::uninit(out * k);
        with_f32(grad, "linear grad", |g| {
            with_f32(w, "linear weight", |wv| {
                self.0.run(&mut dx, n, k, out, g, false, wv, false, false);
                Ok(())
            })?;
            with_f32(x, "linear input", |xv| {
                self.0.run(&mut dw, out, k, n, g, true, xv, false, false);
                Ok(())
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, (n, k), x.device())?), Some(Tensor::from_vec(dw, (out, k), w.device())?)))
    }
}

/// `x·Wᵀ` for x (N, in) and W (out, in) on CPU f32.
pub fn linear(x: &Tensor, w: &Tensor, gemm: Gemm) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp(gemm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::util::rng_for(seed, "mm-test", 0);
        let n: usize = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec((0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn linear_matches_candle_matmul_forward_and_backward() {
        let x = rand_var(&[37, 19], 1);
        let w = rand_var(&[23, 19], 2);
        let probe = rand_var(&[37, 23], 3);
        let a = linear(&x, &w, Gemm::F32).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        let diff = |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&a, &b) < 1e-5);
        let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-4);
        }
    }
}
