//! AdamW with a per-parameter weight-decay mask, global-norm gradient clipping, and an optimiser
//! state that can be saved and restored exactly (for `--resume`).
//!
//! The update follows PyTorch's `torch.optim.AdamW` step for step (decoupled decay first, then the
//! bias-corrected Adam step with `eps` added to `sqrt(v̂)`), so runs can be compared with the
//! reference implementation. candle has no gradient-clipping helper; [`clip_grad_norm`] is ours.

use std::collections::{BTreeMap, HashMap};

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Errors of the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A hyper-parameter is out of range.
    #[error("optimiser: {0}")]
    BadHyperParameter(String),
    /// A saved optimiser state does not match the parameters.
    #[error("optimiser state: {0}")]
    BadState(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's recipe (design §7): lr 1e-4, betas (0.9, 0.95), weight decay 0.05.
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 }
    }
}

impl AdamWConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(OptimError::BadHyperParameter(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be finite and > 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must lie in [0, 1), got {b}"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad(format!("eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("weight decay must be finite and >= 0, got {}", self.weight_decay));
        }
        Ok(())
    }
}

/// First and second moments of one parameter: host vectors updated by the fused one-pass step
/// (CPU f32 parameters), or candle tensors updated with composed ops (other devices).
enum Moments {
    Host { m: Mutex<Vec<f32>>, v: Mutex<Vec<f32>> },
    Tensors { m: Var, v: Var },
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// One fused AdamW update of a CPU f32 parameter, in place: a single pass reads the gradient and
/// updates the moments and the weight.
struct FusedStep<'a> {
    grad: &'a [f32],
    m: &'a Mutex<Vec<f32>>,
    v: &'a Mutex<Vec<f32>>,
    decay_factor: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
}

impl candle_core::InplaceOp1 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "dpar-adamw"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else { candle_core::bail!("adamw: f32 parameters expected") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: contiguous parameters expected")
        };
        let w = &mut data[start..end];
        let mut m = self.m.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.v.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() != self.grad.len() || m.len() != w.len() {
            candle_core::bail!("adamw: gradient and moments do not match the parameter");
        }
        let (b1, b2) = (self.beta1, self.beta2);
        for i in 0..w.len() {
            let g = self.grad[i];
            let mi = b1 * m[i] + (1.0 - b1) * g;
            let vi = b2 * v[i] + (1.0 - b2) * g * g;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() / self.bias2_sqrt + self.eps;
            w[i] = w[i] * self.decay_factor - self.step_size * mi / denom;
        }
        Ok(())
    }
}

/// AdamW over a fixed list of named parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// Weight decay applies to parameters with at least two dimensions only (matrices and
    /// embeddings, not norms or biases), as in LlamaGen's training script.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let decay = var.rank() >= 2;
            let moments = if var.device().is_cpu() && var.dtype() == DType::F32 {
                let n = var.elem_count();
                Moments::Host { m: Mutex::new(vec![0.0; n]), v: Mutex::new(vec![0.0; n]) }
            } else {
                Moments::Tensors {
                    m: Var::zeros(var.shape(), var.dtype(), var.device())?,
                    v: Var::zeros(var.shape(), var.dtype(), var.device())?,
                }
            };
            slots.push(Slot { name, var, decay, moments });
        }
        Ok(Self { slots, config, step: 0 })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Changes the learning rate (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters this optimiser updates.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// One update from `grads`. Parameters without a gradient are left unchanged (their moments
    /// are not advanced either), as in PyTorch.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let step_size = c.lr / bias1;
        let bias2_sqrt = bias2.sqrt();
        for slot in &self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else { continue };
            let decay_factor = if slot.decay && c.weight_decay > 0.0 { 1.0 - c.lr * c.weight_decay } else { 1.0 };
            match &slot.moments {
                Moments::Host { m, v } => {
                    crate::kernels::with_f32(grad, "adamw grad", |g| {
                        slot.var.as_tensor().inplace_op1(&FusedStep {
                            grad: g,
                            m,
                            v,
                            decay_factor: decay_factor as f32,
                            beta1: c.beta1 as f32,
                            beta2: c.beta2 as f32,
                            step_size: step_size as f32,
                            bias2_sqrt: bias2_sqrt as f32,
                            eps: c.eps as f32,
                        })
                    })?;
                }
                Moments::Tensors { m: m_var, v: v_var } => {
                    let m = ((m_var.as_tensor() * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
                    let v = ((v_var.as_tensor() * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
                    let update = (m.div(&denom)? * step_size)?;
                    let decayed = (slot.var.as_tensor() * decay_factor)?;
                    slot.var.set(&(decayed - update)?)?;
                    m_var.set(&m)?;
                    v_var.set(&v)?;
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`adam.m.<param>`, `adam.v.<param>`) plus the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for slot in &self.slots {
            let (m, v) = match &slot.moments {
                Moments::Host { m, v } => {
                    let to_t = |x: &Mutex<Vec<f32>>| {
                        let data = x.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        Tensor::from_vec(data, slot.var.shape(), slot.var.device())
                    };
                    match (to_t(m), to_t(v)) {
                        (Ok(m), Ok(v)) => (m, v),
                        _ => continue,
                    }
                }
                Moments::Tensors { m, v } => (m.as_tensor().clone(), v.as_tensor().clone()),
            };
            out.push((format!("adam.m.{}", slot.name), m));
            out.push((format!("adam.v.{}", slot.name), v));
        }
        (out, self.step)
    }

    /// Restores a state written by [`AdamW::state`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for slot in &self.slots {
            for kind in ["m", "v"] {
                let key = format!("adam.{kind}.{}", slot.name);
                let value = tensors.get(&key).ok_or_else(|| OptimError::BadState(format!("missing `{key}`")))?;
                if value.dims() != slot.var.dims() {
                    return Err(OptimError::BadState(format!(
                        "`{key}` has shape {:?}, parameter has {:?}",
                        value.dims(),
                        slot.var.dims()
                    )));
                }
                match &slot.moments {
                    Moments::Host { m, v } => {
                        let data = value.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let target = if kind == "m" { m } else { v };
                        *target.lock().unwrap_or_else(|e| e.into_inner()) = data;
                    }
                    Moments::Tensors { m, v } => {
                        let target = if kind == "m" { m } else { v };
                        target.set(value)?;
                    }
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales the gradients of `vars` in place so that their global L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1). Returns the
/// norm before clipping. A non-finite norm is returned unchanged so the caller can stop the run.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl Iterator<Item = &'a Var> + Clone,
    max_norm: f64,
) -> Result<f64> {
    let on_cpu = vars.clone().next().is_none_or(|v| v.device().is_cpu());
    let total = if on_cpu { squares_per_param(grads, vars.clone())? } else { squares_on_device(grads, vars.clone())? };
    let norm = total.sqrt();
    if !norm.is_finite() || max_norm <= 0.0 {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// Σ g² over every gradient, each parameter's sum read back and added in f64 (the CPU path).
fn squares_per_param<'a>(grads: &GradStore, vars: impl Iterator<Item = &'a Var>) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    Ok(total)
}

/// Σ g² with every parameter's sum kept on the device and one transfer in all (a GPU would
/// otherwise wait once per parameter).
fn squares_on_device<'a>(grads: &GradStore, vars: impl Iterator<Item = &'a Var>) -> Result<f64> {
    let sums = vars
        .filter_map(|var| grads.get(var.as_tensor()))
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.reshape(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::cat(&sums, 0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Learning-rate schedule: optional linear warm-up, then constant (default) or cosine decay to
/// `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub warmup_steps: u64,
    pub cosine: bool,
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self { warmup_steps: 0, cosine: false, min_lr: 0.0 }
    }
}

impl LrSchedule {
    /// The learning rate for 0-based `step` of `total_steps`.
    pub fn lr(&self, base_lr: f64, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if !self.cosine || total_steps <= self.warmup_steps {
            return base_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / (total_steps - self.warmup_steps) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.min_lr + (base_lr - self.min_lr) * cosine
    }
}

/// Metadata entries for the optimiser config (saved beside checkpoints).
pub fn config_metadata(config: &AdamWConfig) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    meta.insert("optimizer".to_string(), serde_json::to_string(config).unwrap_or_default());
    meta
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// One AdamW step on a 2-element vector and a 1×2 matrix, computed by hand.
    #[test]
    fn adamw_step_matches_hand_computation() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32, 0.5], &dev).unwrap()).unwrap();
        let config = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.5 };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], config).unwrap();
        // loss = sum(w * [3, 4]) + sum(b²) → dL/dw = [3, 4], dL/db = 2b = [1, 1]
        let loss = ((w.as_tensor() * Tensor::new(&[[3.0f32, 4.0]], &dev).unwrap()).unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        // First step: m̂ = g, v̂ = g², update = lr · g/(|g| + eps) ≈ lr · sign(g).
        // w is decayed first: w·(1 − lr·wd) = w·0.95. b (1-D) is not decayed.
        let w_new = w.as_tensor().to_vec2::<f32>().unwrap();
        let b_new = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!((w_new[0][0] - (0.95 - 0.1)).abs() < 1e-6, "{w_new:?}");
        assert!((w_new[0][1] - (-1.9 - 0.1)).abs() < 1e-6, "{w_new:?}");
        assert!((b_new[0] - 0.4).abs() < 1e-6, "{b_new:?}");
    }

    /// The fused one-pass update equals the composed-op update (an f64 parameter takes the
    /// composed path) over several steps.
    #[test]
    fn fused_update_matches_the_composed_update() {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let w32 = Var::from_tensor(&Tensor::from_vec(init.clone(), (3, 4), &dev).unwrap()).unwrap();
        let w64 =
            Var::from_tensor(&Tensor::from_vec(init, (3, 4), &dev).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
        let config = AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let mut a = AdamW::new(vec![("w".into(), w32.clone())], config).unwrap();
        let mut b = AdamW::new(vec![("w".into(), w64.clone())], config).unwrap();
        for _ in 0..5 {
            a.step(&w32.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap()).unwrap();
            b.step(&w64.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap()).unwrap();
        }
        let x = w32.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = w64.as_tensor().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &dev).unwrap()).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, [&w].into_iter(), 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let g = grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }

    /// The one-transfer sum of squares (the GPU path, run here on the CPU) equals the
    /// per-parameter one.
    #[test]
    fn both_gradient_norm_paths_agree() {
        let dev = Device::Cpu;
        let vars: Vec<Var> =
            (0..5).map(|i| Var::from_tensor(&Tensor::randn(0f32, 1.0, (3 + i, 7), &dev).unwrap()).unwrap()).collect();
        let loss = vars.iter().fold(Tensor::zeros((), DType::F32, &dev).unwrap(), |acc, v| {
            (acc + v.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap()
        });
        let grads = loss.backward().unwrap();
        let (a, b) = (squares_per_param(&grads, vars.iter()).unwrap(), squares_on_device(&grads, vars.iter()).unwrap());
        assert!(a > 0.0 && (a - b).abs() < 1e-6 * a, "{a} vs {b}");
        assert_eq!(squares_on_device(&GradStore::default(), vars.iter()).unwrap(), 0.0);
    }

    #[test]
    fn state_round_trip_restores_moments() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        let grads = w.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
        let (state, step) = opt.state();
        let map: HashMap<_, _> = state.into_iter().collect();
        let w2 = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev).unwrap()).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), w2)], AdamWConfig::default()).unwrap();
        opt2.load_state(&map, step).unwrap();
        assert_eq!(opt2.step_count(), 1);
        let m = opt2.state().0[0].1.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((m - 4.0 * 0.1 * 2.0).abs() < 1e-6);
        let mut bad = map.clone();
        bad.remove("adam.v.w");
        assert!(opt2.load_state(&bad, 1).unwrap_err().to_string().contains("adam.v.w"));
    }

    #[test]
    fn invalid_hyper_parameters_are_rejected() {
        let c = AdamWConfig { lr: -1.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("learning rate"));
        let c = AdamWConfig { beta2: 1.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("beta2"));
    }

    #[test]
    fn warmup_then_cosine_schedule() {
        let s = LrSchedule { warmup_steps: 10, cosine: true, min_lr: 0.0 };
        assert!((s.lr(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::default().lr(0.3, 50, 100) == 0.3);
    }
}
