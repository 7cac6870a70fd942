//! The paper's claims as experiments (design §8), at small MNIST scale: train (or load) models
//! through the shared loop, sample them with the cached generators, and measure quality with the
//! frozen classifier. Every table is printed in markdown and saved as JSON with the scale used.
//!
//! - [`bench::bench`]: LlamaGen baseline vs DPAR with the same budget, over several seeds
//!   (FLOPs, speed, quality, FD against training FLOPs and wall-clock, equal-FLOPs comparison);
//! - [`ablate::ablate_patching`]: static vs entropy vs entropy + max length vs all three (Table 3);
//! - [`ablate::ablate_threshold`] / [`ablate::ablate_max_len`]: θ and P sweeps (Tables 4, 5);
//! - [`ablate::ablate_inference`]: raising θ at inference, DPAR vs static (Table 6);
//! - [`ablate::linear_probe`]: average-pooled final hidden states, DPAR vs baseline (Table 7).
//!
//! Every comparison states its noise: a metric over seeds is reported as mean ± half-range
//! ([`Spread`]), and a difference counts only when it exceeds the two half-ranges together.

pub mod ablate;
pub mod bench;
pub mod pareto;

pub use ablate::{ablate_inference, ablate_max_len, ablate_patching, ablate_threshold, linear_probe, run_name, Scale};
pub use bench::{bench, BenchResult};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::dpar::train::{read_entropy_codes, DparTask, DparTrainConfig, EntropyCodes};
use crate::eval::classifier::Classifier;
use crate::eval::QualityReport;
use crate::gpt::Gpt;
use crate::params::ParamStore;
use crate::patching::{PatchConfig, PatchStats};
use crate::sample::SamplingConfig;
use crate::tokenizer::train::Tokenizer;

/// Errors of the experiments. A failed stage keeps the error it wraps as its source.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// A stage failed; `context` says which and for what input.
    #[error("{context}")]
    Stage {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The shards were made by another tokenizer than the one given.
    #[error("{}: codes were made by tokenizer {codes_id}…, but --tokenizer {} is {tokenizer_id}…", codes.display(), tokenizer.display())]
    OtherTokenizer { codes: PathBuf, codes_id: String, tokenizer: PathBuf, tokenizer_id: String },
    /// A run folder to be reused (finished) or resumed holds a run of another configuration.
    #[error("{}: holds a run trained with another configuration ({}); remove that folder or give another --out", run.display(), differences.join("; "))]
    StaleRun { run: PathBuf, differences: Vec<String> },
}

pub type Result<T> = std::result::Result<T, ExperimentError>;

fn ctx<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &str) -> impl FnOnce(E) -> ExperimentError + '_ {
    move |e| ExperimentError::Stage { context: what.to_string(), source: e.into() }
}

/// Where the inputs are and how much to spend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setup {
    pub train_codes: PathBuf,
    pub test_codes: PathBuf,
    pub tokenizer: PathBuf,
    pub entropy_model: PathBuf,
    pub classifier: PathBuf,
    /// Folder of the dataset (for the reference split's images).
    pub data: PathBuf,
    /// Where runs and results go.
    pub out: PathBuf,
    /// Samples per quality measurement (and reference test images).
    pub samples: usize,
    /// Images generated together.
    pub sample_batch: usize,
    pub cfg_scale: f64,
    pub seed: u64,
    /// Runs whose recorded tokenizer or entropy model differ from these are measured anyway
    /// (with a warning) instead of refused.
    #[serde(default)]
    pub allow_mismatch: bool,
}

/// The tokenizer and entropy model of the codes `train_codes`: a given one is checked against the
/// id the codes (or their entropies) record; a missing one is the recorded one, found beside the
/// codes' folder, in `models/mnist` or in `runs`.
pub fn find_parts(
    train_codes: &Path,
    tokenizer: Option<&Path>,
    entropy_model: Option<&Path>,
    allow_mismatch: bool,
) -> Result<(PathBuf, PathBuf)> {
    use crate::parts::{resolve, Part};
    let owner = format!("the codes {}", train_codes.display());
    // The ids the first shard and its sidecar record (metadata only; Env::load checks them all).
    let first = crate::data::shards::shard_files(train_codes)
        .map_err(ctx("--train-codes"))?
        .into_iter()
        .next()
        .ok_or_else(|| ctx("--train-codes")(format!("{}: no shards", train_codes.display())))?;
    let tokenizer_id =
        crate::tensor_io::read_safetensors_metadata(&first).map_err(ctx("--train-codes"))?.get("tokenizer_id").cloned();
    let entropy_id = crate::tensor_io::read_safetensors_metadata(&crate::data::shards::entropy_path(&first))
        .ok()
        .and_then(|m| m.get("entropy_model_id").cloned());
    let tokenizer = resolve(Part::Tokenizer, tokenizer, tokenizer_id.as_deref(), train_codes, &owner, allow_mismatch)
        .map_err(ctx("--tokenizer"))?;
    let entropy_model =
        resolve(Part::EntropyModel, entropy_model, entropy_id.as_deref(), train_codes, &owner, allow_mismatch)
            .map_err(ctx("--entropy-model"))?;
    Ok((tokenizer, entropy_model))
}

/// Loaded inputs shared by every experiment.
pub struct Env {
    pub setup: Setup,
    pub device: Device,
    pub tokenizer: Tokenizer,
    pub classifier: Classifier,
    _classifier_store: ParamStore,
    pub classifier_sha256: String,
    /// Features of the first `samples` test images.
    pub reference: Vec<f32>,
    pub entropy_model: Gpt,
    _entropy_store: ParamStore,
    pub entropy_model_id: String,
    pub train: EntropyCodes,
    pub test: EntropyCodes,
}

impl Env {
    /// Checks that a run was trained on this setup's codes (its recorded tokenizer) and, for
    /// DPAR, cut into patches by this setup's entropy model.
    pub fn check_run(&self, run: &Path, dpar: bool) -> Result<()> {
        let recorded = crate::parts::Recorded::of(run);
        let owner = format!("the run {}", run.display());
        let allow = self.setup.allow_mismatch;
        if let Some(id) = &recorded.tokenizer_id {
            crate::parts::check(crate::parts::Part::Tokenizer, &self.setup.tokenizer, id, &owner, allow)
                .map_err(ctx("--tokenizer"))?;
        }
        if dpar {
            if let Some(id) = &recorded.entropy_model_id {
                crate::parts::check(crate::parts::Part::EntropyModel, &self.setup.entropy_model, id, &owner, allow)
                    .map_err(ctx("--entropy-model"))?;
            }
        }
        Ok(())
    }

    pub fn load(setup: Setup, device: &Device) -> Result<Self> {
        let tokenizer = Tokenizer::load(&setup.tokenizer, None, device).map_err(ctx("tokenizer"))?;
        let (classifier, cstore, hash) =
            crate::eval::classifier::load(&setup.classifier, device).map_err(ctx("classifier"))?;
        let cc = classifier.config().clone();
        let source = crate::data::resolve(&setup.data, "test").map_err(ctx("test split"))?;
        let test_images =
            crate::data::load(&source, cc.image_size, cc.in_channels).map_err(ctx("test split"))?.take(setup.samples);
        let (mut reference, mut probs) = (Vec::new(), Vec::new());
        let idx: Vec<usize> = (0..test_images.len()).collect();
        for chunk in idx.chunks(1000) {
            let x = test_images.batch_tensor(chunk, false, device).map_err(ctx("test images"))?;
            let (f, p) = classifier.features_and_probs(&x).map_err(ctx("reference features"))?;
            reference.extend(f);
            probs.extend(p);
        }
        crate::eval::classifier::check_reference_data(
            &probs,
            &test_images.labels,
            cc.num_classes,
            crate::eval::classifier::recorded_accuracy(&setup.classifier),
            &test_images.source,
        )
        .map_err(ctx("--data"))?;
        let (entropy_model, estore) =
            crate::gpt::load(&setup.entropy_model, None, device).map_err(ctx("entropy model"))?;
        let efile = if setup.entropy_model.is_dir() {
            setup.entropy_model.join("model.safetensors")
        } else {
            setup.entropy_model.clone()
        };
        let entropy_model_id = crate::util::sha256_file(&efile).map_err(ctx("entropy model"))?;
        let train = read_entropy_codes(&setup.train_codes, Some(&entropy_model_id)).map_err(ctx("training shards"))?;
        let test = read_entropy_codes(&setup.test_codes, Some(&entropy_model_id)).map_err(ctx("test shards"))?;
        for (codes, info) in [(&setup.train_codes, &train.shard.info), (&setup.test_codes, &test.shard.info)] {
            if info.tokenizer_id != tokenizer.id {
                return Err(ExperimentError::OtherTokenizer {
                    codes: codes.clone(),
                    codes_id: info.tokenizer_id[..12.min(info.tokenizer_id.len())].to_string(),
                    tokenizer: setup.tokenizer.clone(),
                    tokenizer_id: tokenizer.id[..12.min(tokenizer.id.len())].to_string(),
                });
            }
        }
        Ok(Self {
            setup,
            device: device.clone(),
            tokenizer,
            classifier,
            _classifier_store: cstore,
            classifier_sha256: hash,
            reference,
            entropy_model,
            _entropy_store: estore,
            entropy_model_id,
            train,
            test,
        })
    }

    /// Balanced labels for `n` samples (class i for sample i mod classes).
    fn labels(&self, n: usize, classes: usize) -> Vec<u32> {
        (0..n).map(|i| (i % classes) as u32).collect()
    }

    /// Patch statistics of the training entropies under `config`.
    pub fn patch_stats(&self, config: &PatchConfig) -> Result<PatchStats> {
        crate::patching::stats(&self.train.entropies.entropy, self.train.shard.info.grid_size, config)
            .map_err(ctx("patch statistics"))
    }

    /// θ giving mean patch length `target` on the training entropies with the other settings
    /// of `base`.
    pub fn theta_for(&self, base: &PatchConfig, target: f64) -> Result<f64> {
        Ok(crate::patching::calibrate(&self.train.entropies.entropy, self.train.shard.info.grid_size, base, target)
            .map_err(ctx("θ calibration"))?
            .0)
    }

    /// The floor: the first `samples` real train images, measured like samples against the
    /// same reference test images.
    pub fn real_floor(&self) -> Result<QualityReport> {
        let cc = self.classifier.config().clone();
        let source = crate::data::resolve(&self.setup.data, "train").map_err(ctx("train split"))?;
        let train = crate::data::load(&source, cc.image_size, cc.in_channels)
            .map_err(ctx("train split"))?
            .take(self.setup.samples);
        let idx: Vec<usize> = (0..train.len()).collect();
        let images = train.batch_tensor(&idx, false, &self.device).map_err(ctx("train images"))?;
        crate::eval::quality(&self.classifier, &self.classifier_sha256, &images, Some(&train.labels), &self.reference)
            .map_err(ctx("metrics"))
    }

    fn quality(&self, codes: &[Vec<u32>], labels: &[u32]) -> Result<QualityReport> {
        let l = self.tokenizer.config.seq_len();
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        let mut images = Vec::new();
        for start in (0..codes.len()).step_by(200) {
            let len = 200.min(codes.len() - start);
            let t = Tensor::from_slice(&flat[start * l..(start + len) * l], (len, l), &self.device)
                .map_err(ctx("codes"))?;
            images.push(self.tokenizer.decode(&t).map_err(ctx("decode"))?.clamp(-1f32, 1f32).map_err(ctx("decode"))?);
        }
        let images = Tensor::cat(&images, 0).map_err(ctx("decode"))?;
        crate::eval::quality(&self.classifier, &self.classifier_sha256, &images, Some(labels), &self.reference)
            .map_err(ctx("metrics"))
    }
}

/// One evaluated model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRow {
    pub name: String,
    pub quality: QualityReport,
    pub images_per_s: f64,
    /// Mean transformer positions per image (L for the baseline, patches for DPAR).
    pub positions_per_image: f64,
}

/// Samples `n` images from a trained DPAR model with the inference patcher `patch` and measures
/// them.
pub fn eval_dpar(env: &Env, name: &str, run: &Path, patch: &PatchConfig, n: usize) -> Result<EvalRow> {
    env.check_run(run, true)?;
    let (model, _s, _c) = crate::dpar::train::load(run, &env.device).map_err(ctx("DPAR model"))?;
    let labels = env.labels(n, model.config().num_classes);
    let t = Instant::now();
    let mut codes = Vec::with_capacity(n);
    let mut steps = 0usize;
    for (i, chunk) in labels.chunks(env.setup.sample_batch).enumerate() {
        let sampling = SamplingConfig {
            cfg_scale: env.setup.cfg_scale,
            seed: env.setup.seed,
            first_image: (i * env.setup.sample_batch) as u64,
            ..Default::default()
        };
        let out = crate::dpar::generate::generate(&model, &env.entropy_model, chunk, &sampling, patch, &env.device)
            .map_err(ctx("DPAR sampling"))?;
        steps += out.global_steps().iter().sum::<usize>();
        codes.extend(out.codes);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(EvalRow {
        name: name.into(),
        quality: env.quality(&codes, &labels)?,
        images_per_s: n as f64 / secs,
        positions_per_image: steps as f64 / n as f64,
    })
}

/// Samples `n` images from a trained GPT baseline and measures them.
pub fn eval_gpt(env: &Env, name: &str, run: &Path, n: usize) -> Result<EvalRow> {
    env.check_run(run, false)?;
    let (model, _s) = crate::gpt::load(run, None, &env.device).map_err(ctx("GPT model"))?;
    let labels = env.labels(n, model.config().num_classes);
    let t = Instant::now();
    let mut codes = Vec::with_capacity(n);
    for (i, chunk) in labels.chunks(env.setup.sample_batch).enumerate() {
        let sampling = SamplingConfig {
            cfg_scale: env.setup.cfg_scale,
            seed: env.setup.seed,
            first_image: (i * env.setup.sample_batch) as u64,
            ..Default::default()
        };
        codes.extend(crate::sample::generate_gpt(&model, chunk, &sampling, &env.device).map_err(ctx("GPT sampling"))?);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(EvalRow {
        name: name.into(),
        quality: env.quality(&codes, &labels)?,
        images_per_s: n as f64 / secs,
        positions_per_image: model.config().seq_len() as f64,
    })
}

/// Keys of a saved run config that do not define the model or its training: where the codes
/// were read from (their identity is checked through `tokenizer_id` and `entropy_model_id`), the
/// kernel choice (a runtime setting) and bookkeeping intervals.
const NOT_DEFINING: [&str; 7] =
    ["codes", "val_codes", "val_images", "model.ops", "train.checkpoint_every", "train.log_every", "train.eval_every"];

/// Differences between a saved run config and the one asked for, as "key: saved A, now B",
/// leaving out [`NOT_DEFINING`] keys.
fn config_differences(saved: &serde_json::Value, wanted: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    if NOT_DEFINING.contains(&prefix) {
        return;
    }
    match (saved, wanted) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                config_differences(
                    a.get(k.as_str()).unwrap_or(&Value::Null),
                    b.get(k.as_str()).unwrap_or(&Value::Null),
                    &key,
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{prefix}: saved {a}, now {b}")),
        _ => {}
    }
}

/// Refuses to reuse or resume `run` when its saved `config.json` differs from `config` in
/// anything that defines the model or its training (a table must not silently come from stale
/// models). A folder without a saved config is fresh.
fn check_same_config<C: serde::Serialize>(run: &Path, config: &C) -> Result<()> {
    let file = run.join("config.json");
    let Ok(bytes) = std::fs::read(&file) else { return Ok(()) };
    let saved: serde_json::Value = serde_json::from_slice(&bytes).map_err(ctx(&format!("{}", file.display())))?;
    let wanted = serde_json::to_value(config).map_err(ctx("config"))?;
    let mut differences = Vec::new();
    config_differences(&saved, &wanted, "", &mut differences);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(ExperimentError::StaleRun { run: run.to_path_buf(), differences })
    }
}

/// Whether a run folder holds a finished training of `steps` steps.
fn finished(run: &Path, steps: u64) -> bool {
    crate::tensor_io::read_safetensors_metadata(&run.join("checkpoint.safetensors"))
        .ok()
        .and_then(|m| m.get("step").and_then(|s| s.parse::<u64>().ok()))
        .is_some_and(|s| s >= steps)
}

/// Trains a DPAR variant into `out/name` (resuming; skipped when already finished).
pub fn train_dpar(env: &Env, name: &str, config: DparTrainConfig) -> Result<PathBuf> {
    let run = env.setup.out.join(name);
    check_same_config(&run, &config)?;
    if finished(&run, config.train.steps) {
        tracing::info!("{name}: already trained in {}", run.display());
        return Ok(run);
    }
    tracing::info!("{name}: training ({})", config.model.patch.label());
    let mut task =
        DparTask::new(config.clone(), env.train.clone(), Some(env.test.clone()), &env.device).map_err(ctx(name))?;
    crate::train::run(&mut task, &config.train, &run, true).map_err(ctx(name))?;
    Ok(run)
}

/// A results table: markdown for people, JSON for programs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Table {
    pub title: String,
    pub scale: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table (verdicts against the measured spread).
    pub notes: Vec<String>,
    pub data: serde_json::Value,
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "### {}\n\n{}\n\n| {} |\n|{}|\n",
            self.title,
            self.scale,
            self.header.join(" | "),
            vec!["---"; self.header.len()].join("|")
        );
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        s
    }

    /// Prints the table and writes `name.md` and `name.json` into `dir`.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        println!("{}", self.markdown());
        crate::util::write_atomic(&dir.join(format!("{name}.md")), self.markdown().as_bytes())
            .map_err(ctx("writing results"))?;
        let json = serde_json::to_string_pretty(self).map_err(ctx("json"))?;
        crate::util::write_atomic(&dir.join(format!("{name}.json")), json.as_bytes())
            .map_err(ctx("writing results"))?;
        println!("wrote {}/{name}.{{md,json}}", dir.display());
        Ok(())
    }
}

/// Mean and half-range of one metric over seeds: the spread a claim is judged against.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    pub mean: f64,
    /// (max − min) / 2 over the seeds; 0 for one seed.
    pub half_range: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self { mean: f64::NAN, half_range: f64::NAN, n };
        }
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        Self { mean: values.iter().sum::<f64>() / n as f64, half_range: (max - min) / 2.0, n }
    }

    /// `12.34 ± 0.56` (just the mean for one seed).
    pub fn show(&self, decimals: usize) -> String {
        if self.n > 1 {
            format!("{:.*} ± {:.*}", decimals, self.mean, decimals, self.half_range)
        } else {
            format!("{:.*}", decimals, self.mean)
        }
    }

    /// The same in percent (for shares such as class accuracy).
    pub fn show_percent(&self, decimals: usize) -> String {
        Spread { mean: 100.0 * self.mean, half_range: 100.0 * self.half_range, n: self.n }.show(decimals) + "%"
    }
}

/// Compares `a` with `b` on a metric against their spreads: a difference of the means counts
/// only when it exceeds the sum of the two half-ranges (and needs two seeds a side to say so).
pub fn verdict(metric: &str, a_name: &str, a: &Spread, b_name: &str, b: &Spread, lower_is_better: bool) -> String {
    let diff = a.mean - b.mean;
    let noise = a.half_range + b.half_range;
    let a_better = if lower_is_better { diff < 0.0 } else { diff > 0.0 };
    let (winner, loser) = if a_better { (a_name, b_name) } else { (b_name, a_name) };
    if a.n < 2 || b.n < 2 {
        let what = format!("{metric}: {a_name} {:.3} vs {b_name} {:.3} (difference {:+.3})", a.mean, b.mean, diff);
        return format!("{what}: one seed on a side, so the spread between seeds is unknown; not a verdict");
    }
    let what = format!(
        "{metric}: {a_name} {:.3} vs {b_name} {:.3} (difference {:+.3}, spread ±{noise:.3})",
        a.mean, b.mean, diff
    );
    if diff.abs() > noise {
        format!("{what}: {winner} better than {loser} beyond the spread")
    } else {
        format!("{what}: within the spread (no difference shown)")
    }
}

fn quality_cells(q: &QualityReport) -> Vec<String> {
    vec![
        format!("{:.2}", q.fd),
        format!("{:.2}", q.is_mean),
        format!("{:.3}", q.precision),
        format!("{:.3}", q.recall),
        q.accuracy.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_default(),
    ]
}

/// Quality cells of several seeds' reports, each as mean ± half-range.
fn quality_spread_cells(reports: &[&QualityReport]) -> Vec<String> {
    let of = |f: &dyn Fn(&QualityReport) -> f64| Spread::of(&reports.iter().map(|q| f(q)).collect::<Vec<_>>());
    let acc: Vec<f64> = reports.iter().filter_map(|q| q.accuracy).collect();
    vec![
        of(&|q| q.fd).show(2),
        of(&|q| q.is_mean).show(2),
        of(&|q| q.precision).show(3),
        of(&|q| q.recall).show(3),
        if acc.is_empty() { String::new() } else { Spread::of(&acc).show_percent(1) },
    ]
}

const QUALITY_HEADER: [&str; 5] = ["FD ↓", "classifier IS ↑", "precision ↑", "recall ↑", "class acc ↑"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_mean_and_half_range_and_verdicts_respect_it() {
        let a = Spread::of(&[10.0, 14.0]);
        assert_eq!((a.mean, a.half_range, a.n), (12.0, 2.0, 2));
        assert_eq!(a.show(1), "12.0 ± 2.0");
        assert_eq!(Spread::of(&[0.5]).show_percent(1), "50.0%");
        let b = Spread::of(&[20.0, 21.0]);
        // 12 vs 20.5: a difference of 8.5 against a spread of 2.5.
        assert!(
            verdict("FD", "DPAR", &a, "baseline", &b, true).ends_with("DPAR better than baseline beyond the spread")
        );
        assert!(
            verdict("acc", "DPAR", &a, "baseline", &b, false).ends_with("baseline better than DPAR beyond the spread")
        );
        let c = Spread::of(&[13.0, 15.5]);
        assert!(verdict("FD", "DPAR", &a, "baseline", &c, true).contains("within the spread"));
        assert!(verdict("FD", "DPAR", &Spread::of(&[1.0]), "baseline", &c, true).contains("not a verdict"));
    }

    /// A run folder is reused only when its saved config matches in everything that defines the
    /// model and its training; paths, the kernel choice and bookkeeping intervals may differ.
    #[test]
    fn a_run_folder_with_another_config_is_refused_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("ablate-x-s0");
        let saved = serde_json::json!({
            "codes": "data/codes/train", "seed": 0, "tokenizer_id": "abc",
            "model": { "dim": 128, "ops": "fused", "patch": { "max_patch_len": 4, "threshold": "inf" } },
            "train": { "steps": 1000, "log_every": 20, "adamw": { "lr": 0.002 } }
        });
        // No folder yet: a fresh run.
        check_same_config(&run, &saved).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("config.json"), serde_json::to_vec_pretty(&saved).unwrap()).unwrap();
        check_same_config(&run, &saved).unwrap();
        let mut harmless = saved.clone();
        harmless["codes"] = "/elsewhere/train".into();
        harmless["model"]["ops"] = "bf16".into();
        harmless["train"]["log_every"] = 50.into();
        check_same_config(&run, &harmless).unwrap();
        let mut other = saved.clone();
        other["model"]["patch"]["max_patch_len"] = 8.into();
        other["train"]["adamw"]["lr"] = 0.001.into();
        let err = check_same_config(&run, &other).unwrap_err().to_string();
        assert!(err.contains("model.patch.max_patch_len: saved 4, now 8"), "{err}");
        assert!(err.contains("train.adamw.lr: saved 0.002, now 0.001"), "{err}");
        assert!(err.contains("ablate-x-s0"), "{err}");
        let mut extra = saved.clone();
        extra["model"]["encoder_layers"] = 2.into();
        assert!(check_same_config(&run, &extra)
            .unwrap_err()
            .to_string()
            .contains("model.encoder_layers: saved null, now 2"));
    }
}
