//! Rotary position embeddings: LlamaGen's 2D RoPE (design §3.1) and DPAR's Dynamic RoPE
//! (design §3.2), applied by one CPU kernel with a backward pass.
//!
//! Layout: `d/2` rotation pairs, *interleaved* (elements 2i and 2i+1 of a head vector, not the
//! half-split layout). A table holds, per sequence position, `d/2` angles as cos and sin.
//! Class slots get cos = sin = 0 (not the identity), so their q and k are exactly zero in every
//! layer, as in LlamaGen's released weights.
//!
//! # Shapes
//! x (B, H, T, d); table rows (T, d/2), or (B·T, d/2) when every batch row has its own positions.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_f32;

pub use crate::kernels::rope_rows::RopeRows;

/// d/4 frequencies ω_j = base^(−4j/d), j = 0 … d/4 − 1 (LlamaGen's 2D RoPE).
pub fn freqs_2d(head_dim: usize, base: f64) -> Vec<f64> {
    (0..head_dim / 4).map(|j| base.powf(-4.0 * j as f64 / head_dim as f64)).collect()
}

/// Angles of grid cell (row, col): pairs [0, d/4) rotate by row·ω_j, pairs [d/4, d/2) by col·ω_j.
pub fn angles_2d(row: usize, col: usize, freqs: &[f64]) -> Vec<f32> {
    let mut a: Vec<f32> = freqs.iter().map(|w| (row as f64 * w) as f32).collect();
    a.extend(freqs.iter().map(|w| (col as f64 * w) as f32));
    a
}

/// LlamaGen's 2D table: `cls_token_num` zero rows, then one row per code in raster order
/// (code k at row k div G, column k mod G). Requires d divisible by 4.
pub fn table_2d(grid: usize, head_dim: usize, base: f64, cls_token_num: usize) -> RopeRows {
    let freqs = freqs_2d(head_dim, base);
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; cls_token_num];
    for k in 0..grid * grid {
        rows.push(Some(angles_2d(k / grid, k % grid, &freqs)));
    }
    RopeRows::from_angles(&rows, head_dim / 2)
}

/// How the patch transformer encodes a patch's position (paper Table 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchRope {
    /// `dynamic_4d` (design §3.2): row, then start/end/end/start column groups.
    Dynamic4d,
    /// Dynamic RoPE without the repeated groups: row, then start and end columns once each.
    Dynamic2d,
    /// Plain 2D RoPE at the patch's first code (row, start column).
    Plain2d,
}

/// Angles of a patch covering codes `start ..= end` (inside one row when rows reset).
///
/// `Dynamic4d`: pairs [0, d/4) rotate by r·ω_j (as 2D RoPE's row part); then four groups of d/16
/// pairs by cs·φ_m, ce·φ_m, ce·φ_m, cs·φ_m with φ_m = base^(−16m/d). `Dynamic2d`: after the row
/// part, two groups of d/8 pairs by cs·φ'_m and ce·φ'_m, φ'_m = base^(−8m/d). `Plain2d`: the 2D
/// RoPE angles of the start code.
pub fn patch_angles(start: usize, end: usize, grid: usize, head_dim: usize, base: f64, mode: PatchRope) -> Vec<f32> {
    let (row, cs, ce) = (start / grid, start % grid, end % grid);
    let row_part = freqs_2d(head_dim, base).into_iter().map(|w| (row as f64 * w) as f32);
    let group = |pos: usize, n: usize, step: f64| -> Vec<f32> {
        (0..n).map(|m| (pos as f64 * base.powf(-step * m as f64 / head_dim as f64)) as f32).collect()
    };
    match mode {
        PatchRope::Plain2d => angles_2d(row, cs, &freqs_2d(head_dim, base)),
        PatchRope::Dynamic4d => {
            let n = head_dim / 16;
            let mut a: Vec<f32> = row_part.collect();
            a.extend(group(cs, n, 16.0));
            a.extend(group(ce, n, 16.0));
            a.extend(group(ce, n, 16.0));
            a.extend(group(cs, n, 16.0));
            a
        }
        PatchRope::Dynamic2d => {
            let n = head_dim / 8;
            let mut a: Vec<f32> = row_part.collect();
            a.extend(group(cs, n, 8.0));
            a.extend(group(ce, n, 8.0));
            a
        }
    }
}

#[derive(Debug, Clone)]
struct RopeOp {
    rows: RopeRows,
    /// Rotate by −angle (the backward pass).
    inverse: bool,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "dpar-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[b, h, t, d] = l.dims() else {
            candle_core::bail!("rope: expected (B, H, T, d), got {:?}", l.dims());
        };
        let half = self.rows.half;
        if d != 2 * half {
            candle_core::bail!("rope: head dim {d} does not match the table's {} pairs", half);
        }
        let per_batch = if self.rows.rows == t {
            false
        } else if self.rows.rows == b * t {
            true
        } else {
            candle_core::bail!("rope: table has {} rows for B = {b}, T = {t}", self.rows.rows);
        };
        let x = cpu_f32(s, l, "rope input")?;
        let mut out = vec![0f32; x.len()];
        let sign = if self.inverse { -1.0 } else { 1.0 };
        out.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(bh, (o, xi))| {
            let bi = bh / h;
            for ti in 0..t {
                let row = if per_batch { bi * t + ti } else { ti };
                let cos = &self.rows.cos[row * half..(row + 1) * half];
                let sin = &self.rows.sin[row * half..(row + 1) * half];
                let xs = &xi[ti * d..(ti + 1) * d];
                let os = &mut o[ti * d..(ti + 1) * d];
                for i in 0..half {
                    let (x0, x1) = (xs[2 * i], xs[2 * i + 1]);
                    let (c, sn) = (cos[i], sign * sin[i]);
                    os[2 * i] = x0 * c - x1 * sn;
                    os[2 * i + 1] = x1 * c + x0 * sn;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its adjoint is the rotation by −angle. Class-slot rows
        // (cos = sin = 0) map everything to zero both ways.
        let inv = RopeOp { rows: self.rows.clone(), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(inv)?))
    }
}

/// RoPE applied in place of the fused projection `qkv` (N, 3·H·d): q and k of every head are
/// rotated, v is copied. Token n uses row n (one row per token) or row n mod T (a shared table
/// of T rows for B sequences of T tokens). This is the layout the flash-attention kernel reads.
#[derive(Debug, Clone)]
struct RopeQkvOp {
    rows: RopeRows,
    heads: usize,
    inverse: bool,
}

impl CustomOp1 for RopeQkvOp {
    fn name(&self) -> &'static str {
        "dpar-rope-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, three_dim) = l.shape().dims2()?;
        let half = self.rows.half;
        let dim = three_dim / 3;
        if three_dim != 3 * dim || dim != self.heads * 2 * half {
            candle_core::bail!(
                "rope_qkv: {three_dim} columns do not hold 3 × {} heads × {} dims",
                self.heads,
                2 * half
            );
        }
        let table_rows = self.rows.rows;
        if table_rows == 0 || (table_rows != n && n % table_rows != 0) {
            candle_core::bail!("rope_qkv: table of {table_rows} rows for {n} tokens");
        }
        let x = cpu_f32(s, l, "rope_qkv input")?;
        let mut out = x.to_vec();
        let sign = if self.inverse { -1.0 } else { 1.0 };
        out.par_chunks_mut(three_dim).enumerate().for_each(|(tok, row)| {
            let r = tok % table_rows;
            let cos = &self.rows.cos[r * half..(r + 1) * half];
            let sin = &self.rows.sin[r * half..(r + 1) * half];
            // q and k blocks: columns [0, 2·dim); each head is 2·half wide.
            for head_vec in row[..2 * dim].chunks_mut(2 * half) {
                for i in 0..half {
                    let (x0, x1) = (head_vec[2 * i], head_vec[2 * i + 1]);
                    let (c, sn) = (cos[i], sign * sin[i]);
                    head_vec[2 * i] = x0 * c - x1 * sn;
                    head_vec[2 * i + 1] = x1 * c + x0 * sn;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inv = RopeQkvOp { rows: self.rows.clone(), heads: self.heads, inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(inv)?))
    }
}

/// Rotates q and k inside a fused `qkv` (N, 3·H·d) (see `RopeQkvOp`); CPU f32 only, other
/// devices go through the (B, H, T, d) path.
pub fn apply_qkv(qkv: &Tensor, rows: &RopeRows, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(RopeQkvOp { rows: rows.clone(), heads, inverse: false })
}

/// Applies the rotations of `rows` to `x` (B, H, T, d). CPU f32 uses our kernel; other devices
/// use the composed formula.
pub fn apply(x: &Tensor, rows: &RopeRows) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(RopeOp { rows: rows.clone(), inverse: false });
    }
    apply_reference(x, rows)
}

/// The composed reference: reshape to pairs, rotate with broadcast multiplies.
pub fn apply_reference(x: &Tensor, rows: &RopeRows) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    let dev = x.device();
    let (cos, sin) = if rows.rows == t {
        (
            Tensor::from_slice(&rows.cos[..], (1, 1, t, half, 1), dev)?,
            Tensor::from_slice(&rows.sin[..], (1, 1, t, half, 1), dev)?,
        )
    } else {
        (
            Tensor::from_slice(&rows.cos[..], (b, 1, t, half, 1), dev)?,
            Tensor::from_slice(&rows.sin[..], (b, 1, t, half, 1), dev)?,
        )
    };
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    let pairs = x.reshape((b, h, t, half, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?;
    let x1 = pairs.narrow(4, 1, 1)?;
    let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let y1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y0, y1], 4)?.reshape((b, h, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::Rng;

    #[test]
    fn class_row_is_zero_and_code_rows_hold_row_and_column_angles() {
        let (grid, d) = (4, 16);
        let table = table_2d(grid, d, 10000.0, 1);
        assert_eq!(table.rows, 1 + grid * grid);
        assert!(table.cos[..d / 2].iter().chain(&table.sin[..d / 2]).all(|&v| v == 0.0));
        let freqs = freqs_2d(d, 10000.0);
        assert_eq!(freqs.len(), d / 4);
        assert!((freqs[1] - 10000f64.powf(-4.0 / 16.0)).abs() < 1e-12);
        for k in 0..grid * grid {
            let (r, c) = (k / grid, k % grid);
            for (j, &f) in freqs.iter().enumerate() {
                let want_r = (r as f64 * f) as f32;
                let want_c = (c as f64 * f) as f32;
                // Row 1+k holds code k: pairs [0, d/4) by the row, [d/4, d/2) by the column.
                assert!((table.cos[(1 + k) * d / 2 + j] - want_r.cos()).abs() < 1e-6);
                assert!((table.sin[(1 + k) * d / 2 + j] - want_r.sin()).abs() < 1e-6);
                assert!((table.cos[(1 + k) * d / 2 + d / 4 + j] - want_c.cos()).abs() < 1e-6);
                assert!((table.sin[(1 + k) * d / 2 + d / 4 + j] - want_c.sin()).abs() < 1e-6);
            }
        }
    }

    fn rand_var(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::util::rng_for(seed, "rope-test", 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn kernel_matches_the_composed_rotation_forward_and_backward() {
        let table = table_2d(3, 8, 10000.0, 1);
        let rows = table.narrow(0, 7);
        let x = rand_var(&[2, 3, 7, 8], 1);
        let probe = rand_var(&[2, 3, 7, 8], 2);
        let ours = apply(&x, &rows).unwrap();
        let reference = apply_reference(&x, &rows).unwrap();
        let diff = (&ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6);
        // The class row (position 0) zeroes q and k.
        let first = ours.narrow(2, 0, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(first, 0.0);
        let g1 = (&ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{d}");
        // Per-batch rows: batch 1 uses shifted positions.
        let per_batch = RopeRows::concat(&[table.narrow(0, 7), table.narrow(3, 7)]);
        let a = apply(&x, &per_batch).unwrap();
        let b = apply_reference(&x, &per_batch).unwrap();
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn dynamic_rope_of_a_one_code_patch() {
        let (grid, d) = (16, 64);
        let freqs = freqs_2d(d, 10000.0);
        for k in [0usize, 17, 255] {
            let a = patch_angles(k, k, grid, d, 10000.0, PatchRope::Dynamic4d);
            assert_eq!(a.len(), d / 2);
            let two_d = angles_2d(k / grid, k % grid, &freqs);
            // The row part equals 2D RoPE's row part.
            assert_eq!(&a[..d / 4], &two_d[..d / 4]);
            // Start and end columns coincide: the four groups are equal.
            let n = d / 16;
            let g = |i: usize| &a[d / 4 + i * n..d / 4 + (i + 1) * n];
            assert_eq!(g(0), g(1));
            assert_eq!(g(1), g(2));
            assert_eq!(g(2), g(3));
        }
        // A longer patch: groups are start, end, end, start.
        let a = patch_angles(32 + 2, 32 + 5, grid, d, 10000.0, PatchRope::Dynamic4d);
        let n = d / 16;
        assert!((a[d / 4 + 1] - 2.0 * 10000f64.powf(-16.0 / 64.0) as f32).abs() < 1e-6);
        assert!((a[d / 4 + n + 1] - 5.0 * 10000f64.powf(-16.0 / 64.0) as f32).abs() < 1e-6);
        assert_eq!(&a[d / 4 + n..d / 4 + 2 * n], &a[d / 4 + 2 * n..d / 4 + 3 * n]);
        assert_eq!(&a[d / 4..d / 4 + n], &a[d / 4 + 3 * n..]);
        assert_eq!(patch_angles(5, 9, grid, d, 10000.0, PatchRope::Dynamic2d).len(), d / 2);
        assert_eq!(patch_angles(5, 9, grid, d, 10000.0, PatchRope::Plain2d), angles_2d(0, 5, &freqs));
    }

    /// The fused-layout kernel equals rotating the (B, H, T, d) view, forward and backward.
    #[test]
    fn qkv_layout_kernel_matches_the_head_layout() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let table = table_2d(3, d, 10000.0, 1);
        let qkv = rand_var(&[b * t, 3 * h * d], 9);
        let probe = rand_var(&[b * t, 3 * h * d], 10);
        let fused = apply_qkv(&qkv, &table.narrow(0, t), h).unwrap();
        let split = |x: &Tensor, i: usize| {
            x.narrow(1, i * h * d, h * d)
                .unwrap()
                .reshape((b, t, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        for i in 0..3 {
            let want =
                if i < 2 { apply_reference(&split(&qkv, i), &table.narrow(0, t)).unwrap() } else { split(&qkv, 2) };
            let diff = (split(&fused, i) - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "part {i}: {diff}");
        }
        let g = (&fused * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let reference = Tensor::cat(
            &[
                apply_reference(&split(&qkv, 0), &table.narrow(0, t)).unwrap(),
                apply_reference(&split(&qkv, 1), &table.narrow(0, t)).unwrap(),
                split(&qkv, 2),
            ],
            1,
        )
        .unwrap();
        let probe_split =
            Tensor::cat(&[split(probe.as_tensor(), 0), split(probe.as_tensor(), 1), split(probe.as_tensor(), 2)], 1)
                .unwrap();
        let g2 = (&reference * probe_split).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = (g.get(qkv.as_tensor()).unwrap() - g2.get(qkv.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    /// Relative positions: the dot product of a rotated q and k depends only on the offset.
    #[test]
    fn rotated_dot_products_depend_on_relative_position() {
        let table = table_2d(8, 8, 10000.0, 0);
        let q = rand_var(&[1, 1, 1, 8], 5);
        let k = rand_var(&[1, 1, 1, 8], 6);
        let dot = |pq: usize, pk: usize| {
            let rq = apply(&q, &table.select(&[pq])).unwrap();
            let rk = apply(&k, &table.select(&[pk])).unwrap();
            (rq * rk).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        // Same (Δrow, Δcol) = (1, 2): cells (0,0)→(1,2) and (3,3)→(4,5).
        assert!((dot(0, 10) - dot(27, 37)).abs() < 1e-5);
    }
}
