//! A lean cached decode step for the GPT on the CPU: the blocks run as a
//! [`LeanStack`] (weights copied out of the tensors once per generation, caches and buffers
//! allocated once, no tensor graph per step), followed by the final norm and the head. The
//! arithmetic is the fused path's, operation by operation, so it draws exactly the codes of the
//! tensor path ([`crate::sample::generate_gpt_cached`]).

use crate::nn::lean::{host, LeanLinear, LeanNorm, LeanStack};

use super::{Gpt, GptError, Result};

/// The weights of a [`LeanDecoder`] outside its blocks, shared by decoders made with
/// [`LeanDecoder::sharing`].
struct Head {
    norm: LeanNorm,
    output: LeanLinear,
    tok_embeddings: Vec<f32>,
    cls_embedding: Option<Vec<f32>>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

/// The decoding state of `batch` sequences: weights, KV caches and scratch buffers.
pub struct LeanDecoder {
    dim: usize,
    vocab: usize,
    max_len: usize,
    batch: usize,
    num_classes: usize,
    rope_half: usize,
    stack: LeanStack,
    head: std::sync::Arc<Head>,
    rows: Vec<usize>,
    pos: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    logits: Vec<f32>,
}

impl LeanDecoder {
    /// Copies `model`'s weights for decoding `batch` sequences: a class-conditional model
    /// starts with [`Self::start`], an unconditional one (the entropy model) with
    /// [`Self::step`] on z_0.
    pub fn new(model: &Gpt, batch: usize) -> Result<Self> {
        Self::with_cache(model, batch, crate::nn::KvPrecision::F32)
    }

    /// [`Self::new`] with KV caches of the given precision.
    pub fn with_cache(model: &Gpt, batch: usize, kv: crate::nn::KvPrecision) -> Result<Self> {
        Self::with_gemm(model, batch, kv, model.config().ops.gemm())
    }

    /// An entropy model's decoder for cutting patches at sampling time: f32 GEMMs whatever
    /// kernels its config asks for. A bf16 GEMM rounds differently with and without
    /// AVX512-BF16, which would move entropies near θ and make patches depend on the CPU
    /// (design §4).
    pub fn for_patching(model: &Gpt, batch: usize, kv: crate::nn::KvPrecision) -> Result<Self> {
        Self::with_gemm(model, batch, kv, crate::kernels::matmul::Gemm::F32)
    }

    fn with_gemm(
        model: &Gpt,
        batch: usize,
        kv: crate::nn::KvPrecision,
        gemm: crate::kernels::matmul::Gemm,
    ) -> Result<Self> {
        let c = model.config();
        if model.layers.is_empty() {
            return Err(GptError::BadInput("a model without layers".into()));
        }
        let max_len = c.input_len();
        let head = Head {
            norm: LeanNorm::from(&model.norm)?,
            output: LeanLinear::from(&model.output, gemm)?,
            tok_embeddings: host(&model.tok_embeddings)?,
            cls_embedding: model.cls_embedding.as_ref().map(host).transpose()?,
            rope_cos: model.rope.cos.to_vec(),
            rope_sin: model.rope.sin.to_vec(),
        };
        Ok(Self {
            dim: c.dim,
            vocab: c.vocab_size,
            max_len,
            batch,
            num_classes: c.num_classes,
            rope_half: model.rope.half,
            stack: LeanStack::with_cache(&model.layers, c.dim, c.n_head, gemm, batch, max_len, kv)?,
            head: std::sync::Arc::new(head),
            rows: (0..batch).collect(),
            pos: 0,
            x: vec![0f32; batch * c.dim],
            xn: vec![0f32; batch * c.dim],
            logits: vec![0f32; batch * c.vocab_size],
        })
    }

    /// The blocks (and their weights, shared with [`LeanStack::sharing`]).
    pub(crate) fn stack(&self) -> &LeanStack {
        &self.stack
    }

    /// The final norm and the head.
    pub(crate) fn head(&self) -> (&LeanNorm, &LeanLinear) {
        (&self.head.norm, &self.head.output)
    }

    /// The token embeddings (V × D) and the class table ((classes + 1) × D), when the model has
    /// a class slot.
    pub(crate) fn embeddings(&self) -> (&[f32], Option<&[f32]>) {
        (&self.head.tok_embeddings, self.head.cls_embedding.as_deref())
    }

    /// The RoPE tables (position × d/2) and d/2.
    pub(crate) fn rope(&self) -> (&[f32], &[f32], usize) {
        (&self.head.rope_cos, &self.head.rope_sin, self.rope_half)
    }

    /// The vocabulary size (logits per row).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// A fresh decoder of `batch` sequences with this one's weights (shared, not copied).
    pub fn sharing(&self, batch: usize, kv: crate::nn::KvPrecision) -> Self {
        Self {
            batch,
            stack: self.stack.sharing(batch, self.max_len, kv),
            head: self.head.clone(),
            rows: (0..batch).collect(),
            pos: 0,
            x: vec![0f32; batch * self.dim],
            xn: vec![0f32; batch * self.dim],
            logits: vec![0f32; batch * self.vocab],
            ..*self
        }
    }

    /// Feeds the class slot (`labels`, once, first) and returns the logits (batch × V) of z_0.
    pub fn start(&mut self, labels: &[u32]) -> Result<&[f32]> {
        let table = self
            .head
            .cls_embedding
            .as_ref()
            .ok_or_else(|| GptError::BadInput("this model has no class slot".into()))?;
        if self.pos != 0 || labels.len() != self.batch {
            return Err(GptError::BadInput(format!("start takes {} labels on an empty decoder", self.batch)));
        }
        let d = self.dim;
        for (i, &y) in labels.iter().enumerate() {
            let y = y as usize;
            if y > self.num_classes {
                return Err(GptError::BadInput(format!(
                    "unknown class {y}: the model has {} classes (index {} is the null class)",
                    self.num_classes, self.num_classes
                )));
            }
            self.x[i * d..(i + 1) * d].copy_from_slice(&table[y * d..(y + 1) * d]);
        }
        self.forward()
    }

    /// Feeds one code per sequence and returns the logits (batch × V) of the next code.
    pub fn step(&mut self, codes: &[u32]) -> Result<&[f32]> {
        let needs_start = self.head.cls_embedding.is_some() && self.pos == 0;
        if needs_start || codes.len() != self.batch {
            return Err(GptError::BadInput(format!(
                "step takes {} codes (after start, for a class-conditional model)",
                self.batch
            )));
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
            self.x[i * d..(i + 1) * d].copy_from_slice(&self.head.tok_embeddings[z * d..(z + 1) * d]);
        }
        self.forward()
    }

    fn forward(&mut self) -> Result<&[f32]> {
        let (pos, half) = (self.pos, self.rope_half);
        let (cos, sin) =
            (&self.head.rope_cos[pos * half..(pos + 1) * half], &self.head.rope_sin[pos * half..(pos + 1) * half]);
        self.stack.step(&mut self.x, &self.rows, cos, sin, None)?;
        self.head.norm.run(&self.x, &mut self.xn);
        self.head.output.run(&self.xn, self.batch, &mut self.logits);
        self.pos += 1;
        Ok(&self.logits)
    }
}
