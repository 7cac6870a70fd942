//! `dpar bench` (side by side) and `dpar ablate …`: the paper's claims as commands.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use dpar::experiments::{self, Env, Scale, Setup};

use crate::common::DeviceArgs;

/// Inputs shared by the experiments.
#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Training shards with stored entropies.
    #[arg(long, default_value = "data/codes/train")]
    pub train_codes: PathBuf,
    /// Test shards with stored entropies.
    #[arg(long, default_value = "data/codes/test")]
    pub test_codes: PathBuf,
    /// Tokenizer of the codes. Default: the one the training codes record (by hash), found
    /// beside their folder, in models/mnist/tokenizer or in runs/tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Entropy model of the stored entropies. Default: the one the training entropies record
    /// (by hash), found beside the codes' folder, in models/mnist/entropy or in runs/entropy.
    #[arg(long)]
    pub entropy_model: Option<PathBuf>,
    /// Classifier whose features the metrics use; --data must be its dataset.
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/classifier", value_parser = crate::common::model_path)]
    pub classifier: PathBuf,
    /// Dataset folder (for the reference test images).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Where runs and result tables go.
    #[arg(long, default_value = "runs/experiments")]
    pub out: PathBuf,
    /// Samples per quality measurement (and test images as reference).
    #[arg(long, value_parser = crate::common::positive_usize)]
    pub samples: Option<usize>,
    /// Images generated together while sampling.
    #[arg(long, default_value_t = 100, value_parser = crate::common::positive_usize)]
    pub sample_batch: usize,
    /// Classifier-free guidance scale for sampling.
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f64,
    /// Sampling seed (the models' training seeds are their own).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ExperimentArgs {
    fn env(&self, default_samples: usize) -> Result<Env> {
        let allow = crate::common::allow_mismatch();
        let (tokenizer, entropy_model) = experiments::find_parts(
            &self.train_codes,
            self.tokenizer.as_deref(),
            self.entropy_model.as_deref(),
            allow,
        )?;
        let setup = Setup {
            train_codes: self.train_codes.clone(),
            test_codes: self.test_codes.clone(),
            tokenizer,
            entropy_model,
            allow_mismatch: allow,
            classifier: self.classifier.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            samples: self.samples.unwrap_or(default_samples),
            sample_batch: self.sample_batch,
            cfg_scale: self.cfg,
            seed: self.seed,
        };
        std::fs::create_dir_all(&setup.out)?;
        Ok(Env::load(setup, &self.device.device()?)?)
    }
}

#[derive(Subcommand)]
pub enum AblateCmd {
    /// Static vs entropy vs entropy + max length vs all three (paper Table 3).
    Patching(AblateArgs),
    /// Entropy threshold sweep at P = 4 (Table 4).
    Threshold(AblateArgs),
    /// Maximum patch length sweep (Table 5).
    MaxLen(AblateArgs),
    /// Raising θ at inference, DPAR vs static (Table 6).
    Inference(AblateArgs),
    /// Linear probe of pooled final hidden states, DPAR vs baseline (Table 7).
    Probe(ProbeArgs),
    /// Train the models of every table above without evaluating them: run one process per
    /// seed side by side (`--seeds 0` and `--seeds 1`), or split one seed's models between
    /// processes with `--part K/N`; the tables then find them trained.
    Train(AblateTrainArgs),
    /// Every table above, one after the other.
    All(AblateAllArgs),
}

#[derive(Args)]
pub struct AblateArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    /// Training steps of each ablation model (default: the ablation scale's).
    #[arg(long, value_parser = crate::common::positive_u64)]
    steps: Option<u64>,
    /// Seeds: every row trains one model per seed and reports mean ± half-range.
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 1])]
    seeds: Vec<u64>,
    /// Width of the ablation models (default: the ablation scale's).
    #[arg(long, value_parser = crate::common::positive_usize)]
    dim: Option<usize>,
    /// Depth of the ablation models as encoder+global+decoder, e.g. 1+3+1.
    #[arg(long)]
    layers: Option<String>,
    /// Images per training step of the ablation models (default: the ablation scale's, 16).
    #[arg(long, value_parser = crate::common::positive_usize)]
    batch_size: Option<usize>,
    /// Peak learning rate of the ablation models (default: the ablation scale's, 2e-3).
    #[arg(long, value_parser = crate::common::positive_f64)]
    lr: Option<f64>,
    /// Mean patch length the main setting targets (θ is calibrated for it).
    #[arg(long, default_value_t = 1.8)]
    target_mean_len: f64,
}

#[derive(Args)]
pub struct AblateTrainArgs {
    #[command(flatten)]
    ablate: AblateArgs,
    /// Train only part K of N of the model list (every N-th model from the K-th), so that N
    /// processes can share the list without training the same model.
    #[arg(long, default_value = "1/1")]
    part: String,
}

#[derive(Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    /// DPAR runs, one per seed (repeat the flag); the same defaults as `dpar bench`.
    #[arg(long = "dpar-run", default_values = ["runs/dpar-s0", "runs/dpar-s1"])]
    dpar_runs: Vec<PathBuf>,
    /// Baseline runs, one per seed (repeat the flag).
    #[arg(long = "gpt-run", default_values = ["runs/gpt-s0", "runs/gpt-s1"])]
    gpt_runs: Vec<PathBuf>,
    /// Training images whose pooled features fit the probe.
    #[arg(long, default_value_t = 5000)]
    train_images: usize,
    /// Test images the probe is scored on.
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
}

#[derive(Args)]
pub struct AblateAllArgs {
    #[command(flatten)]
    ablate: AblateArgs,
    #[arg(long = "dpar-run", default_values = ["runs/dpar"])]
    dpar_runs: Vec<PathBuf>,
    #[arg(long = "gpt-run", default_values = ["runs/gpt"])]
    gpt_runs: Vec<PathBuf>,
}

fn scale(env: &Env, a: &AblateArgs) -> Result<Scale> {
    let info = &env.train.shard.info;
    let mut s = Scale::small(info.codebook_size, info.num_classes, info.grid_size);
    if let Some(v) = a.steps {
        s.steps = v;
    }
    if let Some(v) = a.dim {
        s.model.dim = v;
    }
    if let Some(v) = a.batch_size {
        s.batch_size = v;
    }
    if let Some(v) = a.lr {
        s.lr = v;
    }
    if let Some(layers) = &a.layers {
        let parts: Vec<usize> =
            layers.split('+').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().unwrap_or_default();
        let [e, g, d] = parts[..] else {
            anyhow::bail!("--layers {layers}: expected encoder+global+decoder blocks, e.g. 1+3+1")
        };
        (s.model.encoder_layers, s.model.global_layers, s.model.decoder_layers) = (e, g, d);
    }
    if a.seeds.is_empty() {
        anyhow::bail!("--seeds: give at least one seed");
    }
    s.seeds = a.seeds.clone();
    s.model.validate()?;
    Ok(s)
}

/// Mean patch lengths the θ sweep calibrates θ for (1.8, the main setting's, first).
const THETA_TARGETS: [f64; 3] = [1.8, 1.5, 2.1];
/// P = 4 at θ(1.8) is the main setting (first); P = 1 is one code per patch.
const P_SWEEP: [usize; 4] = [4, 1, 2, 8];

/// Inference mean lengths of Table 6: the training length, then about +7%, +12% and +19%.
fn inference_targets(t: f64) -> [f64; 4] {
    [t, t * 1.066, t * 1.12, t * 1.19]
}

pub fn ablate(cmd: AblateCmd) -> Result<()> {
    match cmd {
        AblateCmd::Patching(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_patching(&env, &scale(&env, &a)?, a.target_mean_len)?
                .save(&env.setup.out, "table3-patching")?;
        }
        AblateCmd::Threshold(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_threshold(&env, &scale(&env, &a)?, &THETA_TARGETS)?
                .save(&env.setup.out, "table4-threshold")?;
        }
        AblateCmd::MaxLen(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_max_len(&env, &scale(&env, &a)?, a.target_mean_len, &P_SWEEP)?
                .save(&env.setup.out, "table5-max-len")?;
        }
        AblateCmd::Inference(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_inference(
                &env,
                &scale(&env, &a)?,
                a.target_mean_len,
                &inference_targets(a.target_mean_len),
            )?
            .save(&env.setup.out, "table6-inference")?;
        }
        AblateCmd::Train(t) => {
            let a = &t.ablate;
            let (k, n) = t
                .part
                .split_once('/')
                .and_then(|(k, n)| Some((k.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)))
                .filter(|&(k, n)| k >= 1 && k <= n)
                .ok_or_else(|| anyhow::anyhow!("--part {}: expected K/N with 1 ≤ K ≤ N, e.g. 1/2", t.part))?;
            let env = a.exp.env(1000)?;
            let s = scale(&env, a)?;
            let all = experiments::ablate::ablation_models(&env, a.target_mean_len, &THETA_TARGETS, &P_SWEEP)?;
            let models: Vec<_> = all.into_iter().skip(k - 1).step_by(n).collect();
            let runs = experiments::ablate::train_ablation_models(&env, &s, &models)?;
            println!("{} ablation models trained ({}):", runs.len(), s.describe());
            for r in runs {
                println!("  {}", r.display());
            }
        }
        AblateCmd::Probe(a) => {
            let env = a.exp.env(1000)?;
            experiments::linear_probe(&env, &a.dpar_runs, &a.gpt_runs, a.train_images, a.test_images)?
                .save(&env.setup.out, "table7-probe")?;
        }
        AblateCmd::All(a) => {
            let env = a.ablate.exp.env(1000)?;
            let s = scale(&env, &a.ablate)?;
            let t = a.ablate.target_mean_len;
            experiments::ablate_patching(&env, &s, t)?.save(&env.setup.out, "table3-patching")?;
            experiments::ablate_threshold(&env, &s, &THETA_TARGETS)?.save(&env.setup.out, "table4-threshold")?;
            experiments::ablate_max_len(&env, &s, t, &P_SWEEP)?.save(&env.setup.out, "table5-max-len")?;
            experiments::ablate_inference(&env, &s, t, &inference_targets(t))?
                .save(&env.setup.out, "table6-inference")?;
            experiments::linear_probe(&env, &a.dpar_runs, &a.gpt_runs, 5000, 2000)?
                .save(&env.setup.out, "table7-probe")?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct SideBySideArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    /// Baseline runs, one per seed (repeat the flag), trained with the same data and epochs as
    /// the DPAR runs (`scripts/train-mnist` trains them).
    #[arg(long = "gpt-run", default_values = ["runs/gpt-s0", "runs/gpt-s1"])]
    gpt_runs: Vec<PathBuf>,
    /// DPAR runs, one per seed (repeat the flag).
    #[arg(long = "dpar-run", default_values = ["runs/dpar-s0", "runs/dpar-s1"])]
    dpar_runs: Vec<PathBuf>,
    /// Samples per point of the quality curves over the runs' weight snapshots (0: no curves).
    /// Snapshots exist only when the runs were trained with `--eval-every N`; without them the
    /// bench says so and draws no curve.
    #[arg(long, default_value_t = 1000)]
    curve_samples: usize,
    /// Only measure the quality curves of the snapshots there are so far (each point is kept
    /// beside the snapshot in <run>/snapshots/quality, so a later full bench reuses it): follows runs that still train.
    #[arg(long)]
    curves_only: bool,
}

pub fn side_by_side(args: SideBySideArgs) -> Result<()> {
    if args.curves_only {
        anyhow::ensure!(args.curve_samples > 0, "--curves-only needs --curve-samples above 0");
        let env = args.exp.env(2000)?;
        for (runs, dpar) in [(&args.gpt_runs, false), (&args.dpar_runs, true)] {
            for run in runs {
                let curve = experiments::bench::quality_curve(&env, run, dpar, args.curve_samples)?;
                for p in curve {
                    println!(
                        "{}\tstep {}\tepoch {:.2}\tFD {:.2}\tclass accuracy {:.1}%",
                        run.display(),
                        p.step,
                        p.epoch.unwrap_or(f64::NAN),
                        p.quality.fd,
                        100.0 * p.quality.accuracy.unwrap_or(f64::NAN)
                    );
                }
            }
        }
        return Ok(());
    }
    for (runs, what) in [(&args.gpt_runs, "baseline"), (&args.dpar_runs, "DPAR")] {
        for run in runs {
            if !run.join("model.safetensors").is_file() {
                anyhow::bail!("{} (--{}-run): no trained {what} here; train the runs with scripts/train-mnist (same data and epochs) or `dpar train`", run.display(), if what == "DPAR" { "dpar" } else { "gpt" });
            }
        }
    }
    // The comparison is only fair at the same budget: same epochs (steps × images per step).
    let images_seen = |run: &PathBuf| -> Option<u64> {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).ok()?).ok()?;
        Some(c["train"]["steps"].as_u64()? * c["batch_size"].as_u64()?)
    };
    let budgets: Vec<(String, Option<u64>)> =
        args.gpt_runs.iter().chain(&args.dpar_runs).map(|r| (r.display().to_string(), images_seen(r))).collect();
    if budgets.windows(2).any(|w| w[0].1 != w[1].1) {
        tracing::warn!("the runs saw different numbers of training images: {budgets:?}");
    }
    let env = args.exp.env(2000)?;
    let result = experiments::bench(&env, &args.gpt_runs, &args.dpar_runs, args.curve_samples)?;
    let mut table = result.table.clone();
    table.data = serde_json::json!({ "runs": result.runs, "floor": result.floor });
    table.save(&env.setup.out, "bench")?;
    if args.curve_samples > 0 && result.runs.iter().all(|r| r.curve.is_empty()) {
        println!("no quality curves: the runs hold no weight snapshots (`dpar train --eval-every N` writes one every N steps); --curve-samples 0 skips them");
    } else if args.curve_samples > 0 {
        let png = env.setup.out.join("fd-curves.png");
        experiments::bench::plot_curves(&result, &png, args.curve_samples)?;
        println!("wrote {}", png.display());
    }
    Ok(())
}
