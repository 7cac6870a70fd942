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
    #[arg(long, default_value = "models/mnist/tokenizer")]
    pub tokenizer: PathBuf,
    #[arg(long, default_value = "runs/entropy")]
    pub entropy_model: PathBuf,
    #[arg(long, default_value = "models/mnist/classifier")]
    pub classifier: PathBuf,
    /// Dataset folder (for the reference test images).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Where runs and result tables go.
    #[arg(long, default_value = "runs/experiments")]
    pub out: PathBuf,
    /// Samples per quality measurement (and test images as reference).
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long, default_value_t = 100)]
    pub sample_batch: usize,
    /// Classifier-free guidance scale for sampling.
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ExperimentArgs {
    fn env(&self, default_samples: usize) -> Result<Env> {
        let setup = Setup {
            train_codes: self.train_codes.clone(),
            test_codes: self.test_codes.clone(),
            tokenizer: self.tokenizer.clone(),
            entropy_model: self.entropy_model.clone(),
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
    /// Every table above, one after the other.
    All(AblateAllArgs),
}

#[derive(Args)]
pub struct AblateArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    /// Training steps of each ablation model.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// Mean patch length the main setting targets (θ is calibrated for it).
    #[arg(long, default_value_t = 1.8)]
    target_mean_len: f64,
}

#[derive(Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    #[arg(long, default_value = "runs/dpar")]
    dpar_run: PathBuf,
    #[arg(long, default_value = "runs/gpt")]
    gpt_run: PathBuf,
    #[arg(long, default_value_t = 5000)]
    train_images: usize,
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
}

#[derive(Args)]
pub struct AblateAllArgs {
    #[command(flatten)]
    ablate: AblateArgs,
    #[arg(long, default_value = "runs/dpar")]
    dpar_run: PathBuf,
    #[arg(long, default_value = "runs/gpt")]
    gpt_run: PathBuf,
}

fn scale(env: &Env, steps: u64) -> Scale {
    let info = &env.train.shard.info;
    let mut s = Scale::small(info.codebook_size, info.num_classes, info.grid_size);
    s.steps = steps;
    s
}

/// Mean patch lengths the θ sweep calibrates θ for (1.8 is the main setting's, shared with Table 3).
const THETA_TARGETS: [f64; 3] = [1.5, 1.8, 2.1];
/// P = 1 is one code per patch; P = 4 at θ(1.8) is the main setting.
const P_SWEEP: [usize; 4] = [1, 2, 4, 8];

pub fn ablate(cmd: AblateCmd) -> Result<()> {
    match cmd {
        AblateCmd::Patching(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_patching(&env, &scale(&env, a.steps), a.target_mean_len)?.save(&env.setup.out, "table3-patching")?;
        }
        AblateCmd::Threshold(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_threshold(&env, &scale(&env, a.steps), &THETA_TARGETS)?.save(&env.setup.out, "table4-threshold")?;
        }
        AblateCmd::MaxLen(a) => {
            let env = a.exp.env(1000)?;
            experiments::ablate_max_len(&env, &scale(&env, a.steps), a.target_mean_len, &P_SWEEP)?.save(&env.setup.out, "table5-max-len")?;
        }
        AblateCmd::Inference(a) => {
            let env = a.exp.env(1000)?;
            let targets = [a.target_mean_len, a.target_mean_len * 1.066, a.target_mean_len * 1.12, a.target_mean_len * 1.19];
            experiments::ablate_inference(&env, &scale(&env, a.steps), a.target_mean_len, &targets)?.save(&env.setup.out, "table6-inference")?;
        }
        AblateCmd::Probe(a) => {
            let env = a.exp.env(1000)?;
            experiments::linear_probe(&env, &a.dpar_run, &a.gpt_run, a.train_images, a.test_images)?.save(&env.setup.out, "table7-probe")?;
        }
        AblateCmd::All(a) => {
            let env = a.ablate.exp.env(1000)?;
            let s = scale(&env, a.ablate.steps);
            let t = a.ablate.target_mean_len;
            experiments::ablate_patching(&env, &s, t)?.save(&env.setup.out, "table3-patching")?;
            experiments::ablate_threshold(&env, &s, &THETA_TARGETS)?.save(&env.setup.out, "table4-threshold")?;
            experiments::ablate_max_len(&env, &s, t, &P_SWEEP)?.save(&env.setup.out, "table5-max-len")?;
            experiments::ablate_inference(&env, &s, t, &[t, t * 1.066, t * 1.12, t * 1.19])?.save(&env.setup.out, "table6-inference")?;
            experiments::linear_probe(&env, &a.dpar_run, &a.gpt_run, 5000, 2000)?.save(&env.setup.out, "table7-probe")?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct SideBySideArgs {
    #[command(flatten)]
    exp: ExperimentArgs,
    /// The baseline run, trained with the same budget as the DPAR run (`scripts/train-mnist` trains both).
    #[arg(long, default_value = "runs/gpt")]
    gpt_run: PathBuf,
    /// The DPAR run.
    #[arg(long, default_value = "runs/dpar")]
    dpar_run: PathBuf,
    /// Samples per point of the FD-vs-steps curves.
    #[arg(long, default_value_t = 1000)]
    curve_samples: usize,
}

pub fn side_by_side(args: SideBySideArgs) -> Result<()> {
    let env = args.exp.env(10000)?;
    for (run, what) in [(&args.gpt_run, "baseline"), (&args.dpar_run, "DPAR")] {
        if !run.join("model.safetensors").is_file() {
            anyhow::bail!("{}: no trained {what} here; train both with scripts/train-mnist (same budget) or `dpar train`", run.display());
        }
    }
    // The comparison is only fair at the same budget: same steps and images per step.
    let budget = |run: &PathBuf| -> Option<(u64, u64)> {
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).ok()?).ok()?;
        Some((c["train"]["steps"].as_u64()?, c["batch_size"].as_u64()?))
    };
    match (budget(&args.gpt_run), budget(&args.dpar_run)) {
        (Some(g), Some(d)) if g != d => tracing::warn!("the runs had different budgets: baseline {} steps × {} images, DPAR {} steps × {} images", g.0, g.1, d.0, d.1),
        _ => {}
    }
    let (table, curves) = experiments::bench(&env, &args.gpt_run, &args.dpar_run, args.curve_samples)?;
    table.save(&env.setup.out, "bench")?;
    let series: Vec<dpar::plot::Series> = curves
        .into_iter()
        .map(|(name, pts)| dpar::plot::Series { name, points: pts.into_iter().map(|(s, fd)| (s as f64, fd)).collect() })
        .collect();
    let png = env.setup.out.join("fd-vs-steps.png");
    dpar::plot::line_plot(&png, &format!("FD ({} samples) vs training steps", args.curve_samples), "training step", "FD (classifier features)", &series, false)?;
    println!("wrote {}", png.display());
    Ok(())
}
