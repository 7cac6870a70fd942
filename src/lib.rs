//! # DPAR: dynamic patchification for efficient autoregressive image generation
//!
//! A Rust implementation (on candle) of DPAR: an autoregressive image generator that merges
//! low-information image codes into variable-length patches, chosen by the next-code entropy of
//! a small model, so that the big transformer runs over fewer positions.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! images ─[data]─▶ tokenizer (VQ encoder) ─▶ code shards ─[gpt, unconditional]─▶ entropies
//!        ─[patching]─▶ patch lengths ─[dpar: encoder → patch transformer → decoder]─▶ codes
//!        ─[tokenizer (VQ decoder)]─▶ images ─[eval]─▶ metrics
//! ```
//!
//! - [`data`]: IDX and class-folder image readers, code shards.
//! - [`tokenizer`]: LlamaGen's VQ-VAE (VQ-16 and a small MNIST preset) and its training.
//! - [`nn`]: LlamaGen layers (RMSNorm, attention with KV cache, SwiGLU, 2D RoPE).
//! - [`gpt`]: the LlamaGen GPT baseline and its unconditional variant (the entropy model).
//! - [`sample`]: classifier-free guidance, temperature/top-k/top-p, cached generation.
//! - [`train`]: the one training loop (AdamW, clipping, checkpoints, exact resume).
//! - [`models`]: one entry point for loading every kind of model file; [`home`]: where the
//!   shipped models are found from any working directory.
//! - [`recipe`]: a run assembled from a preset or config file plus overrides, and launched on
//!   one process, thread ranks, MPI or NCCL: everything `dpar train` does, as a call.
//! - [`params`], [`optim`], [`tensor_io`]: seeded parameters, AdamW, safetensors/PyTorch IO.
//! - [`viz`], [`plot`]: PNG grids and curves.
//!
//! The rules implemented are written down in `docs/design.md`; module docs cite its sections
//! as "design §N".

pub mod batch;
pub mod bench;
pub mod data;
pub mod device_check;
pub mod dist;
pub mod dpar;
pub mod entropy;
pub mod eval;
pub mod experiments;
pub mod flops;
pub mod gpt;
pub mod home;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod optim;
pub mod params;
pub mod parts;
pub mod patching;
pub mod plot;
pub mod recipe;
pub mod rundir;
pub mod runs;
pub mod sample;
pub mod sample_set;
pub mod stream;
pub mod tensor_io;
pub mod tokenizer;
pub mod train;
pub mod util;
pub mod viz;
pub mod zipfile;
