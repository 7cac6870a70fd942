//! Continuous batching of the baseline's generations (design §6, "Sampling cost"): streams
//! join a running decode loop at its next step, as new rows of its ragged batch, and leave it
//! when their last code is drawn or when they are cancelled. Each stream keeps its own class,
//! sampling settings and seed, and gets exactly the codes it would get alone
//! ([`crate::sample::generate_gpt`] with the same settings): its draws come from its own seeded
//! stream, its rows attend only to their own caches, and every per-row operation of a step is
//! the same whatever the other rows are.
//!
//! `dpar serve` runs its baseline clients on this engine, and its DPAR clients on
//! [`crate::dpar::streams::DparStreams`], the same for DPAR's four stages.
//!
//! # Shapes
//! R rows stepped (1 per unguided stream, 2 per guided one: conditional, then null class),
//! D width, V vocabulary, L codes per image.

use crate::gpt::decode::LeanDecoder;
use crate::gpt::{Gpt, GptError};
use crate::nn::lean::LeanStack;
use crate::nn::KvPrecision;
use crate::sample::{draw, process_logits, uniforms, Result, SampleError, SamplingConfig};

/// What a step tells the caller about one stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Code `k` of stream `id`, with an entropy (nats) and whether the code opens a patch. The
    /// baseline gives the entropy of the conditional distribution the code was drawn from, and
    /// every code is a patch of its own; DPAR gives the entropy model's H_k, which decided the
    /// patch (∞ for z_0).
    Code { id: u64, k: usize, code: u32, entropy: f32, opens: bool },
    /// Stream `id` drew its last code and left the batch: its codes and patch lengths.
    Done { id: u64, codes: Vec<u32>, lengths: Vec<usize> },
}

struct Stream {
    id: u64,
    label: u32,
    config: SamplingConfig,
    /// Cache rows: the conditional one, and the null-class one when guided.
    rows: (usize, Option<usize>),
    /// Positions fed so far (0: nothing; 1: the class slot; 1 + k: codes up to z_{k−1}).
    fed: usize,
    codes: Vec<u32>,
    u: Vec<f64>,
}

/// The running decode loop of a class-conditional GPT on the CPU (fused or bf16 kernels): up
/// to `capacity` rows at once.
pub struct GptStreams {
    dim: usize,
    vocab: usize,
    len: usize,
    null: u32,
    num_classes: usize,
    /// The weights (embeddings, RoPE tables, norm and head; its blocks are `stack`'s).
    template: LeanDecoder,
    stack: LeanStack,
    free: Vec<usize>,
    streams: Vec<Stream>,
    kv: KvPrecision,
    // Scratch of a step.
    rows: Vec<usize>,
    x: Vec<f32>,
    xn: Vec<f32>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    logits: Vec<f32>,
}

impl GptStreams {
    /// A loop for `model` with room for `capacity` rows (a guided stream takes 2) and KV caches
    /// of precision `kv` (every stream uses it: a stream's `kv_cache` setting must match).
    pub fn new(model: &Gpt, capacity: usize, kv: KvPrecision) -> Result<Self> {
        let c = model.config();
        if c.ops == crate::nn::Ops::Stock || c.cls_token_num != 1 {
            return Err(SampleError::BadConfig(
                "continuous batching needs a class-conditional model with fused or bf16 kernels".into(),
            ));
        }
        if capacity == 0 {
            return Err(SampleError::BadConfig("continuous batching needs room for at least one row".into()));
        }
        let template = LeanDecoder::with_cache(model, 0, kv)?;
        if template.embeddings().1.is_none() {
            return Err(GptError::BadInput("this model has no class slot".into()).into());
        }
        Ok(Self {
            dim: c.dim,
            vocab: c.vocab_size,
            len: c.seq_len(),
            null: c.num_classes as u32,
            num_classes: c.num_classes,
            stack: template.stack().sharing(capacity, c.input_len(), kv),
            template,
            free: (0..capacity).rev().collect(),
            streams: Vec::new(),
            kv,
            rows: Vec::with_capacity(capacity),
            x: Vec::with_capacity(capacity * c.dim),
            xn: Vec::with_capacity(capacity * c.dim),
            rope_cos: Vec::new(),
            rope_sin: Vec::new(),
            logits: Vec::with_capacity(capacity * c.vocab_size),
        })
    }

    /// Streams in the loop.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Free rows (a guided stream needs 2).
    pub fn free_rows(&self) -> usize {
        self.free.len()
    }

    /// Adds stream `id` (class `label`, its own settings and seed); it takes its first step with
    /// the next [`Self::step`]. An error when there is no room or a setting is out of range.
    pub fn join(&mut self, id: u64, label: u32, config: &SamplingConfig) -> Result<()> {
        config.validate()?;
        if label as usize >= self.num_classes {
            return Err(SampleError::BadConfig(format!(
                "unknown class {label}: the model has {} classes",
                self.num_classes
            )));
        }
        if config.kv_cache != self.kv {
            return Err(SampleError::BadConfig(format!(
                "this loop keeps {} KV caches; the stream asks for {}",
                self.kv.name(),
                config.kv_cache.name()
            )));
        }
        if self.streams.iter().any(|s| s.id == id) {
            return Err(SampleError::BadConfig(format!("stream {id} is already running")));
        }
        let guided = config.uses_guidance();
        let need = if guided { 2 } else { 1 };
        if self.free.len() < need {
            return Err(SampleError::BadConfig(format!(
                "no room: {} free rows, the stream needs {need}",
                self.free.len()
            )));
        }
        let cond = self.free.pop().expect("a free row");
        let uncond = guided.then(|| self.free.pop().expect("a second free row"));
        for r in std::iter::once(cond).chain(uncond) {
            self.stack.clear_row(r);
        }
        self.streams.push(Stream {
            id,
            label,
            config: config.clone(),
            rows: (cond, uncond),
            fed: 0,
            codes: Vec::with_capacity(self.len),
            u: uniforms(config, 1, self.len),
        });
        Ok(())
    }

    /// Removes stream `id` (a closed page); its rows are free for the next stream. Whether it
    /// was running.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.streams.iter().position(|s| s.id == id) {
            Some(i) => {
                let s = self.streams.remove(i);
                self.release(&s);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, s: &Stream) {
        self.free.push(s.rows.0);
        if let Some(r) = s.rows.1 {
            self.free.push(r);
        }
    }

    /// One decode step of every stream: each draws its next code. `on` hears every code and
    /// every finished stream (returning `false` from a `Code` event cancels that stream).
    pub fn step(&mut self, mut on: impl FnMut(StreamEvent) -> bool) -> Result<()> {
        if self.streams.is_empty() {
            return Ok(());
        }
        let (d, v) = (self.dim, self.vocab);
        let (tok, cls) = self.template.embeddings();
        let cls = cls.expect("checked in new");
        let (cos, sin, half) = self.template.rope();
        self.rows.clear();
        self.x.clear();
        self.rope_cos.clear();
        self.rope_sin.clear();
        for s in &self.streams {
            let pos = s.fed;
            for (row, y) in std::iter::once((s.rows.0, s.label)).chain(s.rows.1.map(|r| (r, self.null))) {
                self.rows.push(row);
                if pos == 0 {
                    let y = y as usize;
                    self.x.extend_from_slice(&cls[y * d..(y + 1) * d]);
                } else {
                    let z = s.codes[pos - 1] as usize;
                    self.x.extend_from_slice(&tok[z * d..(z + 1) * d]);
                }
                self.rope_cos.extend_from_slice(&cos[pos * half..(pos + 1) * half]);
                self.rope_sin.extend_from_slice(&sin[pos * half..(pos + 1) * half]);
            }
        }
        let r = self.rows.len();
        self.stack.step(&mut self.x, &self.rows, &self.rope_cos, &self.rope_sin, None).map_err(GptError::from)?;
        let (norm, output) = self.template.head();
        self.xn.resize(r * d, 0.0);
        norm.run(&self.x, &mut self.xn);
        self.logits.resize(r * v, 0.0);
        output.run(&self.xn, r, &mut self.logits);
        // Draws, in the order of the rows above.
        let mut at = 0;
        let mut finished = Vec::new();
        let mut dropped = Vec::new();
        for (i, s) in self.streams.iter_mut().enumerate() {
            let cond = &self.logits[at * v..(at + 1) * v];
            let uncond = s.rows.1.map(|_| &self.logits[(at + 1) * v..(at + 2) * v]);
            at += if s.rows.1.is_some() { 2 } else { 1 };
            let k = s.codes.len();
            let code = draw(&process_logits(cond, uncond, &s.config), s.u[k]);
            s.codes.push(code);
            s.fed += 1;
            let entropy = crate::gpt::entropy_rows(cond, v)[0];
            if !on(StreamEvent::Code { id: s.id, k, code, entropy, opens: true }) {
                dropped.push(i);
            } else if s.codes.len() == self.len {
                finished.push(i);
            }
        }
        let mut gone: Vec<usize> = finished.iter().chain(&dropped).copied().collect();
        gone.sort_unstable();
        for &i in gone.iter().rev() {
            let s = self.streams.remove(i);
            self.release(&s);
            if finished.contains(&i) {
                let lengths = vec![1; s.codes.len()];
                on(StreamEvent::Done { id: s.id, codes: s.codes, lengths });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::tests::model as tiny;
    use candle_core::Device;

    fn model() -> (Gpt, crate::params::ParamStore) {
        tiny(8)
    }

    /// Streams that join at different steps, with different classes, settings and seeds, get
    /// exactly the codes of solo generations; a stream cancelled midway does not disturb the
    /// others, and its rows serve a later stream. f32 and bf16 caches.
    #[test]
    fn joining_streams_get_the_codes_they_get_alone() {
        let (m, _s) = model();
        for kv in [KvPrecision::F32, KvPrecision::Bf16] {
            let settings = [
                (1u32, SamplingConfig { cfg_scale: 2.0, seed: 5, kv_cache: kv, ..Default::default() }),
                (0, SamplingConfig { cfg_scale: 1.0, temperature: 0.8, seed: 9, kv_cache: kv, ..Default::default() }),
                (2, SamplingConfig { cfg_scale: 1.5, top_k: 4, seed: 2, kv_cache: kv, ..Default::default() }),
                (1, SamplingConfig { cfg_scale: 3.0, top_p: 0.8, seed: 77, kv_cache: kv, ..Default::default() }),
            ];
            let alone: Vec<Vec<u32>> = settings
                .iter()
                .map(|(y, c)| crate::sample::generate_gpt(&m, &[*y], c, &Device::Cpu).unwrap().remove(0))
                .collect();
            let mut loop_ = GptStreams::new(&m, 5, kv).unwrap();
            let mut done: Vec<Option<Vec<u32>>> = vec![None; 4];
            let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 4];
            // Stream 0 starts; 1 joins at step 2; 2 joins at step 4 and is cancelled after 3
            // codes; 3 joins once its rows are free.
            for step in 0..40 {
                if step == 0 {
                    loop_.join(0, settings[0].0, &settings[0].1).unwrap();
                }
                if step == 2 {
                    loop_.join(1, settings[1].0, &settings[1].1).unwrap();
                }
                if step == 4 {
                    loop_.join(2, settings[2].0, &settings[2].1).unwrap();
                    assert!(loop_.join(3, settings[3].0, &settings[3].1).is_err(), "no room yet");
                }
                if step > 4 && done[3].is_none() && seen[3].is_empty() && loop_.free_rows() >= 2 {
                    loop_.join(3, settings[3].0, &settings[3].1).unwrap();
                }
                loop_
                    .step(|e| match e {
                        StreamEvent::Code { id, code, .. } => {
                            seen[id as usize].push(code);
                            !(id == 2 && seen[2].len() == 3)
                        }
                        StreamEvent::Done { id, codes, .. } => {
                            done[id as usize] = Some(codes);
                            true
                        }
                    })
                    .unwrap();
            }
            assert!(loop_.is_empty());
            for i in [0, 1, 3] {
                assert_eq!(done[i].as_ref(), Some(&alone[i]), "{kv:?} stream {i}");
                assert_eq!(seen[i], alone[i]);
            }
            assert_eq!(done[2], None);
            assert_eq!(seen[2], alone[2][..3], "the cancelled stream's codes so far are its own");
        }
    }

    #[test]
    fn bad_streams_are_refused_with_the_reason() {
        let (m, _s) = model();
        let mut l = GptStreams::new(&m, 2, KvPrecision::F32).unwrap();
        let c = SamplingConfig::default();
        assert!(l.join(0, 7, &c).unwrap_err().to_string().contains("unknown class 7"));
        let bf = SamplingConfig { kv_cache: KvPrecision::Bf16, ..c.clone() };
        assert!(l.join(0, 1, &bf).unwrap_err().to_string().contains("bf16"));
        l.join(0, 1, &c).unwrap();
        assert!(l.join(0, 1, &c).unwrap_err().to_string().contains("already running"));
        assert!(l.join(1, 1, &c).unwrap_err().to_string().contains("no room"));
        assert!(l.cancel(0) && !l.cancel(0));
        assert_eq!(l.free_rows(), 2);
    }
}
