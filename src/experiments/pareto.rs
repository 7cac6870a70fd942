//! The speed–quality picture of DPAR's patchers (design §9): for each variant, sampling speed
//! relative to the baseline in the same sitting (batch 1 and 100) against the Fréchet distance
//! in the classifier's feature space, with the spread over seeds and sittings as error bars.
//!
//! The inputs are files that other commands write, in one folder per variant (`scripts/pareto`
//! makes them):
//! - `VARIANT/q-*/eval.json`: `dpar eval samples --json` of one sampling run (one seed, or one
//!   training seed × sampling seed); FD and class accuracy;
//! - `VARIANT/speed-*.json`: `dpar bench speed --sampling-curve … --json` of one sitting; its
//!   curve holds the baseline's and this variant's images/s at each batch, timed side by side.
//!
//! The variant named `baseline` gives the baseline's quality; its speed ratio is 1 by definition.

use std::path::{Path, PathBuf};

use super::Spread;

/// Errors of gathering and drawing the picture.
#[derive(Debug, thiserror::Error)]
pub enum ParetoError {
    /// A file could not be read or parsed.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// The folder does not hold what the picture needs.
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
}

pub type Result<T> = std::result::Result<T, ParetoError>;

/// One variant's measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Variant {
    pub name: String,
    /// FD of each sampling run.
    pub fd: Vec<f64>,
    /// Class accuracy (0–1) of each sampling run.
    pub accuracy: Vec<f64>,
    /// Per batch size: this variant's images/s ÷ the baseline's in each sitting.
    pub speedup: Vec<(usize, Vec<f64>)>,
}

impl Variant {
    /// The speed ratios at `batch` (empty when not measured).
    pub fn speedup_at(&self, batch: usize) -> &[f64] {
        self.speedup.iter().find(|(b, _)| *b == batch).map(|(_, v)| v.as_slice()).unwrap_or(&[])
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ParetoError::BadFile { path: path.to_path_buf(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ParetoError::BadFile { path: path.to_path_buf(), reason: e.to_string() })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ParetoError::BadFile { path: dir.to_path_buf(), reason: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// Reads every variant folder of `dir` (sorted by name, `baseline` first).
pub fn gather(dir: &Path) -> Result<Vec<Variant>> {
    let mut variants = Vec::new();
    for folder in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
        let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut v = Variant { name, fd: Vec::new(), accuracy: Vec::new(), speedup: Vec::new() };
        for entry in sorted_entries(&folder)? {
            let file_name = entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if entry.is_dir() && file_name.starts_with("q-") && entry.join("eval.json").is_file() {
                let path = entry.join("eval.json");
                let j = read_json(&path)?;
                let get = |key: &str| {
                    j[key].as_f64().ok_or_else(|| ParetoError::BadFile {
                        path: path.clone(),
                        reason: format!("no number `{key}`"),
                    })
                };
                v.fd.push(get("fd")?);
                v.accuracy.push(get("accuracy")?);
            } else if file_name.starts_with("speed-") && file_name.ends_with(".json") {
                let j = read_json(&entry)?;
                let curve = j["sampling_curve"].as_array().ok_or_else(|| ParetoError::BadFile {
                    path: entry.clone(),
                    reason: "no `sampling_curve` (run `dpar bench speed --sampling-curve …`)".into(),
                })?;
                for point in curve {
                    let (Some(b), Some(g), Some(d)) = (
                        point["batch"].as_u64(),
                        point["gpt_images_per_s"].as_f64(),
                        point["dpar_images_per_s"].as_f64(),
                    ) else {
                        return Err(ParetoError::BadFile {
                            path: entry.clone(),
                            reason: "a curve point lacks batch or images/s".into(),
                        });
                    };
                    let b = b as usize;
                    match v.speedup.iter_mut().find(|(x, _)| *x == b) {
                        Some((_, r)) => r.push(d / g),
                        None => v.speedup.push((b, vec![d / g])),
                    }
                }
            }
        }
        v.speedup.sort_by_key(|(b, _)| *b);
        if !v.fd.is_empty() || !v.speedup.is_empty() {
            variants.push(v);
        }
    }
    variants.sort_by_key(|v| v.name != "baseline");
    if !variants.iter().any(|v| v.name == "baseline") {
        return Err(ParetoError::Missing(format!(
            "{}: no `baseline` folder with q-*/eval.json (the baseline's quality)",
            dir.display()
        )));
    }
    Ok(variants)
}

/// The markdown table: per variant, FD and accuracy (mean ± half-range, runs) and the speed
/// ratio at each batch (mean ± half-range over sittings, with the sittings' count).
pub fn table(variants: &[Variant], batches: &[usize]) -> String {
    let mut out = String::from("| variant | FD (runs) | class accuracy % |");
    for b in batches {
        out.push_str(&format!(" ÷ baseline, batch {b} (sittings) |"));
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&"---|".repeat(batches.len()));
    out.push('\n');
    for v in variants {
        let fd = Spread::of(&v.fd);
        let acc: Vec<f64> = v.accuracy.iter().map(|a| 100.0 * a).collect();
        out.push_str(&format!("| {} | {} ({}) | {} |", v.name, fd.show(2), v.fd.len(), Spread::of(&acc).show(2)));
        for &b in batches {
            let s = if v.name == "baseline" { vec![1.0] } else { v.speedup_at(b).to_vec() };
            if s.is_empty() {
                out.push_str(" – |");
            } else {
                out.push_str(&format!(
                    " {}× ({}) |",
                    Spread::of(&s).show(2),
                    if v.name == "baseline" { 0 } else { s.len() }
                ));
            }
        }
        out.push('\n');
    }
    out
}

/// One panel per batch size: speed ratio (x, min–max over sittings) against FD (y, min–max over
/// runs), one labelled point per variant with quality and speed measured.
pub fn plot(variants: &[Variant], batches: &[usize], path: &Path) -> Result<()> {
    let mut panels = Vec::new();
    for &b in batches {
        let mut points = Vec::new();
        for v in variants {
            let speed = if v.name == "baseline" { vec![1.0] } else { v.speedup_at(b).to_vec() };
            if speed.is_empty() || v.fd.is_empty() {
                continue;
            }
            let range = |x: &[f64]| {
                let s = Spread::of(x);
                let lo = x.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (s.mean, lo, hi)
            };
            let (x, x_lo, x_hi) = range(&speed);
            let (y, y_lo, y_hi) = range(&v.fd);
            points.push(crate::plot::ErrorPoint { name: v.name.clone(), x, x_lo, x_hi, y, y_lo, y_hi });
        }
        if points.is_empty() {
            return Err(ParetoError::Missing(format!(
                "batch {b}: no variant has both quality and speed at this batch"
            )));
        }
        panels.push(crate::plot::ErrorPanel {
            title: format!("batch {b}: speed vs quality (small scale, MNIST)"),
            x_label: format!("images/s ÷ baseline's, batch {b}, same sitting (→ faster)"),
            y_label: "FD, classifier features (↓ better)".into(),
            points,
            x_guide: Some(1.3),
        });
    }
    Ok(crate::plot::error_plot(path, &panels)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, value: serde_json::Value) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, value.to_string()).unwrap();
    }

    /// Hand-made folder: ratios are per sitting (DPAR ÷ baseline of the same file), spreads are
    /// half-ranges, and the baseline sits at 1×.
    #[test]
    fn gathers_ratios_per_sitting_and_spreads_over_runs() {
        let dir = std::env::temp_dir().join(format!("dpar-pareto-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir.join("baseline/q-s0/eval.json"), serde_json::json!({"fd": 40.0, "accuracy": 0.96}));
        write(&dir.join("baseline/q-s1/eval.json"), serde_json::json!({"fd": 44.0, "accuracy": 0.97}));
        write(&dir.join("self/q-s0/eval.json"), serde_json::json!({"fd": 35.0, "accuracy": 0.98}));
        let curve = |g: f64, d: f64| {
            serde_json::json!({"sampling_curve": [
                {"batch": 1, "gpt_images_per_s": g, "dpar_images_per_s": d},
                {"batch": 100, "gpt_images_per_s": 2.0 * g, "dpar_images_per_s": 3.0 * d}]})
        };
        write(&dir.join("self/speed-a.json"), curve(10.0, 12.0));
        write(&dir.join("self/speed-b.json"), curve(20.0, 28.0));
        let v = gather(&dir).unwrap();
        assert_eq!(v[0].name, "baseline");
        assert_eq!(v[0].fd, vec![40.0, 44.0]);
        let s = &v[1];
        assert_eq!(s.speedup_at(1), &[1.2, 1.4]);
        assert!((s.speedup_at(100)[0] - 1.8).abs() < 1e-12 && (s.speedup_at(100)[1] - 2.1).abs() < 1e-12);
        let t = table(&v, &[1, 100]);
        assert!(t.contains("| baseline | 42.00 ± 2.00 (2) | 96.50 ± 0.50 | 1.00× (0) |"), "{t}");
        assert!(t.contains("| self | 35.00 (1) | 98.00 | 1.30 ± 0.10× (2) | 1.95 ± 0.15× (2) |"), "{t}");
        let png = dir.join("pareto.png");
        plot(&v, &[1, 100], &png).unwrap();
        assert!(image::open(&png).unwrap().width() >= 800);
        // A folder without the baseline's quality is refused, naming what is missing.
        std::fs::remove_dir_all(dir.join("baseline")).unwrap();
        assert!(gather(&dir).unwrap_err().to_string().contains("baseline"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
