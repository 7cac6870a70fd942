//! Our own CPU kernels, as candle `CustomOp`s with backward passes.
//!
//! candle's stock CPU convolution runs at ~23 GFLOP/s forward here and its backward (through
//! `conv_transpose2d`) is ~4× slower still; [`conv`] replaces it with im2col + GEMM in both
//! directions. [`gemm`] is the safe wrapper over the `gemm` crate that every kernel uses.

pub mod attention;
pub mod bf16;
pub mod block;
pub mod conv;
pub mod fused;
pub mod gemm;
pub mod group_norm;
pub mod isa;
pub mod math;
pub mod matmul;
pub mod rope_rows;
pub mod segment;

use std::mem::MaybeUninit;

/// Extracts a contiguous f32 slice from CPU storage, or explains why not.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        candle_core::CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("{what}: expected f32 data"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (used in backward passes, which receive
/// tensors rather than storages). Non-contiguous tensors are made contiguous first.
pub(crate) fn with_f32<R>(
    tensor: &candle_core::Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(cpu_f32(cpu, layout, what)?),
        _ => candle_core::bail!("{what}: CPU tensor expected"),
    }
}

/// Writes zeros over `s` and returns it, now initialised.
pub(crate) fn zero_fill(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for x in s.iter_mut() {
        x.write(0.0);
    }
    // SAFETY: the loop above wrote every element.
    unsafe { assume_init_mut(s) }
}

/// Writes `src` over `dst`; like `copy_from_slice`, panics unless the lengths are equal.
pub(crate) fn write_slice(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "write_slice: destination and source lengths differ");
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(v);
    }
}

/// `s` as initialised f32 (what `<[MaybeUninit<f32>]>::assume_init_mut` does on newer Rust).
///
/// # Safety
/// Every element of `s` must be initialised.
pub(crate) unsafe fn assume_init_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has the size and alignment of f32, and the caller guarantees that
    // every element is initialised.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Initialised f32 seen as possibly uninitialised, for kernels that write either kind.
///
/// # Safety
/// The caller must write only initialised values through the result (never
/// `MaybeUninit::uninit()`), so that `s` is still initialised when the borrow ends.
pub(crate) unsafe fn as_uninit_mut(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has the size and alignment of f32; the caller keeps every element
    // initialised.
    unsafe { &mut *(s as *mut [f32] as *mut [MaybeUninit<f32>]) }
}
