//! Continuous batching of DPAR generations (design §6, "Sampling cost"): the DPAR counterpart
//! of [`crate::stream::GptStreams`]. Streams join a running decode loop at its next step and
//! leave it when their last code is drawn or when they are cancelled; each keeps its own class,
//! sampling settings, patcher settings and seed, and gets exactly the codes and patches of
//! [`super::decode::generate_lean`] alone with the same inputs.
//!
//! A step takes every stream one code further, whatever code each is at. The four stages are
//! batched over the streams that need them:
//! 1. encoder and entropy model: one row per stream past z_0 (the code drawn last);
//! 2. patch transformer: the class slot of each new stream, and every stream whose entropy
//!    closed a patch (its patch vector), in one step with a RoPE row each;
//! 3. decoder and head: every stream's rows (2 when guided), each at its own position.
//!
//! Every per-row operation is the same whatever the other rows are (small-m GEMMs row by row,
//! attention over the row's own cache), which is what makes a stream's codes its own.
//!
//! # Shapes
//! S image slots (encoder and entropy-model rows), 2S rows of the patch transformer and
//! decoder (slot s: conditional row s, null-class row S + s), D width, V vocabulary, L codes.

use super::decode::Weights;
use super::generate::check;
use super::{Dpar, DparError, Result};
use crate::gpt::{entropy_rows, Gpt};
use crate::nn::lean::LeanStack;
use crate::nn::KvPrecision;
use crate::patching::{OnlinePatcher, PatchConfig};
use crate::sample::{draw, process_logits, uniforms, SamplingConfig};
use crate::stream::StreamEvent;

struct Stream {
    id: u64,
    label: u32,
    sampling: SamplingConfig,
    slot: usize,
    guided: bool,
    patcher: OnlinePatcher,
    /// First code of the open patch.
    patch_start: usize,
    codes: Vec<u32>,
    /// Encoder states of z_0 … z_{k−2} and (once stepped) z_{k−1}, (k, D).
    h_all: Vec<f32>,
    /// Decoder injections of the current global state, per row (cond, then null) and layer.
    injections: Vec<f32>,
    u: Vec<f64>,
    /// H_k and whether z_k opens a patch, for the code about to be drawn.
    entropy: f32,
    opens: bool,
}

/// The running decode loop of a DPAR model and its entropy model on the CPU (fused or bf16
/// kernels): up to `capacity` images at once.
pub struct DparStreams<'m> {
    model: &'m Dpar,
    w: Weights,
    capacity: usize,
    grid: usize,
    encoder: LeanStack,
    entropy: LeanStack,
    global: LeanStack,
    decoder: LeanStack,
    free: Vec<usize>,
    streams: Vec<Stream>,
    kv: KvPrecision,
}

impl<'m> DparStreams<'m> {
    /// A loop for `model` and `entropy_model` with room for `capacity` images, and KV caches
    /// of precision `kv` (a stream's `kv_cache` setting must match).
    pub fn new(model: &'m Dpar, entropy_model: &Gpt, capacity: usize, kv: KvPrecision) -> Result<Self> {
        let c = model.config();
        if c.ops == crate::nn::Ops::Stock {
            return Err(DparError::BadConfig("continuous batching needs fused or bf16 kernels".into()));
        }
        if capacity == 0 {
            return Err(DparError::BadConfig("continuous batching needs room for at least one image".into()));
        }
        check(model, entropy_model, &[0], &SamplingConfig::default(), &c.patch)?;
        let w = Weights::new(model, Some(entropy_model), kv)?;
        let l = c.seq_len();
        Ok(Self {
            encoder: w.encoder.sharing(capacity, l + 1, kv),
            entropy: w.entropy().stack().sharing(capacity, l, kv),
            global: w.global.sharing(2 * capacity, l + 1, kv),
            decoder: w.decoder.sharing(2 * capacity, l + 1, kv),
            model,
            w,
            capacity,
            grid: c.grid_size,
            free: (0..capacity).rev().collect(),
            streams: Vec::new(),
            kv,
        })
    }

    /// Streams in the loop.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Images that may still join.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Adds stream `id` (class `label`, its own sampling and patcher settings and seed); it
    /// draws z_0 at the next [`Self::step`]. An error when there is no room or a setting is out
    /// of range.
    pub fn join(&mut self, id: u64, label: u32, sampling: &SamplingConfig, patch: &PatchConfig) -> Result<()> {
        let c = self.model.config();
        sampling.validate()?;
        patch.validate()?;
        if patch.entropy_from != crate::patching::EntropyFrom::Model {
            return Err(DparError::BadInput("continuous batching takes the entropy model's patches only".into()));
        }
        if label as usize >= c.num_classes {
            return Err(DparError::BadInput(format!("unknown class {label}: the model has {} classes", c.num_classes)));
        }
        if sampling.kv_cache != self.kv {
            return Err(DparError::BadConfig(format!(
                "this loop keeps {} KV caches; the stream asks for {}",
                self.kv.name(),
                sampling.kv_cache.name()
            )));
        }
        if self.streams.iter().any(|s| s.id == id) {
            return Err(DparError::BadInput(format!("stream {id} is already running")));
        }
        let Some(slot) = self.free.pop() else {
            return Err(DparError::BadInput(format!("no room: all {} image slots are taken", self.capacity)));
        };
        self.encoder.clear_row(slot);
        self.entropy.clear_row(slot);
        for r in [slot, self.capacity + slot] {
            self.global.clear_row(r);
            self.decoder.clear_row(r);
        }
        let mut patcher = OnlinePatcher::new(*patch, self.grid)?;
        patcher.push(f32::INFINITY); // z_0 is a patch of its own
        let (l, dim, guided) = (c.seq_len(), c.dim, sampling.uses_guidance());
        self.streams.push(Stream {
            id,
            label,
            sampling: sampling.clone(),
            slot,
            guided,
            patcher,
            patch_start: 0,
            codes: Vec::with_capacity(l),
            h_all: Vec::with_capacity(l * dim),
            injections: vec![0.0; if guided { 2 } else { 1 } * self.w.proj.len() * dim],
            u: uniforms(sampling, 1, l),
            entropy: f32::INFINITY,
            opens: true,
        });
        Ok(())
    }

    /// Removes stream `id` (a closed page); its slot is free for the next stream. Whether it
    /// was running.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.streams.iter().position(|s| s.id == id) {
            Some(i) => {
                let s = self.streams.remove(i);
                self.free.push(s.slot);
                true
            }
            None => false,
        }
    }

    /// The patch-transformer and decoder rows of stream `s`: conditional, then null class.
    fn rows_of(&self, s: &Stream) -> impl Iterator<Item = usize> {
        std::iter::once(s.slot).chain(s.guided.then_some(self.capacity + s.slot))
    }

    /// One decode step of every stream: each draws its next code. `on` hears every code and
    /// every finished stream (returning `false` from a `Code` event cancels that stream).
    pub fn step(&mut self, mut on: impl FnMut(StreamEvent) -> bool) -> Result<()> {
        if self.streams.is_empty() {
            return Ok(());
        }
        let model = self.model;
        let c = model.config();
        let (dim, v, half) = (c.dim, c.vocab_size, c.head_dim() / 2);
        self.encode_and_patch(dim, half)?;
        self.global_step(dim, half)?;

        // 3. Decoder step of every stream's rows at its own position k, then the head.
        let mut rows = Vec::new();
        let (mut x, mut cos, mut sin) = (Vec::new(), Vec::new(), Vec::new());
        let layers = self.w.proj.len();
        for s in &self.streams {
            let k = s.codes.len();
            let input = if k == 0 { &self.w.start_vector[..] } else { &s.h_all[(k - 1) * dim..k * dim] };
            for r in self.rows_of(s) {
                rows.push(r);
                x.extend_from_slice(input);
                cos.extend_from_slice(&model.rope_dec.cos[k * half..(k + 1) * half]);
                sin.extend_from_slice(&model.rope_dec.sin[k * half..(k + 1) * half]);
            }
        }
        let n = rows.len();
        let mut injections = vec![0f32; layers * n * dim];
        let mut at = 0;
        for s in &self.streams {
            for (j, own) in s.injections.chunks(layers * dim).enumerate() {
                for li in 0..layers {
                    let to = (li * n + at + j) * dim;
                    injections[to..to + dim].copy_from_slice(&own[li * dim..(li + 1) * dim]);
                }
            }
            at += if s.guided { 2 } else { 1 };
        }
        self.decoder.step(&mut x, &rows, &cos, &sin, Some(&injections))?;
        let mut normed = vec![0f32; n * dim];
        self.w.norm.run(&x, &mut normed);
        let mut logits = vec![0f32; n * v];
        self.w.output.run(&normed, n, &mut logits);

        // Draws, in the order of the rows above.
        let l = c.seq_len();
        let (mut at, mut gone) = (0, Vec::new());
        for (i, s) in self.streams.iter_mut().enumerate() {
            let cond = &logits[at * v..(at + 1) * v];
            let uncond = s.guided.then(|| &logits[(at + 1) * v..(at + 2) * v]);
            at += if s.guided { 2 } else { 1 };
            let k = s.codes.len();
            let code = draw(&process_logits(cond, uncond, &s.sampling), s.u[k]);
            s.codes.push(code);
            let keep = on(StreamEvent::Code { id: s.id, k, code, entropy: s.entropy, opens: s.opens });
            if !keep || s.codes.len() == l {
                gone.push((i, keep));
            }
        }
        for &(i, finished) in gone.iter().rev() {
            let s = self.streams.remove(i);
            self.free.push(s.slot);
            if finished {
                on(StreamEvent::Done { id: s.id, codes: s.codes, lengths: s.patcher.lengths().to_vec() });
            }
        }
        Ok(())
    }

    /// Stage 1, for every stream past z_0: the encoder state of z_{k−1}, the entropy H_k and
    /// the patch decision for z_k.
    fn encode_and_patch(&mut self, dim: usize, half: usize) -> Result<()> {
        let model = self.model;
        let active: Vec<usize> = (0..self.streams.len()).filter(|&i| !self.streams[i].codes.is_empty()).collect();
        if active.is_empty() {
            return Ok(());
        }
        let (tok, _) = self.w.entropy().embeddings();
        let (ecos, esin, ehalf) = self.w.entropy().rope();
        let mut rows = Vec::with_capacity(active.len());
        let (mut h, mut x) = (Vec::new(), Vec::new());
        let (mut cos, mut sin, mut ent_cos, mut ent_sin) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in &active {
            let s = &self.streams[i];
            let p = s.codes.len() - 1; // position of z_{k−1}
            let z = s.codes[p] as usize;
            rows.push(s.slot);
            h.extend_from_slice(&self.w.tok_table[z * dim..(z + 1) * dim]);
            cos.extend_from_slice(&model.rope_enc.cos[p * half..(p + 1) * half]);
            sin.extend_from_slice(&model.rope_enc.sin[p * half..(p + 1) * half]);
            let ed = tok.len() / self.w.entropy().vocab();
            x.extend_from_slice(&tok[z * ed..(z + 1) * ed]);
            ent_cos.extend_from_slice(&ecos[p * ehalf..(p + 1) * ehalf]);
            ent_sin.extend_from_slice(&esin[p * ehalf..(p + 1) * ehalf]);
        }
        self.encoder.step(&mut h, &rows, &cos, &sin, None)?;
        self.entropy.step(&mut x, &rows, &ent_cos, &ent_sin, None)?;
        let (norm, output) = self.w.entropy().head();
        let ev = self.w.entropy().vocab();
        let mut xn = vec![0f32; x.len()];
        norm.run(&x, &mut xn);
        let mut logits = vec![0f32; rows.len() * ev];
        output.run(&xn, rows.len(), &mut logits);
        let entropies = entropy_rows(&logits, ev);
        for (j, &i) in active.iter().enumerate() {
            let s = &mut self.streams[i];
            s.h_all.extend_from_slice(&h[j * dim..(j + 1) * dim]);
            s.entropy = entropies[j];
            s.opens = s.patcher.push(entropies[j]);
        }
        Ok(())
    }

    /// Stage 2, one patch-transformer step: the class slot of each new stream (zero rotations),
    /// and the patch vector of every patch that closed at z_{k−1}; then those rows' injections.
    fn global_step(&mut self, dim: usize, half: usize) -> Result<()> {
        let model = self.model;
        let c = model.config();
        let (mut states, mut segments, mut closing) = (Vec::new(), Vec::new(), Vec::new());
        let mut spans = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            let k = s.codes.len();
            if k > 0 && s.opens {
                segments.push((states.len() / dim, k - s.patch_start));
                spans.push((s.patch_start, k - 1));
                states.extend_from_slice(&s.h_all[s.patch_start * dim..k * dim]);
                closing.push(i);
            }
        }
        let vectors = if closing.is_empty() { Vec::new() } else { self.w.cross.forward(&states, &segments, dim) };
        let rope = model.patch_rope(&spans);
        // Inputs, rows and RoPE rows; `owners` says which stream and which of its rows each is.
        let (mut x, mut rows, mut cos, mut sin, mut owners) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (j, &i) in closing.iter().enumerate() {
            let s = &self.streams[i];
            for (n, r) in self.rows_of(s).enumerate() {
                x.extend_from_slice(&vectors[j * dim..(j + 1) * dim]);
                rows.push(r);
                cos.extend_from_slice(&rope.cos[j * half..(j + 1) * half]);
                sin.extend_from_slice(&rope.sin[j * half..(j + 1) * half]);
                owners.push((i, n));
            }
        }
        let null = c.num_classes;
        for (i, s) in self.streams.iter().enumerate() {
            if s.codes.is_empty() {
                for (n, r) in self.rows_of(s).enumerate() {
                    let y = if n == 0 { s.label as usize } else { null };
                    x.extend_from_slice(&self.w.cls_table[y * dim..(y + 1) * dim]);
                    rows.push(r);
                    cos.extend(std::iter::repeat_n(0f32, half));
                    sin.extend(std::iter::repeat_n(0f32, half));
                    owners.push((i, n));
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        self.global.step(&mut x, &rows, &cos, &sin, None)?;
        let m = rows.len();
        let mut normed = vec![0f32; m * dim];
        let mut out = vec![0f32; m * dim];
        let layers = self.w.proj.len();
        for (li, (norm, wo)) in self.w.proj.iter().enumerate() {
            norm.run(&x, &mut normed);
            wo.run(&normed, m, &mut out);
            for (j, &(i, n)) in owners.iter().enumerate() {
                let to = (n * layers + li) * dim;
                self.streams[i].injections[to..to + dim].copy_from_slice(&out[j * dim..(j + 1) * dim]);
            }
        }
        for &i in &closing {
            let s = &mut self.streams[i];
            s.patch_start = s.codes.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpar::decode::generate_lean;
    use crate::dpar::decode::tests::random_head;
    use crate::dpar::generate::tests::entropy_model;
    use crate::dpar::model::tests::tiny;

    /// Streams that join at different steps, with different classes, sampling and patcher
    /// settings and seeds, get exactly the codes and patches of solo generations; a stream
    /// cancelled midway leaves the others alone and its slot serves a later stream. f32 and
    /// bf16 caches, fused and bf16 kernels.
    #[test]
    fn joining_streams_get_the_codes_and_patches_they_get_alone() {
        for ops in [crate::nn::Ops::Fused, crate::nn::Ops::Bf16] {
            let (m, _store) = random_head(&tiny().with(|it| it.ops = ops), 31);
            let (e, _es) = entropy_model(32);
            for kv in [KvPrecision::F32, KvPrecision::Bf16] {
                let s = |cfg_scale, seed| SamplingConfig { cfg_scale, seed, kv_cache: kv, ..Default::default() };
                let settings = [
                    (1u32, s(2.0, 5), PatchConfig::dpar(2.5, 4)),
                    (0, SamplingConfig { temperature: 0.8, ..s(1.0, 9) }, PatchConfig::dpar(1.5, 3)),
                    (2, SamplingConfig { top_k: 4, ..s(1.5, 2) }, PatchConfig::dpar(2.5, 4)),
                    (1, SamplingConfig { top_p: 0.8, ..s(3.0, 77) }, PatchConfig::static_patches(2)),
                ];
                let alone: Vec<_> = settings
                    .iter()
                    .map(|(y, sc, p)| {
                        let g = generate_lean(&m, &e, &[*y], sc, p).unwrap();
                        (g.codes[0].clone(), g.lengths[0].clone())
                    })
                    .collect();
                assert!(alone.iter().any(|(_, l)| l.iter().any(|&n| n > 1)), "patches of several codes");
                let mut streams = DparStreams::new(&m, &e, 3, kv).unwrap();
                let mut done: Vec<Option<(Vec<u32>, Vec<usize>)>> = vec![None; 4];
                let mut seen: Vec<Vec<(u32, bool)>> = vec![Vec::new(); 4];
                for step in 0..60 {
                    let join = |streams: &mut DparStreams, i: usize| {
                        let (y, sc, p) = &settings[i];
                        streams.join(i as u64, *y, sc, p)
                    };
                    match step {
                        0 => join(&mut streams, 0).unwrap(),
                        3 => join(&mut streams, 1).unwrap(),
                        5 => {
                            join(&mut streams, 2).unwrap();
                            assert!(join(&mut streams, 3).is_err(), "no room yet");
                        }
                        _ if step > 5 && seen[3].is_empty() && streams.free_slots() > 0 => {
                            join(&mut streams, 3).unwrap()
                        }
                        _ => {}
                    }
                    streams
                        .step(|ev| match ev {
                            StreamEvent::Code { id, code, opens, .. } => {
                                seen[id as usize].push((code, opens));
                                !(id == 2 && seen[2].len() == 5)
                            }
                            StreamEvent::Done { id, codes, lengths } => {
                                done[id as usize] = Some((codes, lengths));
                                true
                            }
                        })
                        .unwrap();
                }
                assert!(streams.is_empty(), "every stream finished");
                for i in [0, 1, 3] {
                    assert_eq!(done[i].as_ref(), Some(&alone[i]), "{ops:?} {kv:?} stream {i}");
                    let codes: Vec<u32> = seen[i].iter().map(|c| c.0).collect();
                    assert_eq!(codes, alone[i].0);
                    let opens = seen[i].iter().filter(|c| c.1).count();
                    assert_eq!(opens, alone[i].1.len(), "one opening event per patch");
                }
                assert_eq!(done[2], None);
                let codes: Vec<u32> = seen[2].iter().map(|c| c.0).collect();
                assert_eq!(codes, alone[2].0[..5], "the cancelled stream's codes so far are its own");
            }
        }
    }

    #[test]
    fn bad_streams_are_refused_with_the_reason() {
        let (m, _store) = random_head(&tiny(), 1);
        let (e, _es) = entropy_model(2);
        let mut l = DparStreams::new(&m, &e, 1, KvPrecision::F32).unwrap();
        let (c, p) = (SamplingConfig::default(), PatchConfig::dpar(2.0, 4));
        assert!(l.join(0, 9, &c, &p).unwrap_err().to_string().contains("unknown class 9"));
        let bf = SamplingConfig { kv_cache: KvPrecision::Bf16, ..c.clone() };
        assert!(l.join(0, 1, &bf, &p).unwrap_err().to_string().contains("bf16"));
        assert!(l.join(0, 1, &c, &PatchConfig::dpar(2.0, 0)).is_err(), "a patch of at most 0 codes");
        l.join(0, 1, &c, &p).unwrap();
        assert!(l.join(0, 1, &c, &p).unwrap_err().to_string().contains("already running"));
        assert!(l.join(1, 1, &c, &p).unwrap_err().to_string().contains("no room"));
        assert!(l.cancel(0) && !l.cancel(0));
        assert_eq!(l.free_slots(), 1);
    }
}
