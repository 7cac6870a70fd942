//! Claims 2–4 as commands: the patch-rule, θ, P and inference-θ ablations (paper Tables 3–6)
//! trained at a small scale over several seeds, and the linear probe (Table 7).
//!
//! Every ablation model is a DPAR model of [`Scale`]; its run folder is named by its patch rules
//! and seed ([`run_name`]), so a table that needs a model another table trained reuses it, and an
//! interrupted sweep resumes where it stopped. Each cell is mean ± half-range over the seeds.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::{ctx, eval_dpar, quality_spread_cells, train_dpar, Env, EvalRow, Result, Spread, Table, QUALITY_HEADER};
use crate::dpar::train::{DparTrainConfig, EntropyCodes};
use crate::dpar::{Dpar, DparConfig};
use crate::gpt::Gpt;
use crate::params::ParamStore;
use crate::patching::PatchConfig;

/// The run folder name of an ablation model: named by its patch rules and seed, so that a table
/// that needs a model another table trained (same rules, same budget) reuses it.
pub fn run_name(patch: &PatchConfig, seed: u64) -> String {
    if !patch.entropy_gate && patch.max_len_rule && patch.row_reset {
        return format!("ablate-static-p{}-s{seed}", patch.max_patch_len);
    }
    let mut name = format!("ablate-theta{:.4}-p{}", patch.threshold, patch.max_patch_len);
    for (on, tag) in [(patch.entropy_gate, "-nogate"), (patch.max_len_rule, "-nomaxlen"), (patch.row_reset, "-norow")] {
        if !on {
            name.push_str(tag);
        }
    }
    format!("{name}-s{seed}")
}

/// The model and training budget of the ablation models, and the seeds each row is trained with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scale {
    /// DPAR model of the ablations (a small one: the tables train about nine per seed).
    pub model: DparConfig,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: u64,
    /// Cosine decay to 0 after the warm-up.
    pub cosine: bool,
    pub seeds: Vec<u64>,
}

impl Scale {
    /// The ablation scale: the main DPAR shape (`DparConfig::mnist()`: width 128, 4 heads,
    /// 1 + 4 + 1 layers, no dropout) trained for 1000 steps of 16 images (0.27 epochs of MNIST)
    /// at lr 2e-3 with a short warm-up and cosine decay, seeds 0 and 1. Like the paper's
    /// ablations (DPAR-L at 50 of 300 epochs) it keeps the model and shortens the training: about
    /// 10 minutes per model on one core, and at this point a DPAR model already follows its class
    /// label (58% class accuracy for the main run's seed-0 snapshot at 0.3 epochs).
    pub fn small(vocab: usize, classes: usize, grid: usize) -> Self {
        let model = DparConfig::mnist().with(|it| {
            it.vocab_size = vocab;
            it.num_classes = classes;
            it.grid_size = grid;
        });
        Self { model, steps: 1000, batch_size: 16, lr: 2e-3, warmup: 20, cosine: true, seeds: vec![0, 1] }
    }

    /// The training config of one ablation model: [`crate::recipe::new_dpar_config`] with
    /// this scale's budget as overrides (the same assembly as `dpar train`).
    pub fn config(&self, env: &Env, patch: PatchConfig, seed: u64) -> Result<DparTrainConfig> {
        let model = self.model.clone().with(|it| {
            it.patch = patch;
        });
        let val = Some(env.setup.test_codes.display().to_string());
        let mut config = crate::recipe::new_dpar_config(model, &env.train, &env.setup.train_codes, val);
        let budget = crate::recipe::Overrides {
            steps: Some(self.steps),
            batch_size: Some(self.batch_size),
            lr: Some(self.lr),
            warmup: Some(self.warmup),
            cosine: Some(self.cosine),
            seed: Some(seed),
            val_images: Some(500),
            log_every: Some(20),
            checkpoint_every: Some(100.min(self.steps)),
            ..Default::default()
        };
        budget.apply_dpar(&mut config).map_err(ctx("ablation config"))?;
        Ok(config)
    }

    pub fn describe(&self) -> String {
        let m = &self.model;
        format!(
            "small scale: DPAR width {}, {}+{}+{} layers, {} steps × {} images (~{:.2} epochs of MNIST), lr {}{}, seeds {:?}",
            m.dim,
            m.encoder_layers,
            m.global_layers,
            m.decoder_layers,
            self.steps,
            self.batch_size,
            (self.steps as f64 * self.batch_size as f64) / 60000.0,
            self.lr,
            if self.cosine { format!(" (warm-up {} + cosine)", self.warmup) } else { String::new() },
            self.seeds
        )
    }

    /// Trains (or finds) the models of `patch`, one per seed.
    fn runs(&self, env: &Env, patch: &PatchConfig) -> Result<Vec<PathBuf>> {
        self.seeds
            .iter()
            .map(|&seed| train_dpar(env, &run_name(patch, seed), self.config(env, *patch, seed)?))
            .collect()
    }

    /// Trains the models of `patch` and evaluates each with the inference patcher `eval_patch`.
    fn evaluate(&self, env: &Env, name: &str, patch: &PatchConfig, eval_patch: &PatchConfig) -> Result<Vec<EvalRow>> {
        self.runs(env, patch)?.iter().map(|run| eval_dpar(env, name, run, eval_patch, env.setup.samples)).collect()
    }
}

/// Every distinct model the ablation tables train, named by their rule: the patch settings of
/// Tables 3, 4 and 5 (Table 6 reuses the full and static models of Table 3).
pub fn ablation_models(
    env: &Env,
    target_len: f64,
    theta_targets: &[f64],
    max_lens: &[usize],
) -> Result<Vec<PatchConfig>> {
    let full = PatchConfig::dpar(0.0, 4);
    let theta = env.theta_for(&full, target_len)?;
    let mut models = vec![
        PatchConfig { threshold: theta, ..full },
        PatchConfig::static_patches(target_len.round().max(1.0) as usize),
        PatchConfig { threshold: theta, max_len_rule: false, row_reset: false, ..full },
        PatchConfig { threshold: theta, max_len_rule: true, row_reset: false, ..full },
    ];
    for &t in theta_targets {
        models.push(PatchConfig { threshold: env.theta_for(&full, t)?, ..full });
    }
    for &p in max_lens {
        models.push(PatchConfig::dpar(theta, p));
    }
    let mut distinct: Vec<PatchConfig> = Vec::new();
    for m in models {
        if !distinct.iter().any(|d| run_name(d, 0) == run_name(&m, 0)) {
            distinct.push(m);
        }
    }
    Ok(distinct)
}

/// Trains every ablation model for the scale's seeds without evaluating any (so that one
/// process per seed can train side by side; the tables then find them trained).
pub fn train_ablation_models(env: &Env, scale: &Scale, models: &[PatchConfig]) -> Result<Vec<PathBuf>> {
    let mut runs = Vec::new();
    for patch in models {
        runs.extend(scale.runs(env, patch)?);
    }
    Ok(runs)
}

fn reports(rows: &[EvalRow]) -> Vec<&crate::eval::QualityReport> {
    rows.iter().map(|r| &r.quality).collect()
}

fn fd_spread(rows: &[EvalRow]) -> Spread {
    Spread::of(&rows.iter().map(|r| r.quality.fd).collect::<Vec<_>>())
}

/// Notes comparing each row's FD with the first row's (the reference setting of a table).
fn fd_verdicts(names: &[String], rows: &[Vec<EvalRow>], reference: usize) -> Vec<String> {
    let reference_fd = fd_spread(&rows[reference]);
    (0..rows.len())
        .filter(|&i| i != reference)
        .map(|i| super::verdict("FD", &names[i], &fd_spread(&rows[i]), &names[reference], &reference_fd, true))
        .collect()
}

/// Table 3: which patch rules matter. Static patches use P = round(mean length of the full
/// method), as in the paper; the entropy rows keep the full method's θ.
pub fn ablate_patching(env: &Env, scale: &Scale, target_len: f64) -> Result<Table> {
    let full = PatchConfig::dpar(0.0, 4);
    let theta = env.theta_for(&full, target_len)?;
    let static_p = target_len.round().max(1.0) as usize;
    let variants = [
        ("entropy+maxlen+row", PatchConfig { threshold: theta, ..full }),
        ("static", PatchConfig::static_patches(static_p)),
        ("entropy", PatchConfig { threshold: theta, max_len_rule: false, row_reset: false, ..full }),
        ("entropy+maxlen", PatchConfig { threshold: theta, max_len_rule: true, row_reset: false, ..full }),
    ];
    let (mut rows, mut data, mut evals, mut names) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, patch) in &variants {
        let evaluated = scale.evaluate(env, name, patch, patch)?;
        let stats = env.patch_stats(patch)?;
        let tick = |b: bool| if b { "✓" } else { "" }.to_string();
        let mut cells = vec![
            tick(patch.entropy_gate),
            if patch.max_len_rule { format!("P={}", patch.max_patch_len) } else { String::new() },
            tick(patch.row_reset),
            format!("{:.2}", stats.mean_len),
        ];
        cells.extend(quality_spread_cells(&reports(&evaluated)));
        rows.push(cells);
        data.push(serde_json::json!({ "variant": name, "patch": patch, "stats": stats, "evals": evaluated }));
        names.push(name.to_string());
        evals.push(evaluated);
    }
    let mut header: Vec<String> =
        ["entropy", "max length", "row reset", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table {
        title: "Patchification strategies (paper Table 3)".into(),
        scale: format!(
            "{}; {} samples per model, cfg {}; cells are mean ± half-range over the seeds",
            scale.describe(),
            env.setup.samples,
            env.setup.cfg_scale
        ),
        header,
        rows,
        notes: fd_verdicts(&names, &evals, 0),
        data: data.into(),
    })
}

/// Table 4: θ sweep at P = 4, θ chosen for mean patch lengths `targets` (the first is the
/// reference setting the others are compared with).
pub fn ablate_threshold(env: &Env, scale: &Scale, targets: &[f64]) -> Result<Table> {
    let base = PatchConfig::dpar(0.0, 4);
    let (mut rows, mut data, mut evals, mut names) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &target in targets {
        let theta = env.theta_for(&base, target)?;
        let patch = PatchConfig { threshold: theta, ..base };
        let name = format!("θ={theta:.3}");
        let evaluated = scale.evaluate(env, &name, &patch, &patch)?;
        let stats = env.patch_stats(&patch)?;
        let mut cells = vec![format!("{theta:.3}"), format!("{:.2}", stats.mean_len)];
        cells.extend(quality_spread_cells(&reports(&evaluated)));
        rows.push(cells);
        data.push(serde_json::json!({ "threshold": theta, "stats": stats, "evals": evaluated }));
        names.push(name);
        evals.push(evaluated);
    }
    let mut header: Vec<String> = ["θ (nats)", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table {
        title: "Entropy threshold θ at P = 4 (paper Table 4)".into(),
        scale: format!(
            "{}; {} samples per model; cells are mean ± half-range over the seeds",
            scale.describe(),
            env.setup.samples
        ),
        header,
        rows,
        notes: fd_verdicts(&names, &evals, 0),
        data: data.into(),
    })
}

/// Table 5: P sweep at the θ of mean length `target_len` (P = 4); `ps[0]` is the reference.
pub fn ablate_max_len(env: &Env, scale: &Scale, target_len: f64, ps: &[usize]) -> Result<Table> {
    let theta = env.theta_for(&PatchConfig::dpar(0.0, 4), target_len)?;
    let (mut rows, mut data, mut evals, mut names) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &p in ps {
        let patch = PatchConfig::dpar(theta, p);
        let name = format!("P={p}");
        let evaluated = scale.evaluate(env, &name, &patch, &patch)?;
        let stats = env.patch_stats(&patch)?;
        let mut cells = vec![p.to_string(), format!("{:.2}", stats.mean_len)];
        cells.extend(quality_spread_cells(&reports(&evaluated)));
        rows.push(cells);
        data.push(serde_json::json!({ "max_patch_len": p, "threshold": theta, "stats": stats, "evals": evaluated }));
        names.push(name);
        evals.push(evaluated);
    }
    let mut header: Vec<String> = ["P", "mean patch len"].iter().map(|s| s.to_string()).collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    Ok(Table {
        title: format!("Maximum patch length P at θ = {theta:.3} (paper Table 5)"),
        scale: format!(
            "{}; {} samples per model; cells are mean ± half-range over the seeds",
            scale.describe(),
            env.setup.samples
        ),
        header,
        rows,
        notes: fd_verdicts(&names, &evals, 0),
        data: data.into(),
    })
}

/// Table 6: raise θ at inference (mean lengths `targets`, the first = training) for the full
/// DPAR model and the static model of [`ablate_patching`] (both trained at mean length
/// `train_len`). The paper's claim: DPAR keeps its FD as θ rises, the static model degrades.
pub fn ablate_inference(env: &Env, scale: &Scale, train_len: f64, targets: &[f64]) -> Result<Table> {
    let full = PatchConfig::dpar(0.0, 4);
    let theta_train = env.theta_for(&full, train_len)?;
    let static_p = train_len.round().max(1.0) as usize;
    let (dpar_patch, static_patch) =
        (PatchConfig { threshold: theta_train, ..full }, PatchConfig::static_patches(static_p));
    let mut header = vec!["model".to_string()];
    let mut thetas = Vec::new();
    let mut lens = vec!["mean patch len".to_string()];
    for &t in targets {
        let theta = env.theta_for(&full, t)?;
        header.push(format!("θ = {theta:.3}"));
        lens.push(format!("{:.2}", env.patch_stats(&PatchConfig { threshold: theta, ..full })?.mean_len));
        thetas.push(theta);
    }
    let mut rows = vec![lens];
    let mut data = Vec::new();
    let mut notes = Vec::new();
    for (name, train_patch) in [("static", &static_patch), ("DPAR", &dpar_patch)] {
        let runs = scale.runs(env, train_patch)?;
        let mut cells = vec![format!("{name} FD ↓")];
        let mut per_theta = Vec::new();
        for &theta in &thetas {
            let patch = PatchConfig { threshold: theta, ..full };
            let evaluated: Vec<EvalRow> =
                runs.iter().map(|run| eval_dpar(env, name, run, &patch, env.setup.samples)).collect::<Result<_>>()?;
            cells.push(fd_spread(&evaluated).show(2));
            data.push(serde_json::json!({ "model": name, "threshold": theta, "evals": evaluated }));
            per_theta.push(evaluated);
        }
        // Degradation: FD at the highest θ against FD at the training θ.
        if let (Some(first), Some(last)) = (per_theta.first(), per_theta.last()) {
            let delta: Vec<f64> = first.iter().zip(last).map(|(a, b)| b.quality.fd - a.quality.fd).collect();
            let d = Spread::of(&delta);
            notes.push(format!(
                "{name}: FD change from θ = {:.3} to θ = {:.3}: {}",
                thetas[0],
                thetas[thetas.len() - 1],
                d.show(2)
            ));
        }
        rows.push(cells);
    }
    Ok(Table {
        title: "Adaptive patch lengths at inference: FD as θ rises (paper Table 6)".into(),
        scale: format!(
            "{}; trained at mean length {train_len} (θ = {theta_train:.3}, static P = {static_p}); {} samples per cell; cells are mean ± half-range over the seeds",
            scale.describe(),
            env.setup.samples
        ),
        header,
        rows,
        notes,
        data: data.into(),
    })
}

/// Average-pooled final hidden states (null class, so no label leaks in) of `n` images of a
/// shard: the patch transformer's outputs for DPAR, the last block's outputs for the baseline.
fn pooled_features(env: &Env, model: &PoolModel, data: &EntropyCodes, n: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let n = n.min(data.shard.len());
    let mut feats = Vec::new();
    for start in (0..n).step_by(50) {
        let idx: Vec<usize> = (start..(start + 50).min(n)).collect();
        match model {
            PoolModel::Dpar(m) => {
                let (codes, _labels, lengths) =
                    crate::dpar::train::batch(data, &idx, m.config(), &env.device).map_err(ctx("probe batch"))?;
                let null =
                    Tensor::new(vec![m.config().num_classes as u32; idx.len()], &env.device).map_err(ctx("labels"))?;
                let layout = m.layout(lengths, m.config().seq_len()).map_err(ctx("layout"))?;
                let (_, g) = m
                    .forward_with_global::<rand_chacha::ChaCha8Rng>(
                        &codes,
                        &null,
                        &layout,
                        crate::dpar::model::GlobalLayout::Packed,
                        None,
                    )
                    .map_err(ctx("DPAR forward"))?;
                for &(start, len) in &layout.packed_segments {
                    // Patch positions only (the class slot's output is left out).
                    let pooled = g
                        .narrow(0, start + 1, len.saturating_sub(1).max(1))
                        .and_then(|x| x.mean(0))
                        .map_err(ctx("pool"))?;
                    feats.extend(pooled.to_vec1::<f32>().map_err(ctx("pool"))?);
                }
            }
            PoolModel::Gpt(m) => {
                let (codes, _labels) =
                    crate::gpt::train::batch_tensors(&data.shard, &idx, &vec![false; idx.len()], &env.device)
                        .map_err(ctx("probe batch"))?;
                let null =
                    Tensor::new(vec![m.config().num_classes as u32; idx.len()], &env.device).map_err(ctx("labels"))?;
                let h = m.hidden_states(&codes, Some(&null)).map_err(ctx("GPT forward"))?;
                let t = h.dim(1).map_err(ctx("pool"))?;
                let pooled = h.narrow(1, 1, t - 1).and_then(|x| x.mean(1)).map_err(ctx("pool"))?;
                feats.extend(pooled.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(ctx("pool"))?);
            }
        }
    }
    Ok((feats, data.shard.labels[..n].to_vec()))
}

#[allow(clippy::large_enum_variant)] // one value per probe run
enum PoolModel {
    Dpar(Dpar),
    Gpt(Gpt),
}

/// Trains a linear classifier (standardised features, AdamW, full batch) and returns top-1 and
/// top-5 test accuracy.
fn probe(
    train: &(Vec<f32>, Vec<u32>),
    test: &(Vec<f32>, Vec<u32>),
    dim: usize,
    classes: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let n = train.1.len();
    let x = Tensor::from_slice(&train.0, (n, dim), device).map_err(ctx("probe"))?;
    let mean = x.mean_keepdim(0).map_err(ctx("probe"))?;
    let std =
        (x.broadcast_sub(&mean).and_then(|d| d.sqr()?.mean_keepdim(0)).and_then(|v| v + 1e-6).and_then(|v| v.sqrt()))
            .map_err(ctx("probe"))?;
    let norm = |t: &Tensor| t.broadcast_sub(&mean).and_then(|d| d.broadcast_div(&std));
    let xs = norm(&x).map_err(ctx("probe"))?;
    let y = Tensor::new(train.1.as_slice(), device).map_err(ctx("probe"))?;
    let store = ParamStore::new(0, device);
    let w = store.root().get((classes, dim), "w", crate::params::Init::Const(0.0)).map_err(ctx("probe"))?;
    let b = store.root().get(classes, "b", crate::params::Init::Const(0.0)).map_err(ctx("probe"))?;
    let mut opt = crate::optim::AdamW::new(
        store.vars(),
        crate::optim::AdamWConfig { lr: 1e-2, weight_decay: 1e-3, ..Default::default() },
    )
    .map_err(ctx("probe"))?;
    for _ in 0..300 {
        let logits =
            xs.matmul(&w.t().map_err(ctx("probe"))?).and_then(|l| l.broadcast_add(&b)).map_err(ctx("probe"))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y).map_err(ctx("probe"))?;
        opt.step(&loss.backward().map_err(ctx("probe"))?).map_err(ctx("probe"))?;
    }
    let m = test.1.len();
    let xt = norm(&Tensor::from_slice(&test.0, (m, dim), device).map_err(ctx("probe"))?).map_err(ctx("probe"))?;
    let logits = xt
        .matmul(&w.t().map_err(ctx("probe"))?)
        .and_then(|l| l.broadcast_add(&b))
        .and_then(|l| l.to_vec2::<f32>())
        .map_err(ctx("probe"))?;
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &yt) in logits.iter().zip(&test.1) {
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        top1 += (order[0] as u32 == yt) as usize;
        top5 += order.iter().take(5).any(|&c| c as u32 == yt) as usize;
    }
    Ok((top1 as f64 / m as f64, top5 as f64 / m as f64))
}

/// Table 7: linear probe on average-pooled final hidden states, DPAR vs baseline, over pairs of
/// runs (one per seed); cells are mean ± half-range.
pub fn linear_probe(
    env: &Env,
    dpar_runs: &[PathBuf],
    gpt_runs: &[PathBuf],
    train_n: usize,
    test_n: usize,
) -> Result<Table> {
    for (runs, dpar) in [(dpar_runs, true), (gpt_runs, false)] {
        for run in runs {
            env.check_run(run, dpar)?;
        }
    }
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut top1 = Vec::new();
    for (name, runs) in [("LlamaGen baseline", gpt_runs), ("DPAR", dpar_runs)] {
        let (mut a1s, mut a5s) = (Vec::new(), Vec::new());
        for run in runs {
            let model = if name == "DPAR" {
                PoolModel::Dpar(crate::dpar::train::load(run, &env.device).map_err(ctx("DPAR model"))?.0)
            } else {
                PoolModel::Gpt(crate::gpt::load(run, None, &env.device).map_err(ctx("GPT model"))?.0)
            };
            let classes = match &model {
                PoolModel::Dpar(m) => m.config().num_classes,
                PoolModel::Gpt(m) => m.config().num_classes,
            };
            let train = pooled_features(env, &model, &env.train, train_n)?;
            let test = pooled_features(env, &model, &env.test, test_n)?;
            let dim = train.0.len() / train.1.len().max(1);
            let (a1, a5) = probe(&train, &test, dim, classes, &env.device)?;
            data.push(serde_json::json!({ "model": name, "run": run, "acc1": a1, "acc5": a5, "train_images": train.1.len(), "test_images": test.1.len() }));
            a1s.push(a1);
            a5s.push(a5);
        }
        rows.push(vec![
            name.to_string(),
            runs.len().to_string(),
            Spread::of(&a1s).show_percent(2),
            Spread::of(&a5s).show_percent(2),
        ]);
        top1.push(Spread::of(&a1s));
    }
    let notes = vec![super::verdict("probe Acc@1", "DPAR", &top1[1], "baseline", &top1[0], false)];
    Ok(Table {
        title: "Linear probe on average-pooled final hidden states (paper Table 7)".into(),
        scale: format!(
            "models {:?} and {:?}; probe trained on {train_n} train images, tested on {test_n} test images (null class input); mean ± half-range over the runs",
            gpt_runs,
            dpar_runs
        ),
        header: vec!["model".into(), "runs".into(), "Acc@1".into(), "Acc@5".into()],
        rows,
        notes,
        data: data.into(),
    })
}
