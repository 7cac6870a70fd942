//! Per-code entropies (design §4): the frozen unconditional GPT runs once over every shard (and
//! every flip copy) and its next-code entropies H_k (natural log) are stored beside the codes.
//!
//! Storage: a sidecar `<shard>.entropy.safetensors` next to each shard file, with
//!
//! | tensor         | dtype | shape      | meaning                                  |
//! |----------------|-------|------------|------------------------------------------|
//! | `entropy`      | F32   | `[N, G·G]` | H_k of every code; **H_0 = +∞**          |
//! | `entropy_flip` | F32   | `[N, G·G]` | the same for the flip copy, when present |
//!
//! z_0 has no prediction (nothing precedes it); storing +∞ keeps one row per code and makes
//! the entropy gate open a patch at z_0, which rule 1 requires anyway. Metadata records the
//! entropy model's identity (`entropy_model_id`, SHA-256 of its weights), the tokenizer that made
//! the codes and a hash of the codes, so a sidecar is never paired with the wrong shard or model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::data::shards::{self, CodeShard};
use crate::gpt::Gpt;

/// Errors of entropy computation and storage.
#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    /// The sidecar does not belong to this shard or model.
    #[error("{path}: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    /// The model cannot produce entropies for these codes.
    #[error("entropy model: {0}")]
    BadModel(String),
    /// An impossible setting (the flag is named in the message).
    #[error("{0}")]
    BadSetting(String),
    #[error(transparent)]
    Gpt(#[from] crate::gpt::GptError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EntropyError>;

/// The entropies of one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardEntropies {
    /// `N × L`, H_0 = +∞.
    pub entropy: Vec<f32>,
    pub entropy_flip: Option<Vec<f32>>,
    pub entropy_model_id: String,
}

impl ShardEntropies {
    /// Entropies of image `i` (flip copy when `flip` and present).
    pub fn of(&self, i: usize, l: usize, flip: bool) -> &[f32] {
        let source = match (&self.entropy_flip, flip) {
            (Some(f), true) => f,
            _ => &self.entropy,
        };
        &source[i * l..(i + 1) * l]
    }
}

pub use crate::data::shards::codes_hash;

/// Checks that an entropy model can read a shard's codes.
pub fn check_model_fits(model: &Gpt, shard: &CodeShard, path: &Path) -> Result<()> {
    let c = model.config();
    if c.cls_token_num != 0 {
        return Err(EntropyError::BadModel(
            "entropies come from an unconditional model (train it with `dpar entropy train`)".into(),
        ));
    }
    check_shape_fits("the entropy model", c.grid_size, c.vocab_size, shard, path)
}

/// Checks that a model (`who`) of a `grid`² grid and `vocab` codes can read a shard's codes.
pub fn check_shape_fits(who: &str, grid: usize, vocab: usize, shard: &CodeShard, path: &Path) -> Result<()> {
    if grid != shard.info.grid_size || vocab < shard.info.codebook_size {
        return Err(EntropyError::Mismatch {
            path: path.to_path_buf(),
            reason: format!(
                "shard has a {}×{} grid of {} codes; {who} expects {grid}×{grid} and {vocab} codes",
                shard.info.grid_size, shard.info.grid_size, shard.info.codebook_size
            ),
        });
    }
    Ok(())
}

/// H_k of every code of every image (`N × L`, H_0 = +∞), `batch` images at a time.
pub fn compute(
    model: &Gpt,
    shard: &CodeShard,
    flip: bool,
    batch: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<f32>> {
    let l = shard.info.seq_len();
    let mut out = Vec::with_capacity(shard.len() * l);
    for start in (0..shard.len()).step_by(batch.max(1)) {
        let idx: Vec<usize> = (start..(start + batch.max(1)).min(shard.len())).collect();
        let mut codes = Vec::with_capacity(idx.len() * l);
        for &i in &idx {
            codes.extend_from_slice(shard.codes_of(i, flip));
        }
        let codes = Tensor::from_vec(codes, (idx.len(), l), device)?;
        let h = model.entropies(&codes)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?; // (b, L−1)
        for row in h {
            out.push(f32::INFINITY);
            out.extend(row);
        }
        progress(idx.len());
    }
    Ok(out)
}

/// What a count table conditions z_k on (design §9, "Count tables").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountContext {
    /// The previous code in raster order, z_{k−1} (a bigram).
    Left,
    /// z_{k−1} and the code above, z_{k−G} (the left neighbour alone in the first row).
    LeftAbove,
}

impl std::str::FromStr for CountContext {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "left" => Ok(Self::Left),
            "left-above" => Ok(Self::LeftAbove),
            other => Err(format!("unknown count context `{other}` (left, left-above)")),
        }
    }
}

/// Next-code entropies from counts, no network: for each context, the entropy of the
/// add-α smoothed distribution of the codes that followed it in the training codes. A context
/// never seen falls back to its left code alone (`LeftAbove`), then to the unconditional
/// distribution.
pub struct CountTable {
    context: CountContext,
    grid: usize,
    /// Entropy per left code (V), and per (left, above) pair seen in training.
    left: Vec<f32>,
    pair: std::collections::HashMap<(u32, u32), f32>,
    unconditional: f32,
    vocab: usize,
}

/// The entropy (nats) of counts smoothed by adding `alpha` to each of `vocab` codes.
fn smoothed_entropy(counts: &std::collections::HashMap<u32, u32>, vocab: usize, alpha: f64) -> f32 {
    let total = counts.values().map(|&c| c as f64).sum::<f64>() + alpha * vocab as f64;
    let mut h = 0.0;
    for &c in counts.values() {
        let p = (c as f64 + alpha) / total;
        h -= p * p.ln();
    }
    let unseen = vocab - counts.len();
    if unseen > 0 && alpha > 0.0 {
        let p = alpha / total;
        h -= unseen as f64 * p * p.ln();
    }
    h as f32
}

impl CountTable {
    /// Counts the codes of `shards` (one grid and vocabulary), smoothing with `alpha`.
    pub fn fit(shards: &[CodeShard], context: CountContext, alpha: f64) -> Result<Self> {
        let first = shards.first().ok_or_else(|| EntropyError::BadSetting("no training shards to count".into()))?;
        let (grid, vocab) = (first.info.grid_size, first.info.codebook_size);
        if shards.iter().any(|s| s.info.grid_size != grid || s.info.codebook_size != vocab) {
            return Err(EntropyError::BadSetting("the training shards differ in grid or vocabulary".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(EntropyError::BadSetting(format!("smoothing α must be > 0, got {alpha}")));
        }
        use std::collections::HashMap;
        let l = grid * grid;
        let mut by_left: Vec<HashMap<u32, u32>> = vec![HashMap::new(); vocab];
        let mut by_pair: HashMap<(u32, u32), HashMap<u32, u32>> = HashMap::new();
        let mut all: HashMap<u32, u32> = HashMap::new();
        for shard in shards {
            for i in 0..shard.len() {
                let z = shard.codes_of(i, false);
                for k in 1..l {
                    *by_left[z[k - 1] as usize].entry(z[k]).or_default() += 1;
                    *all.entry(z[k]).or_default() += 1;
                    if context == CountContext::LeftAbove && k >= grid {
                        *by_pair.entry((z[k - 1], z[k - grid])).or_default().entry(z[k]).or_default() += 1;
                    }
                }
            }
        }
        let unconditional = smoothed_entropy(&all, vocab, alpha);
        let left = by_left
            .iter()
            .map(|c| if c.is_empty() { unconditional } else { smoothed_entropy(c, vocab, alpha) })
            .collect();
        let pair = by_pair.into_iter().map(|(k, c)| (k, smoothed_entropy(&c, vocab, alpha))).collect();
        Ok(Self { context, grid, left, pair, unconditional, vocab })
    }

    /// H_0 … H_{L−1} of one image's codes (H_0 = +∞).
    pub fn entropies(&self, z: &[u32]) -> Vec<f32> {
        let mut h = Vec::with_capacity(z.len());
        h.push(f32::INFINITY);
        for k in 1..z.len() {
            let left = z[k - 1] as usize;
            let by_left = if left < self.vocab { self.left[left] } else { self.unconditional };
            h.push(match self.context {
                CountContext::LeftAbove if k >= self.grid => {
                    self.pair.get(&(z[k - 1], z[k - self.grid])).copied().unwrap_or(by_left)
                }
                _ => by_left,
            });
        }
        h
    }
}

/// Writes a shard's entropy sidecar atomically.
pub fn write(shard_path: &Path, shard: &CodeShard, entropies: &ShardEntropies) -> Result<()> {
    let (n, l) = (shard.len(), shard.info.seq_len());
    let mut tensors = vec![("entropy".to_string(), Tensor::from_slice(&entropies.entropy, (n, l), &Device::Cpu)?)];
    if let Some(f) = &entropies.entropy_flip {
        tensors.push(("entropy_flip".to_string(), Tensor::from_slice(f, (n, l), &Device::Cpu)?));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "dpar-entropy-v1".to_string());
    meta.insert("entropy_model_id".to_string(), entropies.entropy_model_id.clone());
    meta.insert("tokenizer_id".to_string(), shard.info.tokenizer_id.clone());
    meta.insert("codes_hash".to_string(), codes_hash(shard));
    crate::tensor_io::write_safetensors(&shards::entropy_path(shard_path), &tensors, &meta)?;
    Ok(())
}

/// Reads a shard's entropy sidecar, checking that it belongs to this shard and, when
/// `expected_model` is given, to that entropy model.
pub fn read(shard_path: &Path, shard: &CodeShard, expected_model: Option<&str>) -> Result<ShardEntropies> {
    let path = shards::entropy_path(shard_path);
    if !path.is_file() {
        return Err(EntropyError::Mismatch {
            path,
            reason: "no entropies for this shard (run `dpar entropy compute`)".into(),
        });
    }
    let file = crate::tensor_io::read_safetensors(&path, &Device::Cpu)?;
    let mismatch = |reason: String| EntropyError::Mismatch { path: path.clone(), reason };
    if file.meta("codes_hash").unwrap_or("") != codes_hash(shard) {
        return Err(mismatch(format!(
            "was computed for other codes than {} (recompute with `dpar entropy compute`)",
            shard_path.display()
        )));
    }
    let model_id = file.meta("entropy_model_id")?.to_string();
    if let Some(want) = expected_model {
        if want != model_id {
            return Err(mismatch(format!(
                "entropies come from entropy model {}…, but {}… was expected",
                &model_id[..12.min(model_id.len())],
                &want[..12.min(want.len())]
            )));
        }
    }
    let (n, l) = (shard.len(), shard.info.seq_len());
    let read_one = |name: &str| -> Result<Vec<f32>> {
        let t = file.tensor(name)?;
        if t.dims() != [n, l] {
            return Err(mismatch(format!("`{name}` has shape {:?}, the shard has {n} images of {l} codes", t.dims())));
        }
        if t.dtype() != candle_core::DType::F32 {
            return Err(mismatch(format!("`{name}` is stored as {:?}; entropies are F32", t.dtype())));
        }
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        // Entropies are finite and ≥ 0; H_0 is stored as +∞ (z_0 has no prediction).
        let bad =
            values
                .iter()
                .enumerate()
                .find(|&(i, &h)| if i % l == 0 { h != f32::INFINITY } else { !(h.is_finite() && h >= 0.0) });
        if let Some((i, &h)) = bad {
            return Err(mismatch(format!(
                "`{name}` of image {} holds H_{} = {h}; entropies are finite and ≥ 0, and H_0 is +inf (recompute with `dpar entropy compute`)",
                i / l,
                i % l
            )));
        }
        Ok(values)
    };
    let entropy = read_one("entropy")?;
    let entropy_flip = if file.tensors.contains_key("entropy_flip") { Some(read_one("entropy_flip")?) } else { None };
    if shard.flip_codes.is_some() && entropy_flip.is_none() {
        return Err(mismatch("the shard has a flip copy but the sidecar has no `entropy_flip`".into()));
    }
    Ok(ShardEntropies { entropy, entropy_flip, entropy_model_id: model_id })
}

/// Reads the entropies of every shard of a set, concatenated in the order of
/// [`shards::read_shard_set`].
pub fn read_set(path: &Path, expected_model: Option<&str>) -> Result<(CodeShard, ShardEntropies)> {
    let mut all_shard: Option<CodeShard> = None;
    let mut all: Option<ShardEntropies> = None;
    for (file, shard) in shards::read_set_shards(path)? {
        let e = read(&file, &shard, expected_model)?;
        match (&mut all_shard, &mut all) {
            (Some(s), Some(a)) => {
                if a.entropy_model_id != e.entropy_model_id {
                    return Err(EntropyError::Mismatch {
                        path: file.clone(),
                        reason: "shards of the set have entropies from different models".into(),
                    });
                }
                s.codes.extend(&shard.codes);
                s.labels.extend(&shard.labels);
                if let (Some(x), Some(y)) = (&mut s.flip_codes, &shard.flip_codes) {
                    x.extend(y);
                }
                a.entropy.extend(&e.entropy);
                if let (Some(x), Some(y)) = (&mut a.entropy_flip, &e.entropy_flip) {
                    x.extend(y);
                }
            }
            _ => {
                all_shard = Some(shard);
                all = Some(e);
            }
        }
    }
    Ok((all_shard.expect("shard_files returns at least one file"), all.expect("set with one shard")))
}

/// What [`store_for_set`] wrote for one shard.
#[derive(Debug, Clone)]
pub struct Stored {
    pub shard: PathBuf,
    pub sidecar: PathBuf,
    pub images: usize,
    /// Whether the flip copies got entropies too.
    pub flip: bool,
    /// Mean, 30th, 50th and 70th percentile of the finite entropies (nats).
    pub mean: f64,
    pub p30: f64,
    pub p50: f64,
    pub p70: f64,
}

/// Runs the entropy model at `model_path` (run folder or weight file) once over every shard of
/// `set` (and every flip copy) and stores the entropies beside each shard (`dpar entropy
/// compute`). Shards of another tokenizer than the one the model was trained on are refused
/// unless `allow_mismatch` (then a warning). `progress` is called with sequences done.
pub fn store_for_set(
    model: &Gpt,
    model_path: &Path,
    set: &Path,
    batch: usize,
    allow_mismatch: bool,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Stored>> {
    if batch == 0 {
        return Err(EntropyError::BadSetting(
            "--batch 0: entropies are computed in batches of at least 1 image".into(),
        ));
    }
    if model.config().cls_token_num != 0 {
        return Err(EntropyError::BadModel(format!(
            "{} is class-conditional; entropies come from an unconditional model (train one with `dpar entropy train`)",
            model_path.display()
        )));
    }
    let model_id = crate::parts::id_of(model_path).map_err(|e| EntropyError::BadModel(e.to_string()))?;
    let model_tokenizer = crate::parts::Recorded::of(model_path).tokenizer_id;
    store_with(set, &model_id, |file, shard| {
        check_model_fits(model, shard, file)?;
        if let Some(want) = &model_tokenizer {
            if *want != shard.info.tokenizer_id {
                let reason = format!(
                    "codes of tokenizer {}…, but the entropy model {} was trained on codes of tokenizer {}…; its entropies would not mean anything here (give the matching model or codes, or pass --allow-mismatch)",
                    &shard.info.tokenizer_id[..12.min(shard.info.tokenizer_id.len())],
                    model_path.display(),
                    &want[..12.min(want.len())]
                );
                if !allow_mismatch {
                    return Err(EntropyError::Mismatch { path: file.to_path_buf(), reason });
                }
                tracing::warn!("--allow-mismatch: {}: {reason}", file.display());
            }
        }
        let entropy = compute(model, shard, false, batch, device, &mut progress)?;
        let entropy_flip = match shard.flip_codes {
            Some(_) => Some(compute(model, shard, true, batch, device, &mut progress)?),
            None => None,
        };
        Ok((entropy, entropy_flip))
    })
}

/// Stores beside every shard of `set` the entropies `entropies(file, shard)` returns (of the
/// codes and, when the shard has them, of the flip copies), recorded as coming from `source_id`
/// (the SHA-256 of the weights that computed them).
pub fn store_with(
    set: &Path,
    source_id: &str,
    mut entropies: impl FnMut(&Path, &CodeShard) -> Result<(Vec<f32>, Option<Vec<f32>>)>,
) -> Result<Vec<Stored>> {
    let mut stored = Vec::new();
    for (file, shard) in shards::read_set_shards(set)? {
        let (entropy, entropy_flip) = entropies(&file, &shard)?;
        let finite: Vec<f32> = entropy.iter().copied().filter(|h| h.is_finite()).collect();
        if finite.is_empty() {
            return Err(EntropyError::Mismatch { path: file, reason: "the shard holds no images".into() });
        }
        let pct = |q| crate::patching::percentile(&finite, q).unwrap_or(f64::NAN);
        let summary = Stored {
            sidecar: shards::entropy_path(&file),
            images: shard.len(),
            flip: entropy_flip.is_some(),
            mean: finite.iter().map(|&h| h as f64).sum::<f64>() / finite.len().max(1) as f64,
            p30: pct(0.3),
            p50: pct(0.5),
            p70: pct(0.7),
            shard: file.clone(),
        };
        write(&file, &shard, &ShardEntropies { entropy, entropy_flip, entropy_model_id: source_id.to_string() })?;
        stored.push(summary);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-computed case: after code 0 always comes 1 (entropy ≈ 0 with a tiny α), after 1
    /// comes 0 or 2 equally (ln 2); an unseen left code falls back to the unconditional entropy;
    /// the left-above table tells apart what the bigram cannot.
    #[test]
    fn count_tables_give_the_entropies_of_their_counts() {
        let info = |grid| crate::data::shards::ShardInfo {
            grid_size: grid,
            codebook_size: 4,
            num_classes: 1,
            class_names: vec!["x".into()],
            tokenizer_id: "t".into(),
        };
        // 2×2 grids: 0 1 / 0 1 and 0 1 / 2 1 → after 0: {1, 1, 1, 1}; after 1: {0, 2}.
        let shard =
            CodeShard { info: info(2), codes: vec![0, 1, 0, 1, 0, 1, 2, 1], labels: vec![0, 0], flip_codes: None };
        let t = CountTable::fit(std::slice::from_ref(&shard), CountContext::Left, 1e-9).unwrap();
        let h = t.entropies(&[0, 1, 0, 3]);
        assert!(h[0].is_infinite());
        assert!(h[1].abs() < 1e-6, "{h:?}");
        assert!((h[2] - std::f32::consts::LN_2).abs() < 1e-6, "{h:?}");
        // Left code 3 never seen: the unconditional distribution of z_1..: {1:4, 0:1, 2:1}.
        let p = [4.0f64 / 6.0, 1.0 / 6.0, 1.0 / 6.0];
        let want = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        let h = t.entropies(&[0, 1, 3, 2]);
        assert!((h[3] as f64 - want).abs() < 1e-6, "{h:?} vs {want}");
        // Left and above: at k = 2 (z_2, left z_1 = 1, above z_0 = 0) both images show 0 or 2
        // after (1, 0): ln 2; at k = 3 (left z_2, above z_1 = 1): (0, 1) → 1 and (2, 1) → 1: 0.
        let t = CountTable::fit(std::slice::from_ref(&shard), CountContext::LeftAbove, 1e-9).unwrap();
        let h = t.entropies(&[0, 1, 2, 1]);
        assert!((h[2] - std::f32::consts::LN_2).abs() < 1e-6 && h[3].abs() < 1e-6, "{h:?}");
        // Smoothing spreads mass over all four codes: a positive entropy after 0.
        let t = CountTable::fit(std::slice::from_ref(&shard), CountContext::Left, 1.0).unwrap();
        assert!(t.entropies(&[0, 1])[1] > 0.5);
        assert!(CountTable::fit(&[shard], CountContext::Left, 0.0).is_err());
    }
}
