//! Run-time choice of the instruction set for our compiler-vectorised loops.
//!
//! The default build targets baseline x86-64 (SSE2), so the binary runs on any x86-64 CPU. The
//! GEMMs (faer, the `gemm` crate, our small-m and bf16 kernels) pick AVX2/AVX-512 at run time
//! themselves; the plain loops (attention over a cache, flash-attention tiles, RMSNorm, SwiGLU,
//! RoPE, cross-entropy rows) are written once and compiled three times by `multiversion!`:
//! for AVX-512F, for AVX2 + FMA, and for the baseline. [`level`] picks one per call from what
//! the CPU reports (`is_x86_feature_detected!`, checked once), so a kernel costs one relaxed
//! load and a branch more than a statically compiled one.
//!
//! `DPAR_ISA=baseline|avx2|avx512` caps the level for a whole process (to measure or test the
//! fallbacks on a fast CPU); [`set_max`] does the same from code (tests, benches). On other
//! architectures every kernel is the baseline one (NEON on aarch64 is part of its baseline).

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level of the multiversioned kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The build target's own features (SSE2 on x86-64; NEON on aarch64). No FMA: `a·b + c`
    /// is rounded twice.
    Baseline = 1,
    /// AVX2 + FMA (x86-64-v3).
    Avx2 = 2,
    /// AVX-512F (with AVX2 + FMA).
    Avx512 = 3,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2+fma",
            Level::Avx512 => "avx512f",
        }
    }

    fn from_u8(v: u8) -> Level {
        match v {
            3 => Level::Avx512,
            2 => Level::Avx2,
            _ => Level::Baseline,
        }
    }
}

/// 0 until first use, then the level in force.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2 && is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level the `DPAR_ISA` variable asks for, if it names one.
fn requested() -> Option<Level> {
    match std::env::var("DPAR_ISA").ok()?.to_ascii_lowercase().as_str() {
        "baseline" | "sse2" | "x86-64" => Some(Level::Baseline),
        "avx2" | "avx2+fma" | "x86-64-v3" => Some(Level::Avx2),
        "avx512" | "avx512f" => Some(Level::Avx512),
        other => {
            tracing::warn!("DPAR_ISA={other}: expected baseline, avx2 or avx512; ignored");
            None
        }
    }
}

fn init() -> Level {
    let cpu = detected();
    let level = requested().map_or(cpu, |r| r.min(cpu));
    LEVEL.store(level as u8, Ordering::Relaxed);
    level
}

/// The level the kernels run at: what the CPU supports, capped by `DPAR_ISA` or [`set_max`].
#[inline]
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        0 => init(),
        v => Level::from_u8(v),
    }
}

/// Caps the level for the whole process (at most what the CPU supports) and returns the level
/// now in force. For tests and benchmarks that compare the paths; not for use while kernels run
/// on other threads.
pub fn set_max(max: Level) -> Level {
    let level = max.min(detected());
    LEVEL.store(level as u8, Ordering::Relaxed);
    level
}

/// `a·b + c`: one fused multiply-add where the kernel was compiled with FMA (`FMA = true`),
/// otherwise a multiply and an add (a libm `fmaf` call per element would be far slower).
#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Defines a function whose body is compiled for each [`Level`] and chosen at run time by
/// [`level`]. The body is written once, generic over `const FMA: bool` (true in the AVX2 and
/// AVX-512 versions), and may use [`fmadd`]`::<FMA>`. Anything it calls with
/// `#[inline(always)]` (or that the compiler inlines) is compiled for the same level;
/// closures handed to rayon are not, so put this on the per-row work, not around a parallel
/// loop.
///
/// ```ignore
/// multiversion! {
///     pub(crate) fn axpy<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
///         for (y, &x) in y.iter_mut().zip(x) { *y = fmadd::<FMA>(a, x, *y); }
///     }
/// }
/// ```
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<const $fma:ident: bool>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<const $fma: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                match $crate::kernels::isa::level() {
                    // SAFETY: `level` reports AVX-512F (with AVX2 and FMA) only when
                    // `is_x86_feature_detected!` found them on this CPU.
                    $crate::kernels::isa::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    $crate::kernels::isa::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::isa::Level::Baseline => {}
                }
            }
            body::<false>($($arg),*)
        }
    };
}

pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        fn axpy<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = fmadd::<FMA>(a, x, *y);
            }
        }
    }

    #[test]
    fn a_multiversioned_kernel_computes_the_same_at_the_detected_level() {
        // (Other levels are compared in tests/isa_fallback.rs, one process, so that capping
        // the level cannot disturb tests running beside it.)
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
        let mut y = vec![1.0f32; 37];
        axpy(2.0, &x, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, 1.0 + 2.0 * (i as f32 * 0.25));
        }
        assert!(level() <= detected());
    }

    #[test]
    fn levels_are_ordered_and_named() {
        assert!(Level::Baseline < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert_eq!(Level::from_u8(Level::Avx2 as u8), Level::Avx2);
        assert_eq!(Level::Avx512.name(), "avx512f");
    }
}
