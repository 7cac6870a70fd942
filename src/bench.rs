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
    /// One cached sampling step for the whole batch.
    pub sample_step_ms: f64,
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

/// Times a GPT: training step (forward, backward, clip, AdamW), forward alone, and one cached
/// sampling step at mid-sequence.
pub fn gpt_speed(name: &str, c: &GptConfig, batch: usize, warmup: usize, reps: usize, device: &Device) -> Result<SpeedRow> {
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
        Ok(())
    })?;
    let forward_ms = time_ms(warmup, reps, || {
        model.loss::<rand_chacha::ChaCha8Rng>(&codes, labels.as_ref(), None)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    // Cached sampling: a whole generation of the batch (no guidance), per code.
    let sample_step_ms = if c.cls_token_num == 1 {
        let labels_v: Vec<u32> = labels.as_ref().map(|y| y.to_vec1::<u32>()).transpose()?.unwrap_or_default();
        let sampling = crate::sample::SamplingConfig { cfg_scale: 1.0, ..Default::default() };
        let gen_ms = time_ms(0, 1, || {
            crate::sample::generate_gpt(&model, &labels_v, &sampling, device).map_err(|e| BenchError::Bad(e.to_string()))?;
            Ok(())
        })?;
        gen_ms / c.seq_len() as f64
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
    h.chunks(l).map(|img| crate::patching::patch_lengths(img, grid, &c, l).map_err(|e| BenchError::Bad(e.to_string()))).collect()
}

/// Times DPAR: packed training step, forward, and cached generation (per code, the whole
/// incremental algorithm of spec §6 including the entropy model) with mean patch length ≈ 1.8.
pub fn dpar_speed(name: &str, c: &crate::dpar::DparConfig, entropy: &GptConfig, batch: usize, warmup: usize, reps: usize, device: &Device) -> Result<SpeedRow> {
    use crate::dpar::model::GlobalLayout;
    use crate::dpar::Dpar;
    let bad = |e: crate::dpar::DparError| BenchError::Bad(e.to_string());
    let store = ParamStore::new(0, device);
    let model = Dpar::new(c, &store.root()).map_err(bad)?;
    let gpt_like = GptConfig { vocab_size: c.vocab_size, num_classes: c.num_classes, grid_size: c.grid_size, ..GptConfig::mnist() };
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
        let loss = model.loss(&codes, &labels, &layout, GlobalLayout::Packed, Some(TrainNoise { rng: &mut rng })).map_err(bad)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, vars.iter(), 1.0)?;
        opt.step(&grads)?;
        Ok(())
    })?;
    let forward_ms = time_ms(warmup, reps, || {
        model.loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None).map_err(bad)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    // Generation: a random entropy model and a θ at its median entropy give patches of ~2.
    let estore = ParamStore::new(1, device);
    let ec = GptConfig { vocab_size: c.vocab_size, grid_size: c.grid_size, ..entropy.clone() };
    let emodel = Gpt::new(&ec, &estore.root())?;
    let out = estore.var("output.weight").ok_or_else(|| BenchError::Bad("entropy model without head".into()))?;
    out.set(&Tensor::randn(0f32, 1.0, out.shape(), device)?)?;
    let theta = ((c.vocab_size as f64).ln() - 0.35).max(0.0);
    let labels_v: Vec<u32> = labels.to_vec1::<u32>()?;
    let sampling = crate::sample::SamplingConfig { cfg_scale: 1.0, ..Default::default() };
    let patch = crate::patching::PatchConfig::dpar(theta, 4);
    let gen_ms = time_ms(0, 1, || {
        crate::dpar::generate::generate(&model, &emodel, &labels_v, &sampling, &patch, device).map_err(bad)?;
        Ok(())
    })?;
    let fwd_flops = crate::flops::dpar_forward(c, positions as f64) * batch as f64;
    Ok(SpeedRow {
        name: name.to_string(),
        batch,
        positions,
        train_ms,
        forward_ms,
        sample_step_ms: gen_ms / c.seq_len() as f64,
        train_gflops: crate::flops::training(fwd_flops) / train_ms / 1e6,
        forward_gflops: fwd_flops / forward_ms / 1e6,
        train_codes_per_s: (batch * c.seq_len()) as f64 / train_ms * 1e3,
    })
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
    let mut push = |op: &str, shape: String, stock: f64, fused: f64| rows.push(OpRow { op: op.into(), shape, stock_ms: stock, fused_ms: fused });

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
                if i < 2 { rope::apply_reference(&p, &table.narrow(0, t)) } else { Ok(p) }
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
    let mut s = String::from("| op | shape | stock fwd+bwd ms | fused fwd+bwd ms | speed-up |\n|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!("| {} | {} | {:.2} | {:.2} | {:.1}× |\n", r.op, r.shape, r.stock_ms, r.fused_ms, r.stock_ms / r.fused_ms));
    }
    s
}

/// A markdown table of speed rows.
pub fn markdown(rows: &[SpeedRow]) -> String {
    let mut s = String::from("| model | batch × positions | train ms/step | train GFLOP/s | codes/s | forward ms | forward GFLOP/s | cached sample step ms (per code, whole batch) |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} × {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |\n",
            r.name, r.batch, r.positions, r.train_ms, r.train_gflops, r.train_codes_per_s, r.forward_ms, r.forward_gflops, r.sample_step_ms
        ));
    }
    s
}
