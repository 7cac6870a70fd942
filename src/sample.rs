//! Sampling (design §6): classifier-free guidance on raw logits, temperature, top-k, top-p, and
//! the KV-cached generation loop of the LlamaGen baseline (DPAR's own loop lives in
//! `dpar::generate` and uses the same logit processing).
//!
//! Random draws are fixed up front: image i's code k is drawn by inverse CDF from the uniform
//! `u[i·L + k]` of a seeded stream, so two generation algorithms given the same seed make the
//! same choices and can be compared code for code.
//!
//! # Shapes
//! B images, L codes per image, V vocabulary.

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::gpt::{Gpt, GptError};

/// Errors of sampling.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A sampling setting is out of range.
    #[error("sampling: {0}")]
    BadConfig(String),
    /// The observer of a generation asked it to stop (e.g. a closed browser tab).
    #[error("generation cancelled")]
    Cancelled,
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SampleError>;

/// One code position of every image of a batch, as generation produces it: for watchers of a
/// generation (`dpar serve` streams these to a web page).
#[derive(Debug)]
pub struct CodeStep<'a> {
    /// The position k in raster order.
    pub k: usize,
    /// z_k of each image.
    pub codes: &'a [u32],
    /// Per image, the next-code entropy behind z_k in nats: the entropy model's H_k for DPAR
    /// (+∞ for z_0), the conditional model's own for the baseline.
    pub entropies: &'a [f32],
    /// Per image, whether z_k opens a patch (DPAR; every code for the baseline).
    pub opens_patch: &'a [bool],
}

/// Called after every code position; returning `false` stops the generation with
/// [`SampleError::Cancelled`]. `None` watches nothing (and costs nothing).
pub type Observer<'a, 'b> = Option<&'a mut (dyn FnMut(&CodeStep) -> bool + 'b)>;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Guidance scale s: logits = uncond + s·(cond − uncond). 1 = no guidance.
    pub cfg_scale: f64,
    /// Temperature T (logits / max(T, 1e-5)).
    pub temperature: f64,
    /// Keep the k largest logits (0 = off).
    pub top_k: usize,
    /// Keep the smallest prefix of the sorted distribution whose mass exceeds p (1 = off).
    pub top_p: f64,
    pub seed: u64,
    /// Index of this batch's first image in its run (0 when absent): image j of the batch draws
    /// from the stream of (`seed`, `first_image` + j). Set by whatever splits a run into batches
    /// or groups, so that an image does not depend on how its run was split.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_image: u64,
    /// Precision of the KV caches of the lean CPU decode steps (`f32` when absent).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub kv_cache: crate::nn::KvPrecision,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_f32(p: &crate::nn::KvPrecision) -> bool {
    *p == crate::nn::KvPrecision::F32
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            cfg_scale: 2.0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            first_image: 0,
            kv_cache: Default::default(),
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return Err(SampleError::BadConfig(format!("cfg scale must be finite and ≥ 0, got {}", self.cfg_scale)));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SampleError::BadConfig(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SampleError::BadConfig(format!("top-p must lie in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }

    /// The settings of the part of this batch that starts at its image `start`.
    pub fn from_image(&self, start: usize) -> SamplingConfig {
        SamplingConfig { first_image: self.first_image.wrapping_add(start as u64), ..self.clone() }
    }

    /// Whether guidance needs the unconditional half of the batch.
    pub fn uses_guidance(&self) -> bool {
        self.cfg_scale != 1.0
    }
}

/// Guidance, temperature, top-k and top-p applied to one row of logits (design §6). Returns the
/// filtered logits, −∞ where removed.
pub fn process_logits(cond: &[f32], uncond: Option<&[f32]>, config: &SamplingConfig) -> Vec<f32> {
    let s = config.cfg_scale as f32;
    let mut logits: Vec<f32> = match uncond {
        Some(u) => cond.iter().zip(u).map(|(&c, &u)| u + s * (c - u)).collect(),
        None => cond.to_vec(),
    };
    let t = config.temperature.max(1e-5) as f32;
    logits.iter_mut().for_each(|l| *l /= t);
    if config.top_k > 0 && config.top_k < logits.len() {
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[config.top_k - 1];
        logits.iter_mut().for_each(|l| {
            if *l < kth {
                *l = f32::NEG_INFINITY
            }
        });
    }
    if config.top_p < 1.0 {
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut mass_before = 0f64;
        for &i in &order {
            // Keep tokens until the kept mass exceeds p: the token that crosses p stays.
            if mass_before >= config.top_p {
                logits[i] = f32::NEG_INFINITY;
            }
            mass_before += probs[i] as f64;
        }
    }
    logits
}

/// Softmax of a row (−∞ entries get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// Draws an index from the softmax of filtered logits by inverse CDF at `u` ∈ [0, 1).
pub fn draw(filtered_logits: &[f32], u: f64) -> u32 {
    let probs = softmax(filtered_logits);
    let mut acc = 0f64;
    let mut last_kept = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_kept = i;
            acc += p as f64;
            if u < acc {
                return i as u32;
            }
        }
    }
    last_kept as u32
}

/// The uniforms that drive the draws of `images × codes` samples of a batch whose first image
/// is image `config.first_image` of its run: image j's come from the stream of (`config.seed`,
/// `first_image` + j). So an image's codes depend on its seed and its index in the run only,
/// never on the batch it was drawn in, and a batch can be split into groups (or joined by other
/// requests) freely. Runs with different seeds share no stream (seeds s and s + 1 do not draw
/// shifted copies of each other's images).
pub fn uniforms(config: &SamplingConfig, images: usize, codes: usize) -> Vec<f64> {
    let mut u = Vec::with_capacity(images * codes);
    for i in 0..images {
        let index = config.first_image.wrapping_add(i as u64);
        let mut rng = crate::util::rng_for(config.seed, "sample-draws", index);
        u.extend((0..codes).map(|_| rng.random::<f64>()));
    }
    u
}

/// The images of a batch split into decode groups: contiguous ranges, run side by side on the
/// cores, each one a whole generation of its own (images are independent: their codes depend
/// on their own seeds, and every per-row operation of a decode step is the same at any batch
/// size). `group` images per range (the last one shorter); a group small enough that its KV
/// caches stay in the CPU's caches keeps the step off main memory (design §6, "Sampling cost").
pub fn decode_groups(images: usize, group: usize) -> Vec<std::ops::Range<usize>> {
    let threads = crate::kernels::threads().max(1);
    // As few groups of at most `group` as keep every thread busy, in a multiple of the threads
    // where the images allow it, all of nearly the same size.
    let count = images.div_ceil(group.max(1)).div_ceil(threads) * threads;
    let count = count.clamp(1, images.max(1));
    let size = images.div_ceil(count);
    (0..images).step_by(size.max(1)).map(|a| a..(a + size).min(images)).collect()
}

/// Images per decode group of the lean CPU paths for a model of `weight_bytes` whose KV caches
/// take `kv_bytes_per_image` at full length: `DPAR_DECODE_GROUP` if set (to measure), else
/// [`decode_group_for`] on this CPU's last-level cache.
pub fn decode_group(weight_bytes: usize, kv_bytes_per_image: usize) -> usize {
    std::env::var("DPAR_DECODE_GROUP").ok().and_then(|v| v.parse().ok()).filter(|&g| g > 0).unwrap_or_else(|| {
        decode_group_for(weight_bytes, kv_bytes_per_image, last_level_cache(), crate::kernels::threads())
    })
}

/// The group rule (design §6, "Sampling cost"). While the weights fit in half the last-level
/// cache `llc`, a step's products read them from the cache at any group size, and what must stay
/// close is the group's KV caches: each thread gets a quarter of what the weights leave, and a
/// group fills it (at least 2 images, whose rows keep the step products from being
/// matrix-vector products; at most 16). Measured on the shipped MNIST models: groups of 2
/// (f32 cache) and 2–4 (bf16) beat 1, 8 and the whole batch (docs/speed.md). A model whose weights do not fit streams them
/// from memory at every step: then the larger the group, the fewer times they are read, and one
/// group per thread is best ([`usize::MAX`]: [`decode_groups`] splits the batch evenly).
pub fn decode_group_for(weight_bytes: usize, kv_bytes_per_image: usize, llc: usize, threads: usize) -> usize {
    if weight_bytes > llc / 2 {
        return usize::MAX;
    }
    let share = (llc - weight_bytes) / threads.max(1) / 4;
    (share / kv_bytes_per_image.max(1)).clamp(2, 16)
}

/// The CPU's last-level cache in bytes (Linux sysfs; 32 MiB where it cannot be read).
pub fn last_level_cache() -> usize {
    static LLC: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LLC.get_or_init(|| {
        let read = |i: usize| -> Option<usize> {
            let text = std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok()?;
            let t = text.trim();
            let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
            let n: usize = num.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                _ => n,
            })
        };
        (0..8).filter_map(read).max().unwrap_or(32 << 20)
    })
}

/// Bytes of f32 weights and of one image's KV caches at full length for a GPT sampled with
/// `guided` rows (2 with guidance) at cache precision `kv`.
pub fn gpt_decode_sizes(c: &crate::gpt::GptConfig, rows: usize, kv: crate::nn::KvPrecision) -> (usize, usize) {
    let weights = 4 * (c.n_layer * (4 * c.dim * c.dim + 3 * c.dim * c.hidden()) + c.vocab_size * c.dim);
    let cache = rows * c.n_layer * c.input_len() * 2 * c.dim * kv.bytes();
    (weights, cache)
}

/// Runs `work(range)` for every group of `groups` on up to [`crate::kernels::threads`] worker
/// threads (each group on one thread, its kernels serial) and returns the results in group
/// order. One group runs on the calling thread with the pool free to its kernels.
pub fn run_groups<T: Send, E: Send>(
    groups: &[std::ops::Range<usize>],
    work: impl Fn(std::ops::Range<usize>) -> std::result::Result<T, E> + Sync,
) -> std::result::Result<Vec<T>, E> {
    let workers = crate::kernels::threads().min(groups.len());
    if workers <= 1 {
        return groups.iter().map(|g| work(g.clone())).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut slots: Vec<Option<std::result::Result<T, E>>> = (0..groups.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, std::result::Result<T, E>)>> = std::thread::scope(|scope| {
        let run = || {
            crate::kernels::serial(|| {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= groups.len() || failed.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let out = work(groups[i].clone());
                    if out.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    mine.push((i, out));
                }
                mine
            })
        };
        let handles: Vec<_> = (1..workers).map(|_| scope.spawn(run)).collect();
        let mut all = vec![run()];
        for h in handles {
            all.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    for (i, out) in done.into_iter().flatten() {
        slots[i] = Some(out);
    }
    // A failed group stops the others from starting new ones; its error is returned.
    let mut out = Vec::with_capacity(groups.len());
    for r in slots.into_iter().flatten() {
        out.push(r?);
    }
    Ok(out)
}

/// Picks one code per image from model logits (B or 2B rows when guided).
pub fn choose_codes(
    logits: &Tensor,
    b: usize,
    guided: bool,
    config: &SamplingConfig,
    u: &[f64],
    k: usize,
    l: usize,
) -> Result<Vec<u32>> {
    let v = logits.dim(1)?;
    let rows = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(choose_codes_host(&rows, v, b, guided, config, u, k, l))
}

/// [`choose_codes`] on host logits (B or 2B rows of V values, back to back).
#[allow(clippy::too_many_arguments)]
pub fn choose_codes_host(
    logits: &[f32],
    v: usize,
    b: usize,
    guided: bool,
    config: &SamplingConfig,
    u: &[f64],
    k: usize,
    l: usize,
) -> Vec<u32> {
    (0..b)
        .map(|i| {
            let uncond = guided.then(|| &logits[(b + i) * v..(b + i + 1) * v]);
            draw(&process_logits(&logits[i * v..(i + 1) * v], uncond, config), u[i * l + k])
        })
        .collect()
}

/// The labels fed to a guided batch: the requested classes, then (with guidance) the null
/// class for each.
pub fn guided_label_list(labels: &[u32], null: u32, guided: bool) -> Vec<u32> {
    let mut all = labels.to_vec();
    if guided {
        all.extend(std::iter::repeat_n(null, labels.len()));
    }
    all
}

fn guided_labels(labels: &[u32], null: u32, guided: bool, device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(guided_label_list(labels, null, guided), device)?)
}

/// KV-cached generation with the GPT baseline: one cached step per code, CFG with both halves
/// sharing every sampled code. Returns B × L codes. On the CPU with fused or bf16 kernels it
/// runs the lean decode step ([`generate_gpt_lean`]), elsewhere the tensor path
/// ([`generate_gpt_cached`]); both draw the same codes.
pub fn generate_gpt(model: &Gpt, labels: &[u32], config: &SamplingConfig, device: &Device) -> Result<Vec<Vec<u32>>> {
    generate_gpt_observed(model, labels, config, device, None)
}

/// [`generate_gpt`], calling `observer` after every code position.
pub fn generate_gpt_observed(
    model: &Gpt,
    labels: &[u32],
    config: &SamplingConfig,
    device: &Device,
    observer: Observer,
) -> Result<Vec<Vec<u32>>> {
    let c = model.config();
    if device.is_cpu() && c.ops != crate::nn::Ops::Stock && c.cls_token_num == 1 {
        return generate_gpt_lean_observed(model, labels, config, observer);
    }
    config.validate()?;
    let (b, l) = (labels.len(), c.seq_len());
    let u = uniforms(config, b, l);
    let guided = config.uses_guidance() && c.cls_token_num == 1;
    generate_gpt_with(model, labels, config, guided, &u, device, observer)
}

/// [`generate_gpt`] through the tensor path: one cached model step (a small tensor graph) per
/// code, on any device.
pub fn generate_gpt_cached(
    model: &Gpt,
    labels: &[u32],
    config: &SamplingConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    config.validate()?;
    let c = model.config();
    let (b, l) = (labels.len(), c.seq_len());
    let u = uniforms(config, b, l);
    let guided = config.uses_guidance() && c.cls_token_num == 1;
    generate_gpt_with(model, labels, config, guided, &u, device, None)
}

pub(crate) fn generate_gpt_with(
    model: &Gpt,
    labels: &[u32],
    config: &SamplingConfig,
    guided: bool,
    u: &[f64],
    device: &Device,
    mut observer: Observer,
) -> Result<Vec<Vec<u32>>> {
    let c = model.config();
    let (b, l) = (labels.len(), c.seq_len());
    if c.cls_token_num != 1 {
        return Err(SampleError::BadConfig("class-conditional sampling needs a model with a class slot".into()));
    }
    let all_labels = guided_labels(labels, c.num_classes as u32, guided, device)?;
    let mut cache = model.new_cache(all_labels.dim(0)?)?;
    let mut logits = model.step(&mut cache, Some(&all_labels), None)?;
    let mut out = vec![Vec::with_capacity(l); b];
    let opens = vec![true; b];
    for k in 0..l {
        let chosen = choose_codes(&logits, b, guided, config, u, k, l)?;
        for (i, &code) in chosen.iter().enumerate() {
            out[i].push(code);
        }
        if let Some(watch) = observer.as_mut() {
            let host = logits.narrow(0, 0, b)?.flatten_all()?.to_vec1::<f32>()?;
            let entropies = crate::gpt::entropy_rows(&host, c.vocab_size);
            if !watch(&CodeStep { k, codes: &chosen, entropies: &entropies, opens_patch: &opens }) {
                return Err(SampleError::Cancelled);
            }
        }
        if k + 1 < l {
            let mut feed = chosen.clone();
            if guided {
                feed.extend_from_slice(&chosen);
            }
            let feed = Tensor::from_vec(feed, (all_labels.dim(0)?, 1), device)?;
            logits = model.step(&mut cache, None, Some(&feed))?;
        }
    }
    Ok(out)
}

/// [`generate_gpt_cached`] through the lean decode step ([`crate::gpt::decode::LeanDecoder`]): the
/// same codes for the same seed, without a tensor graph per step. CPU, fused or bf16 kernels.
pub fn generate_gpt_lean(model: &Gpt, labels: &[u32], config: &SamplingConfig) -> Result<Vec<Vec<u32>>> {
    generate_gpt_lean_observed(model, labels, config, None)
}

fn generate_gpt_lean_observed(
    model: &Gpt,
    labels: &[u32],
    config: &SamplingConfig,
    observer: Observer,
) -> Result<Vec<Vec<u32>>> {
    config.validate()?;
    let c = model.config();
    if c.ops == crate::nn::Ops::Stock {
        return Err(SampleError::BadConfig(
            "the lean decode step follows the fused kernels; sample a stock-ops model with generate_gpt".into(),
        ));
    }
    // The weights, copied out of the tensors once for every group.
    let weights = crate::gpt::decode::LeanDecoder::with_cache(model, 0, config.kv_cache)?;
    if observer.is_some() {
        return generate_gpt_lean_group(model, &weights, labels, config, observer);
    }
    let rows = if config.uses_guidance() { 2 } else { 1 };
    let (wb, kb) = gpt_decode_sizes(c, rows, config.kv_cache);
    generate_gpt_grouped(model, &weights, labels, config, decode_group(wb, kb))
}

/// [`generate_gpt_lean`] in decode groups of `group` images (see [`decode_groups`]).
pub(crate) fn generate_gpt_grouped(
    model: &Gpt,
    weights: &crate::gpt::decode::LeanDecoder,
    labels: &[u32],
    config: &SamplingConfig,
    group: usize,
) -> Result<Vec<Vec<u32>>> {
    let groups = decode_groups(labels.len(), group);
    let parts = run_groups(&groups, |g| {
        let cfg = config.from_image(g.start);
        generate_gpt_lean_group(model, weights, &labels[g], &cfg, None)
    })?;
    Ok(parts.into_iter().flatten().collect())
}

/// One decode group of [`generate_gpt_lean`]: all of `labels` in lockstep, with the weights of
/// `weights`.
fn generate_gpt_lean_group(
    model: &Gpt,
    weights: &crate::gpt::decode::LeanDecoder,
    labels: &[u32],
    config: &SamplingConfig,
    mut observer: Observer,
) -> Result<Vec<Vec<u32>>> {
    let c = model.config();
    let (b, l) = (labels.len(), c.seq_len());
    let u = uniforms(config, b, l);
    let guided = config.uses_guidance() && c.cls_token_num == 1;
    let mut all = labels.to_vec();
    if guided {
        all.extend(std::iter::repeat_n(c.num_classes as u32, b));
    }
    let mut decoder = weights.sharing(all.len(), config.kv_cache);
    let v = c.vocab_size;
    let mut out = vec![Vec::with_capacity(l); b];
    let mut feed = vec![0u32; all.len()];
    let mut logits = decoder.start(&all)?;
    let opens = vec![true; b];
    for k in 0..l {
        for i in 0..b {
            let uncond = guided.then(|| &logits[(b + i) * v..(b + i + 1) * v]);
            let code = draw(&process_logits(&logits[i * v..(i + 1) * v], uncond, config), u[i * l + k]);
            out[i].push(code);
            feed[i] = code;
            if guided {
                feed[b + i] = code;
            }
        }
        if let Some(watch) = observer.as_mut() {
            let entropies = crate::gpt::entropy_rows(&logits[..b * v], v);
            if !watch(&CodeStep { k, codes: &feed[..b], entropies: &entropies, opens_patch: &opens }) {
                return Err(SampleError::Cancelled);
            }
        }
        if k + 1 < l {
            logits = decoder.step(&feed)?;
        }
    }
    Ok(out)
}

/// The reference: recomputes the whole prefix for every code (no cache). Same draws as
/// [`generate_gpt`] for the same seed.
pub fn generate_gpt_full_recompute(
    model: &Gpt,
    labels: &[u32],
    config: &SamplingConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    config.validate()?;
    let c = model.config();
    let (b, l) = (labels.len(), c.seq_len());
    let u = uniforms(config, b, l);
    let guided = config.uses_guidance();
    let all_labels = guided_labels(labels, c.num_classes as u32, guided, device)?;
    let rows = all_labels.dim(0)?;
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(l); b];
    for k in 0..l {
        let prefix: Vec<u32> = (0..rows).flat_map(|r| out[r % b].clone()).collect();
        let codes = Tensor::from_vec(prefix, (rows, k), device)?;
        let logits = model.forward::<rand_chacha::ChaCha8Rng>(&codes, Some(&all_labels), None)?; // (rows, k+1, V)
        let last = logits.narrow(1, k, 1)?.squeeze(1)?;
        let chosen = choose_codes(&last, b, guided, config, &u, k, l)?;
        for (i, &code) in chosen.iter().enumerate() {
            out[i].push(code);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gpt::GptConfig;
    use crate::params::ParamStore;

    /// A tiny class-conditional GPT (3 classes, 13 codes, 3 × 3 grid) whose head and class
    /// table are random, so that the logits vary.
    pub(crate) fn model(seed: u64) -> (Gpt, ParamStore) {
        model_with(seed, GptConfig::mnist().ops)
    }

    /// [`model`] with kernels `ops`.
    fn model_with(seed: u64, ops: crate::nn::Ops) -> (Gpt, ParamStore) {
        let c = GptConfig::mnist().with(|it| {
            it.ops = ops;
            it.dim = 32;
            it.n_layer = 2;
            it.n_head = 2;
            it.ffn_hidden = Some(48);
            it.vocab_size = 13;
            it.num_classes = 3;
            it.cls_token_num = 1;
            it.grid_size = 3;
        });
        let store = ParamStore::new(seed, &Device::Cpu);
        let m = Gpt::new(&c, &store.root()).unwrap();
        // Give the zero-initialised head some weight so that the logits vary.
        let out = store.var("output.weight").unwrap();
        out.set(&Tensor::randn(0f32, 1.0, out.shape(), &Device::Cpu).unwrap()).unwrap();
        let emb = store.var("cls_embedding.embedding_table.weight").unwrap();
        emb.set(&Tensor::randn(0f32, 1.0, emb.shape(), &Device::Cpu).unwrap()).unwrap();
        (m, store)
    }

    #[test]
    fn cached_generation_matches_full_recompute() {
        let (m, _s) = model(1);
        for cfg_scale in [1.0, 2.5] {
            let config = SamplingConfig { cfg_scale, seed: 7, ..Default::default() };
            let labels = [0u32, 1, 2, 1];
            let cached = generate_gpt_cached(&m, &labels, &config, &Device::Cpu).unwrap();
            let full = generate_gpt_full_recompute(&m, &labels, &config, &Device::Cpu).unwrap();
            assert_eq!(cached, full, "cfg {cfg_scale}");
            assert!(cached.iter().all(|c| c.len() == 9));
        }
    }

    /// The lean decode step gives the cached path's logits (to f32 rounding: same arithmetic)
    /// and exactly its codes, with and without guidance, at several batch sizes.
    /// The device-native path (stock ops: device-tensor KV caches, candle's ops; forced on the
    /// CPU) draws the fused lean path's codes.
    #[test]
    fn the_device_native_gpt_path_draws_the_fused_codes() {
        let (fused, fused_store) = model(5);
        let stock_store = ParamStore::new(5, &Device::Cpu);
        let stock =
            Gpt::new(&fused.config().clone().with(|it| it.ops = crate::nn::Ops::Stock), &stock_store.root()).unwrap();
        for (name, var) in fused_store.vars() {
            stock_store.var(&name).unwrap().set(var.as_tensor()).unwrap();
        }
        for cfg_scale in [1.0, 2.0] {
            let config = SamplingConfig { cfg_scale, seed: 3, ..Default::default() };
            let labels = [2u32, 0, 1];
            assert_eq!(
                generate_gpt(&stock, &labels, &config, &Device::Cpu).unwrap(),
                generate_gpt(&fused, &labels, &config, &Device::Cpu).unwrap(),
                "cfg {cfg_scale}"
            );
        }
    }

    /// The baseline's observer sees every code, with the same entropies on both paths, and can
    /// stop the generation.
    #[test]
    fn gpt_observers_see_every_code_and_can_stop() {
        let (m, _s) = model(4);
        let labels = [1u32, 2];
        let config = SamplingConfig { cfg_scale: 2.0, seed: 7, ..Default::default() };
        let want = generate_gpt_cached(&m, &labels, &config, &Device::Cpu).unwrap();
        let mut entropies = Vec::new();
        for lean in [false, true] {
            let mut seen = vec![Vec::new(); 2];
            let mut h = Vec::new();
            let mut watch = |step: &CodeStep| {
                seen[0].push(step.codes[0]);
                seen[1].push(step.codes[1]);
                h.extend_from_slice(step.entropies);
                assert!(step.opens_patch.iter().all(|&o| o));
                true
            };
            let got = if lean {
                generate_gpt_lean_observed(&m, &labels, &config, Some(&mut watch)).unwrap()
            } else {
                let u = uniforms(&config, 2, m.config().seq_len());
                generate_gpt_with(&m, &labels, &config, true, &u, &Device::Cpu, Some(&mut watch)).unwrap()
            };
            assert_eq!((&got, &seen), (&want, &want), "lean: {lean}");
            entropies.push(h);
        }
        for (a, b) in entropies[0].iter().zip(&entropies[1]) {
            assert!((a - b).abs() < 1e-4 && *a > 0.0, "{a} vs {b}");
        }
        let err = generate_gpt_observed(&m, &labels, &config, &Device::Cpu, Some(&mut |s: &CodeStep| s.k < 3));
        assert!(matches!(err, Err(SampleError::Cancelled)));
    }

    #[test]
    fn the_lean_decode_step_draws_exactly_the_cached_paths_codes() {
        let (m, _s) = model(4);
        for cfg_scale in [1.0, 2.5] {
            for labels in [vec![1u32], vec![0, 1, 2, 1], (0..9).map(|i| i % 3).collect()] {
                let config = SamplingConfig { cfg_scale, seed: 11, ..Default::default() };
                let cached = generate_gpt_cached(&m, &labels, &config, &Device::Cpu).unwrap();
                let lean = generate_gpt_lean(&m, &labels, &config).unwrap();
                assert_eq!(cached, lean, "cfg {cfg_scale}, batch {}", labels.len());
                assert_eq!(
                    generate_gpt(&m, &labels, &config, &Device::Cpu).unwrap(),
                    lean,
                    "the CPU default is the lean path"
                );
            }
        }
        // Step by step, the logits agree.
        let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let mut cache = m.new_cache(2).unwrap();
        let mut lean = crate::gpt::decode::LeanDecoder::new(&m, 2).unwrap();
        let mut want =
            m.step(&mut cache, Some(&labels), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut got = lean.start(&[0, 2]).unwrap().to_vec();
        for k in 0..8u32 {
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "step {k}: {a} vs {b}");
            }
            let codes = [k % 13, (5 * k + 1) % 13];
            want = m
                .step(&mut cache, None, Some(&Tensor::new(&[[codes[0]], [codes[1]]], &Device::Cpu).unwrap()))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            got = lean.step(&codes).unwrap().to_vec();
        }
        assert!(lean.step(&[0]).is_err(), "a wrong batch is refused");
    }

    /// An image's codes depend on its seed and index only: in any batch, split into decode
    /// groups of any size (run side by side on the threads), image i of a batch gets the codes
    /// it gets alone as image i of its run. With and without guidance, f32 and bf16 caches (each compared
    /// with itself), fused and bf16 kernels.
    #[test]
    fn batched_generation_gives_each_image_the_codes_it_gets_alone() {
        for ops in [crate::nn::Ops::Fused, crate::nn::Ops::Bf16] {
            let (m, _s) = model_with(4, ops);
            let labels = [2u32, 0, 1, 1, 2, 0, 1];
            for cfg_scale in [1.0, 2.0] {
                for kv in [crate::nn::KvPrecision::F32, crate::nn::KvPrecision::Bf16] {
                    let config = SamplingConfig { cfg_scale, seed: 40, kv_cache: kv, ..Default::default() };
                    let weights = crate::gpt::decode::LeanDecoder::with_cache(&m, 0, kv).unwrap();
                    let alone: Vec<Vec<u32>> = (0..labels.len())
                        .map(|i| {
                            let c = config.from_image(i);
                            generate_gpt_grouped(&m, &weights, &labels[i..i + 1], &c, 1).unwrap().remove(0)
                        })
                        .collect();
                    for batch in [2, 5, 7] {
                        for group in [1, 2, 3, 7] {
                            let got = generate_gpt_grouped(&m, &weights, &labels[..batch], &config, group).unwrap();
                            assert_eq!(
                                got,
                                alone[..batch],
                                "{ops:?} cfg {cfg_scale} {kv:?} batch {batch} group {group}"
                            );
                        }
                    }
                    // The public entry point too (its own group rule).
                    assert_eq!(generate_gpt(&m, &labels, &config, &Device::Cpu).unwrap(), alone);
                }
            }
        }
    }

    /// Image n of a run draws from the stream of (seed, n): batches of any size give the same
    /// images, no two images of a run share a stream, and runs with seeds s and s + 1 share no
    /// stream. (A scheme that seeded image i of batch b with seed + b + i drew shifted copies of
    /// the same images in neighbouring batches and neighbouring seeds: half of a 2000-image run
    /// were duplicates.)
    #[test]
    fn every_image_of_a_run_has_a_stream_of_its_own() {
        let (m, _s) = model(4);
        let labels = vec![1u32; 12];
        let config = SamplingConfig { seed: 5, ..Default::default() };
        let run = |config: &SamplingConfig, batch| {
            crate::sample_set::sample_gpt(&m, &labels, batch, config, &Device::Cpu, |_| {}).unwrap()
        };
        let whole = run(&config, 12);
        for batch in [1, 5] {
            assert_eq!(run(&config, batch), whole, "batch size {batch}");
        }
        // No two images of a run, and no images of runs with seeds 5 and 6, share their draws.
        let rows = |seed| {
            let u = uniforms(&SamplingConfig { seed, ..config.clone() }, 12, 9);
            u.chunks(9).map(|r| r.iter().map(|x| x.to_bits()).collect::<Vec<u64>>()).collect::<Vec<_>>()
        };
        let mut all: Vec<Vec<u64>> = rows(5);
        all.extend(rows(6));
        let distinct: std::collections::HashSet<&Vec<u64>> = all.iter().collect();
        assert_eq!(distinct.len(), 24, "two images draw from the same stream");
        let u = |seed, first| uniforms(&SamplingConfig { seed, first_image: first, ..config.clone() }, 1, 4);
        assert_ne!(u(5, 1), u(6, 0));
        assert_eq!(u(5, 3), uniforms(&config, 4, 4)[12..]);
    }

    #[test]
    fn decode_groups_cover_the_batch_evenly() {
        for images in [1, 2, 5, 16, 100] {
            for group in [1, 2, 4, 8, usize::MAX] {
                let g = decode_groups(images, group);
                assert_eq!(g.first().unwrap().start, 0);
                assert_eq!(g.last().unwrap().end, images);
                assert!(g.windows(2).all(|w| w[0].end == w[1].start));
                let (lo, hi) = (g.iter().map(|r| r.len()).min().unwrap(), g.iter().map(|r| r.len()).max().unwrap());
                assert!(hi <= group.max(lo) && hi - lo <= hi.div_ceil(2), "{images} {group}: {g:?}");
            }
        }
        // Weights that fit in the cache: groups sized by the KV share; weights that do not: one
        // group per thread.
        assert_eq!(decode_group_for(6 << 20, 3 << 20, 32 << 20, 2), 2);
        assert_eq!(decode_group_for(6 << 20, 1 << 18, 32 << 20, 2), 13);
        assert_eq!(decode_group_for(400 << 20, 1 << 20, 32 << 20, 2), usize::MAX);
    }

    #[test]
    fn cfg_scale_one_equals_the_conditional_only_path() {
        let (m, _s) = model(2);
        let config = SamplingConfig { cfg_scale: 1.0, seed: 3, ..Default::default() };
        let labels = [2u32, 0, 1];
        let u = uniforms(&config, 3, 9);
        let guided = generate_gpt_with(&m, &labels, &config, true, &u, &Device::Cpu, None).unwrap();
        let plain = generate_gpt_with(&m, &labels, &config, false, &u, &Device::Cpu, None).unwrap();
        assert_eq!(guided, plain);
    }

    #[test]
    fn top_k_one_equals_argmax() {
        let logits = [0.3f32, 2.0, -1.0, 1.9, 0.0];
        let config = SamplingConfig { cfg_scale: 1.0, top_k: 1, ..Default::default() };
        for u in [0.0, 0.3, 0.999] {
            assert_eq!(draw(&process_logits(&logits, None, &config), u), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_first_token_that_crosses_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (as logits of their logs)
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let kept = |p: f64| {
            let config = SamplingConfig { cfg_scale: 1.0, top_p: p, ..Default::default() };
            process_logits(&logits, None, &config).iter().filter(|l| l.is_finite()).count()
        };
        assert_eq!(kept(0.5), 1); // 0.5 reaches p: nothing more needed
        assert_eq!(kept(0.6), 2); // 0.5 < 0.6 ≤ 0.8: the crossing token (0.3) stays
        assert_eq!(kept(0.8), 2);
        assert_eq!(kept(0.81), 3);
        assert_eq!(kept(1.0), 4);
        assert_eq!(kept(1e-9), 1); // always at least one
    }

    #[test]
    fn guidance_and_temperature_follow_the_formula() {
        let config = SamplingConfig { cfg_scale: 2.0, temperature: 0.5, ..Default::default() };
        let out = process_logits(&[1.0, 3.0], Some(&[2.0, 1.0]), &config);
        // uncond + 2(cond − uncond) = [0, 5], / 0.5 = [0, 10]
        assert!((out[0] - 0.0).abs() < 1e-6 && (out[1] - 10.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let bad = |c: SamplingConfig| c.validate().unwrap_err().to_string();
        assert!(bad(SamplingConfig { cfg_scale: -1.0, ..Default::default() }).contains("cfg scale"));
        assert!(bad(SamplingConfig { top_p: 0.0, ..Default::default() }).contains("top-p"));
        assert!(bad(SamplingConfig { top_p: 1.5, ..Default::default() }).contains("top-p"));
    }
}
