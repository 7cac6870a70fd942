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
use std::mem::MaybeUninit;

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
pub fn faer_gemm(
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
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "faer_gemm: slices too small for {m}×{n}×{k}");
    count(m, n, k);
    let (a, b) = faer_operands(m, n, k, a, trans_a, b, trans_b);
    let c = MatMut::from_row_major_slice_mut(&mut dst[..m * n], m, n);
    let accum = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(c, accum, a, b, 1.0f32, Par::rayon(rayon::current_num_threads()));
}

/// `op(a)` (m×k) and `op(b)` (k×n) as faer views (see [`faer_gemm`]).
fn faer_operands<'a>(
    m: usize,
    n: usize,
    k: usize,
    a: &'a [f32],
    trans_a: bool,
    b: &'a [f32],
    trans_b: bool,
) -> (MatRef<'a, f32>, MatRef<'a, f32>) {
    let a = if trans_a {
        MatRef::from_row_major_slice(&a[..m * k], k, m).transpose()
    } else {
        MatRef::from_row_major_slice(&a[..m * k], m, k)
    };
    let b = if trans_b {
        MatRef::from_row_major_slice(&b[..k * n], n, k).transpose()
    } else {
        MatRef::from_row_major_slice(&b[..k * n], k, n)
    };
    (a, b)
}

/// [`faer_gemm`] without accumulation into uninitialised memory: writes every element of
/// `dst[..m·n]` (the bits [`faer_gemm`] gives) and reads none before writing it.
#[allow(clippy::too_many_arguments)]
pub fn faer_gemm_uninit(
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
        "faer_gemm_uninit: slices too small for {m}×{n}×{k}"
    );
    let dst = &mut dst[..m * n];
    if m < 2 || n < 2 || k < 2 {
        // faer runs these shapes (matrix-vector products, rank-1 updates, an empty k) through
        // code that forms references to destination elements or fills it through references:
        // zero it first and run the initialised path (same bits: `Replace` ignores the zeros).
        faer_gemm(super::zero_fill(dst), m, n, k, a, trans_a, b, trans_b, false);
        return;
    }
    count(m, n, k);
    let (a, b) = faer_operands(m, n, k, a, trans_a, b, trans_b);
    // SAFETY: `MatMut::from_raw_parts_mut`'s conditions: the pointer comes from the exclusively
    // borrowed `dst` (non-null, aligned, one allocation) and, with row stride n and column stride
    // 1, the m×n view addresses exactly its m·n elements, each once; `a` and `b` are shared
    // borrows, so nothing else touches these elements during the call. faer also requires that
    // the values be initialised before they are read or referenced: with `Accum::Replace` and
    // m, n, k ≥ 2, faer 0.22's `matmul` for f32 skips its matrix-vector and rank-1 paths and
    // calls, by raw pointer only, nano-gemm (m·n·k ≤ 4096: dst scale 0, kernels store without
    // loading), private-gemm-x86 (AVX2/AVX-512: the first K block runs without FLAGS_ACCUM and
    // stores, later blocks add to what it stored) or `gemm::gemm` with `read_dst = false`. Each
    // writes every element of the product and reads none before writing it (faer documents:
    // with `Replace` "the preexisting values in acc are not read"), so when this returns every
    // element of `dst` is initialised.
    let c = unsafe { MatMut::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), m, n, n as isize, 1) };
    faer::linalg::matmul::matmul(c, Accum::Replace, a, b, 1.0f32, Par::rayon(rayon::current_num_threads()));
}

/// The precision of a GEMM: f32, or bf16 operands with f32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    F32,
    Bf16,
}

/// Rows up to which `x·Wᵀ` runs through [`small_m_gemm`] rather than faer's GEMM. A decode
/// step has a few rows (2 × batch with guidance), and faer's packing of W on every call cost
/// more than the product itself (about 55 % of a DPAR sampling profile at batch 1). With W
/// packed once (the lean steps), the small-m kernel matched or beat faer at every m from 2 to
/// 200 (`dpar bench speed --gemm-table`), so every sampling batch up to 128 images with
/// guidance stays on it; training's products (thousands of rows) stay on faer.
pub const SMALL_M: usize = 256;

/// Multiply-adds (m·n·k) from which [`small_m_gemm`] splits its panels over the thread pool. Below
/// it, waking the pool costs more than it saves: at 2²⁰ (the old value) the FFN product of a
/// width-128 decode step at batch 4 with guidance went parallel, and sampling 40 images spent over
/// a second of system time in 360 000 context switches. 2²² fixed that but slowed the bench
/// model's 16-row decode step (its 3-million products went sequential); 2²¹ keeps most of both.
const SMALL_M_PARALLEL_WORK: usize = 1 << 21;

/// Columns per panel of [`small_m_weights`] (one 64-byte cache line of f32).
const NB: usize = 16;
/// Rows per register block of [`small_m_gemm`]: 6 with AVX2 (two 8-lane accumulators per row in
/// 16 registers), 12 with AVX-512 (one 16-lane accumulator per row in 32 registers).
const MR_AVX2: usize = 6;
const MR_AVX512: usize = 12;

/// W (n×k, row-major) packed for [`small_m_gemm`]: panels of NB = 16 columns of Wᵀ, each k × 16
/// contiguous (the last panel zero-padded), rounded to bf16 when `bf16`. A panel is read front
/// to back, one cache line per k. The lean decode steps pack once per generation;
/// [`Gemm::run`] once per call.
pub fn small_m_weights(w: &[f32], n: usize, k: usize, bf16: bool) -> Vec<f32> {
    let mut t = vec![0f32; n.div_ceil(NB) * NB * k];
    for (o, row) in w[..n * k].chunks(k).enumerate() {
        let panel = &mut t[(o / NB) * NB * k..];
        for (kk, &v) in row.iter().enumerate() {
            panel[kk * NB + o % NB] = if bf16 { super::bf16::from_bf16(super::bf16::to_bf16(v)) } else { v };
        }
    }
    t
}

/// `dst (m×n) = [dst +] a (m×k)·Wᵀ` for few rows m, with W packed by [`small_m_weights`]:
/// broadcast-and-FMA over each panel, blocks of up to 6 rows × 16 columns held in registers
/// (the panel stays in L1 between row blocks). Every entry is the fused multiply-add chain over
/// k in order, whatever the blocking or threading, so equal inputs give equal bits on every
/// path. With `bf16` the rows of `a` are rounded to bf16 (the packed W is rounded already):
/// bf16 operands, f32 sums.
#[allow(clippy::too_many_arguments)]
pub fn small_m_gemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    packed: &[f32],
    accumulate: bool,
    bf16: bool,
) {
    // SAFETY: the kernels write only f32 values through the view (so `dst` stays initialised),
    // and what they read when accumulating is `dst`'s initialised contents.
    unsafe { small_m_gemm_raw(super::as_uninit_mut(dst), m, n, k, a, packed, accumulate, bf16) }
}

/// [`small_m_gemm`] without accumulation into uninitialised memory: writes every element of
/// `dst[..m·n]` (the bits [`small_m_gemm`] gives) and reads none of them.
#[allow(clippy::too_many_arguments)]
pub fn small_m_gemm_uninit(
    dst: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    packed: &[f32],
    bf16: bool,
) {
    // SAFETY: without accumulation nothing of `dst` is read.
    unsafe { small_m_gemm_raw(dst, m, n, k, a, packed, false, bf16) }
}

/// [`small_m_gemm`] on a destination that may be uninitialised. It writes every element of
/// `dst[..m·n]`, each in one store of its finished value (or of that value plus the old one when
/// `accumulate`), and reads `dst` only when `accumulate`.
///
/// # Safety
/// With `accumulate`, `dst[..m·n]` must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_gemm_raw(
    dst: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    packed: &[f32],
    accumulate: bool,
    bf16: bool,
) {
    use rayon::prelude::*;
    let panels = n.div_ceil(NB);
    assert!(
        dst.len() >= m * n && a.len() >= m * k && packed.len() >= panels * NB * k,
        "small_m_gemm: slices too small for {m}×{n}×{k}"
    );
    count(m, n, k);
    let rounded;
    let a = if bf16 {
        rounded = super::bf16::round_slice(&a[..m * k]);
        &rounded[..]
    } else {
        &a[..m * k]
    };
    let threads = super::threads();
    if threads > 1 && m * n * k >= SMALL_M_PARALLEL_WORK && panels >= 2 {
        // Panel ranges in parallel, each into its own (m × cols) buffer, then copied out.
        let per = panels.div_ceil(threads);
        let parts: Vec<(usize, Vec<f32>)> = (0..panels)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|p0| {
                let (n0, cols) = (p0 * NB, (per * NB).min(n - p0 * NB));
                let mut out = vec![0f32; m * cols];
                panel_range(&mut out, cols, m, k, a, &packed[p0 * NB * k..], cols, false);
                (n0, out)
            })
            .collect();
        // The parts start at panels 0, per, 2·per, … and run to the next start (the last to n):
        // together they cover every column of every row.
        for (n0, out) in parts {
            let cols = out.len() / m;
            for r in 0..m {
                for (d, &v) in dst[r * n + n0..r * n + n0 + cols].iter_mut().zip(&out[r * cols..(r + 1) * cols]) {
                    let old = if accumulate {
                        // SAFETY: read only when accumulating, when the caller guarantees that
                        // `dst` is initialised.
                        unsafe { d.assume_init_read() }
                    } else {
                        0.0
                    };
                    d.write(if accumulate { old + v } else { v });
                }
            }
        }
    } else {
        // SAFETY: with `accumulate`, `dst` is initialised (this function's contract).
        unsafe { panel_range_on(Isa::detect(), dst, n, m, k, a, packed, n, accumulate) };
    }
}

/// The first `cols` columns of `packed`'s panels into `dst` (row stride `ldd`), by register
/// blocks: AVX-512 (12 rows × one 16-lane register) or AVX2 + FMA (6 rows × two 8-lane
/// registers) as the CPU allows, else scalar. Each lane runs the same fused multiply-add chain
/// over k, so every version gives the same bits.
#[allow(clippy::too_many_arguments)]
fn panel_range(
    dst: &mut [f32],
    ldd: usize,
    m: usize,
    k: usize,
    a: &[f32],
    packed: &[f32],
    cols: usize,
    accumulate: bool,
) {
    // SAFETY: `dst` is initialised and the kernels store only f32 values into it.
    unsafe { panel_range_on(Isa::detect(), super::as_uninit_mut(dst), ldd, m, k, a, packed, cols, accumulate) }
}

/// [`panel_range`] on a given instruction set (`isa` must be available on this CPU), into a
/// destination that may be uninitialised: rows 0..m, columns 0..cols (row stride `ldd`) are
/// each written once, by a store of the finished value (plus the old one when `accumulate`);
/// `dst` is read only when `accumulate`.
///
/// # Safety
/// With `accumulate`, those elements of `dst` must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_range_on(
    isa: Isa,
    dst: &mut [MaybeUninit<f32>],
    ldd: usize,
    m: usize,
    k: usize,
    a: &[f32],
    packed: &[f32],
    cols: usize,
    accumulate: bool,
) {
    let mr = match isa {
        Isa::Avx512 => MR_AVX512,
        _ => MR_AVX2,
    };
    // Panels p = 0, 1, … cover columns p·NB .. p·NB + live (all of 0..cols), row blocks r0 = 0,
    // mr, … cover rows r0 .. r0 + rows (all of 0..m): each block writes its rows × live.
    for (p, panel) in packed.chunks(NB * k).take(cols.div_ceil(NB)).enumerate() {
        let (j, live) = (p * NB, NB.min(cols - p * NB));
        for r0 in (0..m).step_by(mr) {
            let rows = mr.min(m - r0);
            assert!(
                panel.len() >= NB * k && a.len() >= (r0 + rows) * k && dst.len() >= (r0 + rows - 1) * ldd + j + live
            );
            let blk = Block {
                dst: dst[r0 * ldd + j..].as_mut_ptr().cast::<f32>(),
                ldd,
                a: a[r0 * k..].as_ptr(),
                k,
                panel: panel.as_ptr(),
                live,
                accumulate,
            };
            // SAFETY: the assert above bounds every read (rows × k of a, k × NB of the panel)
            // and write (rows rows of `live` columns at stride ldd); the ISA is available (this
            // function's contract), and with `accumulate` the block's elements are initialised
            // (likewise).
            unsafe { blk.run(isa, rows) };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The kernel for the level in force ([`super::isa::level`]: what the CPU has, capped by
    /// `DPAR_ISA`).
    fn detect() -> Self {
        match super::isa::level() {
            super::isa::Level::Avx512 => Isa::Avx512,
            super::isa::Level::Avx2 => Isa::Avx2,
            super::isa::Level::Baseline => Isa::Scalar,
        }
    }
}

/// One register block: `rows` rows of `a` (stride k) against one panel (k × NB), into `live`
/// columns of `dst` (stride ldd). Each of those rows × live elements of `dst` gets one store of
/// its finished value; `dst` is read (the old value added) only when `accumulate`.
struct Block {
    dst: *mut f32,
    ldd: usize,
    a: *const f32,
    k: usize,
    panel: *const f32,
    live: usize,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_rows {
    ($self:ident, $f:ident, $rows:expr, [$($r:literal),*]) => {
        match $rows {
            $($r => $self.$f::<$r>(),)*
            _ => unreachable!("a register block has 1..=12 rows"),
        }
    };
}

/// Whether the scalar small-m kernel fuses its multiply-adds: only where the build itself has
/// hardware FMA (a software `fmaf` per element would be far slower than rounding twice).
const SCALAR_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

impl Block {
    /// # Safety
    /// The pointers must cover the block (see [`panel_range_on`]), `isa` must be this CPU's, and
    /// with `accumulate` the block's elements of `dst` must be initialised (`dst` may be
    /// uninitialised otherwise: it is only written, through raw pointers).
    unsafe fn run(&self, isa: Isa, rows: usize) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => dispatch_rows!(self, avx512, rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => dispatch_rows!(self, avx2, rows, [1, 2, 3, 4, 5, 6]),
            _ => {
                // The same chain over k per entry as the SIMD kernels, 16 columns at a time (the
                // panel is zero-padded to 16) so the compiler vectorises it. With hardware FMA in
                // the build (aarch64; x86 built for FMA) that chain is fused and the bits equal
                // the SIMD kernels'; on baseline x86-64 it is multiply-then-add, since a libm
                // `fmaf` call per element made decode steps 30 times slower.
                for r in 0..rows {
                    let mut acc = [0f32; NB];
                    for kk in 0..self.k {
                        let av = *self.a.add(r * self.k + kk);
                        let p = std::slice::from_raw_parts(self.panel.add(kk * NB), NB);
                        for (acc, &w) in acc.iter_mut().zip(p) {
                            *acc = super::isa::fmadd::<SCALAR_FMA>(av, w, *acc);
                        }
                    }
                    for (c, &v) in acc.iter().enumerate().take(self.live) {
                        let d = self.dst.add(r * self.ldd + c);
                        d.write(if self.accumulate { *d + v } else { v });
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); R];
        for kk in 0..self.k {
            let w = _mm512_loadu_ps(self.panel.add(kk * NB));
            for (r, v) in acc.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(_mm512_set1_ps(*self.a.add(r * self.k + kk)), w, *v);
            }
        }
        let mask: __mmask16 = if self.live == NB { 0xFFFF } else { (1u16 << self.live) - 1 };
        for (r, v) in acc.iter().enumerate() {
            let d = self.dst.add(r * self.ldd);
            let out = if self.accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), *v) } else { *v };
            _mm512_mask_storeu_ps(d, mask, out);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..self.k {
            let w0 = _mm256_loadu_ps(self.panel.add(kk * NB));
            let w1 = _mm256_loadu_ps(self.panel.add(kk * NB + 8));
            for (r, v) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*self.a.add(r * self.k + kk));
                v[0] = _mm256_fmadd_ps(x, w0, v[0]);
                v[1] = _mm256_fmadd_ps(x, w1, v[1]);
            }
        }
        let mut tmp = [0f32; NB];
        for (r, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(tmp.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v[1]);
            for (c, &t) in tmp.iter().enumerate().take(self.live) {
                let d = self.dst.add(r * self.ldd + c);
                d.write(if self.accumulate { *d + t } else { t });
            }
        }
    }
}

impl Gemm {
    /// Whether [`Gemm::run`] sends `x·Wᵀ` to [`small_m_gemm`]: at most [`SMALL_M`] rows (and a
    /// non-empty k, which the packing needs).
    fn small_m(m: usize, k: usize, trans_a: bool, trans_b: bool) -> bool {
        m <= SMALL_M && !trans_a && trans_b && m > 0 && k > 0
    }

    /// `dst = [dst +] op(a)·op(b)` (see [`faer_gemm`]); `x·Wᵀ` with at most [`SMALL_M`] rows
    /// (and k ≥ 1) runs as [`small_m_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
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
        if Self::small_m(m, k, trans_a, trans_b) {
            let bf16 = self == Gemm::Bf16;
            return small_m_gemm(dst, m, n, k, a, &small_m_weights(b, n, k, bf16), accumulate, bf16);
        }
        match self {
            Gemm::F32 => faer_gemm(dst, m, n, k, a, trans_a, b, trans_b, accumulate),
            Gemm::Bf16 => {
                count(m, n, k);
                super::bf16::bf16_gemm(dst, m, n, k, a, trans_a, b, trans_b, accumulate)
            }
        }
    }

    /// `dst = op(a)·op(b)` (m×n) into uninitialised memory, by the kernels of [`Gemm::run`]
    /// without accumulation (the same bits): writes every element of `dst[..m·n]`, reads none
    /// before writing it, and returns them initialised.
    #[allow(clippy::too_many_arguments)]
    pub fn run_uninit<'d>(
        self,
        dst: &'d mut [MaybeUninit<f32>],
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        trans_a: bool,
        b: &[f32],
        trans_b: bool,
    ) -> &'d mut [f32] {
        assert!(dst.len() >= m * n, "Gemm::run_uninit: destination too small for {m}×{n}");
        let dst = &mut dst[..m * n];
        if Self::small_m(m, k, trans_a, trans_b) {
            let bf16 = self == Gemm::Bf16;
            small_m_gemm_uninit(dst, m, n, k, a, &small_m_weights(b, n, k, bf16), bf16);
        } else {
            match self {
                Gemm::F32 => faer_gemm_uninit(dst, m, n, k, a, trans_a, b, trans_b),
                Gemm::Bf16 => {
                    count(m, n, k);
                    super::bf16::bf16_gemm_uninit(dst, m, n, k, a, trans_a, b, trans_b)
                }
            }
        }
        // SAFETY: `small_m_gemm_uninit`, `faer_gemm_uninit` and `bf16_gemm_uninit` each write
        // every element of the m·n slice they are given (or panic).
        unsafe { super::assume_init_mut(dst) }
    }

    /// A new m×n vector `op(a)·op(b)`: [`Gemm::run_uninit`] into fresh memory (no zero fill).
    #[allow(clippy::too_many_arguments)]
    pub fn run_new(self, m: usize, n: usize, k: usize, a: &[f32], trans_a: bool, b: &[f32], trans_b: bool) -> Vec<f32> {
        let mut v = Vec::with_capacity(m * n);
        self.run_uninit(&mut v.spare_capacity_mut()[..m * n], m, n, k, a, trans_a, b, trans_b);
        // SAFETY: `run_uninit` wrote all m·n elements of the spare capacity it was given (the
        // first m·n, within the capacity of m·n).
        unsafe { v.set_len(m * n) };
        v
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
        let y = self.0.run_new(n, out, k, x, false, w, true);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let out = w.dim(0)?;
        let (dx, dw) = with_f32(grad, "linear grad", |g| {
            let dx = with_f32(w, "linear weight", |wv| Ok(self.0.run_new(n, k, out, g, false, wv, false)))?;
            let dw = with_f32(x, "linear input", |xv| Ok(self.0.run_new(out, k, n, g, true, xv, false)))?;
            Ok((dx, dw))
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
        Var::from_tensor(
            &Tensor::from_vec((0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu)
                .unwrap(),
        )
        .unwrap()
    }

    /// Every instruction-set version of the small-m kernel (AVX-512, AVX2 + FMA, scalar) gives
    /// the same bits, on odd shapes with partial panels and partial row blocks; the scalar one
    /// built without FMA (baseline x86-64) rounds twice and agrees to f32 rounding.
    #[test]
    fn small_m_kernels_agree_to_the_bit_on_every_instruction_set() {
        let available = [Isa::Avx512, Isa::Avx2, Isa::Scalar].into_iter().filter(|&isa| match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            _ => isa == Isa::Scalar,
        });
        let isas: Vec<Isa> = available.collect();
        for &(m, n, k) in &[(1, 1, 1), (7, 33, 19), (13, 16, 64), (25, 50, 3)] {
            let a: Vec<f32> = (0..m * k).map(|i| (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 2.0).collect();
            let packed = small_m_weights(&w, n, k, false);
            let results: Vec<Vec<f32>> = isas
                .iter()
                .map(|&isa| {
                    let mut out: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25).collect();
                    // SAFETY: `out` is initialised (it is read: accumulate) and the kernels store
                    // only f32 values.
                    unsafe {
                        panel_range_on(isa, crate::kernels::as_uninit_mut(&mut out), n, m, k, &a, &packed, n, true)
                    };
                    out
                })
                .collect();
            for (isa, r) in isas.iter().zip(&results) {
                if *isa == Isa::Scalar && !SCALAR_FMA {
                    for (x, y) in r.iter().zip(&results[0]) {
                        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{m}×{n}×{k}: scalar {x} vs {y}");
                    }
                } else {
                    assert_eq!(r, &results[0], "{m}×{n}×{k}: {isa:?} differs from {:?}", isas[0]);
                }
            }
        }
    }

    /// The small-m path (decode steps) equals faer's GEMM to f32 rounding, and its bf16 form
    /// equals the bf16 GEMM to f32 rounding (same rounded operands), on odd shapes, with and
    /// without accumulation, through `Gemm::run`'s dispatch.
    #[test]
    fn small_m_products_match_the_packed_gemms() {
        for &(m, n, k) in
            &[(1, 1, 1), (2, 37, 13), (16, 70, 129), (5, 600, 64), (3, 2, 1000), (100, 45, 77), (256, 17, 40)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * 3.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 2.0).collect();
            for acc in [false, true] {
                let init: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
                let (mut small, mut full) = (init.clone(), init.clone());
                Gemm::F32.run(&mut small, m, n, k, &a, false, &b, true, acc);
                faer_gemm(&mut full, m, n, k, &a, false, &b, true, acc);
                let (mut small16, mut full16) = (init.clone(), init.clone());
                Gemm::Bf16.run(&mut small16, m, n, k, &a, false, &b, true, acc);
                super::super::bf16::bf16_gemm(&mut full16, m, n, k, &a, false, &b, true, acc);
                for i in 0..m * n {
                    let scale = 1e-5 * (k as f32).sqrt() * (1.0 + full[i].abs());
                    assert!((small[i] - full[i]).abs() <= scale, "{m}×{n}×{k} f32 [{i}]: {} vs {}", small[i], full[i]);
                    assert!(
                        (small16[i] - full16[i]).abs() <= scale,
                        "{m}×{n}×{k} bf16 [{i}]: {} vs {}",
                        small16[i],
                        full16[i]
                    );
                }
                // bf16 really rounds: it differs from f32 somewhere on non-trivial shapes.
                if k > 1 {
                    assert!(small16.iter().zip(&small).any(|(x, y)| x != y), "{m}×{n}×{k}: bf16 equals f32");
                }
            }
        }
    }

    /// `Gemm::run_uninit` / `run_new` (fresh output, no zero fill) give the bits of `Gemm::run`
    /// without accumulation, for f32 and bf16, on every dispatch path: small m (sequential and
    /// panel-parallel), faer (nano-gemm sizes, large sizes, K past one block, every transpose),
    /// faer's vector and rank-1 shapes (zero-filled first), the packed bf16 kernel (K past one
    /// block), and k = 0. The "uninitialised" memory holds NaN, so a read before the write
    /// would show; so does the destination of `run`, which must not read it either.
    #[test]
    fn fresh_output_gemms_equal_the_initialised_paths() {
        let shapes: &[(usize, usize, usize)] = &[
            (1, 1, 1),
            (2, 37, 13),
            (7, 33, 19),
            (16, 512, 300),
            (256, 17, 40),
            (257, 45, 77),
            (300, 70, 129),
            (513, 33, 600),
            (14, 40, 4099),
            (1, 50, 30),
            (40, 1, 30),
            (40, 50, 1),
            (5, 7, 0),
            (300, 7, 0),
            (0, 7, 5),
            (5, 0, 7),
        ];
        for &(m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * 3.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (((i * 104729) % 997) as f32 / 997.0 - 0.5) * 2.0).collect();
            for gemm in [Gemm::F32, Gemm::Bf16] {
                for (ta, tb) in [(false, true), (false, false), (true, false), (true, true)] {
                    let mut want = vec![f32::NAN; m * n];
                    gemm.run(&mut want, m, n, k, &a, ta, &b, tb, false);
                    let mut buf = vec![MaybeUninit::new(f32::NAN); m * n + 3];
                    let got = gemm.run_uninit(&mut buf, m, n, k, &a, ta, &b, tb);
                    assert_eq!(got.len(), m * n);
                    let what = format!("{gemm:?} {m}×{n}×{k} ta {ta} tb {tb}");
                    assert!(got.iter().all(|v| v.is_finite()), "{what}: NaN leaked");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(&want), "{what}");
                    // The slots past m·n are left alone. SAFETY: every slot was initialised (NaN).
                    assert!(buf[m * n..].iter().all(|v| unsafe { v.assume_init() }.is_nan()), "{what}");
                    assert_eq!(bits(&gemm.run_new(m, n, k, &a, ta, &b, tb)), bits(&want), "{what}: run_new");
                    if k == 0 {
                        assert!(want.iter().all(|&v| v == 0.0), "{what}: an empty product is zero");
                    }
                }
            }
        }
    }

    /// The fresh-output kernels one level down equal their initialised forms on odd shapes:
    /// faer's GEMM (write-only only for m, n, k ≥ 2) and the small-m kernel, into NaN-filled
    /// "uninitialised" memory.
    #[test]
    fn fresh_output_kernels_equal_their_initialised_forms() {
        for &(m, n, k) in &[(2, 2, 2), (3, 5, 7), (16, 16, 16), (17, 16, 16), (33, 65, 513), (1, 9, 9), (9, 9, 1)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut want = vec![f32::NAN; m * n];
                faer_gemm(&mut want, m, n, k, &a, ta, &b, tb, false);
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                faer_gemm_uninit(&mut got, m, n, k, &a, ta, &b, tb);
                // SAFETY: every slot was initialised (NaN, then the product).
                let got: Vec<u32> = got.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect();
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "faer {m}×{n}×{k} ta {ta} tb {tb}");
            }
            for bf16 in [false, true] {
                let packed = small_m_weights(&b, n, k, bf16);
                let mut want = vec![f32::NAN; m * n];
                small_m_gemm(&mut want, m, n, k, &a, &packed, false, bf16);
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                small_m_gemm_uninit(&mut got, m, n, k, &a, &packed, bf16);
                // SAFETY: as above.
                let got: Vec<u32> = got.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect();
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "small m {m}×{n}×{k} bf16 {bf16}");
            }
        }
    }

    #[test]
    fn linear_matches_candle_matmul_forward_and_backward() {
        let x = rand_var(&[37, 19], 1);
        let w = rand_var(&[23, 19], 2);
        let probe = rand_var(&[37, 23], 3);
        let a = linear(&x, &w, Gemm::F32).unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap();
        let diff =
            |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&a, &b) < 1e-5);
        let g1 = (&a * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&b * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-4);
        }
    }
}
