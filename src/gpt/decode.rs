//! A lean cached decode step for the GPT on the CPU (issue 14): the weights are copied out of
//! the tensors once per generation, every buffer (activations, KV caches) is allocated once, and
//! a step runs RMSNorm + qkv, RoPE, attention over the cache, output + residual, RMSNorm +
//! [w1; w3], SwiGLU + w2 + residual and the head on plain slices: no tensor graph, no allocation
//! per step. The arithmetic is the fused path's, operation by operation (the same GEMM, the same
//! order of every sum), so it draws exactly the codes of [`crate::sample::generate_gpt`].

use crate::kernels::matmul::Gemm;
use crate::kernels::math;

use super::{Gpt, GptError, Result};

struct LayerWeights {
    attn_norm: Vec<f32>,
    wqkv: Vec<f32>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// `[w1; w3]` (2F, D).
    w13: Vec<f32>,
    w2: Vec<f32>,
}

/// The decoding state of `batch` sequences: weights, KV caches and scratch buffers.
pub struct LeanDecoder {
    dim: usize,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    vocab: usize,
    max_len: usize,
    batch: usize,
    eps: (f32, f32, f32),
    gemm: Gemm,
    layers: Vec<LayerWeights>,
    norm: Vec<f32>,
    output: Vec<f32>,
    tok_embeddings: Vec<f32>,
    cls_embedding: Option<Vec<f32>>,
    num_classes: usize,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    rope_half: usize,
    /// Per layer, `(batch, heads, max_len, head_dim)`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pos: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    h13: Vec<f32>,
    act: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

fn host(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// xn = x·r·g per row, r = 1/√(mean(x²) + ε): the arithmetic of the fused RMSNorm.
fn rms_norm_rows(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    for (o, xr) in out.chunks_mut(d).zip(x.chunks(d)) {
        let r = 1.0 / (math::dot(xr, xr) / d as f32 + eps).sqrt();
        for j in 0..d {
            o[j] = xr[j] * r * g[j];
        }
    }
}

impl LeanDecoder {
    /// Copies `model`'s weights for decoding `batch` sequences: a class-conditional model
    /// starts with [`Self::start`], an unconditional one (the entropy model) with
    /// [`Self::step`] on z_0.
    pub fn new(model: &Gpt, batch: usize) -> Result<Self> {
        let c = model.config();
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let mut w13 = host(&l.feed_forward.w1.weight)?;
            w13.extend(host(&l.feed_forward.w3.weight)?);
            layers.push(LayerWeights {
                attn_norm: host(&l.attention_norm.weight)?,
                wqkv: host(&l.attention.wqkv.weight)?,
                wo: host(&l.attention.wo.weight)?,
                ffn_norm: host(&l.ffn_norm.weight)?,
                w13,
                w2: host(&l.feed_forward.w2.weight)?,
            });
        }
        let (dim, heads) = (c.dim, c.n_head);
        let head_dim = dim / heads;
        let hidden = model.layers.first().map(|l| l.feed_forward.w2.weight.dims()[1]).unwrap_or(0);
        let max_len = c.input_len();
        let eps = |n: &crate::nn::RmsNorm| n.eps as f32;
        let first = model.layers.first().ok_or_else(|| GptError::BadInput("a model without layers".into()))?;
        Ok(Self {
            dim,
            heads,
            head_dim,
            hidden,
            vocab: c.vocab_size,
            max_len,
            batch,
            eps: (eps(&first.attention_norm), eps(&first.ffn_norm), eps(&model.norm)),
            gemm: c.ops.gemm(),
            layers,
            norm: host(&model.norm.weight)?,
            output: host(&model.output.weight)?,
            tok_embeddings: host(&model.tok_embeddings)?,
            cls_embedding: model.cls_embedding.as_ref().map(host).transpose()?,
            num_classes: c.num_classes,
            rope_cos: model.rope.cos.to_vec(),
            rope_sin: model.rope.sin.to_vec(),
            rope_half: model.rope.half,
            k: (0..c.n_layer).map(|_| vec![0f32; batch * heads * max_len * head_dim]).collect(),
            v: (0..c.n_layer).map(|_| vec![0f32; batch * heads * max_len * head_dim]).collect(),
            pos: 0,
            x: vec![0f32; batch * dim],
            xn: vec![0f32; batch * dim],
            qkv: vec![0f32; batch * 3 * dim],
            att: vec![0f32; batch * dim],
            h13: vec![0f32; batch * 2 * hidden],
            act: vec![0f32; batch * hidden],
            scores: vec![0f32; max_len],
            logits: vec![0f32; batch * c.vocab_size],
        })
    }

    /// Feeds the class slot (`labels`, once, first) and returns the logits (batch × V) of z_0.
    pub fn start(&mut self, labels: &[u32]) -> Result<&[f32]> {
        let table = self.cls_embedding.as_ref().ok_or_else(|| GptError::BadInput("this model has no class slot".into()))?;
        if self.pos != 0 || labels.len() != self.batch {
            return Err(GptError::BadInput(format!("start takes {} labels on an empty decoder", self.batch)));
        }
        let d = self.dim;
        for (i, &y) in labels.iter().enumerate() {
            let y = y as usize;
            if y > self.num_classes {
                return Err(GptError::BadInput(format!("unknown class {y}: the model has {} classes (index {} is the null class)", self.num_classes, self.num_classes)));
            }
            self.x[i * d..(i + 1) * d].copy_from_slice(&table[y * d..(y + 1) * d]);
        }
        self.forward()
    }

    /// Feeds one code per sequence and returns the logits (batch × V) of the next code.
    pub fn step(&mut self, codes: &[u32]) -> Result<&[f32]> {
        let needs_start = self.cls_embedding.is_some() && self.pos == 0;
        if needs_start || codes.len() != self.batch {
            return Err(GptError::BadInput(format!("step takes {} codes (after start, for a class-conditional model)", self.batch)));
        }
        if self.pos >= self.max_len {
            return Err(GptError::BadInput(format!("the sequence is full ({} positions)", self.pos)));
        }
        let d = self.dim;
        for (i, &z) in codes.iter().enumerate() {
            let z = z as usize;
            if z >= self.vocab {
                return Err(GptError::BadInput(format!("code {z} is outside the vocabulary of {}", self.vocab)));
            }
            self.x[i * d..(i + 1) * d].copy_from_slice(&self.tok_embeddings[z * d..(z + 1) * d]);
        }
        self.forward()
    }

    fn forward(&mut self) -> Result<&[f32]> {
        let (b, d, hd, heads, f) = (self.batch, self.dim, self.head_dim, self.heads, self.hidden);
        let pos = self.pos;
        let half = self.rope_half;
        let (cos, sin) = (&self.rope_cos[pos * half..(pos + 1) * half], &self.rope_sin[pos * half..(pos + 1) * half]);
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, w) in self.layers.iter().enumerate() {
            // RMSNorm + qkv.
            rms_norm_rows(&self.x, &w.attn_norm, self.eps.0, &mut self.xn);
            self.gemm.run(&mut self.qkv, b, 3 * d, d, &self.xn, false, &w.wqkv, true, false);
            // RoPE on q and k, in place.
            for row in self.qkv.chunks_mut(3 * d) {
                for head in row[..2 * d].chunks_mut(2 * half) {
                    for i in 0..half {
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        let (c, s) = (cos[i], sin[i]);
                        head[2 * i] = x0 * c - x1 * s;
                        head[2 * i + 1] = x1 * c + x0 * s;
                    }
                }
            }
            // Append k, v; attend over the cache.
            let (kc, vc) = (&mut self.k[li], &mut self.v[li]);
            let at = |row: usize, head: usize, p: usize| ((row * heads + head) * self.max_len + p) * hd;
            for i in 0..b {
                for h in 0..heads {
                    let dst = at(i, h, pos);
                    kc[dst..dst + hd].copy_from_slice(&self.qkv[i * 3 * d + d + h * hd..i * 3 * d + d + (h + 1) * hd]);
                    vc[dst..dst + hd].copy_from_slice(&self.qkv[i * 3 * d + 2 * d + h * hd..i * 3 * d + 2 * d + (h + 1) * hd]);
                }
            }
            let len = pos + 1;
            self.att.fill(0.0);
            for i in 0..b {
                for h in 0..heads {
                    let q = &self.qkv[i * 3 * d + h * hd..i * 3 * d + (h + 1) * hd];
                    let base = at(i, h, 0);
                    let scores = &mut self.scores[..len];
                    for (t, sc) in scores.iter_mut().enumerate() {
                        *sc = scale * math::dot(q, &kc[base + t * hd..base + (t + 1) * hd]);
                    }
                    let m = math::max(scores);
                    for sc in scores.iter_mut() {
                        *sc = math::exp(*sc - m);
                    }
                    let inv = 1.0 / math::sum(scores);
                    let o = &mut self.att[i * d + h * hd..i * d + (h + 1) * hd];
                    for (t, &wt) in scores.iter().enumerate() {
                        let wt = wt * inv;
                        for (x, y) in o.iter_mut().zip(&vc[base + t * hd..base + (t + 1) * hd]) {
                            *x += wt * y;
                        }
                    }
                }
            }
            // Output projection + residual (into xn, then x = xn + x).
            self.gemm.run(&mut self.xn, b, d, d, &self.att, false, &w.wo, true, false);
            for (a, r) in self.xn.iter_mut().zip(&self.x) {
                *a += r;
            }
            std::mem::swap(&mut self.x, &mut self.xn);
            // RMSNorm + [w1; w3], SwiGLU, w2 + residual.
            rms_norm_rows(&self.x, &w.ffn_norm, self.eps.1, &mut self.xn);
            self.gemm.run(&mut self.h13, b, 2 * f, d, &self.xn, false, &w.w13, true, false);
            for (o, hr) in self.act.chunks_mut(f).zip(self.h13.chunks(2 * f)) {
                let (a, g) = hr.split_at(f);
                for j in 0..f {
                    o[j] = a[j] * math::sigmoid(a[j]) * g[j];
                }
            }
            self.gemm.run(&mut self.xn, b, d, f, &self.act, false, &w.w2, true, false);
            for (a, r) in self.xn.iter_mut().zip(&self.x) {
                *a += r;
            }
            std::mem::swap(&mut self.x, &mut self.xn);
        }
        rms_norm_rows(&self.x, &self.norm, self.eps.2, &mut self.xn);
        self.gemm.run(&mut self.logits, b, self.vocab, d, &self.xn, false, &self.output, true, false);
        self.pos += 1;
        Ok(&self.logits)
    }
}
