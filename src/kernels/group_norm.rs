//! GroupNorm with an optional fused SiLU, forward and backward in one pass each.
//!
//! candle-nn's `GroupNorm` is composed of ~10 element-wise ops (each a full pass over memory and
//! an allocation) and the swish after it adds three more; the VQ tokenizer runs a dozen of them
//! per image. Here: one pass for the statistics, one to write the output; the backward
//! recomputes the statistics rather than storing them.
//!
//! y = GN(x)·γ + β, optionally followed by silu(y) = y·σ(y).
//! Backward per group, with x̂ = (x − μ)·r and g = dŷ·γ:
//! dx = r·(g − mean(g) − x̂·mean(g·x̂)), dγ_c = Σ dŷ·x̂, dβ_c = Σ dŷ.
//!
//! # Shapes
//! x (B, C, …) (any trailing spatial dims), γ and β (C)

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, with_f32};

#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

fn sigmoid(v: f32) -> f32 {
    super::math::sigmoid(v)
}

/// (mean, 1/std) of a group's values, accumulated in f64.
fn stats(values: &[f32], eps: f32) -> (f32, f32) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

impl GroupNormOp {
    fn dims(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        if shape.len() < 2 {
            candle_core::bail!("group_norm: input needs at least 2 dims, got {shape:?}");
        }
        let (b, c) = (shape[0], shape[1]);
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!("group_norm: {} groups do not divide {c} channels", self.groups);
        }
        let spatial: usize = shape[2..].iter().product();
        Ok((b, c, spatial))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "dpar-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = self.dims(xl.dims())?;
        let x = cpu_f32(xs, xl, "group_norm input")?;
        let gamma = cpu_f32(gs, gl, "group_norm weight")?;
        let beta = cpu_f32(bs, bl, "group_norm bias")?;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("group_norm: weight/bias must have {c} elements");
        }
        let cpg = c / self.groups;
        let block = cpg * hw;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(bg, (y, xv))| {
            let (mean, rstd) = stats(xv, self.eps);
            let g0 = (bg % self.groups) * cpg;
            for ci in 0..cpg {
                let (scale, shift) = (gamma[g0 + ci] * rstd, beta[g0 + ci] - mean * rstd * gamma[g0 + ci]);
                for (o, &v) in y[ci * hw..(ci + 1) * hw].iter_mut().zip(&xv[ci * hw..(ci + 1) * hw]) {
                    let pre = v * scale + shift;
                    *o = if self.silu { pre * sigmoid(pre) } else { pre };
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, hw) = self.dims(x.dims())?;
        let cpg = c / self.groups;
        let block = cpg * hw;
        let gamma_v = gamma.to_vec1::<f32>()?;
        let beta_v = beta.to_vec1::<f32>()?;
        let mut dx = vec![0f32; b * c * hw];
        // Per (image, channel) partial sums of dγ and dβ, reduced over images afterwards.
        let mut dgamma_part = vec![0f32; b * c];
        let mut dbeta_part = vec![0f32; b * c];
        with_f32(x, "group_norm input", |xv| {
            with_f32(grad, "group_norm grad", |gv| {
                dx.par_chunks_mut(block)
                    .zip(dgamma_part.par_chunks_mut(cpg).zip(dbeta_part.par_chunks_mut(cpg)))
                    .enumerate()
                    .for_each(|(bg, (dxb, (dgam, dbet)))| {
                        let xs = &xv[bg * block..(bg + 1) * block];
                        let gs = &gv[bg * block..(bg + 1) * block];
                        let (mean, rstd) = stats(xs, self.eps);
                        let g0 = (bg % self.groups) * cpg;
                        // Pass 1: dŷ (through the SiLU), γ-scaled gradient g, and its two means.
                        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                        for ci in 0..cpg {
                            let (gam, bet) = (gamma_v[g0 + ci], beta_v[g0 + ci]);
                            let (mut dg, mut db) = (0f32, 0f32);
                            for i in ci * hw..(ci + 1) * hw {
                                let xhat = (xs[i] - mean) * rstd;
                                let dyhat = if self.silu {
                                    let pre = xhat * gam + bet;
                                    let s = sigmoid(pre);
                                    gs[i] * s * (1.0 + pre * (1.0 - s))
                                } else {
                                    gs[i]
                                };
                                dg += dyhat * xhat;
                                db += dyhat;
                                let g = dyhat * gam;
                                dxb[i] = g;
                                sum_g += g as f64;
                                sum_gx += (g * xhat) as f64;
                            }
                            dgam[ci] = dg;
                            dbet[ci] = db;
                        }
                        // Pass 2: dx = r·(g − mean(g) − x̂·mean(g·x̂)).
                        let n = block as f64;
                        let (mg, mgx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
                        for i in 0..block {
                            let xhat = (xs[i] - mean) * rstd;
                            dxb[i] = rstd * (dxb[i] - mg - xhat * mgx);
                        }
                    });
                Ok(())
            })
        })?;
        let sum_over_images = |part: Vec<f32>| -> Vec<f32> {
            let mut out = vec![0f32; c];
            for chunk in part.chunks(c) {
                out.iter_mut().zip(chunk).for_each(|(o, v)| *o += v);
            }
            out
        };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(sum_over_images(dgamma_part), c, dev)?),
            Some(Tensor::from_vec(sum_over_images(dbeta_part), c, dev)?),
        ))
    }
}

/// GroupNorm over `groups` channel groups with affine `weight`/`bias`, optionally followed by
/// SiLU. CPU f32 runs the fused kernels; other devices use the composed candle ops.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op3(weight, bias, GroupNormOp { groups, eps: eps as f32, silu });
    }
    let y = group_norm_reference(x, weight, bias, groups, eps)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// The composed reference (candle-nn's formula), used off-CPU and in tests.
pub fn group_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let c = x.dim(1)?;
    let norm = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
    candle_nn::Module::forward(&norm, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand_var(shape: &[usize], seed: u64, offset: f32) -> Var {
        let mut rng = crate::util::rng_for(seed, "gn-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + rng.random_range(-1.0..1.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward and all three gradients equal the composed candle-nn GroupNorm (+ silu), within
    /// 1e-4 (f32), on odd shapes.
    #[test]
    fn fused_group_norm_matches_the_composed_reference() {
        for (i, (shape, groups, silu)) in
            [(vec![3, 6, 5, 7], 3, true), (vec![2, 8, 4, 4], 8, false), (vec![1, 4, 9], 2, true)]
                .into_iter()
                .enumerate()
        {
            let x = rand_var(&shape, i as u64, 0.5);
            let w = rand_var(&[shape[1]], 10 + i as u64, 1.0);
            let b = rand_var(&[shape[1]], 20 + i as u64, 0.0);
            let probe = rand_var(&shape, 30 + i as u64, 0.0);
            let reference = group_norm_reference(&x, &w, &b, groups, 1e-6).unwrap();
            let reference = if silu { reference.silu().unwrap() } else { reference };
            let ours = group_norm(&x, &w, &b, groups, 1e-6, silu).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "forward case {i}");
            let loss = |y: &Tensor| (y * probe.as_tensor()).unwrap().sum_all().unwrap();
            let g1 = loss(&reference).backward().unwrap();
            let g2 = loss(&ours).backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(d < 1e-4, "grad {name} case {i}: {d}");
            }
        }
    }
}
