//! DPAR generation (design §6): the incremental algorithm with a KV cache in every stage, and the
//! full-recompute reference it must match code for code.
//!
//! Per batch of B images (2B rows with guidance: `[cond; null]`, sharing every code and every
//! patch boundary): prefill the patch transformer with the class slot (its output is g for the
//! lone z_0) and the decoder with its start vector; then for each code k ≥ 1:
//! 1. one cached encoder step on z_{k−1} gives h_{k−1}, one cached entropy-model step gives H_k,
//!    and the online patcher decides whether z_k opens a patch;
//! 2. if it does, the current patch (ending at z_{k−1}) is closed: max-pool + cross-attention →
//!    patch vector → one cached patch-transformer step → the new g;
//! 3. one cached decoder step at position k (input h_{k−1} plus the per-layer projection of g)
//!    gives the logits of z_k; guidance and the sampler choose z_k.
//!
//! The encoder, the entropy model and the patch vectors depend on the codes only, so they run on
//! the B images, not the 2B guided rows.

use candle_core::{Device, Tensor};

use super::model::GlobalLayout;
use super::{Dpar, DparError, Result};
use crate::gpt::{entropy_rows, Gpt};
use crate::patching::{patch_lengths, OnlinePatcher, PatchConfig};
use crate::sample::{choose_codes, uniforms, CodeStep, Observer, SamplingConfig};

/// What generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// B × L codes.
    pub codes: Vec<Vec<u32>>,
    /// Per image, the patch lengths over its L codes.
    pub lengths: Vec<Vec<usize>>,
}

impl Generated {
    /// Patch-transformer steps per image (the class slot plus one per closed patch).
    pub fn global_steps(&self) -> Vec<usize> {
        self.lengths.iter().map(|l| l.len()).collect()
    }
}

pub(super) fn check(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
) -> Result<()> {
    sampling.validate()?;
    patch.validate()?;
    let (c, e) = (model.config(), entropy_model.config());
    if e.cls_token_num != 0 || e.grid_size != c.grid_size || e.vocab_size != c.vocab_size {
        return Err(DparError::BadInput(format!(
            "the entropy model (grid {}, vocabulary {}, class slots {}) does not fit the DPAR model (grid {}, vocabulary {})",
            e.grid_size, e.vocab_size, e.cls_token_num, c.grid_size, c.vocab_size
        )));
    }
    if let Some(&y) = labels.iter().find(|&&y| y as usize >= c.num_classes) {
        return Err(DparError::BadInput(format!("unknown class {y}: the model has {} classes", c.num_classes)));
    }
    if labels.is_empty() {
        return Err(DparError::BadInput("no labels to generate".into()));
    }
    Ok(())
}

use crate::sample::guided_label_list as guided_labels;

/// Rows (B, D) duplicated for the null half when guided.
fn dup(x: &Tensor, guided: bool) -> Result<Tensor> {
    Ok(if guided { Tensor::cat(&[x, x], 0)? } else { x.clone() })
}

/// How the entropy model decodes: the lean step on the CPU, the tensor cache elsewhere.
enum EntropyDecoder {
    Lean(Box<crate::gpt::decode::LeanDecoder>),
    Cached(crate::gpt::GptCache),
    /// Self-entropy patching: no entropy model runs.
    None,
}

/// Incremental generation with caches in every stage: on the CPU with fused or bf16 kernels
/// through lean steps ([`super::decode::generate_lean`]), elsewhere through the tensor path
/// ([`generate_cached`]). Both give the same codes and patch lengths.
pub fn generate(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
) -> Result<Generated> {
    generate_observed(model, entropy_model, labels, sampling, patch, device, None)
}

/// [`generate`], calling `observer` after every code position (its entropies and patch
/// openings); the observer may stop the generation ([`crate::sample::SampleError::Cancelled`]).
pub fn generate_observed(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
    observer: Observer,
) -> Result<Generated> {
    if device.is_cpu()
        && model.config().ops != crate::nn::Ops::Stock
        && entropy_model.config().ops != crate::nn::Ops::Stock
    {
        return super::decode::generate_lean_observed(model, entropy_model, labels, sampling, patch, observer);
    }
    generate_cached_observed(model, entropy_model, labels, sampling, patch, device, observer)
}

/// Tells `observer` about position `k`; an error when it asks to stop.
pub(super) fn notify(
    observer: &mut Observer,
    k: usize,
    codes: &[u32],
    entropies: &[f32],
    opens: &[bool],
) -> Result<()> {
    if let Some(watch) = observer.as_mut() {
        if !watch(&CodeStep { k, codes, entropies, opens_patch: opens }) {
            return Err(crate::sample::SampleError::Cancelled.into());
        }
    }
    Ok(())
}

/// Incremental generation through the tensor path: cached model steps (small tensor graphs) in
/// every stage, on any device.
pub fn generate_cached(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
) -> Result<Generated> {
    generate_cached_observed(model, entropy_model, labels, sampling, patch, device, None)
}

fn generate_cached_observed(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
    mut observer: Observer,
) -> Result<Generated> {
    check(model, entropy_model, labels, sampling, patch)?;
    let c = model.config();
    let self_entropy = patch.entropy_from == crate::patching::EntropyFrom::Decoder;
    let (b, l, grid) = (labels.len(), c.seq_len(), c.grid_size);
    let guided = sampling.uses_guidance();
    let rows = if guided { 2 * b } else { b };
    let u = uniforms(sampling, b, l);
    let mut caches = model.new_caches(b, rows)?;
    // The entropy model runs through the lean decode step on the CPU (same logits, no tensor
    // graph per code), through its cache elsewhere.
    // Self-entropy patching runs none.
    let mut entropy_decoder = if self_entropy {
        EntropyDecoder::None
    } else if device.is_cpu() && entropy_model.config().ops != crate::nn::Ops::Stock {
        EntropyDecoder::Lean(Box::new(crate::gpt::decode::LeanDecoder::for_patching(
            entropy_model,
            b,
            crate::nn::KvPrecision::F32,
        )?))
    } else {
        EntropyDecoder::Cached(entropy_model.new_cache(b)?)
    };
    let mut patchers = (0..b).map(|_| OnlinePatcher::new(*patch, grid)).collect::<std::result::Result<Vec<_>, _>>()?;
    for p in &mut patchers {
        p.push(f32::INFINITY); // z_0 is a patch of its own
    }
    let mut patch_start = vec![0usize; b];
    // h_all[k] = encoder states of z_k, (B, D).
    let mut h_all: Vec<Tensor> = Vec::with_capacity(l);
    let all_labels = Tensor::new(guided_labels(labels, c.num_classes as u32, guided), device)?;
    let mut g = model.global_step(
        &mut caches,
        &(0..rows).collect::<Vec<_>>(),
        &model.class_embeddings(&all_labels)?,
        &model.class_rope(rows),
    )?;
    let mut injections = model.decoder_injections(&g)?;
    let logits = model.decoder_step(&mut caches, &model.start_vectors(rows)?, &injections, 0)?;
    let mut codes: Vec<Vec<u32>> =
        choose_codes(&logits, b, guided, sampling, &u, 0, l)?.into_iter().map(|z| vec![z]).collect();
    let z0: Vec<u32> = codes.iter().map(|z| z[0]).collect();
    notify(&mut observer, 0, &z0, &vec![f32::INFINITY; b], &vec![true; b])?;
    // Closes the patches of `closing` that end at z_{k−1}: patch vectors, one patch-transformer
    // step, new injections.
    let close = |closing: &[usize],
                 k: usize,
                 h_all: &[Tensor],
                 patch_start: &mut [usize],
                 caches: &mut crate::dpar::model::StepCaches,
                 g: &mut Tensor,
                 injections: &mut Vec<Tensor>|
     -> Result<()> {
        if closing.is_empty() {
            return Ok(());
        }
        let mut states = Vec::new();
        let mut segments = Vec::with_capacity(closing.len());
        let mut spans = Vec::with_capacity(closing.len());
        for &i in closing {
            segments.push((states.len(), k - patch_start[i]));
            spans.push((patch_start[i], k - 1));
            for state in &h_all[patch_start[i]..k] {
                states.push(state.narrow(0, i, 1)?);
            }
            patch_start[i] = k;
        }
        let vectors = model.patch_vectors(&Tensor::cat(&states, 0)?, &segments)?; // (|C|, D)
        let mut step_rows = closing.to_vec();
        if guided {
            step_rows.extend(closing.iter().map(|&i| i + b));
            spans.extend(spans.clone());
        }
        let g_new = model.global_step(caches, &step_rows, &dup(&vectors, guided)?, &model.patch_rope(&spans))?;
        // Replace the stepped rows of g.
        let mut map: Vec<u32> = (0..rows as u32).collect();
        for (j, &r) in step_rows.iter().enumerate() {
            map[r] = (rows + j) as u32;
        }
        *g = Tensor::cat(&[&*g, &g_new], 0)?.index_select(&Tensor::new(map, device)?, 0)?;
        *injections = model.decoder_injections(g)?;
        Ok(())
    };
    for k in 1..l {
        let prev = Tensor::from_vec(codes.iter().map(|z| z[k - 1]).collect::<Vec<_>>(), (b, 1), device)?;
        // 1. Encoder state of z_{k−1}, entropy H_k, patch decision for z_k.
        let h = model.encoder_step(&mut caches, &prev, k - 1)?;
        h_all.push(h.clone());
        let (entropies, closing, logits) = if self_entropy {
            // Design §9: forced boundaries close first; the decoder's prediction of z_k as if it
            // continued the open patch decides the others; where a patch opens, the decoder's
            // step is undone (every row, here) and taken again after the patch closes.
            let forced: Vec<usize> = (0..b).filter(|&i| patchers[i].forced()).collect();
            close(&forced, k, &h_all, &mut patch_start, &mut caches, &mut g, &mut injections)?;
            let logits = model.decoder_step(&mut caches, &dup(&h, guided)?, &injections, k)?;
            let host: Vec<f32> = logits.narrow(0, 0, b)?.flatten_all()?.to_vec1()?;
            let entropies = entropy_rows(&host, c.vocab_size);
            let closing: Vec<usize> = (0..b).filter(|&i| patchers[i].push(entropies[i])).collect();
            let late: Vec<usize> = closing.iter().copied().filter(|i| !forced.contains(i)).collect();
            let logits = if late.is_empty() {
                logits
            } else {
                close(&late, k, &h_all, &mut patch_start, &mut caches, &mut g, &mut injections)?;
                for cache in &mut caches.decoder {
                    for r in 0..rows {
                        cache.truncate_row(r, k);
                    }
                }
                model.decoder_step(&mut caches, &dup(&h, guided)?, &injections, k)?
            };
            (entropies, closing, logits)
        } else {
            let ev = entropy_model.config().vocab_size;
            let entropies = match &mut entropy_decoder {
                EntropyDecoder::Lean(lean) => {
                    let prev_codes: Vec<u32> = codes.iter().map(|z| z[k - 1]).collect();
                    entropy_rows(lean.step(&prev_codes)?, ev)
                }
                EntropyDecoder::Cached(cache) => {
                    entropy_rows(&entropy_model.step(cache, None, Some(&prev))?.flatten_all()?.to_vec1::<f32>()?, ev)
                }
                EntropyDecoder::None => {
                    return Err(DparError::BadInput("the entropy model's patches need the entropy model".into()))
                }
            };
            let closing: Vec<usize> = (0..b).filter(|&i| patchers[i].push(entropies[i])).collect();
            // 2. Close the patches that end at z_{k−1}.
            close(&closing, k, &h_all, &mut patch_start, &mut caches, &mut g, &mut injections)?;
            // 3. Decoder step at position k.
            let logits = model.decoder_step(&mut caches, &dup(&h, guided)?, &injections, k)?;
            (entropies, closing, logits)
        };
        let chosen = choose_codes(&logits, b, guided, sampling, &u, k, l)?;
        for (i, &z) in chosen.iter().enumerate() {
            codes[i].push(z);
        }
        if observer.is_some() {
            let opens: Vec<bool> = (0..b).map(|i| closing.contains(&i)).collect();
            notify(&mut observer, k, &chosen, &entropies, &opens)?;
        }
    }
    Ok(Generated { codes, lengths: patchers.iter().map(|p| p.lengths().to_vec()).collect() })
}

/// The padded forward of the references: logits at position k (R, V) for the images' codes
/// z_0 … z_{k−1} (plus a placeholder for z_k) under `lengths` (one per image, covering k + 1
/// codes); rows beyond the images repeat them (the null-class half).
fn prefix_logits(
    model: &Dpar,
    codes: &[Vec<u32>],
    lengths: &[Vec<usize>],
    labels: &Tensor,
    k: usize,
    device: &Device,
) -> Result<Tensor> {
    let (b, rows) = (codes.len(), labels.dims1()?);
    let row_lengths: Vec<Vec<usize>> = (0..rows).map(|r| lengths[r % b].clone()).collect();
    let layout = model.layout(row_lengths, k + 1)?;
    let inputs: Vec<u32> = (0..rows).flat_map(|r| codes[r % b].iter().copied().chain(std::iter::once(0))).collect();
    let inputs = Tensor::from_vec(inputs, (rows, k + 1), device)?;
    let logits = model.forward::<rand_chacha::ChaCha8Rng>(&inputs, labels, &layout, GlobalLayout::Padded, None)?;
    Ok(logits.narrow(1, k, 1)?.squeeze(1)?)
}

/// The reference: for every code, recompute the entropies of the whole prefix, the patch lengths
/// with the batch patcher and the padded forward over the prefix. Same draws as [`generate`].
pub fn generate_full_recompute(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
) -> Result<Generated> {
    check(model, entropy_model, labels, sampling, patch)?;
    if patch.entropy_from == crate::patching::EntropyFrom::Decoder {
        return self_entropy_full_recompute(model, labels, sampling, patch, device);
    }
    let c = model.config();
    let (b, l, grid) = (labels.len(), c.seq_len(), c.grid_size);
    let guided = sampling.uses_guidance();
    let u = uniforms(sampling, b, l);
    let all_labels = Tensor::new(guided_labels(labels, c.num_classes as u32, guided), device)?;
    let mut codes: Vec<Vec<u32>> = vec![Vec::with_capacity(l); b];
    let mut entropies = vec![vec![0f32; l]; b];
    for e in &mut entropies {
        e[0] = f32::INFINITY;
    }
    for k in 0..l {
        if k >= 1 {
            let prefix = Tensor::from_vec(codes.iter().flat_map(|z| z.clone()).collect::<Vec<_>>(), (b, k), device)?;
            let logits = entropy_model
                .forward::<rand_chacha::ChaCha8Rng>(&prefix, None, None)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let h = entropy_rows(&logits, entropy_model.config().vocab_size); // B × k
            for i in 0..b {
                entropies[i][1..=k].copy_from_slice(&h[i * k..(i + 1) * k]);
            }
        }
        let lengths: Vec<Vec<usize>> =
            (0..b).map(|i| patch_lengths(&entropies[i], grid, patch, k + 1)).collect::<std::result::Result<_, _>>()?;
        let last = prefix_logits(model, &codes, &lengths, &all_labels, k, device)?;
        for (i, z) in choose_codes(&last, b, guided, sampling, &u, k, l)?.into_iter().enumerate() {
            codes[i].push(z);
        }
    }
    let lengths =
        (0..b).map(|i| patch_lengths(&entropies[i], grid, patch, l)).collect::<std::result::Result<_, _>>()?;
    Ok(Generated { codes, lengths })
}

/// The reference of self-entropy patching (design §9): for every code z_k, the padded forward
/// over the prefix with z_k added to the open patch gives the decoder's prediction whose
/// conditional entropy decides the patch; where z_k opens one, the forward over the prefix
/// with z_k's new patch gives the logits it is drawn from. Same draws as [`generate`].
fn self_entropy_full_recompute(
    model: &Dpar,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    device: &Device,
) -> Result<Generated> {
    let c = model.config();
    let (b, l, v) = (labels.len(), c.seq_len(), c.vocab_size);
    let guided = sampling.uses_guidance();
    let u = uniforms(sampling, b, l);
    let all_labels = Tensor::new(guided_labels(labels, c.num_classes as u32, guided), device)?;
    let mut patchers = (0..b)
        .map(|_| crate::patching::OnlinePatcher::new(*patch, c.grid_size))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut codes: Vec<Vec<u32>> = vec![Vec::with_capacity(l); b];
    let logits_at = |codes: &[Vec<u32>], lengths: &[Vec<usize>], k: usize| {
        prefix_logits(model, codes, lengths, &all_labels, k, device)
    };
    for k in 0..l {
        let last = if k <= 1 {
            // z_0 and z_1 always open a patch (and z_0's must stay alone).
            for p in &mut patchers {
                p.push(f32::INFINITY);
            }
            let lengths: Vec<Vec<usize>> = patchers.iter().map(|p| p.lengths().to_vec()).collect();
            logits_at(&codes, &lengths, k)?
        } else {
            // z_k continuing the open patch.
            let continued: Vec<Vec<usize>> = patchers
                .iter()
                .map(|p| {
                    let mut lengths = p.lengths().to_vec();
                    *lengths.last_mut().expect("z_0 opened a patch") += 1;
                    lengths
                })
                .collect();
            let speculative = logits_at(&codes, &continued, k)?;
            let cond = speculative.narrow(0, 0, b)?.flatten_all()?.to_vec1::<f32>()?;
            let entropies = entropy_rows(&cond, v);
            let opened: Vec<bool> = (0..b).map(|i| patchers[i].push(entropies[i])).collect();
            if opened.iter().any(|&o| o) {
                let lengths: Vec<Vec<usize>> = patchers.iter().map(|p| p.lengths().to_vec()).collect();
                logits_at(&codes, &lengths, k)?
            } else {
                speculative
            }
        };
        for (i, z) in choose_codes(&last, b, guided, sampling, &u, k, l)?.into_iter().enumerate() {
            codes[i].push(z);
        }
    }
    Ok(Generated { codes, lengths: patchers.iter().map(|p| p.lengths().to_vec()).collect() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dpar::model::tests::model;
    use crate::gpt::GptConfig;
    use crate::params::ParamStore;

    pub(crate) fn entropy_model(seed: u64) -> (Gpt, ParamStore) {
        let c = GptConfig::mnist_entropy().with(|it| {
            it.dim = 16;
            it.n_layer = 1;
            it.n_head = 1;
            it.ffn_hidden = Some(32);
            it.vocab_size = 13;
            it.grid_size = 4;
            it.cls_token_num = 0;
        });
        let store = ParamStore::new(seed, &Device::Cpu);
        let m = Gpt::new(&c, &store.root()).unwrap();
        let out = store.var("output.weight").unwrap();
        out.set(&Tensor::randn(0f32, 1.0, out.shape(), &Device::Cpu).unwrap()).unwrap();
        (m, store)
    }

    #[test]
    fn cached_generation_matches_full_recompute() {
        let (m, _s) = model(11);
        let (e, _es) = entropy_model(12);
        let labels = [0u32, 2, 1];
        // Entropies of a random 13-way model sit near ln 13 ≈ 2.56; θ = 2.5 mixes both outcomes.
        for (cfg_scale, patch) in
            [(2.0, PatchConfig::dpar(2.5, 3)), (1.0, PatchConfig::dpar(2.4, 4)), (1.5, PatchConfig::static_patches(2))]
        {
            let sampling = SamplingConfig { cfg_scale, seed: 5, ..Default::default() };
            let cached = generate_cached(&m, &e, &labels, &sampling, &patch, &Device::Cpu).unwrap();
            let full = generate_full_recompute(&m, &e, &labels, &sampling, &patch, &Device::Cpu).unwrap();
            assert_eq!(cached.codes, full.codes, "codes differ (cfg {cfg_scale}, {patch:?})");
            assert_eq!(cached.lengths, full.lengths, "patch boundaries differ");
            let lean = crate::dpar::decode::generate_lean(&m, &e, &labels, &sampling, &patch).unwrap();
            assert_eq!(lean, cached, "the lean steps differ from the tensor path (cfg {cfg_scale}, {patch:?})");
            assert!(cached.lengths.iter().all(|l| l.iter().sum::<usize>() == 16));
            let steps = cached.global_steps();
            assert!(steps.iter().any(|&s| s > 1 && s < 16), "{steps:?}");
        }
    }

    /// What an observer sees rebuilds the result: every code in order, a patch opening at each
    /// patch start; and an observer that says stop stops both paths.
    #[test]
    fn observers_see_every_code_and_patch_opening_and_can_stop_generation() {
        let (m, _s) = model(11);
        let (e, _es) = entropy_model(12);
        let labels = [0u32, 2];
        let sampling = SamplingConfig { cfg_scale: 2.0, seed: 3, ..Default::default() };
        let patch = PatchConfig::dpar(2.5, 3);
        let want = generate_cached(&m, &e, &labels, &sampling, &patch, &Device::Cpu).unwrap();
        for lean in [false, true] {
            let mut seen = vec![Vec::new(); 2];
            let mut opens = vec![Vec::new(); 2];
            let mut watch = |step: &CodeStep| {
                for i in 0..2 {
                    seen[i].push(step.codes[i]);
                    opens[i].push(step.opens_patch[i]);
                    assert!(step.k == 0 || step.entropies[i].is_finite());
                }
                true
            };
            let got = if lean {
                crate::dpar::decode::generate_lean_observed(&m, &e, &labels, &sampling, &patch, Some(&mut watch))
            } else {
                generate_cached_observed(&m, &e, &labels, &sampling, &patch, &Device::Cpu, Some(&mut watch))
            }
            .unwrap();
            assert_eq!(got, want, "lean: {lean}");
            assert_eq!(seen, want.codes, "lean: {lean}");
            for (i, image_opens) in opens.iter().enumerate() {
                // z_0 is its own patch and z_1 opens the next; then a patch opens where one starts.
                let mut starts = vec![0usize];
                for len in &want.lengths[i] {
                    starts.push(starts.last().unwrap() + len);
                }
                let opened: Vec<usize> = (0..16).filter(|&k| image_opens[k]).collect();
                assert_eq!(opened, starts[..starts.len() - 1], "lean: {lean}, image {i}");
            }
            let mut stop_at_5 = |step: &CodeStep| step.k < 5;
            let err = if lean {
                crate::dpar::decode::generate_lean_observed(&m, &e, &labels, &sampling, &patch, Some(&mut stop_at_5))
            } else {
                generate_cached_observed(&m, &e, &labels, &sampling, &patch, &Device::Cpu, Some(&mut stop_at_5))
            }
            .unwrap_err();
            assert!(err.to_string().contains("cancelled"), "{err}");
        }
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let (m, _s) = model(1);
        let (e, _es) = entropy_model(2);
        let s = SamplingConfig::default();
        let err = generate(&m, &e, &[3], &s, &PatchConfig::dpar(1.0, 4), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("unknown class 3"), "{err}");
        let err = generate(&m, &e, &[0], &s, &PatchConfig::dpar(1.0, 0), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("P must be ≥ 1"), "{err}");
        let err = generate(&m, &e, &[0], &s, &PatchConfig::dpar(f64::NAN, 4), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
    }
}
