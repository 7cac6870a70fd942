//! A bf16 GEMM for the optional mixed-precision path: operands are rounded to bfloat16 while
//! they are packed, products are accumulated in f32 (AVX512-BF16's `vdpbf16ps`: 16 lanes, each
//! a dot product of two bf16 pairs, twice the multiply rate of f32 FMA). Master weights,
//! activations outside the matmuls and all reductions stay f32.
//!
//! Blocking (Goto style): K in equal blocks of at most 2048 (every pass over C reads and
//! writes all of it from memory: with blocks of 512 the bench model's k = 688 and 1376
//! products ran about 20% slower than as one block), the B block packed once into 32-column
//! panels of bf16 pairs, row blocks of A packed per thread into 12-row slivers; a 12×32
//! micro-kernel keeps twenty-four 16-lane accumulators in registers (two B loads and twelve
//! broadcasts per 24 dot products). Rows of C are spread over rayon's threads. Packing converts
//! sixteen lanes at a time with AVX-512 integer rounding (bit-identical to [`to_bf16`]).
//!
//! Without AVX512-BF16 at run time the same bf16-rounded operands go through faer's f32 GEMM:
//! identical numbers, no speed-up.

use std::mem::MaybeUninit;

use rayon::prelude::*;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 2048;
/// Rows of C per rayon task.
const MC: usize = 8 * MR;

/// f32 → bf16 bits, round to nearest even (NaN stays NaN). Branch-free, so loops vectorise.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1))) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    let is_nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

/// bf16 bits → f32.
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Rounds every value to the nearest bf16 (in f32 storage).
pub fn round_slice(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| from_bf16(to_bf16(v))).collect()
}

/// Whether this CPU runs the bf16 kernel (AVX512-F and AVX512-BF16, detected at run time, and
/// the level in force allows AVX-512: see [`super::isa`]).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa::level() == super::isa::Level::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst (m×n) = [dst +] op(a)·op(b)` with bf16 operands and f32 accumulation; the layout
/// conventions of [`super::matmul::faer_gemm`].
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "bf16_gemm: slices too small for {m}×{n}×{k}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || !available() {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        if k > 0 {
            super::matmul::faer_gemm(
                dst,
                m,
                n,
                k,
                &round_slice(&a[..m * k]),
                trans_a,
                &round_slice(&b[..k * n]),
                trans_b,
                true,
            );
        }
        return;
    }
    // SAFETY: AVX512-F and AVX512-BF16 are present (checked by `available`) and k ≥ 1; `dst` is
    // initialised, the kernel stores only f32 values into it (so it stays initialised), and what
    // the accumulating passes read is its initialised contents.
    unsafe { packed_gemm(super::as_uninit_mut(dst), m, n, k, a, trans_a, b, trans_b, accumulate) }
}

/// [`bf16_gemm`] without accumulation into uninitialised memory: writes every element of
/// `dst[..m·n]` (the bits [`bf16_gemm`] gives). With AVX512-BF16 the packed kernel's first K
/// block stores every element without reading it; without it (or for k = 0) `dst` is zeroed
/// first and the product added, as [`bf16_gemm`] does.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm_uninit(
    dst: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
) {
    assert!(
        dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "bf16_gemm_uninit: slices too small for {m}×{n}×{k}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || !available() {
        // The fallback adds into dst (faer with `Add`): zero it first.
        bf16_gemm(super::zero_fill(&mut dst[..m * n]), m, n, k, a, trans_a, b, trans_b, true);
        return;
    }
    // SAFETY: AVX512-F and AVX512-BF16 are present (checked by `available`) and k ≥ 1; without
    // accumulation the kernel reads only elements of `dst` that its first K block stored.
    unsafe { packed_gemm(dst, m, n, k, a, trans_a, b, trans_b, false) }
}

/// The packed AVX512-BF16 GEMM of [`bf16_gemm`] on a destination that may be uninitialised.
/// Without `accumulate` its first K block stores every element of `dst[..m·n]` without reading
/// it (the row blocks cover 0..m, the 32-column panels 0..n, and the kernel stores each of its
/// rows × cols); later K blocks read and add to what that block stored. With `accumulate` every
/// block reads and adds.
///
/// # Safety
/// AVX512-F and AVX512-BF16 must be available; m, n, k ≥ 1 and the slices as long as
/// [`bf16_gemm`] asserts; with `accumulate`, `dst[..m·n]` must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn packed_gemm(
    dst: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    accumulate: bool,
) {
    let n_panels = n.div_ceil(NR);
    // K blocks of equal, even length (at most KC): no short tail block.
    let kcb = (k.div_ceil(k.div_ceil(KC)) + 1) & !1;
    let kp_max = kcb.min(k).div_ceil(2);
    // One B buffer for all K blocks of the call (no fresh pages per block).
    let mut bp = vec![0u32; n_panels * kp_max * NR];
    for k0 in (0..k).step_by(kcb) {
        let kc = kcb.min(k - k0);
        // The first K block stores its sums over C (no zero fill, no read of C) unless the
        // caller accumulates; later blocks add to C. The row blocks of MC cover rows 0..m, the
        // slivers of MR each block, the panels of NR columns 0..n: every element is stored.
        let overwrite = k0 == 0 && !accumulate;
        let kp = kc.div_ceil(2);
        // Pack B: panel jp holds, per k-pair q, 32 columns of (B[2q][j], B[2q+1][j]) words.
        bp[..n_panels * kp * NR].par_chunks_mut(kp * NR).enumerate().for_each(|(jp, panel)| {
            let j0 = jp * NR;
            let cols = NR.min(n - j0);
            if trans_b {
                // B[p][j] = b[j·k + p]: the pairs of column j are contiguous in row j of b.
                let mut words = vec![0u32; kp];
                for c in 0..cols {
                    // SAFETY: AVX-512F is present (this function's contract; callers check
                    // `available`).
                    unsafe { pairs_row(&b[(j0 + c) * k + k0..(j0 + c) * k + k0 + kc], &mut words) };
                    for q in 0..kp {
                        panel[q * NR + c] = words[q];
                    }
                }
            } else {
                // B[p][j] = b[p·n + j]: pairs interleave rows 2q and 2q + 1.
                for q in 0..kp {
                    let p = k0 + 2 * q;
                    let lo = &b[p * n + j0..p * n + j0 + cols];
                    let hi = (p + 1 < k0 + kc).then(|| &b[(p + 1) * n + j0..(p + 1) * n + j0 + cols]);
                    // SAFETY: as above.
                    unsafe { interleave_rows(lo, hi, &mut panel[q * NR..q * NR + cols]) };
                }
            }
        });
        let bp = &bp[..n_panels * kp * NR];
        // Rows of C in blocks of MC = 8·MR per rayon task (enough work to amortise the task),
        // each packing its own A: row-major pairs per sliver (row r at r·kp) when A's rows are
        // contiguous, the whole block pair-major (pair q at q·MC) when A is transposed.
        dst[..m * n].par_chunks_mut(MC * n).enumerate().for_each(|(blk, cblock)| {
            let block_rows = MC.min(m - blk * MC);
            let b0 = blk * MC;
            if trans_a {
                // A[i][p] = a[p·m + i]: pairs interleave rows 2q and 2q + 1 of a. The whole
                // block is packed pair-major (pair q's MC words at q·MC), full 16-lane vectors
                // along the contiguous rows of a; sliver `sub` starts at word `sub`.
                let mut ap = vec![0u32; kp * MC];
                for q in 0..kp {
                    let p = k0 + 2 * q;
                    let lo = &a[p * m + b0..p * m + b0 + block_rows];
                    let hi = (p + 1 < k0 + kc).then(|| &a[(p + 1) * m + b0..(p + 1) * m + b0 + block_rows]);
                    // SAFETY: as above.
                    unsafe { interleave_rows(lo, hi, &mut ap[q * MC..q * MC + block_rows]) };
                }
                for sub in (0..block_rows).step_by(MR) {
                    let rows = MR.min(block_rows - sub);
                    for jp in 0..n_panels {
                        let cols = NR.min(n - jp * NR);
                        let panel = &bp[jp * kp * NR..(jp + 1) * kp * NR];
                        // SAFETY: the kernel reads A words r + q·MC (r < MR, q < kp) of
                        // `ap[sub..]`, below (kp − 1)·MC + MC − sub, and kp·NR words of `panel`;
                        // it writes rows < `rows`, columns < `cols` (row stride n) in `cblock`.
                        // Without `overwrite` it reads them too: the first K block stored them,
                        // or the caller accumulates and they were initialised on entry.
                        unsafe {
                            kernel(
                                kp,
                                &ap[sub..],
                                1,
                                MC,
                                panel,
                                &mut cblock[sub * n + jp * NR..],
                                n,
                                rows,
                                cols,
                                overwrite,
                            )
                        };
                    }
                }
                return;
            }
            // A's rows contiguous: each sliver of MR rows is packed row-major (row r at r·kp)
            // once and stays in L1 while every B panel streams past it (measured against the
            // other loop order, B panel in L1 and the slivers from L2: no clear difference,
            // this one a little ahead on forward shapes).
            let mut ap = vec![0u32; kp * MR];
            for sub in (0..block_rows).step_by(MR) {
                let i0 = b0 + sub;
                let rows = MR.min(block_rows - sub);
                for r in 0..rows {
                    // SAFETY: as above.
                    unsafe { pairs_row(&a[(i0 + r) * k + k0..(i0 + r) * k + k0 + kc], &mut ap[r * kp..(r + 1) * kp]) };
                }
                for jp in 0..n_panels {
                    let cols = NR.min(n - jp * NR);
                    let panel = &bp[jp * kp * NR..(jp + 1) * kp * NR];
                    // SAFETY: the kernel reads A words r·kp + q (r < MR, q < kp), all inside
                    // `ap`, and kp·NR words of `panel`; it writes rows < `rows`, columns
                    // < `cols` (row stride n) inside `cblock`, and reads them only without
                    // `overwrite`, when they are initialised (as above).
                    unsafe {
                        kernel(kp, &ap, kp, 1, panel, &mut cblock[sub * n + jp * NR..], n, rows, cols, overwrite)
                    };
                }
            }
        });
    }
}

/// The first `live` (1 to 16) of sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_mask(live: usize) -> u16 {
    if live >= 16 {
        0xFFFF
    } else {
        (1u16 << live) - 1
    }
}

/// Sixteen f32 lanes rounded to bf16 bits (in the low half of each 32-bit lane): exactly
/// [`to_bf16`], lane by lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))));
    let quiet_nan = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
    let abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFF_FFFF));
    let is_nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
    _mm512_mask_blend_epi32(is_nan, rounded, quiet_nan)
}

/// [`pack_pairs`] sixteen lanes at a time: `words` (⌈row/2⌉ long) gets the row in bf16, read
/// as pairs; an odd tail is zero-padded.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pairs_row(row: &[f32], words: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(words.len() >= row.len().div_ceil(2));
    let mut i = 0;
    while i < row.len() {
        let live = (row.len() - i).min(16);
        let mask = lane_mask(live);
        // Masked-off lanes load as 0.0, which rounds to 0: the zero pad of an odd tail.
        let halves = _mm512_cvtepi32_epi16(round16(_mm512_maskz_loadu_ps(mask, row.as_ptr().add(i))));
        let n_words = live.div_ceil(2);
        if n_words == 8 {
            _mm256_storeu_si256(words.as_mut_ptr().add(i / 2) as *mut __m256i, halves);
        } else {
            let mut tmp = [0u32; 8];
            _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, halves);
            words[i / 2..i / 2 + n_words].copy_from_slice(&tmp[..n_words]);
        }
        i += 16;
    }
}

/// [`interleave`] sixteen lanes at a time: words `(lo[i], hi[i])` in bf16 (hi absent: zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_rows(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < out.len() {
        let live = (out.len() - i).min(16);
        let mask = lane_mask(live);
        let low = round16(_mm512_maskz_loadu_ps(mask, lo.as_ptr().add(i)));
        let word = match hi {
            Some(hi) => {
                _mm512_or_si512(low, _mm512_slli_epi32::<16>(round16(_mm512_maskz_loadu_ps(mask, hi.as_ptr().add(i)))))
            }
            None => low,
        };
        _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i) as *mut i32, mask, word);
        i += 16;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_row(row: &[f32], words: &mut [u32]) {
    pack_pairs(row, words)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_rows(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    interleave(lo, hi, out)
}

/// Packs consecutive pairs of a row into 32-bit words (low half = even element), zero-padding
/// an odd tail: the row converted to bf16 in order, read as pairs.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline]
fn pack_pairs(row: &[f32], words: &mut [u32]) {
    let pairs = row.len() / 2;
    for (q, w) in words.iter_mut().enumerate().take(pairs) {
        *w = to_bf16(row[2 * q]) as u32 | (to_bf16(row[2 * q + 1]) as u32) << 16;
    }
    if row.len() % 2 == 1 {
        words[pairs] = to_bf16(row[row.len() - 1]) as u32;
    }
}

/// Words `(lo[i], hi[i])` for two rows (hi absent: zero).
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline]
fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    match hi {
        Some(hi) => {
            for i in 0..out.len() {
                out[i] = to_bf16(lo[i]) as u32 | (to_bf16(hi[i]) as u32) << 16;
            }
        }
        None => {
            for i in 0..out.len() {
                out[i] = to_bf16(lo[i]) as u32;
            }
        }
    }
}

/// The MR×32 micro-kernel: C[r][j] (+)= Σ_q A-pair(r, q) · B-pair(q, j), stored over C when
/// `overwrite` (C is then only written, by masked stores of rows < `rows`, columns < `cols`),
/// added to it otherwise.
///
/// # Safety
/// AVX512-F and AVX512-BF16 must be available; `a` and `b` must hold the words the strides
/// address for kp pairs, `c` rows < `rows` of `cols` ≤ 32 columns at stride `ldc`; without
/// `overwrite` those elements of `c` must be initialised.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kp: usize,
    a: &[u32],
    row_stride: usize,
    pair_stride: usize,
    b: &[u32],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let ap = a.as_ptr() as *const i32;
    let bptr = b.as_ptr();
    for q in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bptr.add(q * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bptr.add(q * NR + 16) as *const _));
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * row_stride + q * pair_stride)));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        let base = c.as_mut_ptr().cast::<f32>().add(r * ldc);
        for (h, v) in row.iter().enumerate() {
            let lo = h * 16;
            if lo >= cols {
                break;
            }
            let live = (cols - lo).min(16);
            let mask = lane_mask(live);
            let ptr = base.add(lo);
            if overwrite {
                _mm512_mask_storeu_ps(ptr, mask, *v);
            } else {
                let old = _mm512_maskz_loadu_ps(mask, ptr);
                _mm512_mask_storeu_ps(ptr, mask, _mm512_add_ps(old, *v));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _kp: usize,
    _a: &[u32],
    _rs: usize,
    _qs: usize,
    _b: &[u32],
    _c: &mut [MaybeUninit<f32>],
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _overwrite: bool,
) {
    unreachable!("bf16 kernel is only dispatched on x86_64 with AVX512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        // 1 + 2^-8 lies exactly between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    /// The vectorised packers give the scalar packers' bits: round to nearest even, NaN
    /// quieted, infinities, subnormals and signed zeros kept, odd tails zero-padded, every
    /// length from 0 to 70 (full 16-lane chunks and masked tails).
    #[test]
    fn vector_packing_equals_scalar_packing_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU (the vector packers are not used)");
            return;
        }
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-45,
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + 1.0 / 256.0,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFFF_FFFF),
        ];
        let mut state = 0x9E37_79B9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            if state.is_multiple_of(7) {
                specials[(state as usize / 7) % specials.len()]
            } else {
                f32::from_bits(state)
            }
        };
        for len in 0usize..=70 {
            let row: Vec<f32> = (0..len).map(|_| next()).collect();
            let other: Vec<f32> = (0..len).map(|_| next()).collect();
            let mut want = vec![0u32; len.div_ceil(2)];
            let mut got = vec![0xDEAD_BEEFu32; len.div_ceil(2)];
            pack_pairs(&row, &mut want);
            unsafe { pairs_row(&row, &mut got) };
            assert_eq!(got, want, "pairs of a row of {len}");
            for hi in [Some(&other[..]), None] {
                let mut want = vec![0u32; len];
                let mut got = vec![0xDEAD_BEEFu32; len];
                interleave(&row, hi, &mut want);
                unsafe { interleave_rows(&row, hi, &mut got) };
                assert_eq!(got, want, "interleave of {len} (hi: {})", hi.is_some());
            }
        }
    }

    /// Against the exact (f64) product of the unrounded operands, every entry lies within the
    /// bf16 rounding bound: bf16 keeps 8 significant bits, so each operand is off by at most
    /// u = 2⁻⁸ relative and a product by at most 2u + u² of |a|·|b|, plus f32 accumulation
    /// (k·2⁻²⁴ of Σ|a||b|). Odd shapes: 1×1×1,
    /// primes, K past one block (4097: two blocks of 2050 and 2047) and odd, every transpose.
    #[test]
    fn bf16_gemm_is_within_rounding_bounds_of_the_exact_product() {
        for &(m, n, k) in &[(1, 1, 1), (7, 11, 13), (97, 61, 257), (5, 33, 513), (31, 1, 300), (3, 17, 4097)] {
            let a: Vec<f32> = (0..m * k).map(|i| (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * 3.7).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 2.3).collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    // Without accumulation the old contents are never read: NaN must not leak.
                    let mut got = vec![f32::NAN; m * n];
                    bf16_gemm(&mut got, m, n, k, &a, ta, &b, tb, false);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut abs) = (0f64, 0f64);
                            for p in 0..k {
                                let av = if ta { a[p * m + i] } else { a[i * k + p] } as f64;
                                let bv = if tb { b[j * k + p] } else { b[p * n + j] } as f64;
                                exact += av * bv;
                                abs += (av * bv).abs();
                            }
                            let bound =
                                abs * (2.0 * 2f64.powi(-8) + 2f64.powi(-16) + k as f64 * 2f64.powi(-24)) + 1e-30;
                            let err = (got[i * n + j] as f64 - exact).abs();
                            assert!(
                                err <= bound,
                                "{m}×{n}×{k} ta {ta} tb {tb} [{i},{j}]: error {err:e} > bound {bound:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The bf16 GEMM equals an f64 product of the bf16-rounded operands (up to f32 summation),
    /// for every transpose and for sizes that exercise every edge (odd K, partial panels).
    #[test]
    fn bf16_gemm_matches_the_product_of_rounded_operands() {
        for &(m, n, k) in &[(13, 45, 37), (6, 32, 2), (1, 1, 1), (70, 33, 600), (200, 40, 1030), (14, 40, 4099)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    let mut got = vec![0.5f32; m * n];
                    bf16_gemm(&mut got, m, n, k, &a, ta, &b, tb, true);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| {
                                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                                    from_bf16(to_bf16(av)) as f64 * from_bf16(to_bf16(bv)) as f64
                                })
                                .sum::<f64>()
                                + 0.5;
                            let err = (got[i * n + j] as f64 - want).abs();
                            assert!(
                                err < 1e-3 * (1.0 + want.abs()),
                                "{m}×{n}×{k} ta {ta} tb {tb} [{i},{j}]: {} vs {want}",
                                got[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}
