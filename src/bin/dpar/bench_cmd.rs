//! `dpar bench speed`: training, forward and cached-sampling speed of the models.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::common::DeviceArgs;

/// `dpar bench` alone runs the side-by-side comparison; `dpar bench speed` times the kernels.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    side: crate::experiment_cmd::SideBySideArgs,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Medians over repeated steps after warm-up, with GFLOP/s.
    Speed(SpeedArgs),
}

#[derive(Args)]
pub struct SpeedArgs {
    /// Presets to time (comma separated): GPT presets (bench, mnist, …) and DPAR presets
    /// prefixed `dpar-` (dpar-mnist, dpar-b, …).
    #[arg(long, default_value = "bench,mnist,dpar-mnist")]
    models: String,
    /// Implementations to time (comma separated): stock, fused, bf16.
    #[arg(long, default_value = "stock,fused")]
    ops: String,
    /// Images per timed step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Untimed repetitions before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also time each fused op against its stock version.
    #[arg(long)]
    op_table: bool,
    /// Skip the model rows (with --op-table: ops only).
    #[arg(long)]
    no_models: bool,
    /// Also write the table as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.cmd {
        Some(BenchCmd::Speed(a)) => speed(a),
        None => crate::experiment_cmd::side_by_side(args.side),
    }
}

fn speed(args: SpeedArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut rows = Vec::new();
    let models = if args.no_models { String::new() } else { args.models.clone() };
    for name in models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        for ops in args.ops.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let kind = match ops {
                "fused" => dpar::nn::Ops::Fused,
                "stock" => dpar::nn::Ops::Stock,
                "bf16" => dpar::nn::Ops::Bf16,
                other => anyhow::bail!("--ops: unknown `{other}` (fused, stock, bf16)"),
            };
            let label = format!("{name} ({ops})");
            if let Some(preset) = name.strip_prefix("dpar-") {
                let mut config = dpar::dpar::DparConfig::preset(preset)?;
                config.ops = kind;
                let mut entropy = dpar::gpt::GptConfig::mnist_entropy();
                entropy.ops = kind;
                tracing::info!("timing DPAR {preset} with {ops} ops ({}+{}+{} layers, width {})", config.encoder_layers, config.global_layers, config.decoder_layers, config.dim);
                rows.push(dpar::bench::dpar_speed(&label, &config, &entropy, args.batch_size, args.warmup, args.reps, &device)?);
            } else {
                let mut config = dpar::gpt::GptConfig::preset(name)?;
                config.ops = kind;
                tracing::info!("timing {name} with {ops} ops ({} layers, width {})", config.n_layer, config.dim);
                rows.push(dpar::bench::gpt_speed(&label, &config, args.batch_size, args.warmup, args.reps, &device)?);
            }
        }
    }
    if !rows.is_empty() {
        print!("{}", dpar::bench::markdown(&rows));
    }
    let ops = if args.op_table { dpar::bench::op_speed(args.warmup, args.reps, &device)? } else { Vec::new() };
    if !ops.is_empty() {
        println!();
        print!("{}", dpar::bench::op_markdown(&ops));
    }
    println!("threads: {}, warm-up {} + {} timed repetitions (medians)", rayon::current_num_threads(), args.warmup, args.reps);
    if let Some(path) = args.json {
        let json = serde_json::json!({ "models": rows, "ops": ops });
        dpar::util::write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
