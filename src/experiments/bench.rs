//! Claim 1 as a command: the LlamaGen baseline against DPAR of the same width and depth, trained
//! on the same codes for the same epochs, each with one run per seed.
//!
//! For every run: quality of its final weights (FD, IS, precision/recall, class accuracy),
//! sampling speed, FLOPs and training cost, and an FD curve over its weight snapshots placed
//! against training FLOPs and training wall-clock (from the run's log). Each metric is reported
//! as mean ± half-range over the seeds. The paper compares at equal epochs; the table adds the
//! comparison at equal training FLOPs by reading the baseline's curves at DPAR's FLOPs.

use std::path::{Path, PathBuf};

use super::{
    ctx, eval_dpar, eval_gpt, quality_cells, quality_spread_cells, verdict, Env, EvalRow, Result, Spread, Table,
    QUALITY_HEADER,
};
use crate::eval::QualityReport;

/// One point of a run's quality curve: a weight snapshot and where the run was when it was taken.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CurvePoint {
    pub step: u64,
    pub epoch: Option<f64>,
    pub train_flops: Option<f64>,
    pub train_seconds: Option<f64>,
    pub quality: QualityReport,
}

/// Everything measured of one trained run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub model: String,
    pub run: PathBuf,
    pub seed: u64,
    pub eval: EvalRow,
    pub fwd_gflops_per_image: f64,
    pub ms_per_step: f64,
    pub epochs: Option<f64>,
    pub train_flops: Option<f64>,
    pub train_seconds: Option<f64>,
    pub curve: Vec<CurvePoint>,
}

/// The bench: per-run results, the real-data floor at the same sample count, and the tables.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub runs: Vec<RunResult>,
    /// Real train images against the reference test images, the same count as the samples.
    pub floor: QualityReport,
    pub table: Table,
}

/// Values of a log key at the line of `step` (the snapshot's step), if logged.
fn logged_at(log: &[serde_json::Value], step: u64, key: &str) -> Option<f64> {
    log.iter().filter(|v| v.get("step").and_then(|s| s.as_u64()) == Some(step)).find_map(|v| v.get(key)?.as_f64())
}

/// FD (and the rest) of every weight snapshot of a run, `n` samples each, placed on the run's
/// FLOPs and wall-clock axes.
pub fn quality_curve(env: &Env, run: &Path, dpar: bool, n: usize) -> Result<Vec<CurvePoint>> {
    env.check_run(run, dpar)?;
    let log = crate::runs::read_log(run).unwrap_or_default();
    let mut points = Vec::new();
    for (step, path) in crate::train::RunPaths::new(run).list_snapshots() {
        let cache = curve_cache_file(env, &path, n)?;
        let quality = match std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice::<QualityReport>(&b).ok()) {
            Some(q) => {
                tracing::info!("{}: step {step}: measured before ({})", run.display(), cache.display());
                q
            }
            None => {
                let row = if dpar {
                    let (_, _, cfg) = crate::dpar::train::load(&path, &env.device).map_err(ctx("snapshot"))?;
                    eval_dpar(env, "snapshot", &path, &cfg.model.patch, n)?
                } else {
                    eval_gpt(env, "snapshot", &path, n)?
                };
                let json = serde_json::to_vec_pretty(&row.quality).map_err(ctx("curve cache"))?;
                crate::util::write_atomic(&cache, &json).map_err(ctx("curve cache"))?;
                row.quality
            }
        };
        tracing::info!(
            "{}: step {step}: FD {:.3}, class accuracy {:.1}%",
            run.display(),
            quality.fd,
            100.0 * quality.accuracy.unwrap_or(f64::NAN)
        );
        points.push(CurvePoint {
            step,
            epoch: logged_at(&log, step, "epoch"),
            train_flops: logged_at(&log, step, "train_flops"),
            train_seconds: logged_at(&log, step, "train_seconds"),
            quality,
        });
    }
    Ok(points)
}

/// Where the measurement of one snapshot is kept: `<run>/snapshots/quality/<key>.json` beside
/// the snapshot (so every bench of the run finds it, whatever its --out), the key a hash
/// of everything that decides the numbers (the snapshot's bytes, sample count, cfg, seed,
/// batch, tokenizer, entropy model, classifier, reference count). A snapshot never changes, so an
/// interrupted or repeated bench (or one run while later snapshots are still training) measures
/// each point once.
fn curve_cache_file(env: &Env, snapshot: &Path, n: usize) -> Result<PathBuf> {
    let weights = crate::util::sha256_file(snapshot).map_err(ctx("snapshot"))?;
    let s = &env.setup;
    let key = format!(
        "{weights}|n={n}|cfg={}|seed={}|batch={}|tok={}|ent={}|cls={}|ref={}",
        s.cfg_scale,
        s.seed,
        s.sample_batch,
        env.tokenizer.id,
        env.entropy_model_id,
        env.classifier_sha256,
        env.reference.len()
    );
    let dir = snapshot.parent().unwrap_or(Path::new(".")).join("quality");
    std::fs::create_dir_all(&dir).map_err(ctx("curve cache"))?;
    Ok(dir.join(format!("{}.json", &crate::util::sha256_hex(key.as_bytes())[..24])))
}

/// Linear interpolation of `y` at `x` on points sorted by x; `None` outside their range.
pub fn interpolate(points: &[(f64, f64)], x: f64) -> Option<f64> {
    let i = points.windows(2).position(|w| w[0].0 <= x && x <= w[1].0)?;
    let ((x0, y0), (x1, y1)) = (points[i], points[i + 1]);
    Some(if x1 > x0 { y0 + (y1 - y0) * (x - x0) / (x1 - x0) } else { y0 })
}

fn measure_run(env: &Env, model: &str, run: &Path, curve_samples: usize) -> Result<RunResult> {
    let dpar = model == "DPAR";
    let summary = crate::runs::RunSummary::read(run).map_err(ctx("run"))?;
    let (eval, fwd) = if dpar {
        let (m, _s, cfg) = crate::dpar::train::load(run, &env.device).map_err(ctx("DPAR model"))?;
        let stats = env.patch_stats(&cfg.model.patch)?;
        let fwd = crate::flops::dpar_forward(m.config(), stats.mean_patches) / 1e9;
        drop(m);
        (eval_dpar(env, model, run, &cfg.model.patch, env.setup.samples)?, fwd)
    } else {
        let (m, _s) = crate::gpt::load(run, None, &env.device).map_err(ctx("GPT model"))?;
        let fwd = crate::flops::gpt_forward(m.config()) / 1e9;
        drop(m);
        (eval_gpt(env, model, run, env.setup.samples)?, fwd)
    };
    tracing::info!(
        "{model} {}: FD {:.3}, class accuracy {:.1}%",
        run.display(),
        eval.quality.fd,
        100.0 * eval.quality.accuracy.unwrap_or(f64::NAN)
    );
    let curve = if curve_samples > 0 { quality_curve(env, run, dpar, curve_samples)? } else { Vec::new() };
    Ok(RunResult {
        model: model.into(),
        run: run.to_path_buf(),
        seed: summary.seed,
        eval,
        fwd_gflops_per_image: fwd,
        ms_per_step: summary.median_ms_per_step.unwrap_or(f64::NAN),
        epochs: summary.epochs,
        train_flops: summary.train_flops,
        train_seconds: summary.train_seconds,
        curve,
    })
}

/// The side-by-side benchmark of baseline runs and DPAR runs (one per seed each), with quality
/// curves from their snapshots (`curve_samples` samples per point; 0 skips them).
pub fn bench(env: &Env, gpt_runs: &[PathBuf], dpar_runs: &[PathBuf], curve_samples: usize) -> Result<BenchResult> {
    let mut runs = Vec::new();
    for run in gpt_runs {
        runs.push(measure_run(env, "LlamaGen baseline", run, curve_samples)?);
    }
    for run in dpar_runs {
        runs.push(measure_run(env, "DPAR", run, curve_samples)?);
    }
    let floor = env.real_floor()?;
    let n = env.setup.samples;
    let of = |rs: &[&RunResult], f: &dyn Fn(&RunResult) -> Option<f64>| {
        Spread::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let groups: Vec<(&str, Vec<&RunResult>)> =
        ["LlamaGen baseline", "DPAR"].iter().map(|m| (*m, runs.iter().filter(|r| r.model == *m).collect())).collect();
    for (name, rs) in &groups {
        if rs.is_empty() {
            continue;
        }
        let mut cells = vec![
            name.to_string(),
            rs.len().to_string(),
            of(rs, &|r| r.epochs).show(2),
            of(rs, &|r| Some(r.eval.positions_per_image)).show(1),
            of(rs, &|r| Some(r.fwd_gflops_per_image)).show(3),
            of(rs, &|r| r.train_flops.map(|f| f / 1e15)).show(3),
            of(rs, &|r| r.train_seconds.map(|s| s / 60.0)).show(0),
            of(rs, &|r| Some(r.ms_per_step)).show(0),
            of(rs, &|r| Some(r.eval.images_per_s)).show(2),
        ];
        cells.extend(quality_spread_cells(&rs.iter().map(|r| &r.eval.quality).collect::<Vec<_>>()));
        rows.push(cells);
    }
    // Equal training FLOPs: each baseline curve read at DPAR's mean training FLOPs.
    let (base, dpar) = (&groups[0].1, &groups[1].1);
    let dpar_flops = of(dpar, &|r| r.train_flops);
    if curve_samples == 0 {
        notes.push("equal-FLOPs comparison: needs the quality curves (--curve-samples above 0)".into());
    } else if !base.is_empty() && dpar_flops.n > 0 {
        let at = |f: &dyn Fn(&QualityReport) -> Option<f64>| -> Vec<f64> {
            base.iter()
                .filter_map(|r| {
                    let pts: Vec<(f64, f64)> =
                        r.curve.iter().filter_map(|p| Some((p.train_flops?, f(&p.quality)?))).collect();
                    interpolate(&pts, dpar_flops.mean)
                })
                .collect()
        };
        let (fd, acc) = (at(&|q| Some(q.fd)), at(&|q| q.accuracy));
        if !fd.is_empty() {
            let mut cells = vec![
                format!("baseline at DPAR's training FLOPs (curve, {curve_samples} samples)"),
                fd.len().to_string(),
                String::new(),
                String::new(),
                String::new(),
            ];
            cells.extend([
                of(dpar, &|r| r.train_flops.map(|f| f / 1e15)).show(3),
                String::new(),
                String::new(),
                String::new(),
                Spread::of(&fd).show(2),
                String::new(),
                String::new(),
                String::new(),
                Spread::of(&acc).show_percent(1),
            ]);
            rows.push(cells);
            // The matching DPAR numbers come from the same curve sample count (the last snapshot).
            let dpar_last: Vec<f64> = dpar.iter().filter_map(|r| r.curve.last().map(|p| p.quality.fd)).collect();
            if !dpar_last.is_empty() {
                notes.push(verdict(
                    &format!("FD at equal training FLOPs ({curve_samples} samples)"),
                    "DPAR",
                    &Spread::of(&dpar_last),
                    "baseline",
                    &Spread::of(&fd),
                    true,
                ));
            }
        } else {
            notes.push("equal-FLOPs comparison: the baseline's snapshots do not bracket DPAR's training FLOPs (or its log lacks train_flops)".into());
        }
    }
    let mut floor_cells = vec![
        format!("real train images (floor, {} images)", floor.samples),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ];
    floor_cells.extend(quality_cells(&floor));
    rows.push(floor_cells);
    if !base.is_empty() && !dpar.is_empty() {
        let q = |rs: &[&RunResult], f: &dyn Fn(&QualityReport) -> Option<f64>| {
            Spread::of(&rs.iter().filter_map(|r| f(&r.eval.quality)).collect::<Vec<_>>())
        };
        notes.insert(
            0,
            verdict(
                &format!("FD at equal epochs ({n} samples)"),
                "DPAR",
                &q(dpar, &|x| Some(x.fd)),
                "baseline",
                &q(base, &|x| Some(x.fd)),
                true,
            ),
        );
        notes.insert(
            1,
            verdict(
                "class accuracy at equal epochs",
                "DPAR",
                &q(dpar, &|x| x.accuracy),
                "baseline",
                &q(base, &|x| x.accuracy),
                false,
            ),
        );
        notes.push(format!(
            "cost: DPAR needs {:.2}× the baseline's forward FLOPs per image, {:.2}× its training time per step and samples {:.2}× as fast",
            of(dpar, &|r| Some(r.fwd_gflops_per_image)).mean / of(base, &|r| Some(r.fwd_gflops_per_image)).mean,
            of(dpar, &|r| Some(r.ms_per_step)).mean / of(base, &|r| Some(r.ms_per_step)).mean,
            of(dpar, &|r| Some(r.eval.images_per_s)).mean / of(base, &|r| Some(r.eval.images_per_s)).mean
        ));
    }
    for (name, rs) in &groups {
        for r in rs {
            notes.push(format!(
                "{name}, seed {} ({}): FD {:.2}, class accuracy {:.1}%, {:.2} epochs",
                r.seed,
                r.run.display(),
                r.eval.quality.fd,
                100.0 * r.eval.quality.accuracy.unwrap_or(f64::NAN),
                r.epochs.unwrap_or(f64::NAN)
            ));
        }
    }
    notes.push(format!("targets: FD ≤ 3 × floor = {:.2}; class accuracy ≥ 90%", 3.0 * floor.fd));
    let mut header: Vec<String> = [
        "model",
        "seeds",
        "epochs",
        "positions per image",
        "fwd GFLOP/image",
        "train PFLOP",
        "train minutes",
        "ms per train step",
        "sampling images/s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(QUALITY_HEADER.iter().map(|s| s.to_string()));
    let table = Table {
        title: "LlamaGen baseline vs DPAR, same width, depth, data and epochs".into(),
        scale: format!(
            "MNIST (small scale); {n} samples per run, cfg {}, sampling batch {}; mean ± half-range over seeds; FD in the classifier's features (not FID)",
            env.setup.cfg_scale, env.setup.sample_batch
        ),
        header,
        rows,
        notes,
        data: serde_json::Value::Null,
    };
    Ok(BenchResult { runs, floor, table })
}

/// The quality-curve picture: FD against training FLOPs and against training wall-clock, one
/// line per run (every seed of both models), in one PNG.
pub fn plot_curves(result: &BenchResult, path: &Path, curve_samples: usize) -> Result<()> {
    let series = |x: &dyn Fn(&CurvePoint) -> Option<f64>| -> Vec<crate::plot::Series> {
        result
            .runs
            .iter()
            .map(|r| crate::plot::Series {
                name: format!("{} s{}", if r.model == "DPAR" { "DPAR" } else { "baseline" }, r.seed),
                points: r.curve.iter().filter_map(|p| Some((x(p)?, p.quality.fd))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let by_flops = series(&|p| p.train_flops.map(|f| f / 1e15));
    let by_time = series(&|p| p.train_seconds.map(|s| s / 60.0));
    let y = format!("FD ({curve_samples} samples, classifier features)");
    let panels = [
        crate::plot::Panel {
            title: "FD vs training FLOPs".into(),
            x_label: "training PFLOP".into(),
            y_label: y.clone(),
            series: &by_flops,
            log_y: true,
        },
        crate::plot::Panel {
            title: "FD vs training wall-clock".into(),
            x_label: "training minutes (the run's own wall-clock)".into(),
            y_label: y,
            series: &by_time,
            log_y: true,
        },
    ];
    crate::plot::panels_plot(path, &panels).map_err(ctx("plot"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_reads_between_points_and_refuses_outside() {
        let pts = [(0.0, 10.0), (2.0, 6.0), (4.0, 5.0)];
        assert_eq!(interpolate(&pts, 1.0), Some(8.0));
        assert_eq!(interpolate(&pts, 3.0), Some(5.5));
        assert_eq!(interpolate(&pts, 4.0), Some(5.0));
        assert_eq!(interpolate(&pts, 5.0), None);
        assert_eq!(interpolate(&pts, -1.0), None);
    }
}
