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
pub mod math;
pub mod matmul;
pub mod segment;

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
