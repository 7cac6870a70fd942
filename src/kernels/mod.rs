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

use std::cell::Cell;
use std::mem::MaybeUninit;

thread_local! {
    /// Set while a thread runs its own share of a parallel job (a decode group).
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Threads a kernel may spread its work over: the thread pool's, or 1 inside [`serial`] (a
/// decode group that already has a core of its own gains nothing from waking the pool).
pub fn threads() -> usize {
    if SERIAL.with(Cell::get) {
        1
    } else {
        rayon::current_num_threads()
    }
}

thread_local! {
    /// Decode-step traffic counted on this thread since the last [`take_traffic`].
    static TRAFFIC: Cell<Traffic> = const { Cell::new(Traffic { weight_bytes: 0, kv_bytes: 0, attention_flops: 0 }) };
}

/// What the lean decode steps read and computed outside the GEMMs (whose FLOPs
/// `matmul::take_flop_count` counts): the bytes of weights the step products streamed, the
/// bytes of cached keys and values the attention read, and the attention's FLOPs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub attention_flops: u64,
}

/// Adds to this thread's [`Traffic`].
pub fn count_traffic(weight_bytes: u64, kv_bytes: u64, attention_flops: u64) {
    TRAFFIC.with(|t| {
        let mut v = t.get();
        v.weight_bytes += weight_bytes;
        v.kv_bytes += kv_bytes;
        v.attention_flops += attention_flops;
        t.set(v);
    });
}

/// This thread's [`Traffic`] since the previous call; resets it.
pub fn take_traffic() -> Traffic {
    TRAFFIC.with(|t| t.replace(Traffic::default()))
}

/// Runs `f` with [`threads`] = 1 on this thread: the kernels it calls stay on it.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let out = f();
    SERIAL.with(|s| s.set(before));
    out
}

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
