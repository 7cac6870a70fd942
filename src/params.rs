//! Named trainable parameters with seeded initialisation.
//!
//! candle's CPU device cannot be seeded, so every initial value is drawn here from a ChaCha RNG
//! derived from `(seed, parameter name)`. A parameter's initial value therefore depends only on
//! the run's seed and its own name: adding a layer does not change the others, and runs are
//! reproducible across machines and backends.
//!
//! Names follow the reference checkpoints (LlamaGen, the DPAR authors), so a [`ParamStore`] can
//! load released weights by key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Errors of parameter creation and loading.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    /// A parameter was requested twice with different shapes.
    #[error("parameter `{name}` requested with shape {requested:?} but it already has {existing:?}")]
    ShapeConflict { name: String, requested: Vec<usize>, existing: Vec<usize> },
    /// A weight file lacks parameters the model needs.
    #[error("{path}: missing {} parameter(s): {}", keys.len(), preview(keys))]
    MissingKeys { path: PathBuf, keys: Vec<String> },
    /// A weight file holds a tensor of the wrong shape.
    #[error("{path}: parameter `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A weight file holds keys the model does not know (strict loading only).
    #[error("{path}: {} unexpected parameter(s): {}; the file is not a checkpoint of this model (--allow-extra-keys loads it anyway)", keys.len(), preview(keys))]
    UnexpectedKeys { path: PathBuf, keys: Vec<String> },
    /// A weight file holds a parameter that is not a float tensor or holds NaN/Inf.
    #[error("{path}: parameter `{name}` {problem}; the file is damaged or not a weight file for this model")]
    BadValue { path: PathBuf, name: String, problem: String },
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn preview(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(6).map(|s| s.as_str()).collect();
    if keys.len() > shown.len() {
        format!("{}, ... ({} more)", shown.join(", "), keys.len() - shown.len())
    } else {
        shown.join(", ")
    }
}

pub type Result<T> = std::result::Result<T, ParamError>;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²).
    Normal(f64),
    /// U(−bound, bound).
    Uniform(f64),
    /// Every element equal to the value.
    Const(f64),
}

/// The parameters of one model, by name.
#[derive(Debug)]
pub struct ParamStore {
    vars: Mutex<BTreeMap<String, Var>>,
    seed: u64,
    device: Device,
    dtype: DType,
}

impl ParamStore {
    /// An empty f32 store whose initial values derive from `seed`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self { vars: Mutex::new(BTreeMap::new()), seed, device: device.clone(), dtype: DType::F32 }
    }

    /// The root path builder.
    pub fn root(&self) -> Pb<'_> {
        Pb { store: self, prefix: String::new() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock only means another thread panicked while holding it; the map itself is
        // still consistent (insertions are single operations).
        self.vars.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every parameter, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// A parameter by name.
    pub fn var(&self, name: &str) -> Option<Var> {
        self.lock().get(name).cloned()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }

    /// The parameters as named tensors (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.lock().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// Creates (or returns) the parameter `name`.
    fn get_or_init(&self, name: &str, shape: Shape, init: Init) -> Result<Tensor> {
        let mut vars = self.lock();
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                return Err(ParamError::ShapeConflict {
                    name: name.to_string(),
                    requested: shape.dims().to_vec(),
                    existing: var.dims().to_vec(),
                });
            }
            return Ok(var.as_tensor().clone());
        }
        let count = shape.elem_count();
        let mut rng = crate::util::rng_for(self.seed, name, 0);
        let values: Vec<f32> = match init {
            Init::Normal(std) => {
                // `std` is a finite positive constant chosen in model code, never user input.
                let normal = Normal::new(0.0f64, std).expect("init std must be finite and >= 0");
                (0..count).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            Init::Uniform(bound) => (0..count).map(|_| rng.random_range(-bound..=bound) as f32).collect(),
            Init::Const(value) => vec![value as f32; count],
        };
        let tensor = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// Copies values from `weights` into the store. Every store parameter must be present with the
    /// right shape; extra keys are an error when `strict`, ignored otherwise. Returns the ignored
    /// keys. `path` names the source in errors.
    pub fn load_map(&self, weights: &HashMap<String, Tensor>, path: &Path, strict: bool) -> Result<Vec<String>> {
        let vars = self.lock();
        let mut missing = Vec::new();
        for (name, var) in vars.iter() {
            match weights.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.dims() != var.dims() => {
                    return Err(ParamError::ShapeMismatch {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    })
                }
                Some(t) => {
                    let bad = |problem: String| ParamError::BadValue {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        problem,
                    };
                    if !matches!(t.dtype(), DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
                        return Err(bad(format!("is stored as {:?}, not as a float type", t.dtype())));
                    }
                    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let non_finite = values.iter().filter(|x| !x.is_finite()).count();
                    if non_finite > 0 {
                        return Err(bad(format!("holds {non_finite} NaN or infinite value(s)")));
                    }
                    if let Some(m) = implausible_magnitude(&values) {
                        return Err(bad(format!(
                            "holds values of typical magnitude {m:.1e} (stored as {:?}), far outside what trained weights hold: bytes of another type under this label (F16 labelled BF16?)",
                            t.dtype()
                        )));
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(ParamError::MissingKeys { path: path.to_path_buf(), keys: missing });
        }
        let mut extra: Vec<String> = weights.keys().filter(|k| !vars.contains_key(*k)).cloned().collect();
        extra.sort();
        if strict && !extra.is_empty() {
            return Err(ParamError::UnexpectedKeys { path: path.to_path_buf(), keys: extra });
        }
        for (name, var) in vars.iter() {
            let value = &weights[name];
            var.set(&value.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(extra)
    }

    /// Loads a model's weights: like [`Self::load_file`], but keys the model does not know are
    /// an error (a file of another model, or of another version of this one) unless
    /// [`set_allow_extra_keys`] was set, in which case they are ignored with a warning. Known
    /// buffers of LlamaGen checkpoints ([`KNOWN_BUFFERS`]) are always ignored.
    pub fn load_model_file(&self, path: &Path, pt_key: Option<&str>) -> Result<()> {
        // A refused file leaves the store half-loaded; the caller drops the model with the error.
        let extra = self.load_file(path, false, pt_key)?;
        let unexpected: Vec<String> = extra.into_iter().filter(|k| !KNOWN_BUFFERS.contains(&k.as_str())).collect();
        if !unexpected.is_empty() {
            if !ALLOW_EXTRA_KEYS.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ParamError::UnexpectedKeys { path: path.to_path_buf(), keys: unexpected });
            }
            tracing::warn!(
                "--allow-extra-keys: {}: ignoring {} unexpected parameter(s): {}",
                path.display(),
                unexpected.len(),
                preview(&unexpected)
            );
        }
        Ok(())
    }

    /// Loads weights from a safetensors or PyTorch file (see [`crate::tensor_io::read_weights`]).
    pub fn load_file(&self, path: &Path, strict: bool, pt_key: Option<&str>) -> Result<Vec<String>> {
        let weights = crate::tensor_io::read_weights(path, &self.device, pt_key)?;
        self.load_map(&weights, path, strict)
    }

    /// Saves every parameter (f32) with metadata, atomically.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
        crate::tensor_io::write_safetensors(path, &self.named_tensors(), metadata)?;
        Ok(())
    }
}

/// Buffers that LlamaGen checkpoints carry beside the weights (the VQ model's code-usage
/// counter); loading ignores them.
pub const KNOWN_BUFFERS: &[&str] = &["quantize.codebook_used"];

static ALLOW_EXTRA_KEYS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`ParamStore::load_model_file`] ignores unknown keys (with a warning) instead of
/// refusing the file: the process-wide `--allow-extra-keys` switch.
pub fn set_allow_extra_keys(allow: bool) {
    ALLOW_EXTRA_KEYS.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// A path into a [`ParamStore`]: `pb.pp("layers").pp(3).get(..)` creates `layers.3.<name>`.
#[derive(Clone)]
pub struct Pb<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> Pb<'a> {
    /// A sub-path.
    pub fn pp(&self, part: impl std::fmt::Display) -> Pb<'a> {
        let prefix = if self.prefix.is_empty() { part.to_string() } else { format!("{}.{}", self.prefix, part) };
        Pb { store: self.store, prefix }
    }

    /// The full name of `name` under this path.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Creates or fetches a parameter.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        self.store.get_or_init(&self.name(name), shape.into(), init)
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }
}

/// The median magnitude of a tensor's non-zero values when it lies beyond anything trained
/// weights hold (below 1e-12 or above 1e12), the mark of bytes read under the wrong dtype (the
/// F16 bit pattern of a typical weight, read as BF16, is of order 1e-16). Tensors of fewer than 16
/// non-zero values, and all-zero tensors (a fresh output head), pass.
fn implausible_magnitude(values: &[f32]) -> Option<f32> {
    let mut mags: Vec<f32> = values.iter().map(|x| x.abs()).filter(|&x| x > 0.0).collect();
    if mags.len() < 16 {
        return None;
    }
    let mid = mags.len() / 2;
    let (_, median, _) = mags.select_nth_unstable_by(mid, f32::total_cmp);
    let median = *median;
    (!(1e-12..=1e12).contains(&median)).then_some(median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_values_depend_only_on_seed_and_name() {
        let a = ParamStore::new(3, &Device::Cpu);
        let b = ParamStore::new(3, &Device::Cpu);
        let c = ParamStore::new(4, &Device::Cpu);
        let wa = a.root().pp("x").get((4, 5), "w", Init::Normal(0.02)).unwrap();
        // b creates another parameter first: `x.w` must not change.
        b.root().get(7, "other", Init::Uniform(1.0)).unwrap();
        let wb = b.root().pp("x").get((4, 5), "w", Init::Normal(0.02)).unwrap();
        let wc = c.root().pp("x").get((4, 5), "w", Init::Normal(0.02)).unwrap();
        let diff =
            |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&wa, &wb), 0.0);
        assert!(diff(&wa, &wc) > 0.0);
        let std = wa.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(std > 0.005 && std < 0.05, "std {std}");
    }

    #[test]
    fn loading_reports_missing_and_mismatched_keys() {
        let store = ParamStore::new(0, &Device::Cpu);
        store.root().get((2, 2), "a", Init::Const(0.0)).unwrap();
        store.root().get(3, "b", Init::Const(0.0)).unwrap();
        let mut weights = HashMap::new();
        weights.insert("a".to_string(), Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap());
        let err = store.load_map(&weights, Path::new("w.safetensors"), false).unwrap_err();
        assert!(err.to_string().contains("missing 1 parameter(s): b"), "{err}");
        weights.insert("b".to_string(), Tensor::ones(4, DType::F32, &Device::Cpu).unwrap());
        let err = store.load_map(&weights, Path::new("w.safetensors"), false).unwrap_err();
        assert!(err.to_string().contains("`b` has shape [4]"), "{err}");
        weights.insert("b".to_string(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
        weights.insert("extra".to_string(), Tensor::ones(1, DType::F32, &Device::Cpu).unwrap());
        assert!(store.load_map(&weights, Path::new("w"), true).is_err());
        let ignored = store.load_map(&weights, Path::new("w"), false).unwrap();
        assert_eq!(ignored, vec!["extra".to_string()]);
        let a = store.var("a").unwrap();
        assert_eq!(a.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(), 4.0);
    }

    /// Weights with NaN/Inf, or stored as integers, must not load silently.
    #[test]
    fn loading_refuses_non_finite_and_non_float_weights() {
        let store = ParamStore::new(0, &Device::Cpu);
        store.root().get(3, "w", Init::Const(0.0)).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut weights = HashMap::new();
            weights.insert("w".to_string(), Tensor::new(&[1.0f32, bad, 2.0], &Device::Cpu).unwrap());
            let err = store.load_map(&weights, Path::new("w.safetensors"), false).unwrap_err().to_string();
            assert!(err.contains("`w`") && err.contains("NaN or infinite"), "{err}");
        }
        let mut weights = HashMap::new();
        weights.insert("w".to_string(), Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap());
        let err = store.load_map(&weights, Path::new("w.safetensors"), false).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("U8"), "{err}");
        weights
            .insert("w".to_string(), Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap());
        store.load_map(&weights, Path::new("w.safetensors"), false).unwrap();
    }

    /// F16 bytes labelled BF16 decode to values of order 1e-16 (an f16 weight of 0.02 is
    /// 0x2519; as bf16 that is 2^-53 × 1.2); the store refuses them, and accepts the same
    /// weights under their true label and a fresh all-zero head.
    #[test]
    fn weights_under_the_wrong_dtype_label_are_refused() {
        let store = ParamStore::new(0, &Device::Cpu);
        store.root().get(64, "w", Init::Const(0.0)).unwrap();
        let trained: Vec<f32> = (0..64).map(|i| 0.02 * ((i as f32) * 0.7).sin() + 0.001).collect();
        let f16_bits: Vec<u16> = trained.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
        let relabelled: Vec<half::bf16> = f16_bits.iter().map(|&b| half::bf16::from_bits(b)).collect();
        let mut weights = HashMap::new();
        weights.insert("w".to_string(), Tensor::new(relabelled.as_slice(), &Device::Cpu).unwrap());
        let err = store.load_map(&weights, Path::new("w.safetensors"), false).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("BF16") && err.contains("another type"), "{err}");
        let honest: Vec<half::f16> = f16_bits.iter().map(|&b| half::f16::from_bits(b)).collect();
        weights.insert("w".to_string(), Tensor::new(honest.as_slice(), &Device::Cpu).unwrap());
        store.load_map(&weights, Path::new("w.safetensors"), false).unwrap();
        weights.insert("w".to_string(), Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap());
        store.load_map(&weights, Path::new("w.safetensors"), false).unwrap();
    }
}
