//! Reading finished (or running) run folders back: one summary per run (shape, budget, cost,
//! final validation loss) for sweep tables, and the logged curves against steps, training
//! wall-clock, training FLOPs or epochs for plots.
//!
//! A run folder is what [`crate::train::run`] writes: `config.json`, `log.jsonl` (one JSON object
//! per logged step, with cumulative `train_seconds`, `train_flops` and `epoch`) and
//! `model.safetensors`.

use std::path::{Path, PathBuf};

/// Errors of reading run folders.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    /// A file of the run is missing or unreadable.
    #[error("{path}: {reason}")]
    BadRun { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, RunsError>;

/// What a run was and what it reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub path: PathBuf,
    /// `gpt`, `entropy`, `dpar`, …
    pub kind: String,
    /// Width, heads and depth (`6` or `1+4+1`).
    pub dim: usize,
    pub heads: usize,
    pub layers: String,
    pub params: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: u64,
    pub cosine: bool,
    pub dropout: f64,
    pub seed: u64,
    /// Kernels the run used (`fused`, `bf16`, `stock`).
    pub ops: String,
    /// The last logged step and the configured total.
    pub step: u64,
    pub steps: u64,
    pub epochs: Option<f64>,
    pub train_seconds: Option<f64>,
    pub train_flops: Option<f64>,
    /// The last validation loss logged, and the step it was logged at.
    pub val_loss: Option<f64>,
    pub val_step: Option<u64>,
    /// DPAR: mean patch-transformer positions per image on the validation images.
    pub val_patches: Option<f64>,
    pub median_ms_per_step: Option<f64>,
}

fn bad(path: &Path, reason: impl Into<String>) -> RunsError {
    RunsError::BadRun { path: path.to_path_buf(), reason: reason.into() }
}

/// The log lines of a run folder (or of a `log.jsonl` given directly).
pub fn read_log(run: &Path) -> Result<Vec<serde_json::Value>> {
    let log = if run.is_dir() { run.join("log.jsonl") } else { run.to_path_buf() };
    let text = std::fs::read_to_string(&log).map_err(|e| bad(&log, format!("cannot read the log: {e}")))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            // The last line of a run killed while appending may be cut short.
            Err(_) if i + 1 == lines.len() => tracing::warn!("{}: skipping its last line, cut short", log.display()),
            Err(e) => return Err(bad(&log, format!("line {} is not a JSON log line: {e}", i + 1))),
        }
    }
    if out.is_empty() {
        return Err(bad(&log, "holds no log lines".to_string()));
    }
    Ok(out)
}

/// Points `(x, y)` of a logged metric against `x_key` (`step`, `train_seconds`, `train_flops`,
/// `epoch`), in log order, skipping lines without both.
pub fn curve(log: &[serde_json::Value], x_key: &str, y_key: &str) -> Vec<(f64, f64)> {
    log.iter().filter_map(|v| Some((v.get(x_key)?.as_f64()?, v.get(y_key)?.as_f64()?))).collect()
}

/// Parameter count of a safetensors weight file (from its header and tensor shapes).
fn count_params(file: &Path) -> Result<usize> {
    let bytes = std::fs::read(file).map_err(|e| bad(file, format!("cannot read: {e}")))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(file, format!("not a safetensors file: {e}")))?;
    Ok(st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum())
}

impl RunSummary {
    /// Reads a run folder.
    pub fn read(run: &Path) -> Result<Self> {
        let config_path = run.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, format!("cannot read: {e}")))?;
        let c: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&config_path, format!("not JSON: {e}")))?;
        let m = &c["model"];
        let t = &c["train"];
        let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as usize;
        let layers = if m.get("global_layers").is_some() {
            format!("{}+{}+{}", u(&m["encoder_layers"]), u(&m["global_layers"]), u(&m["decoder_layers"]))
        } else {
            u(&m["n_layer"]).to_string()
        };
        let log = read_log(run)?;
        let last = |key: &str| log.iter().rev().find_map(|v| v.get(key)?.as_f64());
        let val = log.iter().rev().find(|v| v.get("val_loss").is_some());
        let ms: Vec<f64> = log.iter().filter_map(|v| v.get("ms_per_step")?.as_f64()).collect();
        let model = run.join("model.safetensors");
        Ok(Self {
            path: run.to_path_buf(),
            kind: c["kind"].as_str().unwrap_or("?").to_string(),
            dim: u(&m["dim"]),
            heads: u(&m["n_head"]),
            layers,
            params: if model.is_file() { count_params(&model)? } else { 0 },
            batch_size: u(&c["batch_size"]),
            lr: t["adamw"]["lr"].as_f64().unwrap_or(f64::NAN),
            warmup: t["schedule"]["warmup_steps"].as_u64().unwrap_or(0),
            cosine: t["schedule"]["cosine"].as_bool().unwrap_or(false),
            dropout: m["resid_dropout"].as_f64().unwrap_or(0.0),
            seed: c["seed"].as_u64().unwrap_or(0),
            ops: m["ops"].as_str().unwrap_or("fused").to_string(),
            step: log.iter().filter_map(|v| v.get("step")?.as_u64()).max().unwrap_or(0),
            steps: t["steps"].as_u64().unwrap_or(0),
            epochs: last("epoch"),
            train_seconds: last("train_seconds"),
            train_flops: last("train_flops"),
            val_loss: val.and_then(|v| v["val_loss"].as_f64()),
            val_step: val.and_then(|v| v["step"].as_u64()),
            val_patches: val.and_then(|v| v.get("val_patches_per_image")?.as_f64()),
            median_ms_per_step: (!ms.is_empty()).then(|| crate::util::median(&ms)),
        })
    }

    /// The header of [`RunSummary::markdown_row`].
    pub fn markdown_header() -> String {
        let cols = [
            "run",
            "model",
            "width",
            "layers",
            "heads",
            "params",
            "batch",
            "lr",
            "schedule",
            "dropout",
            "ops",
            "steps",
            "epochs",
            "ms/step",
            "train time",
            "train PFLOP",
            "val loss",
        ];
        format!("| {} |\n|{}|", cols.join(" | "), vec!["---"; cols.len()].join("|"))
    }

    /// One markdown table row.
    pub fn markdown_row(&self, name: &str) -> String {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "–".into());
        let schedule = format!(
            "{}{}",
            if self.warmup > 0 { format!("warm-up {} + ", self.warmup) } else { String::new() },
            if self.cosine { "cosine" } else { "constant" }
        );
        let steps =
            if self.step < self.steps { format!("{} of {}", self.step, self.steps) } else { self.steps.to_string() };
        let val = match (self.val_loss, self.val_step) {
            (Some(v), Some(s)) if s < self.steps => format!("{v:.4} (step {s})"),
            (Some(v), _) => format!("{v:.4}"),
            _ => "–".into(),
        };
        let cells = [
            name.to_string(),
            self.kind.clone(),
            self.dim.to_string(),
            self.layers.clone(),
            self.heads.to_string(),
            format!("{:.2}M", self.params as f64 / 1e6),
            self.batch_size.to_string(),
            format!("{}", self.lr),
            schedule,
            format!("{}", self.dropout),
            self.ops.clone(),
            steps,
            opt(self.epochs, &|e| format!("{e:.2}")),
            opt(self.median_ms_per_step, &|m| format!("{m:.0}")),
            opt(self.train_seconds, &|s| crate::util::human_duration(s)),
            opt(self.train_flops, &|f| format!("{:.3}", f / 1e15)),
            val,
        ];
        format!("| {} |", cells.join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_is_summarised_from_its_config_log_and_weights() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "kind": "gpt", "seed": 3, "batch_size": 32,
            "model": { "dim": 128, "n_layer": 6, "n_head": 4, "resid_dropout": 0.1, "ops": "bf16" },
            "train": { "steps": 100, "adamw": { "lr": 0.001 }, "schedule": { "warmup_steps": 10, "cosine": true } }
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let log = [
            r#"{"step":50,"loss":3.0,"ms_per_step":100.0,"train_seconds":5.0,"train_flops":1e12,"epoch":0.5,"val_loss":3.1}"#,
            r#"{"step":100,"loss":2.0,"ms_per_step":300.0,"train_seconds":10.0,"train_flops":2e12,"epoch":1.0}"#,
            r#"{"step":100,"val_loss":2.5,"train_seconds":10.0,"final":true}"#,
        ];
        std::fs::write(dir.path().join("log.jsonl"), log.join("\n")).unwrap();
        let w = candle_core::Tensor::zeros((3, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w".to_string(), w)]),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let s = RunSummary::read(dir.path()).unwrap();
        assert_eq!((s.kind.as_str(), s.dim, s.layers.as_str(), s.heads, s.params), ("gpt", 128, "6", 4, 12));
        assert_eq!((s.step, s.steps, s.val_step, s.val_loss), (100, 100, Some(100), Some(2.5)));
        assert_eq!((s.epochs, s.train_seconds, s.train_flops), (Some(1.0), Some(10.0), Some(2e12)));
        assert_eq!(s.median_ms_per_step, Some(200.0));
        let row = s.markdown_row("r");
        assert!(row.contains("warm-up 10 + cosine") && row.contains("| 2.5000 |") && row.contains("0.00M"), "{row}");
        assert_eq!(curve(&read_log(dir.path()).unwrap(), "train_seconds", "val_loss"), vec![(5.0, 3.1), (10.0, 2.5)]);
    }

    #[test]
    fn a_folder_without_a_config_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunSummary::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("cannot read"), "{err}");
    }
}
