//! A safe, bounds-checked wrapper over the `gemm` crate (the GEMM candle itself uses), for
//! row-major f32 matrices with optional transposes.

/// `dst (m×n) = [dst +] op(a) · op(b)` with row-major storage:
/// `a` is `m×k` (or `k×m` when `trans_a`), `b` is `k×n` (or `n×k` when `trans_b`).
/// `threads > 1` lets gemm split the work with rayon.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    threads: usize,
) {
    assert!(dst.len() >= m * n, "sgemm: dst holds {} < {m}×{n}", dst.len());
    assert!(a.len() >= m * k, "sgemm: a holds {} < {m}×{k}", a.len());
    assert!(b.len() >= k * n, "sgemm: b holds {} < {k}×{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    // (row stride, column stride) of each operand.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee every index the strides reach is inside the slices:
    // a reaches (m−1)·a_rs + (k−1)·a_cs < m·k, b likewise, dst (m−1)·n + n−1 < m·n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `dst (m×n, leading dim ldd) = [dst +] alpha · op(a) · op(b)` for row-major matrices with
/// explicit leading dimensions (row strides): `a` is m×k (lda) or, with `trans_a`, k×m;
/// `b` is k×n (ldb) or, with `trans_b`, n×k. Single-threaded; used inside parallel kernels on
/// tiles of larger matrices.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_ld(
    dst: &mut [f32],
    ldd: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let need = |rows: usize, cols: usize, ld: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
    assert!(ldd >= n && dst.len() >= need(m, n, ldd), "sgemm_ld: dst too small");
    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    assert!(lda >= a_cols && a.len() >= need(a_rows, a_cols, lda), "sgemm_ld: a too small");
    assert!(ldb >= b_cols && b.len() >= need(b_rows, b_cols, ldb), "sgemm_ld: b too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(0.0);
            }
        }
        return;
    }
    let (a_rs, a_cs) = if trans_a { (1, lda as isize) } else { (lda as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, ldb as isize) } else { (ldb as isize, 1) };
    // SAFETY: the asserts above bound every element the strides reach inside each slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Threads to give one GEMM: all of rayon's pool.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    out[i * n + j] += av * bv;
                }
            }
        }
        out
    }

    #[test]
    fn strided_sgemm_works_on_tiles_of_larger_matrices() {
        // a: 3×2 tile at row stride 5; b: 2×4 tile at row stride 6; dst: 3×4 at stride 7.
        let a: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..12).map(|i| (i as f32) * 0.5).collect();
        let mut dst = vec![0.0; 21];
        sgemm_ld(&mut dst, 7, &a, 5, &b, 6, 3, 4, 2, false, false, false, 2.0);
        for i in 0..3 {
            for j in 0..4 {
                let want: f32 = (0..2).map(|p| a[i * 5 + p] * b[p * 6 + j]).sum::<f32>() * 2.0;
                assert!((dst[i * 7 + j] - want).abs() < 1e-4);
            }
        }
        // Transposed b: rows of an n×k matrix at stride 6.
        let mut dst2 = vec![0.0; 21];
        sgemm_ld(&mut dst2, 7, &a, 5, &b, 6, 3, 2, 2, false, true, false, 1.0);
        for i in 0..3 {
            for j in 0..2 {
                let want: f32 = (0..2).map(|p| a[i * 5 + p] * b[j * 6 + p]).sum();
                assert!((dst2[i * 7 + j] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn sgemm_matches_the_naive_product_for_every_transpose() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(&a, &b, m, n, k, ta, tb);
                let mut got = vec![1.0; m * n];
                sgemm(&mut got, &a, &b, m, n, k, ta, tb, false, 2);
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5);
                }
                let mut acc = vec![1.0; m * n];
                sgemm(&mut acc, &a, &b, m, n, k, ta, tb, true, 1);
                for (x, y) in acc.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-5);
                }
            }
        }
    }
}
