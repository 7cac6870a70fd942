//! The page's requests: every query parameter checked, with a message naming the parameter and
//! the allowed range for anything else (the server answers those with HTTP 400).

use dpar::patching::{EntropyFrom, PatchConfig};
use dpar::sample::SamplingConfig;

use super::Models;

/// Which model generates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelChoice {
    Dpar = 0,
    Gpt = 1,
}

impl ModelChoice {
    pub fn name(self) -> &'static str {
        match self {
            ModelChoice::Dpar => "dpar",
            ModelChoice::Gpt => "gpt",
        }
    }
}

/// One validated generation request (one image).
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Slow motion: a pause after every code, in ms (0 = full speed), so people can watch.
    pub pace_ms: u64,
    pub model: ModelChoice,
    pub class: u32,
    pub sampling: SamplingConfig,
    pub patch: PatchConfig,
}

impl GenRequest {
    /// The settings this request stands for, as `dpar sample --config` reads them.
    pub fn settings(&self) -> dpar::sample_set::SampleSettings {
        dpar::sample_set::SampleSettings {
            model: Some(self.model.name().to_string()),
            classes: Some(self.class.to_string()),
            per_class: Some(1),
            seed: Some(self.sampling.seed),
            cfg: Some(self.sampling.cfg_scale),
            temperature: Some(self.sampling.temperature),
            top_k: Some(self.sampling.top_k),
            top_p: Some(self.sampling.top_p),
            patch: (self.model == ModelChoice::Dpar).then_some(self.patch),
        }
    }
}

const KEYS: [&str; 16] = [
    "patcher",
    "pace",
    "model",
    "class",
    "seed",
    "cfg",
    "temperature",
    "top_k",
    "top_p",
    "theta",
    "max_patch_len",
    "entropy_gate",
    "max_len",
    "row_reset",
    "static",
    "thetas",
];
const MAX_CFG: f64 = 20.0;
const MAX_TEMPERATURE: f64 = 10.0;
const MAX_THETA: f64 = 50.0;
/// The longest slow-motion pause per code (256 codes × 50 ms = 12.8 s).
const MAX_PACE_MS: u64 = 50;
/// At most this many θ in one sweep (each is one image).
pub const MAX_THETAS: usize = 6;

/// The ranges the page may ask for (sent with `/api/info`).
pub fn limits(grid: usize, vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "cfg": [0.0, MAX_CFG], "temperature": [0.0, MAX_TEMPERATURE], "top_k": [0, vocab],
        "top_p": [0.0, 1.0], "theta": [0.0, MAX_THETA], "max_patch_len": [1, grid], "thetas": MAX_THETAS,
        "pace": [0, MAX_PACE_MS],
    })
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn number<T: std::str::FromStr>(pairs: &[(String, String)], key: &str, default: T) -> Result<T, String> {
    match get(pairs, key) {
        None => Ok(default),
        Some(v) => v.trim().parse::<T>().map_err(|_| format!("{key}: `{v}` is not a number of the right kind")),
    }
}

fn real(pairs: &[(String, String)], key: &str, default: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f64, String> {
    let v = number(pairs, key, default)?;
    if !v.is_finite() || v > hi || v < lo || (lo_open && v == lo) {
        let open = if lo_open { "(" } else { "[" };
        return Err(format!("{key}: {v} is outside {open}{lo}, {hi}]"));
    }
    Ok(v)
}

fn flag(pairs: &[(String, String)], key: &str, default: bool) -> Result<bool, String> {
    match get(pairs, key) {
        None => Ok(default),
        Some("1" | "true" | "on") => Ok(true),
        Some("0" | "false" | "off") => Ok(false),
        Some(v) => Err(format!("{key}: `{v}` is not 0/1 or true/false")),
    }
}

/// Parses and checks a request; `sweep` requests are DPAR only.
pub fn parse(pairs: &[(String, String)], models: &Models, sweep: bool) -> Result<GenRequest, String> {
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown parameter `{k}` (known: {})", KEYS.join(", ")));
    }
    for key in KEYS {
        if pairs.iter().filter(|(k, _)| k == key).count() > 1 {
            return Err(format!("{key}: given more than once"));
        }
    }
    if get(pairs, "thetas").is_some() && !sweep {
        return Err("thetas: only a sweep (/api/sweep) takes several θ".into());
    }
    let c = models.dpar.config();
    let model = match get(pairs, "model").unwrap_or("dpar") {
        "dpar" => ModelChoice::Dpar,
        "gpt" if sweep => return Err("model: a θ sweep is for DPAR only".into()),
        "gpt" if models.gpt.is_none() => return Err("model: this server has no baseline (no gpt/ in --models)".into()),
        "gpt" => ModelChoice::Gpt,
        other => return Err(format!("model: `{other}` is neither `dpar` nor `gpt`")),
    };
    let class_text = get(pairs, "class").ok_or("class: missing (a class number)")?;
    let class: u32 = class_text.trim().parse().map_err(|_| format!("class: `{class_text}` is not a class number"))?;
    if class as usize >= c.num_classes {
        return Err(format!("class: unknown class {class}; the model has classes 0-{}", c.num_classes - 1));
    }
    let sampling = SamplingConfig {
        cfg_scale: real(pairs, "cfg", 2.0, 0.0, MAX_CFG, false)?,
        temperature: real(pairs, "temperature", 1.0, 0.0, MAX_TEMPERATURE, true)?,
        top_k: number(pairs, "top_k", 0usize)?,
        top_p: real(pairs, "top_p", 1.0, 0.0, 1.0, true)?,
        seed: number(pairs, "seed", 0u64)?,
        first_image: 0,
        kv_cache: Default::default(),
    };
    if sampling.top_k > c.vocab_size {
        return Err(format!("top_k: {} is more than the {} codes (0 = off)", sampling.top_k, c.vocab_size));
    }
    sampling.validate().map_err(|e| e.to_string())?;
    let grid = c.grid_size;
    let max_patch_len = number(pairs, "max_patch_len", models.patch.max_patch_len)?;
    if max_patch_len == 0 || max_patch_len > grid {
        return Err(format!("max_patch_len: {max_patch_len} is outside [1, {grid}] (P is at most a grid row)"));
    }
    let patch = if flag(pairs, "static", false)? {
        PatchConfig::static_patches(max_patch_len)
    } else {
        let entropy_from: EntropyFrom = match get(pairs, "patcher") {
            None => Default::default(),
            Some(name) => name.parse().map_err(|e| format!("patcher: {e}"))?,
        };
        // Self-entropy's θ lives on the decoder's scale: its default is the θ stored beside the
        // model, not the training θ of the entropy model.
        let default_theta = match (entropy_from, models.self_theta()) {
            (EntropyFrom::Decoder, Some(theta)) => theta,
            (EntropyFrom::Decoder, None) if get(pairs, "theta").is_none() => {
                return Err("theta: give θ for patcher=self (no self-entropy θ is stored beside the model: `dpar patchify --on-samples … --patcher self --store`)".into())
            }
            _ => models.patch.threshold,
        };
        PatchConfig {
            threshold: real(pairs, "theta", default_theta, 0.0, MAX_THETA, false)?,
            max_patch_len,
            entropy_gate: flag(pairs, "entropy_gate", models.patch.entropy_gate)?,
            max_len_rule: flag(pairs, "max_len", models.patch.max_len_rule)?,
            row_reset: flag(pairs, "row_reset", models.patch.row_reset)?,
            entropy_from,
        }
    };
    patch.validate().map_err(|e| e.to_string())?;
    let pace_ms = number(pairs, "pace", 0u64)?;
    if pace_ms > MAX_PACE_MS {
        return Err(format!("pace: {pace_ms} ms per code is more than {MAX_PACE_MS}"));
    }
    Ok(GenRequest { pace_ms, model, class, sampling, patch })
}

/// The θ of a sweep: 2 to [`MAX_THETAS`] finite values in [0, 50].
pub fn thetas(pairs: &[(String, String)]) -> Result<Vec<f64>, String> {
    let text = get(pairs, "thetas").ok_or("thetas: missing (e.g. thetas=1.5,2,2.5,3)")?;
    let values: Vec<f64> = text
        .split(',')
        .map(|t| t.trim().parse::<f64>().map_err(|_| format!("thetas: `{t}` is not a number")))
        .collect::<Result<_, _>>()?;
    if values.len() < 2 || values.len() > MAX_THETAS {
        return Err(format!("thetas: {} values; give 2 to {MAX_THETAS}", values.len()));
    }
    if let Some(bad) = values.iter().find(|v| !v.is_finite() || **v < 0.0 || **v > MAX_THETA) {
        return Err(format!("thetas: {bad} is outside [0, {MAX_THETA}]"));
    }
    Ok(values)
}
