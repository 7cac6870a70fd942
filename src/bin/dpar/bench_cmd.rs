//! `dpar bench speed`: training, forward and cached-sampling speed of the models.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::common::DeviceArgs;

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
    /// Also time our f32 and bf16 GEMMs at the bench model's shapes (GFLOP/s); with --torch
    /// this table is printed beside PyTorch's anyway.
    #[arg(long)]
    gemm_table: bool,
    /// Also write the table as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// A Python with torch: also run PyTorch's reference scripts (bench/torch_bench_model.py,
    /// torch_bench_bf16.py, torch_sample_bench.py, torch_gemm_shapes.py) in the same sitting and
    /// print the ratios against our bench model (fused and bf16, batch 16), and both sides'
    /// GEMMs at 1024³ and at the bench model's shapes.
    #[arg(long)]
    torch: Option<std::path::PathBuf>,
    /// Folder of the reference scripts.
    #[arg(long, default_value = "bench")]
    torch_scripts: std::path::PathBuf,
    /// Also time whole generations (images/s) of the trained baseline (--gpt) and DPAR (--dpar)
    /// at these batch sizes, comma separated (e.g. 1,2,4,8,16,32,64,100), with guidance
    /// --cfg and the DPAR model's patch rules: the small-batch sampling curve.
    #[arg(long, value_name = "BATCHES")]
    sampling_curve: Option<String>,
    /// The baseline of the sampling curve (run folder or weight file).
    #[arg(long, default_value = "models/mnist/gpt")]
    gpt: std::path::PathBuf,
    /// The DPAR model of the sampling curve; its entropy model is found by the hash it records
    /// (or given with --entropy-model).
    #[arg(long, default_value = "models/mnist/dpar")]
    dpar: std::path::PathBuf,
    /// The entropy model of the sampling curve's DPAR model.
    #[arg(long)]
    entropy_model: Option<std::path::PathBuf>,
    /// Classifier-free guidance scale of the sampling curve (1 = none; above 1 doubles the rows).
    #[arg(long, default_value_t = 2.0)]
    cfg: f64,
    #[command(flatten)]
    device: DeviceArgs,
}

/// PyTorch's reference scripts, run by `--torch`.
const TORCH_SCRIPTS: [&str; 4] =
    ["torch_bench_model.py", "torch_bench_bf16.py", "torch_sample_bench.py", "torch_gemm_shapes.py"];

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Speed(a) => speed(a),
    }
}

fn speed(args: SpeedArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut rows = Vec::new();
    let mut models = if args.no_models { String::new() } else { args.models.clone() };
    let mut ops_list = args.ops.clone();
    if args.torch.is_some() {
        anyhow::ensure!(
            args.batch_size == 16,
            "--torch: the reference scripts use batch 16; drop --batch-size {}",
            args.batch_size
        );
        for script in TORCH_SCRIPTS {
            anyhow::ensure!(
                args.torch_scripts.join(script).is_file(),
                "--torch-scripts {}: no {script} there",
                args.torch_scripts.display()
            );
        }
        // The comparison needs our bench model with both kernels.
        if !models.split(',').any(|m| m.trim() == "bench") {
            models = format!("bench,{models}");
        }
        for o in ["fused", "bf16"] {
            if !ops_list.split(',').any(|x| x.trim() == o) {
                ops_list = format!("{ops_list},{o}");
            }
        }
    }
    // PyTorch first: a broken Python fails before our timings, and both sides run in this sitting.
    let reference = match &args.torch {
        Some(python) => {
            let mut reference = dpar::bench::TorchReference::default();
            for script in TORCH_SCRIPTS {
                tracing::info!("running PyTorch's {script} (same sitting)");
                reference.run_script(python, &args.torch_scripts.join(script))?;
            }
            Some(reference)
        }
        None => None,
    };
    for name in models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        for ops in ops_list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
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
                tracing::info!(
                    "timing DPAR {preset} with {ops} ops ({}+{}+{} layers, width {})",
                    config.encoder_layers,
                    config.global_layers,
                    config.decoder_layers,
                    config.dim
                );
                rows.push(dpar::bench::dpar_speed(
                    &label,
                    &config,
                    &entropy,
                    args.batch_size,
                    args.warmup,
                    args.reps,
                    &device,
                )?);
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
    println!(
        "threads: {}, warm-up {} + {} timed repetitions (medians)",
        rayon::current_num_threads(),
        args.warmup,
        args.reps
    );
    let mut decode = Vec::new();
    if args.gemm_table {
        if args.torch.is_none() {
            println!();
            print!("{}", dpar::bench::gemm_markdown(&dpar::bench::gemm_shapes(args.reps), None));
            println!("GFLOP/s, medians");
        }
        decode = dpar::bench::decode_gemm(args.reps);
        println!();
        println!(
            "| decode product m × 768 × 256 (f32) | faer GFLOP/s | small-m, W packed once, GFLOP/s |\n|---|---|---|"
        );
        for (m, faer, small) in &decode {
            println!("| m = {m} | {faer:.1} | {small:.1} |");
        }
        println!(
            "`dpar sample` uses the small-m kernel up to m = {} rows (a decode step of 2 × batch rows with guidance)",
            dpar::kernels::matmul::SMALL_M
        );
    }
    let mut torch = None;
    if let (Some(_), Some(reference)) = (&args.torch, reference) {
        let gemm = dpar::bench::gemm_1024(args.reps);
        let shapes = dpar::bench::gemm_shapes(args.reps);
        println!();
        print!("{}", dpar::bench::torch_markdown(&rows, &reference, &gemm));
        println!("ratios: PyTorch's time over ours (above 1: ours is faster), best kernel of each side");
        println!();
        print!("{}", dpar::bench::gemm_markdown(&shapes, Some(&reference)));
        println!("GFLOP/s, medians; bf16: bf16 operands, f32 accumulation on both sides");
        torch = Some(serde_json::json!({ "reference": reference, "ours_gemm_1024": gemm, "ours_gemm_shapes": shapes }));
    }
    let mut curve = Vec::new();
    if let Some(list) = &args.sampling_curve {
        let batches: Vec<usize> = list
            .split(',')
            .map(|b| {
                b.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&b| b > 0 && b <= 4096)
                    .ok_or_else(|| anyhow::anyhow!("--sampling-curve: `{b}` is not a batch size in 1..=4096"))
            })
            .collect::<Result<_>>()?;
        let (gpt, _gs) = dpar::models::gpt(&args.gpt, None, &device)?;
        let (model, _store, _) = dpar::models::dpar(&args.dpar, &device)?;
        let recorded = dpar::parts::Recorded::of(&args.dpar);
        let part = dpar::parts::Part::EntropyModel;
        let owner = format!("the model {}", args.dpar.display());
        let entropy_path = dpar::parts::resolve(
            part,
            args.entropy_model.as_deref(),
            recorded.id(part),
            &args.dpar,
            &owner,
            crate::common::allow_mismatch(),
        )?;
        let (entropy, _es) = dpar::models::gpt(&entropy_path, None, &device)?;
        let (gc, dc) = (gpt.config(), model.config());
        anyhow::ensure!(
            gc.seq_len() == dc.seq_len() && gc.num_classes == dc.num_classes,
            "--gpt {} ({} codes, {} classes) and --dpar {} ({} codes, {} classes) do not generate the same images",
            args.gpt.display(),
            gc.seq_len(),
            gc.num_classes,
            args.dpar.display(),
            dc.seq_len(),
            dc.num_classes
        );
        let sampling = dpar::sample::SamplingConfig { cfg_scale: args.cfg, ..Default::default() };
        sampling.validate()?;
        tracing::info!(
            "sampling curve: {} ({} layers, width {}) against {} ({}+{}+{} layers, width {}), cfg {}",
            args.gpt.display(),
            gc.n_layer,
            gc.dim,
            args.dpar.display(),
            dc.encoder_layers,
            dc.global_layers,
            dc.decoder_layers,
            dc.dim,
            args.cfg
        );
        curve =
            dpar::bench::sampling_curve(&gpt, &model, &entropy, &sampling, &dc.patch, &batches, args.reps, &device)?;
        println!();
        print!("{}", dpar::bench::sampling_markdown(&curve, dc.seq_len()));
        println!(
            "whole generations (cfg {}), median of up to {} runs or one second per batch size",
            args.cfg, args.reps
        );
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({ "models": rows, "ops": ops, "torch": torch, "sampling_curve": curve, "decode_gemm": decode });
        dpar::util::write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
