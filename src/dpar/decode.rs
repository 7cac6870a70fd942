//! DPAR generation through lean steps on the CPU: the algorithm of
//! [`super::generate::generate_cached`] with every stage (entropy model, encoder, patch
//! transformer, decoder) a [`LeanStack`] and the patch vectors, the decoder injections and the
//! head on plain slices. Weights are copied once per generation; caches and buffers are
//! allocated once; no tensor graph is built per code. Each operation is the fused path's, with
//! the same GEMM shapes, so the codes and patch boundaries are exactly those of the tensor path.
//!
//! # Shapes
//! B images, R rows (2B with guidance), D width, H heads, d = D/H, V vocabulary, L codes.

use super::generate::{check, notify, Generated};
use super::{Dpar, Result};
use crate::gpt::decode::LeanDecoder;
use crate::gpt::{entropy_rows, Gpt};
use crate::kernels::segment;
use crate::nn::lean::{host, LeanLinear, LeanNorm, LeanStack};
use crate::patching::{EntropyFrom, OnlinePatcher, PatchConfig};
use crate::sample::{choose_codes_host, uniforms, SamplingConfig};

/// The patch encoder's cross-attention on the host.
pub(super) struct Cross {
    norm_q: LeanNorm,
    norm_kv: LeanNorm,
    wq: LeanLinear,
    wk: LeanLinear,
    wv: LeanLinear,
    wo: LeanLinear,
    heads: usize,
}

impl Cross {
    /// Patch vectors (M, D) of `segments` (offset, length) of the states (T, D): the query is
    /// the max over the patch's states, plus wo of its attention over them.
    pub(super) fn forward(&self, states: &[f32], segments: &[(usize, usize)], dim: usize) -> Vec<f32> {
        let (t, m) = (states.len() / dim, segments.len());
        let (h, d) = (self.heads, dim / self.heads);
        let mut queries = vec![0f32; m * dim];
        for (o, &(start, len)) in queries.chunks_mut(dim).zip(segments) {
            o.copy_from_slice(&states[start * dim..(start + 1) * dim]);
            for r in start + 1..start + len {
                for (q, &v) in o.iter_mut().zip(&states[r * dim..(r + 1) * dim]) {
                    if v > *q {
                        *q = v;
                    }
                }
            }
        }
        let mut qn = vec![0f32; m * dim];
        self.norm_q.run(&queries, &mut qn);
        let mut q = vec![0f32; m * dim];
        self.wq.run(&qn, m, &mut q);
        let mut kvn = vec![0f32; t * dim];
        self.norm_kv.run(states, &mut kvn);
        let (mut k, mut v) = (vec![0f32; t * dim], vec![0f32; t * dim]);
        self.wk.run(&kvn, t, &mut k);
        self.wv.run(&kvn, t, &mut v);
        let scale = 1.0 / (d as f32).sqrt();
        let mut attn = vec![0f32; m * dim];
        for (mi, (o, &(start, len))) in attn.chunks_mut(dim).zip(segments).enumerate() {
            for hi in 0..h {
                let p = segment::weights(
                    &q[mi * dim + hi * d..mi * dim + (hi + 1) * d],
                    &k,
                    start..start + len,
                    dim,
                    hi * d,
                    d,
                    scale,
                );
                let oh = &mut o[hi * d..(hi + 1) * d];
                for (j, r) in (start..start + len).enumerate() {
                    for (x, y) in oh.iter_mut().zip(&v[r * dim + hi * d..r * dim + (hi + 1) * d]) {
                        *x += p[j] * y;
                    }
                }
            }
        }
        let mut out = vec![0f32; m * dim];
        self.wo.run(&attn, m, &mut out);
        for (a, b) in queries.iter_mut().zip(&out) {
            *a += b;
        }
        queries
    }
}

/// Incremental DPAR generation on the CPU through lean steps: the same codes and patch lengths
/// as [`super::generate::generate_cached`] for the same inputs. Needs a model with fused or bf16
/// kernels (`ops` other than `stock`).
pub fn generate_lean(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
) -> Result<Generated> {
    generate_lean_observed(model, entropy_model, labels, sampling, patch, None)
}

/// [`generate_lean`], calling `observer` after every code position.
pub(super) fn generate_lean_observed(
    model: &Dpar,
    entropy_model: &Gpt,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    observer: crate::sample::Observer,
) -> Result<Generated> {
    check(model, entropy_model, labels, sampling, patch)?;
    let c = model.config();
    if c.ops == crate::nn::Ops::Stock {
        return Err(super::DparError::BadInput(
            "the lean decode step follows the fused kernels; sample a stock-ops model with generate_cached".into(),
        ));
    }
    let weights =
        Weights::new(model, (patch.entropy_from == EntropyFrom::Model).then_some(entropy_model), sampling.kv_cache)?;
    if observer.is_some() {
        return generate_lean_group(model, &weights, labels, sampling, patch, observer, None);
    }
    // Images are independent (their own seeds, per-row arithmetic): decode groups side by side.
    let rows = if sampling.uses_guidance() { 2 } else { 1 };
    let (ew, ek) = crate::sample::gpt_decode_sizes(entropy_model.config(), 1, sampling.kv_cache);
    let layers = c.global_layers + c.decoder_layers;
    let per_layer = 4 * (4 * c.dim * c.dim + 3 * c.dim * c.hidden());
    let weight_bytes = ew + per_layer * (layers + c.encoder_layers) + 4 * c.vocab_size * c.dim;
    let cache = ek + (rows * layers + c.encoder_layers) * (c.seq_len() + 1) * 2 * c.dim * sampling.kv_cache.bytes();
    generate_lean_grouped(model, &weights, labels, sampling, patch, crate::sample::decode_group(weight_bytes, cache))
}

/// [`generate_lean`] in decode groups of `group` images ([`crate::sample::decode_groups`]).
fn generate_lean_grouped(
    model: &Dpar,
    weights: &Weights,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    group: usize,
) -> Result<Generated> {
    let groups = crate::sample::decode_groups(labels.len(), group);
    let parts = crate::sample::run_groups(&groups, |g| {
        let cfg = sampling.from_image(g.start);
        generate_lean_group(model, weights, &labels[g], &cfg, patch, None, None)
    })?;
    let mut all = Generated { codes: Vec::with_capacity(labels.len()), lengths: Vec::with_capacity(labels.len()) };
    for part in parts {
        all.codes.extend(part.codes);
        all.lengths.extend(part.lengths);
    }
    Ok(all)
}

/// Every weight of a lean DPAR generation, copied out of the tensors once and shared by the
/// decode groups (stacks of zero rows whose blocks [`LeanStack::sharing`] hands on).
pub(super) struct Weights {
    pub(super) cls_table: Vec<f32>,
    pub(super) tok_table: Vec<f32>,
    pub(super) start_vector: Vec<f32>,
    pub(super) cross: Cross,
    pub(super) proj: Vec<(LeanNorm, LeanLinear)>,
    pub(super) norm: LeanNorm,
    pub(super) output: LeanLinear,
    pub(super) encoder: LeanStack,
    pub(super) global: LeanStack,
    pub(super) decoder: LeanStack,
    /// The entropy model's decoder (none for self-entropy patching).
    pub(super) entropy: Option<LeanDecoder>,
}

impl Weights {
    /// The entropy model's decoder; only called on weights built with one (continuous batching).
    pub(super) fn entropy(&self) -> &LeanDecoder {
        self.entropy.as_ref().expect("continuous batching builds its weights with the entropy model")
    }

    pub(super) fn new(model: &Dpar, entropy_model: Option<&Gpt>, kv: crate::nn::KvPrecision) -> Result<Self> {
        let c = model.config();
        let (gemm, dim, l) = (c.ops.gemm(), c.dim, c.seq_len());
        Ok(Self {
            cls_table: host(&model.cls_embedding)?,
            tok_table: host(&model.tok_embeddings)?,
            start_vector: host(&model.start)?,
            cross: Cross {
                norm_q: LeanNorm::from(&model.enc_cross.norm_q)?,
                norm_kv: LeanNorm::from(&model.enc_cross.norm_kv)?,
                wq: LeanLinear::from(&model.enc_cross.wq, gemm)?,
                wk: LeanLinear::from(&model.enc_cross.wk, gemm)?,
                wv: LeanLinear::from(&model.enc_cross.wv, gemm)?,
                wo: LeanLinear::from(&model.enc_cross.wo, gemm)?,
                heads: model.enc_cross.n_head,
            },
            proj: model
                .dec_proj
                .iter()
                .map(|p| Ok((LeanNorm::from(&p.norm)?, LeanLinear::from(&p.wo, gemm)?)))
                .collect::<Result<_>>()?,
            norm: LeanNorm::from(&model.norm)?,
            output: LeanLinear::from(&model.output, gemm)?,
            encoder: LeanStack::with_cache(&model.enc_layers, dim, c.n_head, gemm, 0, l + 1, kv)?,
            global: LeanStack::with_cache(&model.layers, dim, c.n_head, gemm, 0, l + 1, kv)?,
            decoder: LeanStack::with_cache(&model.dec_layers, dim, c.n_head, gemm, 0, l + 1, kv)?,
            entropy: entropy_model.map(|e| LeanDecoder::for_patching(e, 0, kv)).transpose()?,
        })
    }
}

/// The self-entropies of given codes (design §9, "Self-entropies of real codes"): per image L values, H_0 = +∞ and H_k the entropy of the decoder's prediction
/// of z_k as self-entropy patching at θ = `patch.threshold` computes it while generating these
/// very codes (teacher forcing, no guidance). Cut with the same `patch`, they give exactly the
/// patches that sampling would have given these codes; at another θ they mean nothing.
pub fn self_entropies(
    model: &Dpar,
    entropy_model: &Gpt,
    codes: &[Vec<u32>],
    labels: &[u32],
    patch: &PatchConfig,
) -> Result<Vec<Vec<f32>>> {
    if patch.entropy_from != EntropyFrom::Decoder {
        return Err(super::DparError::BadInput("self_entropies needs a self-entropy patcher".into()));
    }
    let (l, v) = (model.config().seq_len(), model.config().vocab_size);
    if codes.len() != labels.len() || codes.iter().any(|z| z.len() != l) {
        return Err(super::DparError::BadInput(format!(
            "self_entropies: {} code sequences of length {l} and as many labels expected",
            labels.len()
        )));
    }
    if let Some(z) = codes.iter().flatten().find(|&&z| z as usize >= v) {
        return Err(super::DparError::BadInput(format!("self_entropies: code {z} is outside the model's {v} codes")));
    }
    let sampling = SamplingConfig { cfg_scale: 1.0, ..Default::default() };
    check(model, entropy_model, labels, &sampling, patch)?;
    let weights = Weights::new(model, None, sampling.kv_cache)?;
    let groups = crate::sample::decode_groups(labels.len(), 32);
    let parts = crate::sample::run_groups(&groups, |g| {
        let b = g.len();
        let mut h = vec![vec![0f32; l]; b];
        let mut record = |step: &crate::sample::CodeStep| {
            for (row, &e) in h.iter_mut().zip(step.entropies) {
                row[step.k] = e;
            }
            true
        };
        generate_lean_group(model, &weights, &labels[g.clone()], &sampling, patch, Some(&mut record), Some(&codes[g]))?;
        Ok::<_, super::DparError>(h)
    })?;
    Ok(parts.into_iter().flatten().collect())
}

/// One decode group of [`generate_lean`]: all of `labels` in lockstep. With `teacher`, the
/// codes are those (one sequence per label) instead of draws.
fn generate_lean_group(
    model: &Dpar,
    w: &Weights,
    labels: &[u32],
    sampling: &SamplingConfig,
    patch: &PatchConfig,
    mut observer: crate::sample::Observer,
    teacher: Option<&[Vec<u32>]>,
) -> Result<Generated> {
    let c = model.config();
    let (b, l, grid, dim, v) = (labels.len(), c.seq_len(), c.grid_size, c.dim, c.vocab_size);
    let half = c.head_dim() / 2;
    let guided = sampling.uses_guidance();
    let rows = if guided { 2 * b } else { b };
    let all_rows: Vec<usize> = (0..rows).collect();
    let image_rows: Vec<usize> = (0..b).collect();
    let u = uniforms(sampling, b, l);
    let (cls_table, tok_table, start_vector, cross, proj, norm, output) =
        (&w.cls_table, &w.tok_table, &w.start_vector, &w.cross, &w.proj, &w.norm, &w.output);
    let kv = sampling.kv_cache;
    let mut encoder = w.encoder.sharing(b, l + 1, kv);
    let mut global = w.global.sharing(rows, l + 1, kv);
    let mut decoder = w.decoder.sharing(rows, l + 1, kv);
    let mut entropy = w.entropy.as_ref().map(|e| (e.sharing(b, kv), e.vocab()));

    let mut patchers = (0..b).map(|_| OnlinePatcher::new(*patch, grid)).collect::<std::result::Result<Vec<_>, _>>()?;
    for p in &mut patchers {
        p.push(f32::INFINITY); // z_0 is a patch of its own
    }
    let mut patch_start = vec![0usize; b];
    // h_all[k·B·D ..] = encoder states of z_k (B, D).
    let mut h_all: Vec<f32> = Vec::with_capacity(l * b * dim);
    // Per-layer injections wo_ℓ(RMSNorm_ℓ(g)) of the current g, back to back (layers × R × D).
    let mut injections = vec![0f32; proj.len() * rows * dim];
    let mut normed = vec![0f32; rows * dim];
    let inject = |g: &[f32], injections: &mut [f32], normed: &mut [f32]| {
        for (li, (n, wo)) in proj.iter().enumerate() {
            n.run(g, normed);
            wo.run(normed, rows, &mut injections[li * rows * dim..(li + 1) * rows * dim]);
        }
    };
    // Decoder step + head: logits (R, V) for z_pos from the inputs x (R, D).
    let mut y = vec![0f32; rows * dim];
    let mut yn = vec![0f32; rows * dim];
    let mut logits = vec![0f32; rows * v];
    let dec_cos = &model.rope_dec.cos[..];
    let dec_sin = &model.rope_dec.sin[..];

    // The class slot: zero rotations; its output is g for the lone z_0.
    let mut g = vec![0f32; rows * dim];
    let null = c.num_classes;
    for (r, row) in g.chunks_mut(dim).enumerate() {
        let y = if r < b { labels[r] as usize } else { null };
        row.copy_from_slice(&cls_table[y * dim..(y + 1) * dim]);
    }
    let zeros = vec![0f32; half];
    global.step(&mut g, &all_rows, &zeros, &zeros, None)?;
    inject(&g, &mut injections, &mut normed);
    for row in y.chunks_mut(dim) {
        row.copy_from_slice(start_vector);
    }
    decoder.step(&mut y, &all_rows, &dec_cos[..half], &dec_sin[..half], Some(&injections))?;
    norm.run(&y, &mut yn);
    output.run(&yn, rows, &mut logits);
    let draw = |logits: &[f32], k: usize| match teacher {
        Some(t) => t.iter().map(|z| z[k]).collect(),
        None => choose_codes_host(logits, v, b, guided, sampling, &u, k, l),
    };
    let mut codes: Vec<Vec<u32>> = draw(&logits, 0).into_iter().map(|z| vec![z]).collect();
    let z0: Vec<u32> = codes.iter().map(|z| z[0]).collect();
    notify(&mut observer, 0, &z0, &vec![f32::INFINITY; b], &vec![true; b])?;
    let self_entropy = patch.entropy_from == EntropyFrom::Decoder;
    // Closes the patches of `closing` that end at z_{k−1}: patch vectors, one patch-transformer
    // step, new injections.
    #[allow(clippy::too_many_arguments)]
    let close = |closing: &[usize],
                 k: usize,
                 h_all: &[f32],
                 patch_start: &mut [usize],
                 global: &mut LeanStack,
                 g: &mut [f32],
                 injections: &mut [f32],
                 normed: &mut [f32]|
     -> Result<()> {
        let mut states = Vec::new();
        let mut segments = Vec::with_capacity(closing.len());
        let mut spans = Vec::with_capacity(closing.len());
        for &i in closing {
            segments.push((states.len() / dim, k - patch_start[i]));
            spans.push((patch_start[i], k - 1));
            for pos in patch_start[i]..k {
                states.extend_from_slice(&h_all[(pos * b + i) * dim..(pos * b + i + 1) * dim]);
            }
            patch_start[i] = k;
        }
        let vectors = cross.forward(&states, &segments, dim); // (|C|, D)
        let mut step_rows = closing.to_vec();
        let mut x = vectors.clone();
        if guided {
            step_rows.extend(closing.iter().map(|&i| i + b));
            x.extend_from_slice(&vectors);
            spans.extend(spans.clone());
        }
        let rope = model.patch_rope(&spans);
        global.step(&mut x, &step_rows, &rope.cos, &rope.sin, None)?;
        for (j, &r) in step_rows.iter().enumerate() {
            g[r * dim..(r + 1) * dim].copy_from_slice(&x[j * dim..(j + 1) * dim]);
        }
        inject(g, injections, normed);
        Ok(())
    };
    // Decoder step of every row at position k (input h_{k−1}, the current injections).
    let decode_all = |decoder: &mut LeanStack, y: &mut Vec<f32>, h: &[f32], injections: &[f32], k: usize| {
        y[..b * dim].copy_from_slice(h);
        if guided {
            y[b * dim..].copy_from_slice(h);
        }
        decoder.step(
            y,
            &all_rows,
            &dec_cos[k * half..(k + 1) * half],
            &dec_sin[k * half..(k + 1) * half],
            Some(injections),
        )
    };
    let mut prev = vec![0u32; b];
    let mut h = vec![0f32; b * dim];
    for k in 1..l {
        for (i, z) in codes.iter().enumerate() {
            prev[i] = z[k - 1];
        }
        // 1. Encoder state of z_{k−1}, entropy H_k, patch decision for z_k.
        for (row, &z) in h.chunks_mut(dim).zip(&prev) {
            row.copy_from_slice(&tok_table[z as usize * dim..(z as usize + 1) * dim]);
        }
        let p = k - 1;
        encoder.step(
            &mut h,
            &image_rows,
            &model.rope_enc.cos[p * half..(p + 1) * half],
            &model.rope_enc.sin[p * half..(p + 1) * half],
            None,
        )?;
        h_all.extend_from_slice(&h);
        let (entropies, closing) = if self_entropy {
            // 2'. Patches that must close whatever the entropy (row starts, full patches)
            // close first. Then the decoder's prediction of z_k, for the others as if z_k
            // continued the open patch; its entropy decides. Where it opens a patch, that step
            // is undone, the patch closes, and the decoder steps again (design §9).
            let forced: Vec<usize> = (0..b).filter(|&i| patchers[i].forced()).collect();
            if !forced.is_empty() {
                close(&forced, k, &h_all, &mut patch_start, &mut global, &mut g, &mut injections, &mut normed)?;
            }
            decode_all(&mut decoder, &mut y, &h, &injections, k)?;
            norm.run(&y, &mut yn);
            output.run(&yn, rows, &mut logits);
            let entropies = entropy_rows(&logits[..b * v], v);
            let closing: Vec<usize> = (0..b).filter(|&i| patchers[i].push(entropies[i])).collect();
            let late: Vec<usize> = closing.iter().copied().filter(|i| !forced.contains(i)).collect();
            if !late.is_empty() {
                close(&late, k, &h_all, &mut patch_start, &mut global, &mut g, &mut injections, &mut normed)?;
                let mut step_rows = late.clone();
                if guided {
                    step_rows.extend(late.iter().map(|&i| i + b));
                }
                let m = step_rows.len();
                let mut x = Vec::with_capacity(m * dim);
                let mut inj = vec![0f32; proj.len() * m * dim];
                for (j, &r) in step_rows.iter().enumerate() {
                    decoder.truncate_row(r, k);
                    let i = r % b;
                    x.extend_from_slice(&h[i * dim..(i + 1) * dim]);
                    for li in 0..proj.len() {
                        let from = (li * rows + r) * dim;
                        inj[(li * m + j) * dim..(li * m + j + 1) * dim].copy_from_slice(&injections[from..from + dim]);
                    }
                }
                let (cos, sin) = (&dec_cos[k * half..(k + 1) * half], &dec_sin[k * half..(k + 1) * half]);
                decoder.step(&mut x, &step_rows, cos, sin, Some(&inj))?;
                let mut xn = vec![0f32; m * dim];
                norm.run(&x, &mut xn);
                let mut redone = vec![0f32; m * v];
                output.run(&xn, m, &mut redone);
                for (j, &r) in step_rows.iter().enumerate() {
                    logits[r * v..(r + 1) * v].copy_from_slice(&redone[j * v..(j + 1) * v]);
                }
            }
            (entropies, closing)
        } else {
            let (entropy, ev) = entropy.as_mut().ok_or_else(|| {
                super::DparError::BadInput("the entropy model's patches need the entropy model".into())
            })?;
            let entropies = entropy_rows(entropy.step(&prev)?, *ev);
            let closing: Vec<usize> = (0..b).filter(|&i| patchers[i].push(entropies[i])).collect();
            // 2. Close the patches that end at z_{k−1}.
            if !closing.is_empty() {
                close(&closing, k, &h_all, &mut patch_start, &mut global, &mut g, &mut injections, &mut normed)?;
            }
            // 3. Decoder step at position k.
            decode_all(&mut decoder, &mut y, &h, &injections, k)?;
            norm.run(&y, &mut yn);
            output.run(&yn, rows, &mut logits);
            (entropies, closing)
        };
        let chosen = draw(&logits, k);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dpar::generate::{generate, generate_cached, tests::entropy_model};
    use crate::dpar::model::tests::tiny;
    use crate::params::ParamStore;
    use candle_core::{Device, Tensor};

    /// A DPAR of `config` whose head and class table are random (the initial head is zero, so
    /// every draw would depend on the seed alone).
    pub(crate) fn random_head(config: &crate::dpar::DparConfig, seed: u64) -> (Dpar, ParamStore) {
        let store = ParamStore::new(seed, &Device::Cpu);
        let m = Dpar::new(config, &store.root()).unwrap();
        for name in ["output.weight", "cls_embedding.embedding_table.weight"] {
            let var = store.var(name).unwrap();
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        (m, store)
    }

    /// Beyond the tensor-path test in `generate`: two encoder layers, bf16 GEMMs, a batch of five
    /// and every sampling filter; the lean steps give exactly the same codes and patches, and the
    /// CPU default (`generate`) is the lean path.
    #[test]
    fn lean_steps_equal_the_tensor_path_with_bf16_and_two_encoder_layers() {
        for ops in [crate::nn::Ops::Fused, crate::nn::Ops::Bf16] {
            let config = tiny().with(|it| {
                it.encoder_layers = 2;
                it.ops = ops;
            });
            let (m, _store) = random_head(&config, 21);
            let (e, _es) = entropy_model(22);
            let labels = [2u32, 0, 1, 1, 2];
            for (cfg_scale, top_k, top_p) in [(2.0, 0, 1.0), (1.0, 5, 0.9)] {
                let sampling = SamplingConfig { cfg_scale, top_k, top_p, seed: 9, ..Default::default() };
                let patch = PatchConfig::dpar(2.5, 4);
                let cached = generate_cached(&m, &e, &labels, &sampling, &patch, &Device::Cpu).unwrap();
                let lean = generate_lean(&m, &e, &labels, &sampling, &patch).unwrap();
                assert_eq!(lean, cached, "{ops:?}, cfg {cfg_scale}");
                assert_eq!(generate(&m, &e, &labels, &sampling, &patch, &Device::Cpu).unwrap(), lean);
                let steps = lean.global_steps();
                assert!(steps.iter().any(|&s| s > 1 && s < 16), "no patch of several codes: {steps:?}");
            }
        }
    }

    /// An image's codes and patches depend on its seed and index only: in any batch and any
    /// decode groups, image i of a batch gets what it gets alone as image i of its run. With
    /// and without guidance, f32 and bf16 caches (each compared with itself).
    #[test]
    fn batched_generation_gives_each_image_the_codes_and_patches_it_gets_alone() {
        let (m, _store) = random_head(&tiny(), 23);
        let (e, _es) = entropy_model(24);
        let labels = [2u32, 0, 1, 1, 2, 0];
        let patch = PatchConfig::dpar(2.5, 4);
        for cfg_scale in [1.0, 2.0] {
            for kv in [crate::nn::KvPrecision::F32, crate::nn::KvPrecision::Bf16] {
                let sampling = SamplingConfig { cfg_scale, seed: 70, kv_cache: kv, ..Default::default() };
                let w = Weights::new(&m, Some(&e), kv).unwrap();
                let alone: Vec<Generated> = (0..labels.len())
                    .map(|i| {
                        let s = sampling.from_image(i);
                        generate_lean_grouped(&m, &w, &labels[i..i + 1], &s, &patch, 1).unwrap()
                    })
                    .collect();
                let want = |n: usize| Generated {
                    codes: alone[..n].iter().map(|g| g.codes[0].clone()).collect(),
                    lengths: alone[..n].iter().map(|g| g.lengths[0].clone()).collect(),
                };
                for batch in [2, 3, 6] {
                    for group in [1, 2, 4, 6] {
                        let got = generate_lean_grouped(&m, &w, &labels[..batch], &sampling, &patch, group).unwrap();
                        assert_eq!(got, want(batch), "cfg {cfg_scale} {kv:?} batch {batch} group {group}");
                    }
                }
                assert_eq!(generate_lean(&m, &e, &labels, &sampling, &patch).unwrap(), want(labels.len()));
                assert!(want(6).global_steps().iter().any(|&s| s > 1 && s < 16), "patches of several codes");
            }
        }
    }

    /// Self-entropy patching (design §9): the lean path, which decodes z_k speculatively and
    /// steps again at a boundary, gives exactly the codes and patches of the full recomputation
    /// of the same rule (a forward over the prefix per decision). Several θ, with and without
    /// guidance, fused and bf16 kernels; the decoder's entropy really decides some patches.
    #[test]
    fn self_entropy_patching_equals_its_full_recomputation() {
        use crate::dpar::generate::generate_full_recompute;
        use crate::patching::EntropyFrom;
        for ops in [crate::nn::Ops::Fused, crate::nn::Ops::Bf16] {
            let (m, _store) = random_head(&tiny().with(|it| it.ops = ops), 41);
            let (e, _es) = entropy_model(42);
            let labels = [2u32, 0, 1];
            let mut decided = false;
            for cfg_scale in [1.0, 2.0] {
                let sampling = SamplingConfig { cfg_scale, seed: 3, ..Default::default() };
                let at = |theta: f64| PatchConfig { entropy_from: EntropyFrom::Decoder, ..PatchConfig::dpar(theta, 4) };
                let forced = generate_lean(&m, &e, &labels, &sampling, &at(f64::INFINITY)).unwrap().lengths;
                for theta in [0.5, 1.0, 1.5, 2.0, 2.5] {
                    let lean = generate_lean(&m, &e, &labels, &sampling, &at(theta)).unwrap();
                    let full = generate_full_recompute(&m, &e, &labels, &sampling, &at(theta), &Device::Cpu).unwrap();
                    assert_eq!(lean, full, "{ops:?} cfg {cfg_scale} θ {theta}");
                    let ones = lean.lengths.iter().all(|l| l.iter().all(|&n| n == 1));
                    decided |= !ones && lean.lengths != forced;
                }
            }
            assert!(decided, "{ops:?}: no θ let the decoder's entropy decide a patch");
        }
    }

    /// Teacher-forced self-entropies of generated codes, cut by the batch patcher at the same
    /// θ, give exactly the patches that generation gave them, with and without guidance (the
    /// decision reads the conditional rows only).
    #[test]
    fn self_entropies_of_generated_codes_give_their_patches_back() {
        use crate::patching::EntropyFrom;
        let (m, _store) = random_head(&tiny(), 61);
        let (e, _es) = entropy_model(62);
        let labels = [0u32, 1, 2, 2, 1];
        let grid = m.config().grid_size;
        for theta in [1.0, 2.0] {
            let patch = PatchConfig { entropy_from: EntropyFrom::Decoder, ..PatchConfig::dpar(theta, 4) };
            for cfg_scale in [1.0, 2.5] {
                let sampling = SamplingConfig { cfg_scale, seed: 8, ..Default::default() };
                let got = generate_lean(&m, &e, &labels, &sampling, &patch).unwrap();
                let h = self_entropies(&m, &e, &got.codes, &labels, &patch).unwrap();
                for (i, row) in h.iter().enumerate() {
                    assert!(row[0].is_infinite() && row[1..].iter().all(|x| x.is_finite() && *x >= 0.0));
                    let lengths = crate::patching::patch_lengths(row, grid, &patch, row.len()).unwrap();
                    assert_eq!(lengths, got.lengths[i], "θ {theta} cfg {cfg_scale} image {i}");
                }
            }
        }
        let bad = self_entropies(
            &m,
            &e,
            &[vec![0; 3]],
            &[0],
            &PatchConfig { entropy_from: EntropyFrom::Decoder, ..PatchConfig::dpar(1.0, 4) },
        );
        assert!(bad.unwrap_err().to_string().contains("length"));
        let p = PatchConfig { entropy_from: EntropyFrom::Decoder, ..PatchConfig::dpar(1.0, 4) };
        let big = vec![vec![m.config().vocab_size as u32; m.config().seq_len()]];
        assert!(self_entropies(&m, &e, &big, &[0], &p).unwrap_err().to_string().contains("outside"));
    }

    /// Every patcher mode (the entropy model's full rule, its ablations, static patches and
    /// self-entropy with and without row resets) gives the same codes and patches in the
    /// tensor path with KV caches and in the lean steps, with and without guidance.
    #[test]
    fn every_patcher_mode_gives_the_same_codes_in_the_cached_and_lean_paths() {
        use crate::patching::EntropyFrom;
        let (m, _store) = random_head(&tiny(), 51);
        let (e, _es) = entropy_model(52);
        let labels = [1u32, 2, 0];
        let full = PatchConfig::dpar(1.5, 4);
        let modes = [
            full,
            PatchConfig { max_len_rule: false, row_reset: false, ..full },
            PatchConfig::static_patches(3),
            PatchConfig { entropy_from: EntropyFrom::Decoder, ..full },
            PatchConfig { entropy_from: EntropyFrom::Decoder, row_reset: false, threshold: 1.0, ..full },
        ];
        for cfg_scale in [1.0, 2.0] {
            let sampling = SamplingConfig { cfg_scale, seed: 5, ..Default::default() };
            for patch in &modes {
                let lean = generate_lean(&m, &e, &labels, &sampling, patch).unwrap();
                let cached = generate_cached(&m, &e, &labels, &sampling, patch, &Device::Cpu).unwrap();
                assert_eq!(lean, cached, "{} cfg {cfg_scale}", patch.label());
                let steps = lean.global_steps();
                assert!(steps.iter().any(|&s| s < 16), "{}: no patch of several codes: {steps:?}", patch.label());
            }
        }
    }

    #[test]
    fn a_stock_ops_model_is_refused_with_a_pointer_to_the_tensor_path() {
        let config = tiny().with(|it| {
            it.ops = crate::nn::Ops::Stock;
        });
        let store = ParamStore::new(1, &Device::Cpu);
        let m = Dpar::new(&config, &store.root()).unwrap();
        let (e, _es) = entropy_model(2);
        let err = generate_lean(&m, &e, &[0], &SamplingConfig::default(), &PatchConfig::dpar(1.0, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("generate_cached"), "{err}");
    }
}
