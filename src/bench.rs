//! Speed measurements: medians over repeated steps after warm-up, with GFLOP/s from the
//! analytic counts of [`crate::flops`]. Random codes stand in for data (speed does not depend on
//! the values).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::gpt::{Gpt, GptConfig, TrainNoise};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::params::ParamStore;

/// Errors of benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Bad(String),
    #[error(transparent)]
    Gpt(#[from] crate::gpt::GptError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// One model's timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedRow {
    pub name: String,
    pub batch: usize,
    /// Positions per sequence seen by the transformer.
    pub positions: usize,
    pub train_ms: f64,
    pub forward_ms: f64,
    /// One cached sampling step (per code, the whole batch) through the tensor path.
    pub sample_step_ms: f64,
    /// The same through the lean decode steps (on the CPU with fused or bf16 kernels; NaN
    /// otherwise), the default of `dpar sample` there.
    pub lean_sample_step_ms: f64,
    pub train_gflops: f64,
    pub forward_gflops: f64,
    /// Codes per second in training.
    pub train_codes_per_s: f64,
}

/// Times `f` `reps` times after `warmup` calls; returns the median in ms.
pub fn time_ms(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::util::median(&times))
}

fn random_batch(c: &GptConfig, batch: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = crate::util::rng_for(seed, "bench", 0);
    let codes: Vec<u32> = (0..batch * c.seq_len()).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..c.num_classes.max(1) as u32)).collect();
    Ok((Tensor::from_vec(codes, (batch, c.seq_len()), device)?, Tensor::new(labels, device)?))
}

/// Times a GPT: training step (forward, backward, clip, AdamW), forward alone, and, when
/// `sample`, one cached sampling step at mid-sequence (else those fields are NaN).
pub fn gpt_speed(
    name: &str,
    c: &GptConfig,
    batch: usize,
    warmup: usize,
    reps: usize,
    device: &Device,
    sample: bool,
) -> Result<SpeedRow> {
    let store = ParamStore::new(0, device);
    let model = Gpt::new(c, &store.root())?;
    let (codes, labels) = random_batch(c, batch, 1, device)?;
    let labels = (c.cls_token_num == 1).then_some(labels);
    let mut opt = AdamW::new(store.vars(), AdamWConfig::default())?;
    let vars: Vec<_> = store.vars().into_iter().map(|(_, v)| v).collect();
    let mut step = 0u64;
    let train_ms = time_ms(warmup, reps, || {
        step += 1;
        let mut rng = crate::util::rng_for(0, "bench-noise", step);
        let loss = model.loss(&codes, labels.as_ref(), Some(TrainNoise { rng: &mut rng }))?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, vars.iter(), 1.0)?;
        opt.step(&grads)?;
        // A GPU runs ahead of the host: wait for the step's kernels.
        device.synchronize()?;
        Ok(())
    })?;
    let forward_ms = time_ms(warmup, reps, || {
        model.loss::<rand_chacha::ChaCha8Rng>(&codes, labels.as_ref(), None)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    // Sampling: a whole generation of the batch (no guidance), per code, through the cached path
    // and through the lean decode step (CPU, fused or bf16 kernels).
    let labels_v: Vec<u32> = labels.as_ref().map(|y| y.to_vec1::<u32>()).transpose()?.unwrap_or_default();
    let sampling = crate::sample::SamplingConfig { cfg_scale: 1.0, ..Default::default() };
    let per_code =
        |generate: &dyn Fn() -> std::result::Result<Vec<Vec<u32>>, crate::sample::SampleError>| -> Result<f64> {
            let ms = time_ms(0, 1, || generate().map(|_| ()).map_err(|e| BenchError::Bad(e.to_string())))?;
            Ok(ms / c.seq_len() as f64)
        };
    let conditional = c.cls_token_num == 1;
    let sample_step_ms = if conditional && sample {
        per_code(&|| crate::sample::generate_gpt_cached(&model, &labels_v, &sampling, device))?
    } else {
        f64::NAN
    };
    let lean_sample_step_ms = if sample && conditional && device.is_cpu() && c.ops != crate::nn::Ops::Stock {
        per_code(&|| crate::sample::generate_gpt_lean(&model, &labels_v, &sampling))?
    } else {
        f64::NAN
    };
    let fwd_flops = crate::flops::gpt_forward(c) * batch as f64;
    Ok(SpeedRow {
        name: name.to_string(),
        batch,
        positions: c.input_len(),
        train_ms,
        forward_ms,
        sample_step_ms,
        lean_sample_step_ms,
        train_gflops: crate::flops::training(fwd_flops) / train_ms / 1e6,
        forward_gflops: fwd_flops / forward_ms / 1e6,
        train_codes_per_s: (batch * c.seq_len()) as f64 / train_ms * 1e3,
    })
}

/// Random patch lengths with a mean near `target` (for DPAR speed runs): i.i.d. entropies
/// through the patcher with a calibrated θ, P = 4, every rule on.
pub fn synthetic_lengths(grid: usize, batch: usize, target: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    let l = grid * grid;
    let mut rng = crate::util::rng_for(seed, "bench-entropy", 0);
    let mut h: Vec<f32> = (0..batch * l).map(|_| rng.random_range(0.0f32..4.0)).collect();
    for img in h.chunks_mut(l) {
        img[0] = f32::INFINITY;
    }
    let base = crate::patching::PatchConfig::dpar(0.0, 4);
    let (theta, _) = crate::patching::calibrate(&h, grid, &base, target).map_err(|e| BenchError::Bad(e.to_string()))?;
    let c = crate::patching::PatchConfig { threshold: theta, ..base };
    h.chunks(l)
        .map(|img| crate::patching::patch_lengths(img, grid, &c, l).map_err(|e| BenchError::Bad(e.to_string())))
        .collect()
}

/// Times DPAR: packed training step, forward, and, when `sample`, cached generation (per code,
/// the whole incremental algorithm of design §6 including the entropy model; else those fields are
/// NaN) with mean patch length ≈ 1.8.
#[allow(clippy::too_many_arguments)]
pub fn dpar_speed(
    name: &str,
    c: &crate::dpar::DparConfig,
    entropy: &GptConfig,
    batch: usize,
    warmup: usize,
    reps: usize,
    device: &Device,
    sample: bool,
) -> Result<SpeedRow> {
    use crate::dpar::model::GlobalLayout;
    use crate::dpar::Dpar;
    let bad = |e: crate::dpar::DparError| BenchError::Bad(e.to_string());
    let store = ParamStore::new(0, device);
    let model = Dpar::new(c, &store.root()).map_err(bad)?;
    let gpt_like = GptConfig::mnist().with(|it| {
        it.vocab_size = c.vocab_size;
        it.num_classes = c.num_classes;
        it.grid_size = c.grid_size;
    });
    let (codes, labels) = random_batch(&gpt_like, batch, 1, device)?;
    let lengths = synthetic_lengths(c.grid_size, batch, 1.8, 2)?;
    let layout = model.layout(lengths, c.seq_len()).map_err(bad)?;
    let positions = layout.packed_len() / batch;
    let mut opt = AdamW::new(store.vars(), AdamWConfig::default())?;
    let vars: Vec<_> = store.vars().into_iter().map(|(_, v)| v).collect();
    let mut step = 0u64;
    let train_ms = time_ms(warmup, reps, || {
        step += 1;
        let mut rng = crate::util::rng_for(0, "bench-noise", step);
        let loss = model
            .loss(&codes, &labels, &layout, GlobalLayout::Packed, Some(TrainNoise { rng: &mut rng }))
            .map_err(bad)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, vars.iter(), 1.0)?;
        opt.step(&grads)?;
        // A GPU runs ahead of the host: wait for the step's kernels.
        device.synchronize()?;
        Ok(())
    })?;
    let forward_ms = time_ms(warmup, reps, || {
        model
            .loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None)
            .map_err(bad)?
            .to_scalar::<f32>()?;
        Ok(())
    })?;
    // Generation: a random entropy model and a θ at its median entropy give patches of ~2.
    let estore = ParamStore::new(1, device);
    let ec = entropy.clone().with(|it| {
        it.vocab_size = c.vocab_size;
        it.grid_size = c.grid_size;
    });
    let emodel = Gpt::new(&ec, &estore.root())?;
    let out = estore.var("output.weight").ok_or_else(|| BenchError::Bad("entropy model without head".into()))?;
    out.set(&Tensor::randn(0f32, 1.0, out.shape(), device)?)?;
    let theta = ((c.vocab_size as f64).ln() - 0.35).max(0.0);
    let labels_v: Vec<u32> = labels.to_vec1::<u32>()?;
    let sampling = crate::sample::SamplingConfig { cfg_scale: 1.0, ..Default::default() };
    let patch = crate::patching::PatchConfig::dpar(theta, 4);
    let gen_ms = if sample {
        time_ms(0, 1, || {
            crate::dpar::generate::generate_cached(&model, &emodel, &labels_v, &sampling, &patch, device)
                .map_err(bad)?;
            Ok(())
        })?
    } else {
        f64::NAN
    };
    let lean_ms = if sample && device.is_cpu() && c.ops != crate::nn::Ops::Stock {
        time_ms(0, 1, || {
            crate::dpar::decode::generate_lean(&model, &emodel, &labels_v, &sampling, &patch).map_err(bad)?;
            Ok(())
        })?
    } else {
        f64::NAN
    };
    let fwd_flops = crate::flops::dpar_forward(c, positions as f64) * batch as f64;
    Ok(SpeedRow {
        name: name.to_string(),
        batch,
        positions,
        train_ms,
        forward_ms,
        sample_step_ms: gen_ms / c.seq_len() as f64,
        lean_sample_step_ms: lean_ms / c.seq_len() as f64,
        train_gflops: crate::flops::training(fwd_flops) / train_ms / 1e6,
        forward_gflops: fwd_flops / forward_ms / 1e6,
        train_codes_per_s: (batch * c.seq_len()) as f64 / train_ms * 1e3,
    })
}

/// What one image of a sampling run costs, counted on the lean decode steps (one decode
/// group of the run, on one thread): GEMM and attention FLOPs, and the bytes of weights and of
/// cached keys and values the steps read.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ImageCost {
    pub gemm_flops: f64,
    pub attention_flops: f64,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
}

impl ImageCost {
    pub fn flops(&self) -> f64 {
        self.gemm_flops + self.attention_flops
    }

    pub fn bytes(&self) -> f64 {
        self.weight_bytes + self.kv_bytes
    }

    /// The roofline bound (images/s) on a machine with `peak` FLOP/s and `bandwidth` B/s:
    /// the slower of computing every product at the GEMM peak and streaming every byte from
    /// main memory.
    pub fn bound(&self, peak: f64, bandwidth: f64) -> f64 {
        1.0 / (self.flops() / peak).max(self.bytes() / bandwidth)
    }

    /// Counts one generation of `images` images run by `generate` on this thread.
    fn count(images: usize, generate: impl FnOnce() -> Result<()>) -> Result<Self> {
        crate::kernels::matmul::take_flop_count();
        crate::kernels::take_traffic();
        crate::kernels::serial(generate)?;
        let flops = crate::kernels::matmul::take_flop_count() as f64;
        let t = crate::kernels::take_traffic();
        let n = images as f64;
        Ok(Self {
            gemm_flops: flops / n,
            attention_flops: t.attention_flops as f64 / n,
            weight_bytes: t.weight_bytes as f64 / n,
            kv_bytes: t.kv_bytes as f64 / n,
        })
    }
}

/// The machine's limits, measured in the same sitting as the sampling curve.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Machine {
    /// STREAM-style triad `a = b + s·c` over arrays far larger than the caches, all threads, B/s
    /// (12 bytes per element: two reads and a write).
    pub triad_bytes_per_s: f64,
    /// Our GEMMs at 1024³, FLOP/s, f32 and bf16.
    pub gemm_f32_flops: f64,
    pub gemm_bf16_flops: f64,
    pub threads: usize,
}

/// Measures [`Machine`]: the best of `reps` triads over 3 × 64 MiB, and the 1024³ GEMMs.
pub fn machine(reps: usize) -> Machine {
    use rayon::prelude::*;
    let n = 1 << 24;
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let c: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
    let mut a = vec![0f32; n];
    let chunk = n / (4 * rayon::current_num_threads()).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(3) {
        let t = Instant::now();
        a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).zip(c.par_chunks(chunk)).for_each(|((a, b), c)| {
            for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&a);
    let gemm = gemm_1024(reps.max(3));
    Machine {
        triad_bytes_per_s: 12.0 * n as f64 / best,
        gemm_f32_flops: gemm[0].1 * 1e9,
        gemm_bf16_flops: gemm[1].1 * 1e9,
        threads: rayon::current_num_threads(),
    }
}

/// Sampling speed of the baseline and of DPAR at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingRow {
    pub batch: usize,
    /// KV-cache precision of the run.
    pub kv_cache: crate::nn::KvPrecision,
    pub gpt_images_per_s: f64,
    pub dpar_images_per_s: f64,
    /// Patch-transformer steps per image (the baseline's transformer takes L).
    pub dpar_steps_per_image: f64,
    pub gpt_cost: ImageCost,
    pub dpar_cost: ImageCost,
    /// Roofline bounds (images/s) on [`Machine`], at the GEMM peak of each model's precision.
    pub gpt_bound: f64,
    pub dpar_bound: f64,
}

/// Median wall time (ms) of `f`, repeated until `reps` runs or about four seconds have passed.
fn time_for_seconds(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.is_empty() || (times.len() < reps && start.elapsed().as_secs_f64() < 4.0) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::util::median(&times))
}

/// Images per second of whole generations with the baseline and with DPAR (the default path of
/// `dpar sample`: lean steps on the CPU) at each batch size, classes cycling through the
/// model's, one untimed generation first; with each image's cost counted (one decode group) and
/// its roofline bound on `machine`.
#[allow(clippy::too_many_arguments)]
pub fn sampling_curve(
    gpt: &Gpt,
    dpar: &crate::dpar::Dpar,
    entropy: &Gpt,
    sampling: &crate::sample::SamplingConfig,
    patch: &crate::patching::PatchConfig,
    batches: &[usize],
    reps: usize,
    machine: Option<&Machine>,
    device: &Device,
) -> Result<Vec<SamplingRow>> {
    let bad = |e: String| BenchError::Bad(e);
    let classes = dpar.config().num_classes.max(1) as u32;
    let labels_of = |b: usize| (0..b as u32).map(|i| i % classes).collect::<Vec<_>>();
    let run_gpt = |labels: &[u32]| {
        crate::sample::generate_gpt(gpt, labels, sampling, device).map(|_| ()).map_err(|e| bad(e.to_string()))
    };
    let run_dpar = |labels: &[u32]| {
        crate::dpar::generate::generate(dpar, entropy, labels, sampling, patch, device).map_err(|e| bad(e.to_string()))
    };
    let bound = |cost: &ImageCost, ops: crate::nn::Ops| match machine {
        Some(m) => cost.bound(
            match ops.gemm() {
                crate::kernels::matmul::Gemm::Bf16 => m.gemm_bf16_flops,
                crate::kernels::matmul::Gemm::F32 => m.gemm_f32_flops,
            },
            m.triad_bytes_per_s,
        ),
        None => f64::NAN,
    };
    run_gpt(&labels_of(1))?;
    run_dpar(&labels_of(1))?;
    let mut rows = Vec::with_capacity(batches.len());
    for &b in batches {
        let labels = labels_of(b);
        let gpt_ms = time_for_seconds(reps, || run_gpt(&labels))?;
        let mut steps = 0.0;
        let dpar_ms = time_for_seconds(reps, || {
            let out = run_dpar(&labels)?;
            steps = out.global_steps().iter().sum::<usize>() as f64 / b as f64;
            Ok(())
        })?;
        // The lean steps' costs (the tensor path on other devices is not counted).
        let (mut gpt_cost, mut dpar_cost) = (ImageCost::default(), ImageCost::default());
        if machine.is_some() {
            // Two images (one group), counted on this thread. The roofline's weight bytes
            // are those of a batch run in lockstep (each weight read once per step for all b
            // images), whatever groups the run used.
            let counted = labels_of(b.min(2));
            let g = counted.len() as f64;
            gpt_cost = ImageCost::count(counted.len(), || run_gpt(&counted))?;
            dpar_cost = ImageCost::count(counted.len(), || run_dpar(&counted).map(|_| ()))?;
            gpt_cost.weight_bytes *= g / b as f64;
            dpar_cost.weight_bytes *= g / b as f64;
        }
        let row = SamplingRow {
            batch: b,
            kv_cache: sampling.kv_cache,
            gpt_images_per_s: b as f64 / gpt_ms * 1e3,
            dpar_images_per_s: b as f64 / dpar_ms * 1e3,
            dpar_steps_per_image: steps,
            gpt_bound: bound(&gpt_cost, gpt.config().ops),
            dpar_bound: bound(&dpar_cost, dpar.config().ops),
            gpt_cost,
            dpar_cost,
        };
        tracing::info!(
            "batch {b} ({} KV cache): baseline {:.1} images/s ({:.0}% of its bound), DPAR {:.1} images/s ({:.0}%)",
            sampling.kv_cache.name(),
            row.gpt_images_per_s,
            100.0 * row.gpt_images_per_s / row.gpt_bound,
            row.dpar_images_per_s,
            100.0 * row.dpar_images_per_s / row.dpar_bound
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Models with random weights for a paper-scale sampling curve (`dpar bench speed --random`):
/// the baseline, DPAR, and an unconditional entropy model, with random output heads so that
/// their predictions (and entropies) vary from code to code, and θ for a mean patch length near
/// `target`, calibrated on random codes: on the entropy model's entropies (`Model`), or on the
/// DPAR decoder's self-entropies of those codes (`Decoder`). Random codes are not sampled codes,
/// so the curve reports the patch steps its generations really took.
pub struct RandomModels {
    pub gpt: Gpt,
    pub dpar: crate::dpar::Dpar,
    pub entropy: Gpt,
    pub patch: crate::patching::PatchConfig,
    _stores: [ParamStore; 3],
}

/// Builds [`RandomModels`] of the given configurations (the entropy model's vocabulary and grid
/// follow DPAR's).
pub fn random_models(
    gpt: &GptConfig,
    dpar: &crate::dpar::DparConfig,
    entropy: &GptConfig,
    entropy_from: crate::patching::EntropyFrom,
    target: f64,
    device: &Device,
) -> Result<RandomModels> {
    let bad = |e: String| BenchError::Bad(e);
    let randomize = |store: &ParamStore, names: &[&str], seed: u64| -> Result<()> {
        for name in names {
            let var = store.var(name).ok_or_else(|| bad(format!("no parameter {name}")))?;
            let mut rng = crate::util::rng_for(seed, "bench-head", 0);
            let n = var.elem_count();
            let scale = 1.0 / (var.dims()[var.dims().len() - 1] as f32).sqrt();
            let values: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 3.0 * scale).collect();
            var.set(&Tensor::from_vec(values, var.shape(), device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    };
    let (gs, ds, es) = (ParamStore::new(10, device), ParamStore::new(11, device), ParamStore::new(12, device));
    let gpt_model = Gpt::new(gpt, &gs.root())?;
    randomize(&gs, &["output.weight"], 10)?;
    let dpar_model = crate::dpar::Dpar::new(dpar, &ds.root()).map_err(|e| bad(e.to_string()))?;
    randomize(&ds, &["output.weight"], 11)?;
    // Self-entropy patching runs no entropy model: a token one stands in for it.
    let ec = match entropy_from {
        crate::patching::EntropyFrom::Decoder => {
            GptConfig::mnist_entropy().with(|it| (it.n_layer, it.dim, it.n_head) = (1, 64, 1))
        }
        crate::patching::EntropyFrom::Model => entropy.clone(),
    }
    .with(|it| {
        it.vocab_size = dpar.vocab_size;
        it.grid_size = dpar.grid_size;
        (it.cls_token_num, it.class_dropout) = (0, 0.0);
    });
    let entropy_model = Gpt::new(&ec, &es.root())?;
    randomize(&es, &["output.weight"], 12)?;
    // θ on 4 random code sequences.
    let l = dpar.seq_len();
    let mut rng = crate::util::rng_for(13, "bench-codes", 0);
    let codes: Vec<Vec<u32>> =
        (0..4).map(|_| (0..l).map(|_| rng.random_range(0..dpar.vocab_size as u32)).collect()).collect();
    let base = crate::patching::PatchConfig { entropy_from, ..crate::patching::PatchConfig::dpar(f64::INFINITY, 4) };
    let entropies: Vec<f32> = match entropy_from {
        crate::patching::EntropyFrom::Model => {
            let t = Tensor::from_vec(codes.concat(), (codes.len(), l), device)?;
            let h = entropy_model.entropies(&t)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            h.into_iter().flat_map(|row| std::iter::once(f32::INFINITY).chain(row)).collect()
        }
        crate::patching::EntropyFrom::Decoder => {
            let labels: Vec<u32> = (0..codes.len() as u32).map(|i| i % dpar.num_classes.max(1) as u32).collect();
            crate::dpar::decode::self_entropies(&dpar_model, &entropy_model, &codes, &labels, &base)
                .map_err(|e| bad(e.to_string()))?
                .concat()
        }
    };
    let (theta, _) =
        crate::patching::calibrate(&entropies, dpar.grid_size, &base, target).map_err(|e| bad(e.to_string()))?;
    Ok(RandomModels {
        gpt: gpt_model,
        dpar: dpar_model,
        entropy: entropy_model,
        patch: crate::patching::PatchConfig { threshold: theta, ..base },
        _stores: [gs, ds, es],
    })
}

/// The sampling curve as a markdown table: speed, and each model's counted cost per image with
/// its roofline bound and the fraction of it reached.
pub fn sampling_markdown(rows: &[SamplingRow], codes_per_image: usize) -> String {
    let mut s = format!(
        "| batch | KV cache | baseline images/s | DPAR images/s | DPAR ÷ baseline | patch-transformer steps per image (baseline: {codes_per_image}) |\n|---|---|---|---|---|---|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.1} |\n",
            r.batch,
            r.kv_cache.name(),
            r.gpt_images_per_s,
            r.dpar_images_per_s,
            r.dpar_images_per_s / r.gpt_images_per_s,
            r.dpar_steps_per_image
        );
    }
    s += "\n| batch | KV cache | model | GFLOP per image (GEMM + attention) | MB per image (weights + KV) | roofline bound images/s | reached |\n|---|---|---|---|---|---|---|\n";
    for r in rows {
        for (name, cost, bound, got) in [
            ("baseline", &r.gpt_cost, r.gpt_bound, r.gpt_images_per_s),
            ("DPAR", &r.dpar_cost, r.dpar_bound, r.dpar_images_per_s),
        ] {
            s += &format!(
                "| {} | {} | {name} | {:.2} ({:.2} + {:.2}) | {:.0} ({:.0} + {:.0}) | {:.1} | {:.0}% |\n",
                r.batch,
                r.kv_cache.name(),
                cost.flops() / 1e9,
                cost.gemm_flops / 1e9,
                cost.attention_flops / 1e9,
                cost.bytes() / 1e6,
                cost.weight_bytes / 1e6,
                cost.kv_bytes / 1e6,
                bound,
                100.0 * got / bound
            );
        }
    }
    s
}

/// The machine line under the sampling tables.
pub fn machine_line(m: &Machine) -> String {
    format!(
        "machine: triad {:.1} GB/s, GEMM 1024³ {:.0} GFLOP/s f32 / {:.0} bf16, {} threads; bound = 1 / max(FLOPs ÷ GEMM peak, bytes ÷ triad bandwidth)",
        m.triad_bytes_per_s / 1e9,
        m.gemm_f32_flops / 1e9,
        m.gemm_bf16_flops / 1e9,
        m.threads
    )
}

/// One fused op against its stock composed version on the bench shapes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpRow {
    pub op: String,
    pub shape: String,
    /// Forward + backward, milliseconds (median).
    pub stock_ms: f64,
    pub fused_ms: f64,
}

fn rand_tensor(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = crate::util::rng_for(seed, "op-bench", 0);
    let n: usize = shape.iter().product();
    Ok(Tensor::from_vec((0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, device)?)
}

/// Times forward + backward of `f` (a loss built from the variables) after warm-up.
fn time_fwd_bwd(warmup: usize, reps: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> Result<f64> {
    time_ms(warmup, reps, || {
        let loss = f()?;
        loss.backward()?;
        Ok(())
    })
}

/// Each fused kernel against the stock composed candle ops, forward + backward, on the shapes
/// of the bench model (16 × 256 tokens, width 256, 4 heads, SwiGLU 688, vocabulary 1024).
pub fn op_speed(warmup: usize, reps: usize, device: &Device) -> Result<Vec<OpRow>> {
    use crate::kernels::{attention, fused, matmul};
    use crate::nn::rope;
    use candle_core::Var;
    let (b, t, d, h, f, v) = (16usize, 256usize, 256usize, 4usize, 688usize, 1024usize);
    let n = b * t;
    let var = |shape: &[usize], seed| -> Result<Var> { Ok(Var::from_tensor(&rand_tensor(shape, seed, device)?)?) };
    let mut rows = Vec::new();
    let mut push = |op: &str, shape: String, stock: f64, fused: f64| {
        rows.push(OpRow { op: op.into(), shape, stock_ms: stock, fused_ms: fused })
    };

    // Linear (the qkv projection).
    let x = var(&[n, d], 1)?;
    let w = var(&[3 * d, d], 2)?;
    let stock = time_fwd_bwd(warmup, reps, &|| x.matmul(&w.t()?)?.sum_all())?;
    let ours = time_fwd_bwd(warmup, reps, &|| matmul::linear(&x, &w, matmul::Gemm::F32)?.sum_all())?;
    push("linear x·Wᵀ (faer)", format!("{n}×{d} · {d}×{}", 3 * d), stock, ours);

    // Attention.
    let qkv = var(&[n, 3 * d], 3)?;
    let probe = rand_tensor(&[n, d], 4, device)?;
    let segs = attention::causal_segments(b, t);
    let table = rope::table_2d(16, d / h, 10000.0, 0);
    let stock = time_fwd_bwd(warmup, reps, &|| (attention::attention_reference(&qkv, h, &segs)? * &probe)?.sum_all())?;
    let ours = time_fwd_bwd(warmup, reps, &|| (attention::flash_attention(&qkv, h, &segs)? * &probe)?.sum_all())?;
    push("causal attention", format!("{b}×{t} tokens, {h} heads × {}", d / h), stock, ours);

    // RoPE on q and k (stock: the (B, H, T, d) layout with composed ops).
    let probe3 = rand_tensor(&[n, 3 * d], 5, device)?;
    let stock = time_fwd_bwd(warmup, reps, &|| {
        let parts: Vec<Tensor> = (0..3)
            .map(|i| {
                let p = qkv.narrow(1, i * d, d)?.reshape((b, t, h, d / h))?.transpose(1, 2)?.contiguous()?;
                if i < 2 {
                    rope::apply_reference(&p, &table.narrow(0, t))
                } else {
                    Ok(p)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let merged = Tensor::cat(&parts, 1)?.transpose(1, 2)?.reshape((n, 3 * d))?;
        (merged * &probe3)?.sum_all()
    })?;
    let ours = time_fwd_bwd(warmup, reps, &|| (rope::apply_qkv(&qkv, &table.narrow(0, t), h)? * &probe3)?.sum_all())?;
    push("RoPE (2D, q and k)", format!("{n} tokens × {h} heads"), stock, ours);

    // RMSNorm.
    let wn = var(&[d], 6)?;
    let probe_d = rand_tensor(&[n, d], 7, device)?;
    let stock = time_fwd_bwd(warmup, reps, &|| (fused::rms_norm_reference(&x, &wn, 1e-5)? * &probe_d)?.sum_all())?;
    let ours = time_fwd_bwd(warmup, reps, &|| (fused::rms_norm(&x, &wn, 1e-5)? * &probe_d)?.sum_all())?;
    push("RMSNorm", format!("{n}×{d}"), stock, ours);

    // SwiGLU.
    let hh = var(&[n, 2 * f], 8)?;
    let probe_f = rand_tensor(&[n, f], 9, device)?;
    let stock = time_fwd_bwd(warmup, reps, &|| (fused::swiglu_reference(&hh)? * &probe_f)?.sum_all())?;
    let ours = time_fwd_bwd(warmup, reps, &|| (fused::swiglu(&hh)? * &probe_f)?.sum_all())?;
    push("SwiGLU", format!("{n}×{f}"), stock, ours);

    // Softmax + cross-entropy.
    let logits = var(&[n, v], 10)?;
    let mut rng = crate::util::rng_for(11, "targets", 0);
    let targets = Tensor::from_vec((0..n).map(|_| rng.random_range(0..v as u32)).collect::<Vec<_>>(), n, device)?;
    let stock = time_fwd_bwd(warmup, reps, &|| candle_nn::loss::cross_entropy(&logits, &targets))?;
    let ours = time_fwd_bwd(warmup, reps, &|| fused::cross_entropy(&logits, &targets))?;
    push("softmax + cross-entropy", format!("{n}×{v}"), stock, ours);
    Ok(rows)
}

/// A markdown table of fused-vs-stock op timings.
pub fn op_markdown(rows: &[OpRow]) -> String {
    let mut s =
        String::from("| op | shape | stock fwd+bwd ms | fused fwd+bwd ms | speed-up |\n|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.1}× |\n",
            r.op,
            r.shape,
            r.stock_ms,
            r.fused_ms,
            r.stock_ms / r.fused_ms
        ));
    }
    s
}

/// A markdown table of speed rows.
pub fn markdown(rows: &[SpeedRow]) -> String {
    let mut s = String::from("| model | batch × positions | train ms/step | train GFLOP/s | codes/s | forward ms | forward GFLOP/s | cached sample step ms (per code, whole batch) | lean decode step ms |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let lean =
            if r.lean_sample_step_ms.is_finite() { format!("{:.2}", r.lean_sample_step_ms) } else { "—".into() };
        s.push_str(&format!(
            "| {} | {} × {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {lean} |\n",
            r.name,
            r.batch,
            r.positions,
            r.train_ms,
            r.train_gflops,
            r.train_codes_per_s,
            r.forward_ms,
            r.forward_gflops,
            r.sample_step_ms
        ));
    }
    s
}

/// PyTorch's figures for the bench model, from the reference scripts in `bench/`
/// (`torch_bench_model.py`: f32; `torch_bench_bf16.py`: bf16 autocast; `torch_sample_bench.py`:
/// cached sampling at batch 16), run in the same sitting as ours.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TorchReference {
    /// Best over the scripts' attention variants (plain and `scaled_dot_product_attention`).
    pub train_ms_f32: Option<f64>,
    pub forward_ms_f32: Option<f64>,
    pub train_ms_bf16: Option<f64>,
    pub forward_ms_bf16: Option<f64>,
    pub sample_step_ms: Option<f64>,
    /// `(dtype, GFLOP/s)` of a 1024³ matmul.
    pub matmul_gflops: Vec<(String, f64)>,
    /// `(shape name, dtype, GFLOP/s)` of the bench model's GEMMs (`torch_gemm_shapes.py`).
    pub gemm_gflops: Vec<(String, String, f64)>,
}

/// The number after `key` in `line` (`"median 12.3 ms"` → 12.3 for key `median`).
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.trim_end_matches(',').parse().ok()
}

fn keep_min(slot: &mut Option<f64>, v: Option<f64>) {
    if let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) {
        *slot = Some(slot.map_or(v, |s| s.min(v)));
    }
}

impl TorchReference {
    /// Reads the figures out of a reference script's output (lines it does not know are skipped).
    pub fn parse(&mut self, output: &str) {
        for line in output.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("MATMUL ") {
                let dtype = rest.split_whitespace().next().unwrap_or("").to_string();
                if let Some(g) =
                    line.rsplit(", ").next().and_then(|t| t.split_whitespace().next()).and_then(|g| g.parse().ok())
                {
                    self.matmul_gflops.push((dtype, g));
                }
            } else if let Some(rest) = line.strip_prefix("GEMM ") {
                let mut words = rest.split_whitespace();
                let (name, dtype) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
                if let Some(g) =
                    line.rsplit(", ").next().and_then(|t| t.split_whitespace().next()).and_then(|g| g.parse().ok())
                {
                    self.gemm_gflops.push((name, dtype, g));
                }
            } else if line.starts_with("AUTOCAST-BF16 TRAIN") {
                keep_min(&mut self.train_ms_bf16, number_after(line, "median"));
            } else if line.starts_with("AUTOCAST-BF16 FWD") {
                keep_min(&mut self.forward_ms_bf16, number_after(line, "median"));
            } else if line.starts_with("TRAIN ") {
                keep_min(&mut self.train_ms_f32, number_after(line, "median"));
            } else if line.starts_with("FWD") {
                keep_min(&mut self.forward_ms_f32, number_after(line, "median"));
            } else if line.starts_with("TORCH SAMPLE") {
                keep_min(
                    &mut self.sample_step_ms,
                    line.split(": ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()),
                );
            }
        }
    }

    /// Runs `python script` and parses its output; an error names the script and shows the end
    /// of its output.
    pub fn run_script(&mut self, python: &std::path::Path, script: &std::path::Path) -> Result<()> {
        let out = std::process::Command::new(python).arg(script).output().map_err(|e| {
            BenchError::Bad(format!("--torch {}: cannot run {}: {e}", python.display(), script.display()))
        })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String =
                err.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(BenchError::Bad(format!(
                "{} {} failed ({}):\n{tail}",
                python.display(),
                script.display(),
                out.status
            )));
        }
        self.parse(&text);
        Ok(())
    }
}

/// Median GFLOP/s of our f32 and bf16 GEMMs at 1024³ (the reference scripts' matmul).
pub fn gemm_1024(reps: usize) -> Vec<(String, f64)> {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let mut c = vec![0f32; n * n];
    let flops = 2.0 * (n * n * n) as f64;
    let mut out = Vec::new();
    let mut time = |f: &mut dyn FnMut(&mut [f32])| -> f64 {
        f(&mut c);
        let mut ts: Vec<f64> = (0..reps.max(1))
            .map(|_| {
                let t = Instant::now();
                f(&mut c);
                t.elapsed().as_secs_f64()
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        flops / ts[ts.len() / 2] / 1e9
    };
    out.push((
        "f32 (faer)".to_string(),
        time(&mut |c| crate::kernels::matmul::faer_gemm(c, n, n, n, &a, false, &b, false, false)),
    ));
    let label = if crate::kernels::bf16::available() {
        "bf16 (vdpbf16ps)"
    } else {
        "bf16 (no AVX512-BF16: rounded operands through f32)"
    };
    out.push((
        label.to_string(),
        time(&mut |c| crate::kernels::bf16::bf16_gemm(c, n, n, n, &a, false, &b, false, false)),
    ));
    out
}

/// One GEMM shape of the bench model: ours in f32 (faer) and bf16, GFLOP/s.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemmRow {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub f32_gflops: f64,
    pub bf16_gflops: f64,
}

/// The bench model's GEMM shapes (batch 16 × 256, width 256, SwiGLU 688, vocabulary 1024) with
/// their operand layouts: `(name, m, n, k, trans_a, trans_b)`. The names match
/// `bench/torch_gemm_shapes.py`.
pub const GEMM_SHAPES: [(&str, usize, usize, usize, bool, bool); 7] = [
    ("fwd-qkv", 4096, 768, 256, false, true),
    ("fwd-w13", 4096, 1376, 256, false, true),
    ("fwd-w2", 4096, 256, 688, false, true),
    ("fwd-head", 4096, 1024, 256, false, true),
    ("bwd-dx-w13", 4096, 256, 1376, false, false),
    ("bwd-dw-w13", 1376, 256, 4096, true, false),
    ("square-1024", 1024, 1024, 1024, false, false),
];

/// Median GFLOP/s of our f32 and bf16 GEMMs at [`GEMM_SHAPES`].
pub fn gemm_shapes(reps: usize) -> Vec<GemmRow> {
    GEMM_SHAPES
        .iter()
        .map(|&(name, m, n, k, ta, tb)| {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let mut time = |gemm: crate::kernels::matmul::Gemm| {
                gemm.run(&mut c, m, n, k, &a, ta, &b, tb, false);
                let mut ts: Vec<f64> = (0..reps.max(3))
                    .map(|_| {
                        let t = Instant::now();
                        gemm.run(&mut c, m, n, k, &a, ta, &b, tb, false);
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                ts.sort_by(f64::total_cmp);
                flops / ts[ts.len() / 2] / 1e9
            };
            let f32_gflops = time(crate::kernels::matmul::Gemm::F32);
            let bf16_gflops = time(crate::kernels::matmul::Gemm::Bf16);
            GemmRow { name: name.to_string(), m, n, k, f32_gflops, bf16_gflops }
        })
        .collect()
}

/// Decode-step products `x (m×k)·Wᵀ` for W (n×k) of a qkv projection at width 256: faer's
/// packed GEMM against [`crate::kernels::matmul::small_m_gemm`] on W packed once (the lean
/// steps), f32, GFLOP/s. Where the two cross is the right [`crate::kernels::matmul::SMALL_M`].
pub fn decode_gemm(reps: usize) -> Vec<(usize, f64, f64)> {
    use crate::kernels::matmul::{faer_gemm, small_m_gemm, small_m_weights};
    let (n, k) = (768, 256);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let packed = small_m_weights(&w, n, k, false);
    [1, 2, 4, 8, 16, 32, 64, 128, 200]
        .iter()
        .map(|&m| {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let inner = (1 << 22) / (m * n * k) + 1;
            let mut time = |f: &mut dyn FnMut(&mut [f32])| {
                let mut ts: Vec<f64> = (0..reps.max(3))
                    .map(|_| {
                        let t = Instant::now();
                        for _ in 0..inner {
                            f(&mut c);
                        }
                        t.elapsed().as_secs_f64() / inner as f64
                    })
                    .collect();
                ts.sort_by(f64::total_cmp);
                flops / ts[ts.len() / 2] / 1e9
            };
            let faer = time(&mut |c| faer_gemm(c, m, n, k, &x, false, &w, true, false));
            let small = time(&mut |c| small_m_gemm(c, m, n, k, &x, &packed, false, false));
            (m, faer, small)
        })
        .collect()
}

/// Our GEMM rows beside PyTorch's (when measured), GFLOP/s.
pub fn gemm_markdown(rows: &[GemmRow], torch: Option<&TorchReference>) -> String {
    let theirs = |name: &str, dtype: &str| {
        torch
            .and_then(|t| t.gemm_gflops.iter().find(|(n, d, _)| n == name && d == dtype))
            .map_or("—".to_string(), |(_, _, g)| format!("{g:.0}"))
    };
    let mut s = String::from("| GEMM (bench model) | m × n × k | ours f32 | PyTorch f32 | ours bf16 | PyTorch bf16 |\n|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} × {} × {} | {:.0} | {} | {:.0} | {} |\n",
            r.name,
            r.m,
            r.n,
            r.k,
            r.f32_gflops,
            theirs(&r.name, "float32"),
            r.bf16_gflops,
            theirs(&r.name, "bfloat16")
        ));
    }
    s
}

/// A markdown comparison of our bench-model rows (`bench (fused)`, `bench (bf16)`) with
/// PyTorch's; ratios are PyTorch's time over ours (above 1: we are faster).
pub fn torch_markdown(rows: &[SpeedRow], torch: &TorchReference, ours_gemm: &[(String, f64)]) -> String {
    let find = |ops: &str| rows.iter().find(|r| r.name == format!("bench ({ops})"));
    let (fused, bf16) = (find("fused"), find("bf16"));
    // Our sampling step: the faster of the cached and the lean decode paths.
    let sample_ms = |r: &SpeedRow| {
        if r.lean_sample_step_ms.is_finite() {
            r.sample_step_ms.min(r.lean_sample_step_ms)
        } else {
            r.sample_step_ms
        }
    };
    let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1}"));
    let best = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    let ratio = |theirs: Option<f64>, ours: Option<f64>| match (theirs, ours) {
        (Some(t), Some(o)) if o > 0.0 => format!("{:.2}×", t / o),
        _ => "—".into(),
    };
    let mut s = String::from("| bench model, batch 16 (ms) | PyTorch f32 | PyTorch bf16 autocast | ours fused (f32) | ours bf16 | ours best vs PyTorch best |\n|---|---|---|---|---|---|\n");
    // (row, PyTorch f32, PyTorch bf16, ours fused, ours bf16)
    type Line<'a> = (&'a str, Option<f64>, Option<f64>, Option<f64>, Option<f64>);
    let lines: [Line; 3] = [
        ("training step", torch.train_ms_f32, torch.train_ms_bf16, fused.map(|r| r.train_ms), bf16.map(|r| r.train_ms)),
        (
            "forward",
            torch.forward_ms_f32,
            torch.forward_ms_bf16,
            fused.map(|r| r.forward_ms),
            bf16.map(|r| r.forward_ms),
        ),
        ("cached sampling step", torch.sample_step_ms, None, fused.map(sample_ms), bf16.map(sample_ms)),
    ];
    for (what, tf, tb, of, ob) in lines {
        s.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} |\n",
            cell(tf),
            cell(tb),
            cell(of),
            cell(ob),
            ratio(best(tf, tb), best(of, ob))
        ));
    }
    s.push_str("\n| 1024³ matmul | GFLOP/s |\n|---|---|\n");
    for (dtype, g) in &torch.matmul_gflops {
        s.push_str(&format!("| PyTorch {dtype} | {g:.1} |\n"));
    }
    for (what, g) in ours_gemm {
        s.push_str(&format!("| ours {what} | {g:.1} |\n"));
    }
    s
}

#[cfg(test)]
mod torch_tests {
    use super::*;

    /// The parser reads the reference scripts' own lines (copied from their output format) and
    /// keeps the best of the attention variants.
    #[test]
    fn torch_output_is_parsed_and_the_best_variant_kept() {
        let mut t = TorchReference::default();
        t.parse("MATMUL torch.float32 1024^3: median 10.20 ms, 210.5 GFLOP/s\nparams 3675904\nFWD(no_grad) sdpa=False median 190.5 ms\nTRAIN sdpa=False median 570.1 ms loss 7.0123\nFWD(no_grad) sdpa=True median 186.0 ms\nTRAIN sdpa=True median 566.4 ms loss 7.0001\n");
        t.parse("MATMUL torch.bfloat16 1024^3: median 2.30 ms, 930.2 GFLOP/s\nAUTOCAST-BF16 FWD sdpa=True median 97.0 ms\nAUTOCAST-BF16 TRAIN sdpa=True median 267.3 ms loss 7.1\n");
        t.parse("TORCH SAMPLE batch 16: 2.51 ms per step (mean over 256 steps, median of 3 runs)\n");
        t.parse("GEMM fwd-qkv bfloat16 4096x768x256: median 1.234 ms, 652.1 GFLOP/s\n");
        assert_eq!(t.gemm_gflops, vec![("fwd-qkv".to_string(), "bfloat16".to_string(), 652.1)]);
        let gr = GemmRow { name: "fwd-qkv".into(), m: 4096, n: 768, k: 256, f32_gflops: 200.0, bf16_gflops: 300.0 };
        assert!(gemm_markdown(&[gr], Some(&t)).contains("| fwd-qkv | 4096 × 768 × 256 | 200 | — | 300 | 652 |"));
        assert_eq!(t.train_ms_f32, Some(566.4));
        assert_eq!(t.forward_ms_f32, Some(186.0));
        assert_eq!(t.train_ms_bf16, Some(267.3));
        assert_eq!(t.forward_ms_bf16, Some(97.0));
        assert_eq!(t.sample_step_ms, Some(2.51));
        assert_eq!(t.matmul_gflops, vec![("torch.float32".to_string(), 210.5), ("torch.bfloat16".to_string(), 930.2)]);
        let row = |name: &str, train_ms: f64| SpeedRow {
            name: name.into(),
            batch: 16,
            positions: 256,
            train_ms,
            forward_ms: 100.0,
            sample_step_ms: 2.0,
            lean_sample_step_ms: f64::NAN,
            train_gflops: 0.0,
            forward_gflops: 0.0,
            train_codes_per_s: 0.0,
        };
        let md = torch_markdown(&[row("bench (fused)", 360.0), row("bench (bf16)", 300.0)], &t, &[]);
        // Training: PyTorch's best 267.3 over our best 300.
        assert!(md.contains("| training step | 566.4 | 267.3 | 360.0 | 300.0 | 0.89× |"), "{md}");
        assert!(md.contains("| cached sampling step | 2.5 | — | 2.0 | 2.0 | 1.25× |"), "{md}");
    }
}
