//! The patcher (design §4): per-code entropies → patch lengths. A pure function, in two forms:
//!
//! - [`patch_lengths`], the batch form: first the *forced* boundaries (z_0, z_1, row starts,
//!   H_k > θ), then every segment between forced boundaries cut into runs of at most P codes;
//! - [`OnlinePatcher`], the online form for generation: it decides for z_k, before z_k is
//!   sampled, from H_k and the length of the current patch.
//!
//! The two are written independently on purpose; property tests show they agree.
//!
//! Rule: code z_k starts a new patch iff k ∈ {0, 1}, or k mod G = 0 (row reset), or H_k > θ
//! (entropy gate), or the current patch already holds P codes (max length). The last three are
//! switchable for the paper's ablations; "static" patchification is fixed length P with row
//! resets and no entropy.
//!
//! Entropies are stored per image as L values with H_0 = +∞ (z_0 has no prediction; the value
//! makes rule 3 agree with rule 1).

/// Errors of the patcher.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// Impossible settings.
    #[error("patcher: {0}")]
    BadConfig(String),
    /// Inputs that do not fit (length mismatch).
    #[error("patcher input: {0}")]
    BadInput(String),
}

pub type Result<T> = std::result::Result<T, PatchError>;

/// Where the entropy that gates a patch comes from at sampling time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyFrom {
    /// The entropy model's H_k (the paper's rule; training patches always come from it).
    #[default]
    Model,
    /// DPAR's own decoder: the entropy of its prediction of z_k made as if z_k continued the
    /// open patch (design §9, "Self-entropy patching"). No entropy model runs.
    Decoder,
}

impl EntropyFrom {
    fn is_model(&self) -> bool {
        *self == EntropyFrom::Model
    }

    /// The name the command line and the page use: `model` or `self`.
    pub fn name(self) -> &'static str {
        match self {
            EntropyFrom::Model => "model",
            EntropyFrom::Decoder => "self",
        }
    }
}

impl std::str::FromStr for EntropyFrom {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "model" => Ok(EntropyFrom::Model),
            "self" | "decoder" => Ok(EntropyFrom::Decoder),
            other => Err(format!("unknown patcher `{other}` (model, self)")),
        }
    }
}

/// Patcher settings: threshold θ, max length P and the three switches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PatchConfig {
    /// θ: a code with H_k > θ opens a patch (natural-log entropy). ±∞ is stored as a string in
    /// JSON, which has no infinities.
    #[serde(with = "crate::util::serde_f64_inf")]
    pub threshold: f64,
    /// P: the most codes a patch may hold (when `max_len_rule`).
    pub max_patch_len: usize,
    pub entropy_gate: bool,
    pub max_len_rule: bool,
    pub row_reset: bool,
    /// Where H_k comes from at sampling time (the entropy model when absent).
    #[serde(default, skip_serializing_if = "EntropyFrom::is_model")]
    pub entropy_from: EntropyFrom,
}

impl PatchConfig {
    /// DPAR's full rule set.
    pub fn dpar(threshold: f64, max_patch_len: usize) -> Self {
        Self {
            threshold,
            max_patch_len,
            entropy_gate: true,
            max_len_rule: true,
            row_reset: true,
            entropy_from: EntropyFrom::Model,
        }
    }

    /// Static patchification: fixed length P with row resets, no entropy.
    pub fn static_patches(max_patch_len: usize) -> Self {
        Self {
            threshold: f64::INFINITY,
            max_patch_len,
            entropy_gate: false,
            max_len_rule: true,
            row_reset: true,
            entropy_from: EntropyFrom::Model,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.threshold.is_nan() {
            return Err(PatchError::BadConfig("threshold θ is NaN".into()));
        }
        if self.max_len_rule && self.max_patch_len == 0 {
            return Err(PatchError::BadConfig("max patch length P must be ≥ 1".into()));
        }
        Ok(())
    }

    /// A short human label, e.g. `entropy+maxlen+row (θ=1.20, P=4)`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if self.entropy_gate {
            parts.push("entropy");
        }
        if self.max_len_rule {
            parts.push("maxlen");
        }
        if self.row_reset {
            parts.push("row");
        }
        let rules = if parts.is_empty() { "none".to_string() } else { parts.join("+") };
        let from = if self.entropy_from.is_model() { "" } else { ", self-entropy" };
        format!("{rules} (θ={:.3}, P={}{from})", self.threshold, self.max_patch_len)
    }
}

/// Rules 1–3 for code k (everything but the max-length rule).
fn forced_boundary(k: usize, entropy: f32, grid: usize, config: &PatchConfig) -> bool {
    k <= 1 || (config.row_reset && k.is_multiple_of(grid)) || (config.entropy_gate && entropy as f64 > config.threshold)
}

/// Batch form: patch lengths of the first `n_codes` codes of an image (n_codes ≤ L; use L − 1
/// for the encoder's inputs). `entropies` holds H_k for every code of the image (index 0 unused).
pub fn patch_lengths(entropies: &[f32], grid: usize, config: &PatchConfig, n_codes: usize) -> Result<Vec<usize>> {
    config.validate()?;
    if grid == 0 {
        return Err(PatchError::BadConfig("grid size must be > 0".into()));
    }
    if entropies.len() != grid * grid {
        return Err(PatchError::BadInput(format!(
            "{} entropies for a {grid}×{grid} grid of {} codes",
            entropies.len(),
            grid * grid
        )));
    }
    if n_codes > entropies.len() {
        return Err(PatchError::BadInput(format!("asked for {n_codes} codes of {}", entropies.len())));
    }
    // Segments between forced boundaries.
    let starts: Vec<usize> = (0..n_codes).filter(|&k| forced_boundary(k, entropies[k], grid, config)).collect();
    let mut lengths = Vec::with_capacity(n_codes);
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(n_codes);
        let mut remaining = end - start;
        if config.max_len_rule {
            while remaining > config.max_patch_len {
                lengths.push(config.max_patch_len);
                remaining -= config.max_patch_len;
            }
        }
        lengths.push(remaining);
    }
    Ok(lengths)
}

/// Online form: decides, code by code, whether z_k opens a new patch.
#[derive(Debug, Clone)]
pub struct OnlinePatcher {
    config: PatchConfig,
    grid: usize,
    next: usize,
    lengths: Vec<usize>,
}

impl OnlinePatcher {
    pub fn new(config: PatchConfig, grid: usize) -> Result<Self> {
        config.validate()?;
        if grid == 0 {
            return Err(PatchError::BadConfig("grid size must be > 0".into()));
        }
        Ok(Self { config, grid, next: 0, lengths: Vec::new() })
    }

    /// The index of the code the next call decides for.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Whether the next code opens a patch whatever its entropy (z_0, z_1, a row start, a full
    /// patch).
    pub fn forced(&self) -> bool {
        let k = self.next;
        let current = self.lengths.last().copied().unwrap_or(0);
        k <= 1
            || (self.config.row_reset && k.is_multiple_of(self.grid))
            || (self.config.max_len_rule && current >= self.config.max_patch_len)
    }

    /// Decides for the next code z_k given H_k (ignored for k = 0) and records it. Returns
    /// whether z_k opens a new patch.
    pub fn push(&mut self, entropy: f32) -> bool {
        let opens = self.forced() || (self.config.entropy_gate && entropy as f64 > self.config.threshold);
        if opens {
            self.lengths.push(1);
        } else if let Some(last) = self.lengths.last_mut() {
            *last += 1;
        }
        self.next += 1;
        opens
    }

    /// Lengths of the patches so far (the last one may still grow).
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}

/// Start index of every patch (prefix sums of the lengths).
pub fn patch_starts(lengths: &[usize]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(lengths.len());
    let mut acc = 0;
    for &l in lengths {
        starts.push(acc);
        acc += l;
    }
    starts
}

/// For every code, the index of the patch that holds it.
pub fn patch_ids(lengths: &[usize]) -> Vec<usize> {
    lengths.iter().enumerate().flat_map(|(i, &l)| std::iter::repeat_n(i, l)).collect()
}

/// Summary statistics of patch lengths over many images.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PatchStats {
    pub images: usize,
    /// Codes per patch on average (= the token-count reduction factor).
    pub mean_len: f64,
    pub min_patches: usize,
    pub mean_patches: f64,
    pub max_patches: usize,
    /// `histogram[n]` = number of patches of length n (index 0 unused).
    pub histogram: Vec<usize>,
}

/// Patch statistics of `images` images whose L entropies each are concatenated in `entropies`.
pub fn stats(entropies: &[f32], grid: usize, config: &PatchConfig) -> Result<PatchStats> {
    let l = grid * grid;
    if l == 0 || !entropies.len().is_multiple_of(l) {
        return Err(PatchError::BadInput(format!(
            "{} entropies is not a whole number of {l}-code images",
            entropies.len()
        )));
    }
    let images = entropies.len() / l;
    let mut histogram = vec![0usize; 2];
    let (mut total_patches, mut min_p, mut max_p) = (0usize, usize::MAX, 0usize);
    for img in entropies.chunks(l) {
        let lengths = patch_lengths(img, grid, config, l)?;
        for &len in &lengths {
            if len >= histogram.len() {
                histogram.resize(len + 1, 0);
            }
            histogram[len] += 1;
        }
        total_patches += lengths.len();
        min_p = min_p.min(lengths.len());
        max_p = max_p.max(lengths.len());
    }
    Ok(PatchStats {
        images,
        mean_len: (images * l) as f64 / total_patches.max(1) as f64,
        min_patches: if images == 0 { 0 } else { min_p },
        mean_patches: total_patches as f64 / images.max(1) as f64,
        max_patches: max_p,
        histogram,
    })
}

/// How well two patchings of the same images agree on where patches start.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Agreement {
    /// Of the starts under `other`, the share that are starts under `reference`.
    pub precision: f64,
    /// Of the starts under `reference`, the share that are starts under `other`.
    pub recall: f64,
    /// Their harmonic mean: the per-code F1 of "z_k opens a patch".
    pub f1: f64,
    /// Codes compared (k ≥ 2 of every image; z_0 and z_1 always open a patch).
    pub codes: usize,
}

/// Boundary agreement of the patches of `other` (entropies, rules) with those of `reference`,
/// over the same images: every code k ≥ 2 is a yes/no decision, "z_k opens a patch". Forced
/// starts (row resets, the length cap) count like any other.
pub fn agreement(reference: (&[f32], &PatchConfig), other: (&[f32], &PatchConfig), grid: usize) -> Result<Agreement> {
    let l = grid * grid;
    if reference.0.len() != other.0.len() {
        return Err(PatchError::BadInput(format!(
            "the two entropy sets differ in size ({} and {})",
            reference.0.len(),
            other.0.len()
        )));
    }
    if l == 0 || !reference.0.len().is_multiple_of(l) {
        return Err(PatchError::BadInput(format!(
            "{} entropies is not a whole number of {l}-code images",
            reference.0.len()
        )));
    }
    let starts = |h: &[f32], c: &PatchConfig| -> Result<Vec<bool>> {
        let mut open = vec![false; l];
        for k in patch_starts(&patch_lengths(h, grid, c, l)?) {
            open[k] = true;
        }
        Ok(open)
    };
    let (mut both, mut only_ref, mut only_other, mut codes) = (0usize, 0usize, 0usize, 0usize);
    for (a, b) in reference.0.chunks(l).zip(other.0.chunks(l)) {
        let (sa, sb) = (starts(a, reference.1)?, starts(b, other.1)?);
        for k in 2.min(l)..l {
            codes += 1;
            match (sa[k], sb[k]) {
                (true, true) => both += 1,
                (true, false) => only_ref += 1,
                (false, true) => only_other += 1,
                (false, false) => {}
            }
        }
    }
    let ratio = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
    let (precision, recall) = (ratio(both, both + only_other), ratio(both, both + only_ref));
    let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    Ok(Agreement { precision, recall, f1, codes })
}

/// θ calibrated on a DPAR model's own samples (`dpar patchify --on-samples … --store`), one per
/// patcher, kept beside the model as [`SamplingThresholds::FILE`] (derived data: the weights and
/// their config stay untouched). `dpar sample --patcher self` takes the `self` one when no
/// --threshold is given; `--sampling-threshold` takes the stored one of either patcher.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingThresholds {
    /// For the entropy model's patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Calibrated>,
    /// For self-entropy patching.
    #[serde(default, rename = "self", skip_serializing_if = "Option::is_none")]
    pub decoder: Option<Calibrated>,
}

/// One calibrated θ and how it was found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibrated {
    pub threshold: f64,
    /// The mean patch length the sampled images reached (the target).
    pub target_mean_len: f64,
    /// Sampled images per θ tried, and their seed.
    pub images: usize,
    pub seed: u64,
}

impl SamplingThresholds {
    pub const FILE: &'static str = "sampling-thresholds.json";

    /// Where the thresholds of the model at `model` (run folder or weight file) live.
    pub fn path(model: &std::path::Path) -> std::path::PathBuf {
        if model.is_dir() {
            model.join(Self::FILE)
        } else {
            model.parent().unwrap_or(std::path::Path::new(".")).join(Self::FILE)
        }
    }

    /// The stored thresholds of `model` (none stored: the default, empty).
    pub fn read(model: &std::path::Path) -> Result<Self> {
        let path = Self::path(model);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| PatchError::BadInput(format!("{}: {e}", path.display())))?;
        let t: Self =
            serde_json::from_str(&text).map_err(|e| PatchError::BadInput(format!("{}: {e}", path.display())))?;
        for c in t.model.iter().chain(&t.decoder) {
            if !(c.threshold.is_finite() && c.threshold >= 0.0) {
                return Err(PatchError::BadInput(format!("{}: θ {} is not an entropy", path.display(), c.threshold)));
            }
        }
        Ok(t)
    }

    /// The stored θ for `from`.
    pub fn get(&self, from: EntropyFrom) -> Option<&Calibrated> {
        match from {
            EntropyFrom::Model => self.model.as_ref(),
            EntropyFrom::Decoder => self.decoder.as_ref(),
        }
    }

    /// Stores `calibrated` for `from` beside `model` (atomically), keeping the other patcher's.
    pub fn store(model: &std::path::Path, from: EntropyFrom, calibrated: Calibrated) -> Result<std::path::PathBuf> {
        let mut t = Self::read(model)?;
        match from {
            EntropyFrom::Model => t.model = Some(calibrated),
            EntropyFrom::Decoder => t.decoder = Some(calibrated),
        }
        let path = Self::path(model);
        let text = serde_json::to_string_pretty(&t).map_err(|e| PatchError::BadInput(e.to_string()))?;
        crate::util::write_atomic(&path, text.as_bytes())
            .map_err(|e| PatchError::BadInput(format!("{}: {e}", path.display())))?;
        Ok(path)
    }
}

/// Finds θ whose mean patch length is closest to `target` by bisection (the mean length grows
/// with θ). Returns θ and its statistics. `target` must lie between the lengths reachable at
/// θ = −∞ and θ = +∞ for the other settings of `config`.
pub fn calibrate(entropies: &[f32], grid: usize, config: &PatchConfig, target: f64) -> Result<(f64, PatchStats)> {
    if !(target.is_finite() && target >= 1.0) {
        return Err(PatchError::BadConfig(format!("target mean patch length must be ≥ 1, got {target}")));
    }
    let finite: Vec<f32> = entropies.iter().copied().filter(|h| h.is_finite()).collect();
    if finite.is_empty() {
        return Err(PatchError::BadInput("no finite entropies to calibrate on".into()));
    }
    let lo_h = finite.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    let hi_h = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let at = |theta: f64| stats(entropies, grid, &PatchConfig { threshold: theta, entropy_gate: true, ..*config });
    let (mut lo, mut hi) = (lo_h - 1e-3, hi_h + 1e-3);
    let (min_len, max_len) = (at(lo)?.mean_len, at(hi)?.mean_len);
    if target < min_len - 1e-9 || target > max_len + 1e-9 {
        return Err(PatchError::BadConfig(format!(
            "target mean length {target} is out of reach: θ gives between {min_len:.3} and {max_len:.3} with these rules"
        )));
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if at(mid)?.mean_len < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (s_lo, s_hi) = (at(lo)?, at(hi)?);
    Ok(if (s_lo.mean_len - target).abs() <= (s_hi.mean_len - target).abs() { (lo, s_lo) } else { (hi, s_hi) })
}

/// The value at `q` ∈ [0, 1] of the sorted finite entropies (k ≥ 1 of every image).
pub fn percentile(entropies: &[f32], q: f64) -> Option<f64> {
    let mut v: Vec<f32> = entropies.iter().copied().filter(|h| h.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    Some(v[idx] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INF: f32 = f32::INFINITY;

    /// A 4×4 grid worked by hand, θ = 1.0, P = 3:
    ///
    /// ```text
    /// k:   0    1    2    3  |  4    5    6    7  |  8    9   10   11  | 12   13   14   15
    /// H:   ∞   0.1  0.2  0.3 | 0.1  2.0  0.1  0.1 | 0.1  0.1  0.1  0.1 | 0.1  0.1  0.1  5.0
    /// ```
    /// z_0 alone; z_1 opens (rule 1) and absorbs z_2, z_3 (row ends); z_4 opens (row start);
    /// z_5 opens (H > θ) and takes z_6, z_7; z_8 opens (row); z_9, z_10 join it, making 3, so
    /// z_11 opens (max length); z_12 opens (row) with z_13, z_14; z_15 opens (H > θ).
    #[test]
    fn hand_worked_four_by_four_exercises_every_rule() {
        let h = [INF, 0.1, 0.2, 0.3, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 5.0];
        let c = PatchConfig::dpar(1.0, 3);
        assert_eq!(patch_lengths(&h, 4, &c, 16).unwrap(), vec![1, 3, 1, 3, 3, 1, 3, 1]);
        // Without the next code (encoder inputs, L − 1 = 15): the last patch is cut away.
        assert_eq!(patch_lengths(&h, 4, &c, 15).unwrap(), vec![1, 3, 1, 3, 3, 1, 3]);
        // Switches off one at a time.
        let no_gate = PatchConfig { entropy_gate: false, ..c };
        assert_eq!(patch_lengths(&h, 4, &no_gate, 16).unwrap(), vec![1, 3, 3, 1, 3, 1, 3, 1]);
        let no_max = PatchConfig { max_len_rule: false, ..c };
        assert_eq!(patch_lengths(&h, 4, &no_max, 16).unwrap(), vec![1, 3, 1, 3, 4, 3, 1]);
        let no_row = PatchConfig { row_reset: false, ..c };
        assert_eq!(patch_lengths(&h, 4, &no_row, 16).unwrap(), vec![1, 3, 1, 3, 3, 3, 1, 1]);
        // Static: fixed length P with row resets.
        assert_eq!(patch_lengths(&h, 4, &PatchConfig::static_patches(2), 16).unwrap(), vec![1, 2, 1, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn infinite_thresholds_survive_a_json_round_trip() {
        for c in [PatchConfig::static_patches(4), PatchConfig::dpar(f64::NEG_INFINITY, 2), PatchConfig::dpar(1.25, 3)] {
            let text = serde_json::to_string(&c).unwrap();
            let back: PatchConfig = serde_json::from_str(&text).unwrap();
            assert_eq!(back, c, "{text}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let h = vec![0.0f32; 16];
        assert!(patch_lengths(&h[..15], 4, &PatchConfig::dpar(1.0, 4), 15)
            .unwrap_err()
            .to_string()
            .contains("15 entropies for a 4×4 grid"));
        assert!(patch_lengths(&h, 4, &PatchConfig::dpar(f64::NAN, 4), 16).unwrap_err().to_string().contains("NaN"));
        assert!(patch_lengths(&h, 4, &PatchConfig::dpar(1.0, 0), 16)
            .unwrap_err()
            .to_string()
            .contains("P must be ≥ 1"));
        assert!(OnlinePatcher::new(PatchConfig::dpar(1.0, 0), 4).is_err());
    }

    #[test]
    fn calibration_reaches_the_target_and_percentiles_sort() {
        let h: Vec<f32> = (0..64 * 16).map(|i| ((i * 37) % 101) as f32 / 25.0).collect();
        let (theta, s) = calibrate(&h, 4, &PatchConfig::dpar(0.0, 4), 1.8).unwrap();
        assert!((s.mean_len - 1.8).abs() < 0.1, "θ {theta}: {}", s.mean_len);
        assert!(calibrate(&h, 4, &PatchConfig::dpar(0.0, 4), 9.0).is_err());
        assert!(percentile(&h, 0.3).unwrap() <= percentile(&h, 0.7).unwrap());
    }

    /// One 2×2 image (L = 4, no row resets, no cap): the reference opens at k = 2 (H 3 > θ 2.5)
    /// and not at 3; the other (θ 0.5) opens at both. Over k ∈ {2, 3}: 1 common start, 1 extra
    /// start in the other: precision 1/2, recall 1, F1 2/3. Against itself: all 1.
    #[test]
    fn boundary_agreement_of_a_hand_computed_case() {
        let h = [f32::INFINITY, 0.0, 3.0, 1.0];
        let rules = PatchConfig { row_reset: false, max_len_rule: false, ..PatchConfig::dpar(2.5, 4) };
        let low = PatchConfig { threshold: 0.5, ..rules };
        let a = agreement((&h, &rules), (&h, &low), 2).unwrap();
        assert_eq!((a.precision, a.recall, a.codes), (0.5, 1.0, 2));
        assert!((a.f1 - 2.0 / 3.0).abs() < 1e-12);
        let same = agreement((&h, &rules), (&h, &rules), 2).unwrap();
        assert_eq!((same.precision, same.recall, same.f1), (1.0, 1.0, 1.0));
        assert!(agreement((&h, &rules), (&h[..2], &rules), 2).is_err(), "sizes differ");
    }

    fn arb_case() -> impl Strategy<Value = (usize, Vec<f32>, f64, usize, [bool; 3])> {
        (2usize..7).prop_flat_map(|g| {
            (
                Just(g),
                proptest::collection::vec(0.0f32..5.0, g * g),
                0.0f64..5.0,
                1usize..6,
                proptest::array::uniform3(any::<bool>()),
            )
        })
    }

    proptest! {
        #[test]
        fn online_and_batch_forms_agree_and_lengths_are_valid((g, mut h, theta, p, [gate, maxlen, row]) in arb_case()) {
            h[0] = f32::INFINITY;
            let c = PatchConfig { threshold: theta, max_patch_len: p, entropy_gate: gate, max_len_rule: maxlen, row_reset: row, entropy_from: EntropyFrom::Model };
            let l = g * g;
            for n in [l, l - 1] {
                let batch = patch_lengths(&h, g, &c, n).unwrap();
                let mut online = OnlinePatcher::new(c, g).unwrap();
                for &hk in &h[..n] {
                    online.push(hk);
                }
                prop_assert_eq!(online.lengths(), &batch[..]);
                prop_assert_eq!(batch.iter().sum::<usize>(), n);
                prop_assert_eq!(batch[0], 1);
                let starts = patch_starts(&batch);
                for (&s, &len) in starts.iter().zip(&batch) {
                    prop_assert!(len >= 1);
                    if maxlen { prop_assert!(len <= p); }
                    if row && s > 0 { prop_assert_eq!(s / g, (s + len - 1) / g, "patch {}..{} crosses a row", s, s + len); }
                }
            }
        }

        #[test]
        fn raising_theta_never_increases_the_number_of_patches((g, mut h, theta, p, [_, maxlen, row]) in arb_case(), bump in 0.0f64..3.0) {
            h[0] = f32::INFINITY;
            let c = PatchConfig { threshold: theta, max_patch_len: p, entropy_gate: true, max_len_rule: maxlen, row_reset: row, entropy_from: EntropyFrom::Model };
            let raised = PatchConfig { threshold: theta + bump, ..c };
            let n = g * g;
            prop_assert!(patch_lengths(&h, g, &raised, n).unwrap().len() <= patch_lengths(&h, g, &c, n).unwrap().len());
        }
    }

    /// Stored thresholds round-trip per patcher, keep each other, and a corrupt file is named.
    #[test]
    fn sampling_thresholds_are_stored_beside_the_model() {
        let dir = std::env::temp_dir().join(format!("dpar-thresholds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(SamplingThresholds::read(&dir).unwrap(), SamplingThresholds::default());
        let c = |t: f64| Calibrated { threshold: t, target_mean_len: 1.8, images: 200, seed: 0 };
        SamplingThresholds::store(&dir, EntropyFrom::Decoder, c(1.81)).unwrap();
        SamplingThresholds::store(&dir.join("model.safetensors"), EntropyFrom::Model, c(2.16)).unwrap();
        let t = SamplingThresholds::read(&dir).unwrap();
        assert_eq!(t.get(EntropyFrom::Decoder), Some(&c(1.81)));
        assert_eq!(t.get(EntropyFrom::Model), Some(&c(2.16)));
        let text = std::fs::read_to_string(dir.join(SamplingThresholds::FILE)).unwrap();
        assert!(text.contains("\"self\"") && text.contains("\"model\""), "{text}");
        std::fs::write(
            dir.join(SamplingThresholds::FILE),
            "{\"self\": {\"threshold\": -1, \"target_mean_len\": 1.8, \"images\": 1, \"seed\": 0}}",
        )
        .unwrap();
        let err = SamplingThresholds::read(&dir).unwrap_err().to_string();
        assert!(err.contains(SamplingThresholds::FILE) && err.contains("-1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
