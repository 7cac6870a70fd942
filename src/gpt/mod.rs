//! LlamaGen's GPT (design §3): the class-conditional baseline (`cls_token_num` 1) and its
//! unconditional variant (`cls_token_num` 0), which is DPAR's entropy model (design §4).
//!
//! Input sequence: `[class_emb, e(z_0), …, e(z_{L−2})]`; position p predicts z_p. Without the
//! class slot: `[e(z_0), …, e(z_{L−2})]`, position k−1 predicts z_k. Parameter names equal
//! LlamaGen's c2i checkpoint keys, so released `.pt`/safetensors weights load by name.
//!
//! # Shapes
//! B batch, L codes per image, T sequence length (L or L−1), D width, V codebook size.

pub mod decode;
pub mod train;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use crate::nn::rope::{self, RopeRows};
use crate::nn::{
    self, AttnMask, Block, BlockCache, DropoutCtx, Linear, RaggedKvCache, RmsNorm, TransformerConfig, INIT_STD,
};
use crate::params::{Init, ParamStore, Pb};

/// Errors of the GPT model.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// The configuration is impossible.
    #[error("GPT config: {0}")]
    BadConfig(String),
    /// Inputs that do not fit the model (wrong length, unknown class, code out of range).
    #[error("GPT input: {0}")]
    BadInput(String),
    /// A weight file that cannot be used.
    #[error("{path}: {reason}")]
    BadFile { path: std::path::PathBuf, reason: String },
    #[error(transparent)]
    Nn(#[from] nn::NnError),
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, GptError>;

/// The GPT architecture and its regularisation (LlamaGen's `ModelArgs`): the shared
/// [`TransformerConfig`] (reached through `Deref`: `config.dim`) plus depth and the class slot.
/// The file format is flat, as before: the shared fields sit beside `n_layer`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GptConfig {
    #[serde(flatten)]
    pub core: TransformerConfig,
    pub n_layer: usize,
    /// 1: class-conditional; 0: unconditional (the entropy model).
    pub cls_token_num: usize,
}

crate::nn::config::embeds_transformer_config!(GptConfig);

impl GptConfig {
    fn llamagen(dim: usize, n_layer: usize, n_head: usize) -> Self {
        Self { core: TransformerConfig::llamagen(dim, n_head), n_layer, cls_token_num: 1 }
    }

    /// LlamaGen GPT-B: 12 layers, 12 heads, width 768 (111M parameters).
    pub fn gpt_b() -> Self {
        Self::llamagen(768, 12, 12)
    }
    /// LlamaGen GPT-L: 24 layers, 16 heads, width 1024 (343M).
    pub fn gpt_l() -> Self {
        Self::llamagen(1024, 24, 16)
    }
    /// LlamaGen GPT-XL: 36 layers, 20 heads, width 1280 (775M).
    pub fn gpt_xl() -> Self {
        Self::llamagen(1280, 36, 20)
    }
    /// LlamaGen GPT-XXL: 48 layers, 24 heads, width 1536 (1.4B).
    pub fn gpt_xxl() -> Self {
        Self::llamagen(1536, 48, 24)
    }

    /// Our MNIST baseline: 6 layers, width 128, 4 heads (head dim 32; 1.7M parameters) over the
    /// 16×16 = 256 codes of the `mnist` tokenizer (512 codes, 10 classes). The shape is the
    /// compute sweep's choice for a few CPU-hours of training (`scripts/sweep-mnist`, README
    /// "Choosing the configuration"). No dropout: at a few epochs the models underfit, and the
    /// sweep measured dropout 0.1 as a cost. Class dropout 0.1 stays, for guidance.
    pub fn mnist() -> Self {
        Self::llamagen(128, 6, 4).with(|c| {
            (c.vocab_size, c.num_classes) = (512, 10);
            (c.token_dropout, c.resid_dropout, c.ffn_dropout) = (0.0, 0.0, 0.0);
        })
    }

    /// Our MNIST entropy model: unconditional, 4 layers, width 128, 2 heads. The paper uses a
    /// GPT-B-sized entropy model; a small one suffices to rank code entropies on digits.
    pub fn mnist_entropy() -> Self {
        Self::llamagen(128, 4, 2).with(|c| {
            (c.cls_token_num, c.class_dropout) = (0, 0.0);
            (c.vocab_size, c.num_classes) = (512, 10);
        })
    }

    /// The speed bench model: 4 layers, width 256, 4 heads, SwiGLU 688, vocab 1024, and — like
    /// the PyTorch reference `bench/torch_bench_model.py` — no dropout, so both do the
    /// same work.
    pub fn bench() -> Self {
        Self::llamagen(256, 4, 4).with(|c| {
            (c.ffn_hidden, c.vocab_size, c.num_classes) = (Some(688), 1024, 10);
            (c.token_dropout, c.resid_dropout, c.ffn_dropout, c.class_dropout) = (0.0, 0.0, 0.0, 0.0);
        })
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "gpt-b" | "b" => Self::gpt_b(),
            "gpt-l" | "l" => Self::gpt_l(),
            "gpt-xl" | "xl" => Self::gpt_xl(),
            "gpt-xxl" | "xxl" => Self::gpt_xxl(),
            "mnist" => Self::mnist(),
            "mnist-entropy" => Self::mnist_entropy(),
            "bench" => Self::bench(),
            other => {
                return Err(GptError::BadConfig(format!(
                    "unknown GPT preset `{other}` (known: gpt-b, gpt-l, gpt-xl, gpt-xxl, mnist, mnist-entropy, bench)"
                )))
            }
        })
    }

    /// Length of the training input sequence.
    pub fn input_len(&self) -> usize {
        self.seq_len() - 1 + self.cls_token_num
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(GptError::BadConfig(m));
        if self.n_layer == 0 {
            return bad("a GPT needs at least one layer".into());
        }
        self.core.validate(4, "2D RoPE").map_err(GptError::BadConfig)?;
        if self.cls_token_num > 1 {
            return bad(format!("cls_token_num must be 0 or 1, got {}", self.cls_token_num));
        }
        if self.cls_token_num == 1 && self.num_classes == 0 {
            return bad("a class-conditional model needs num_classes > 0".into());
        }
        // Weights in f32, counted in f64 so that an absurd config cannot overflow.
        let (d, v) = (self.dim as f64, self.vocab_size as f64);
        let ffn = self.ffn_hidden.map_or(4.0 * self.dim as f64, |h| h as f64);
        let params =
            self.n_layer as f64 * (4.0 * d * d + 3.0 * d * ffn) + 2.0 * v * d + (self.num_classes as f64 + 1.0) * d;
        crate::util::check_memory(
            &format!(
                "a GPT of {} layers, width {}, vocabulary {}, {} classes ({params:.3e} parameters)",
                self.n_layer, self.dim, self.vocab_size, self.num_classes
            ),
            4.0 * params,
        )
        .map_err(GptError::BadConfig)?;
        Ok(())
    }
}

/// LlamaGen's transformer.
pub struct Gpt {
    config: GptConfig,
    /// `cls_embedding.embedding_table.weight` (num_classes + 1, D); row num_classes = null class.
    cls_embedding: Option<Tensor>,
    tok_embeddings: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    rope: RopeRows,
}

/// KV caches of every layer for incremental decoding.
pub struct GptCache {
    layers: Vec<RaggedKvCache>,
    /// `[w1; w3]` per layer, stacked once for the whole generation.
    w13: Vec<Tensor>,
    batch: usize,
}

impl GptCache {
    /// Positions consumed so far.
    pub fn len(&self) -> usize {
        self.layers.first().map(|c| c.len_of(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub use crate::batch::TrainNoise;

impl Gpt {
    pub fn new(config: &GptConfig, pb: &Pb) -> Result<Self> {
        config.validate()?;
        let config = &config.clone().with(|c| c.ops = c.precision.kernels(c.ops).resolve(pb.device()));
        let c = config;
        let cls_embedding = if c.cls_token_num == 1 {
            Some(pb.pp("cls_embedding").pp("embedding_table").get(
                (c.num_classes + 1, c.dim),
                "weight",
                Init::Normal(INIT_STD),
            )?)
        } else {
            None
        };
        let layers = (0..c.n_layer)
            .map(|i| Block::new(&pb.pp("layers").pp(i), c.dim, c.n_head, c.hidden(), c.norm_eps, c.ops))
            .collect::<nn::Result<Vec<_>>>()?;
        Ok(Self {
            config: c.clone(),
            cls_embedding,
            tok_embeddings: pb.pp("tok_embeddings").get((c.vocab_size, c.dim), "weight", Init::Normal(INIT_STD))?,
            layers,
            norm: RmsNorm::new(&pb.pp("norm"), c.dim, c.norm_eps, c.ops)?,
            // LlamaGen zero-initialises the output head.
            output: Linear::new(&pb.pp("output"), c.dim, c.vocab_size, Init::Const(0.0))?.with_ops(c.ops),
            rope: rope::table_2d(c.grid_size, c.head_dim(), c.rope_base, c.cls_token_num),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    fn check_codes(&self, codes: &Tensor, max_len: usize) -> Result<()> {
        let (_, l) = codes.dims2()?;
        if l > max_len {
            return Err(GptError::BadInput(format!("{l} codes per image, the model takes at most {max_len}")));
        }
        if l > 0 {
            let max = codes.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
            if max as usize >= self.config.vocab_size {
                return Err(GptError::BadInput(format!(
                    "code {max} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Class embeddings (B, 1, D) for labels (B); label `num_classes` is the null class.
    fn class_embeddings(&self, labels: &Tensor) -> Result<Tensor> {
        let table =
            self.cls_embedding.as_ref().ok_or_else(|| GptError::BadInput("this model has no class slot".into()))?;
        let max = labels.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max > self.config.num_classes {
            return Err(GptError::BadInput(format!(
                "unknown class {max}: the model has {} classes (index {} is the null class)",
                self.config.num_classes, self.config.num_classes
            )));
        }
        Ok(table.index_select(labels, 0)?.unsqueeze(1)?)
    }

    fn embed_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, l) = codes.dims2()?;
        Ok(self.tok_embeddings.index_select(&codes.flatten_all()?, 0)?.reshape((b, l, self.config.dim))?)
    }

    /// The input sequence for codes (B, L or fewer) and labels: `[cls, e(z_0), …]` (without the
    /// last code when all L are given) or `[e(z_0), …]` unconditionally.
    fn input_sequence(&self, codes: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let (_, l) = codes.dims2()?;
        let seq_len = self.config.seq_len();
        self.check_codes(codes, seq_len)?;
        let inputs = if l == seq_len { codes.narrow(1, 0, seq_len - 1)? } else { codes.clone() };
        let tokens = self.embed_codes(&inputs)?;
        let seq = if self.config.cls_token_num == 1 {
            let labels = labels.ok_or_else(|| GptError::BadInput("a class-conditional model needs labels".into()))?;
            Tensor::cat(&[&self.class_embeddings(labels)?, &tokens], 1)?
        } else {
            tokens
        };
        // The activations' dtype (bf16 under mixed precision), set once at the input.
        Ok(seq.to_dtype(self.config.precision.activations(self.config.ops))?)
    }

    /// Final hidden states (after the last block, before the final norm), for linear probes.
    /// # Shapes
    /// codes (B, L), labels (B) → (B, T, D)
    pub fn hidden_states(&self, codes: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.input_sequence(codes, labels)?;
        let t = h.dim(1)?;
        let rows = self.rope.narrow(0, t);
        for layer in &self.layers {
            h = layer.forward::<rand_chacha::ChaCha8Rng>(&h, Some(&rows), &AttnMask::Causal, BlockCache::None, None)?;
        }
        Ok(h)
    }

    /// Training/teacher-forced forward: logits for every position.
    /// With `noise`, applies class dropout, token dropout and residual/FFN dropout.
    /// # Shapes
    /// codes (B, L) u32, labels (B) u32 → logits (B, T, V)
    pub fn forward<R: Rng>(
        &self,
        codes: &Tensor,
        labels: Option<&Tensor>,
        noise: Option<TrainNoise<'_, R>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let mut noise = noise;
        let labels = match (labels, noise.as_mut()) {
            (Some(y), Some(n)) if c.class_dropout > 0.0 && c.cls_token_num == 1 => {
                Some(crate::batch::drop_classes(y, c.class_dropout, c.num_classes as u32, n)?)
            }
            (y, _) => y.cloned(),
        };
        let mut h = self.input_sequence(codes, labels.as_ref())?;
        let t = h.dim(1)?;
        let rows = self.rope.narrow(0, t);
        match noise {
            Some(n) => {
                h = nn::dropout(&h, c.token_dropout, n.rng)?;
                let mut ctx = DropoutCtx { rng: n.rng, resid: c.resid_dropout, ffn: c.ffn_dropout };
                for layer in &self.layers {
                    h = layer.forward(&h, Some(&rows), &AttnMask::Causal, BlockCache::None, Some(&mut ctx))?;
                }
            }
            None => {
                for layer in &self.layers {
                    h = layer.forward::<R>(&h, Some(&rows), &AttnMask::Causal, BlockCache::None, None)?;
                }
            }
        }
        Ok(self.norm.then_linear(&h, &self.output)?)
    }

    /// The training targets of codes (B, L): all L codes with a class slot, z_1 … z_{L−1} without.
    pub fn targets(&self, codes: &Tensor) -> Result<Tensor> {
        Ok(if self.config.cls_token_num == 1 {
            codes.clone()
        } else {
            codes.narrow(1, 1, self.config.seq_len() - 1)?
        })
    }

    /// Mean cross-entropy of the next-code predictions.
    pub fn loss<R: Rng>(
        &self,
        codes: &Tensor,
        labels: Option<&Tensor>,
        noise: Option<TrainNoise<'_, R>>,
    ) -> Result<Tensor> {
        let logits = self.forward(codes, labels, noise)?;
        let targets = self.targets(codes)?;
        Ok(nn::cross_entropy(&logits, &targets, self.config.ops)?)
    }

    /// An empty cache for decoding `batch` sequences up to their full length.
    pub fn new_cache(&self, batch: usize) -> Result<GptCache> {
        let c = &self.config;
        Ok(GptCache {
            layers: (0..self.layers.len())
                .map(|_| {
                    RaggedKvCache::for_ops(
                        batch,
                        c.n_head,
                        c.head_dim(),
                        c.input_len(),
                        c.ops,
                        self.tok_embeddings.device(),
                    )
                })
                .collect::<nn::Result<_>>()?,
            w13: self.layers.iter().map(|l| l.stacked_w13()).collect::<nn::Result<_>>()?,
            batch,
        })
    }

    /// One cached decoding step: feeds the class slot (when `labels` is given and the cache is
    /// empty) or one code per image, and returns the logits of the next code.
    /// # Shapes
    /// labels (B) or codes (B, 1) → logits (B, V)
    pub fn step(&self, cache: &mut GptCache, labels: Option<&Tensor>, codes: Option<&Tensor>) -> Result<Tensor> {
        let pos = cache.len();
        let h = match (labels, codes) {
            (Some(y), None) if pos == 0 && self.config.cls_token_num == 1 => self.class_embeddings(y)?,
            (None, Some(z)) => {
                self.check_codes(z, 1)?;
                self.embed_codes(z)?
            }
            _ => {
                return Err(GptError::BadInput(
                    "a step takes the class labels first (once), then one code per image".into(),
                ))
            }
        };
        if pos >= self.config.input_len() {
            return Err(GptError::BadInput(format!("the sequence is full ({pos} positions)")));
        }
        let b = h.dim(0)?;
        if b != cache.batch {
            return Err(GptError::BadInput(format!("the cache holds {} sequences, the step {b}", cache.batch)));
        }
        let rope_rows = self.rope.narrow(pos, 1);
        let rows: Vec<usize> = (0..b).collect();
        let mut h = h;
        for ((layer, layer_cache), w13) in self.layers.iter().zip(cache.layers.iter_mut()).zip(&cache.w13) {
            h = layer.forward::<rand_chacha::ChaCha8Rng>(
                &h,
                Some(&rope_rows),
                &AttnMask::Causal,
                BlockCache::Ragged { cache: layer_cache, rows: &rows, w13: Some(w13) },
                None,
            )?;
        }
        let logits = self.norm.then_linear(&h, &self.output)?; // (B, 1, V)
        Ok(logits.squeeze(1)?)
    }

    /// Per-code next-code entropies H_k (natural log) of codes (B, L), k = 1 … L−1, for the
    /// unconditional model (design §4). Returns (B, L−1): entry k−1 holds H_k.
    pub fn entropies(&self, codes: &Tensor) -> Result<Tensor> {
        if self.config.cls_token_num != 0 {
            return Err(GptError::BadInput("entropies come from the unconditional model (cls_token_num 0)".into()));
        }
        let logits = self.forward::<rand_chacha::ChaCha8Rng>(codes, None, None)?; // (B, L−1, V)
        Ok(entropy_of_logits(&logits)?)
    }
}

/// −Σ p log p over the last dim, computed stably from logits.
/// The next-code entropy (nats) of each row of host logits (rows of `v` values, back to back),
/// computed in f64: H = ln Σ e^{x−m} − Σ e^{x−m}(x−m) / Σ e^{x−m}. Generation decides patches
/// with this one function on every path, so all of them agree to the bit.
pub fn entropy_rows(logits: &[f32], v: usize) -> Vec<f32> {
    logits
        .chunks(v)
        .map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let (mut s, mut t) = (0f64, 0f64);
            for &x in row {
                let d = x as f64 - m;
                let e = d.exp();
                if e > 0.0 {
                    s += e;
                    t += e * d;
                }
            }
            (s.ln() - t / s) as f32
        })
        .collect()
}

pub fn entropy_of_logits(logits: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()
}

/// Loads a GPT from a run folder or weight file. Files written by `dpar train` carry their
/// config; LlamaGen's released c2i checkpoints need `preset` (e.g. `gpt-b`).
pub fn load(path: &std::path::Path, preset: Option<&str>, device: &Device) -> Result<(Gpt, ParamStore)> {
    if !path.exists() {
        return Err(GptError::BadFile {
            path: path.to_path_buf(),
            reason: "no such model file or run folder (train one with `dpar train`)".into(),
        });
    }
    let file = crate::tensor_io::weight_file(path)?;
    let config = match preset {
        Some(p) => GptConfig::preset(p)?,
        None => {
            let Some((full, source)) = crate::tensor_io::embedded_config(&file)? else {
                return Err(GptError::BadFile {
                    path: file,
                    reason: "no embedded config and no config.json beside it; pass --preset (e.g. gpt-b)".into(),
                });
            };
            let bad = |reason: String| GptError::BadFile { path: source.clone(), reason };
            let kind = full.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "gpt" && kind != "entropy" {
                return Err(bad(format!("holds a `{kind}` model, not a GPT")));
            }
            let full: train::GptTrainConfig = crate::util::from_json_strict(full, nn::config::TOLERATED_KEYS)
                .map_err(|e| bad(format!("config: {e}")))?;
            full.model.validate().map_err(|e| bad(format!("config: {e}")))?;
            full.model
        }
    };
    let store = ParamStore::new(0, device);
    let model = Gpt::new(&config, &store.root())?;
    store.load_model_file(&file, Some("model"))?;
    Ok((model, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny(cls: usize) -> GptConfig {
        let core = TransformerConfig {
            ffn_hidden: Some(48),
            vocab_size: 11,
            num_classes: 3,
            grid_size: 3,
            ..TransformerConfig::llamagen(32, 2)
        };
        GptConfig { core, n_layer: 2, cls_token_num: cls }
    }

    pub(crate) fn codes(b: usize, l: usize, seed: u64) -> Tensor {
        let mut rng = crate::util::rng_for(seed, "codes", 0);
        let v: Vec<u32> = (0..b * l).map(|_| rng.random_range(0..11)).collect();
        Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
    }

    #[test]
    fn llamagen_presets_have_the_released_parameter_counts() {
        // Counting from shapes is cheap; building GPT-XXL is not needed.
        let count = |c: &GptConfig| {
            let per_layer = 4 * c.dim * c.dim + 3 * c.dim * c.hidden() + 2 * c.dim;
            c.n_layer * per_layer + (c.num_classes + 1) * c.dim + 2 * c.vocab_size * c.dim + c.dim
        };
        let millions = |c: &GptConfig| count(c) as f64 / 1e6;
        assert!((millions(&GptConfig::gpt_b()) - 111.0).abs() < 2.0, "{}", millions(&GptConfig::gpt_b()));
        assert!((millions(&GptConfig::gpt_l()) - 343.0).abs() < 3.0, "{}", millions(&GptConfig::gpt_l()));
        assert!((millions(&GptConfig::gpt_xl()) - 775.0).abs() < 5.0, "{}", millions(&GptConfig::gpt_xl()));
        assert!((millions(&GptConfig::gpt_xxl()) - 1400.0).abs() < 20.0, "{}", millions(&GptConfig::gpt_xxl()));
    }

    /// The device-native path (candle's ops, forced here on the CPU) gives the fused path's
    /// loss and gradients; under mixed precision (bf16 activations, f32 masters) the loss stays
    /// within bf16 rounding and every master gets an f32 gradient along the f32 one.
    #[test]
    fn device_native_and_mixed_precision_paths_follow_the_fused_path() {
        let store = ParamStore::new(3, &Device::Cpu);
        let build = |ops: crate::nn::Ops, precision: crate::nn::Precision| {
            Gpt::new(
                &tiny(1).with(|it| {
                    it.ops = ops;
                    it.precision = precision;
                }),
                &store.root(),
            )
            .unwrap()
        };
        let fused = build(crate::nn::Ops::Fused, crate::nn::Precision::F32);
        let out = store.var("output.weight").unwrap();
        out.set(&Tensor::randn(0f32, 0.5, out.shape(), &Device::Cpu).unwrap()).unwrap();
        let stock = build(crate::nn::Ops::Stock, crate::nn::Precision::F32);
        let mixed = build(crate::nn::Ops::Stock, crate::nn::Precision::Bf16);
        let labels = Tensor::new(&[0u32, 2, 1, 3], &Device::Cpu).unwrap();
        let codes = codes(4, 9, 1);
        let run = |m: &Gpt| {
            let loss = m.loss::<rand_chacha::ChaCha8Rng>(&codes, Some(&labels), None).unwrap();
            (loss.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
        };
        let ((lf, gf), (ls, gs), (lm, gm)) = (run(&fused), run(&stock), run(&mixed));
        assert!((lf - ls).abs() < 1e-5, "loss: fused {lf}, device-native {ls}");
        assert!((lf - lm).abs() < 2e-2 * lf, "loss: f32 {lf}, bf16 {lm}");
        assert_ne!(lf, lm, "bf16 arithmetic shows in the loss");
        for (name, var) in store.vars() {
            let get = |g: &candle_core::backprop::GradStore| {
                let t = g.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
                assert_eq!(t.dtype(), DType::F32, "{name}: f32 gradient");
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (f, s, m) = (get(&gf), get(&gs), get(&gm));
            let scale = f.iter().fold(1e-6f32, |a, x| a.max(x.abs()));
            let rel = f.iter().zip(&s).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale;
            assert!(rel < 1e-3, "{name}: device-native gradient off by {rel} of its scale");
            let dot: f64 = f.iter().zip(&m).map(|(&x, &y)| x as f64 * y as f64).sum();
            let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (norm(&f) * norm(&m)).max(1e-30);
            assert!(cos > 0.95, "{name}: bf16 gradient at cosine {cos} from the f32 one");
        }
    }

    #[test]
    fn every_trainable_parameter_receives_a_finite_nonzero_gradient() {
        for cls in [1, 0] {
            let store = ParamStore::new(3, &Device::Cpu);
            let model = Gpt::new(&tiny(cls), &store.root()).unwrap();
            // The zero-initialised head blocks every other gradient on the first step; move it.
            let out = store.var("output.weight").unwrap();
            out.set(&Tensor::randn(0f32, 0.02, out.shape(), &Device::Cpu).unwrap()).unwrap();
            let labels = Tensor::new(&[0u32, 2, 1, 3], &Device::Cpu).unwrap();
            let mut rng = crate::util::rng_for(0, "t", 0);
            let loss =
                model.loss(&codes(4, 9, 1), (cls == 1).then_some(&labels), Some(TrainNoise { rng: &mut rng })).unwrap();
            let grads = loss.backward().unwrap();
            for (name, var) in store.vars() {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
                let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
                assert!(v.iter().any(|&x| x != 0.0), "{name}: zero gradient");
            }
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let store = ParamStore::new(3, &Device::Cpu);
        let model = Gpt::new(&tiny(1), &store.root()).unwrap();
        let err = model
            .loss::<rand_chacha::ChaCha8Rng>(&codes(1, 9, 1), Some(&Tensor::new(&[4u32], &Device::Cpu).unwrap()), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("unknown class 4"), "{err}");
        let bad = Tensor::new(&[[11u32; 9]], &Device::Cpu).unwrap();
        let err = model
            .loss::<rand_chacha::ChaCha8Rng>(&bad, Some(&Tensor::new(&[0u32], &Device::Cpu).unwrap()), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        let mut c = tiny(1);
        c.n_head = 3;
        assert!(Gpt::new(&c, &store.root()).is_err());
    }

    #[test]
    fn uniform_and_one_hot_entropies() {
        let v = 7usize;
        let uniform = Tensor::zeros((1, 1, v), DType::F32, &Device::Cpu).unwrap();
        let h = entropy_of_logits(&uniform).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((h - (v as f32).ln()).abs() < 1e-6, "{h}");
        let mut one_hot = vec![-1e9f32; v];
        one_hot[3] = 0.0;
        let h = entropy_of_logits(&Tensor::from_vec(one_hot, (1, 1, v), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(h.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 0.0);
    }

    /// Every position's logits depend only on earlier codes.
    #[test]
    fn logits_depend_only_on_earlier_codes() {
        let store = ParamStore::new(4, &Device::Cpu);
        let model = Gpt::new(&tiny(1), &store.root()).unwrap();
        let out = store.var("output.weight").unwrap();
        out.set(&Tensor::randn(0f32, 0.5, out.shape(), &Device::Cpu).unwrap()).unwrap();
        let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let base = codes(1, 9, 2);
        let y0 = model.forward::<rand_chacha::ChaCha8Rng>(&base, Some(&labels), None).unwrap();
        for k in 0..8 {
            let mut v = base.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            v[k] = (v[k] + 1) % 11;
            let y1 = model
                .forward::<rand_chacha::ChaCha8Rng>(
                    &Tensor::from_vec(v, (1, 9), &Device::Cpu).unwrap(),
                    Some(&labels),
                    None,
                )
                .unwrap();
            // Position p predicts z_p from z_<p: positions ≤ k must not change, k+1 must.
            let diff = |p: usize| {
                (y0.narrow(1, p, 1).unwrap() - y1.narrow(1, p, 1).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            for p in 0..=k {
                assert_eq!(diff(p), 0.0, "perturbing z_{k} changed position {p}");
            }
            assert!(diff(k + 1) > 0.0);
        }
    }
}
