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
    // Cached sampling: prefill half the sequence, then time single steps.
    let mut cache = model.new_cache();
    let half = c.seq_len() / 2;
    if let Some(y) = &labels {
        model.step(&mut cache, Some(y), None)?;
    }
    for k in 0..half {
        model.step(&mut cache, None, Some(&codes.narrow(1, k, 1)?))?;
    }
    let mut k = half;
    let sample_step_ms = time_ms(1, reps.min(c.seq_len() - half - 2), || {
        model.step(&mut cache, None, Some(&codes.narrow(1, k, 1)?))?.to_dtype(candle_core::DType::F32)?;
        k += 1;
        Ok(())
    })?;
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

/// A markdown table of speed rows.
pub fn markdown(rows: &[SpeedRow]) -> String {
    let mut s = String::from("| model | batch × positions | train ms/step | train GFLOP/s | codes/s | forward ms | forward GFLOP/s | cached sample step ms |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} × {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |\n",
            r.name, r.batch, r.positions, r.train_ms, r.train_gflops, r.train_codes_per_s, r.forward_ms, r.forward_gflops, r.sample_step_ms
        ));
    }
    s
}
