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
