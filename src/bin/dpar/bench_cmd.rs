//! `dpar bench speed`: training, forward and cached-sampling speed of the models.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::common::DeviceArgs;

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum BenchCmd {
    /// Medians over repeated steps after warm-up, with GFLOP/s.
    Speed(SpeedArgs),
    /// The checks of a GPU machine (run by scripts/gpu-check): smoke tests of both models on the
    /// device against the CPU (loss, gradients, generated codes; f32 and bf16), training
    /// throughput of gpt-b and dpar-b (f32, bf16), sampling images/s with guidance; writes
    /// report.json and report.md. Under a multi-process launcher (RANK/WORLD_SIZE, mpirun):
    /// the all-reduce check of the ranks alone.
    Device(DeviceCheckArgs),
}

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// Folder for report.json and report.md (and nccl.json from the multi-rank check).
    #[arg(long, default_value = "out/device-check")]
    out: std::path::PathBuf,
    /// Small presets (MNIST sizes), batch 4, one timed repetition: a dry run of the whole
    /// report on any machine.
    #[arg(long)]
    quick: bool,
    /// Images per training step and per generation.
    #[arg(long, default_value_t = 64, value_parser = crate::common::positive_usize)]
    batch_size: usize,
    /// Untimed training steps before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed training steps (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = crate::common::positive_usize)]
    reps: usize,
    /// Guidance scale of the sampling row.
    #[arg(long, default_value_t = 2.0)]
    cfg: f64,
    /// Only the smoke tests.
    #[arg(long)]
    smoke_only: bool,
    /// A multi-rank check's result (nccl.json) to include in the report.
    #[arg(long)]
    nccl_result: Option<std::path::PathBuf>,
    /// How the report names the device (scripts/gpu-check passes the GPU, driver and date).
    #[arg(long)]
    label: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
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
    #[arg(long, default_value_t = 16, value_parser = crate::common::positive_usize)]
    batch_size: usize,
    /// Untimed repetitions before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = crate::common::positive_usize)]
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
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/gpt", value_parser = crate::common::model_path)]
    gpt: std::path::PathBuf,
    /// The DPAR model of the sampling curve; its entropy model is found by the hash it records
    /// (or given with --entropy-model).
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist/dpar", value_parser = crate::common::model_path)]
    dpar: std::path::PathBuf,
    /// The entropy model of the sampling curve's DPAR model.
    #[arg(long)]
    entropy_model: Option<std::path::PathBuf>,
    /// θ of the sampling curve's DPAR patcher (default: the DPAR model's); with another
    /// --entropy-model, the θ calibrated for it (`dpar patchify --target-mean-len`).
    #[arg(long, value_parser = crate::common::positive_f64)]
    threshold: Option<f64>,
    /// The sampling curve's DPAR patcher: `model` (its entropy model) or `self` (the decoder's
    /// own entropy, at the θ stored beside the model unless --threshold is given).
    #[arg(long, default_value = "model")]
    patcher: dpar::patching::EntropyFrom,
    /// Time the sampling curve on models with random weights instead of trained ones: a GPT
    /// preset and a DPAR preset, comma separated (`gpt-b,dpar-b`): paper-scale per-image time,
    /// FLOPs and bytes (design §9). θ is calibrated for --target-mean-len on random codes.
    #[arg(long, value_name = "GPT,DPAR", conflicts_with_all = ["entropy_model"])]
    random: Option<String>,
    /// With --random: the entropy model's shape, a GPT preset (`gpt-b`: the paper's 111M) or
    /// LAYERSxWIDTH (`2x256`: LlamaGen blocks with 64-wide heads); unused with --patcher self.
    #[arg(long, default_value = "gpt-b", requires = "random")]
    entropy_preset: String,
    /// With --random: the mean patch length θ is calibrated for.
    #[arg(long, default_value_t = 1.8, requires = "random")]
    target_mean_len: f64,
    /// Classifier-free guidance scale of the sampling curve (1 = none; above 1 doubles the rows).
    #[arg(long, default_value_t = 2.0)]
    cfg: f64,
    /// KV-cache precisions of the sampling curve, comma separated (f32, bf16): one curve each,
    /// in the same sitting.
    #[arg(long, default_value = "f32", value_delimiter = ',')]
    kv_cache: Vec<dpar::nn::KvPrecision>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `--random GPT,DPAR` with `--entropy-preset`: random-weight models for the sampling curve.
fn random_models(spec: &str, args: &SpeedArgs, device: &candle_core::Device) -> Result<dpar::bench::RandomModels> {
    let (g, d) = spec
        .split_once(',')
        .ok_or_else(|| anyhow::anyhow!("--random `{spec}`: give a GPT and a DPAR preset, e.g. gpt-b,dpar-b"))?;
    let gc = dpar::gpt::GptConfig::preset(g.trim()).context("--random")?;
    let dc = dpar::dpar::DparConfig::preset(d.trim()).context("--random")?;
    anyhow::ensure!(
        gc.seq_len() == dc.seq_len() && gc.num_classes == dc.num_classes && gc.vocab_size == dc.vocab_size,
        "--random {spec}: the two presets do not generate the same images ({} and {} codes, {} and {} classes)",
        gc.seq_len(),
        dc.seq_len(),
        gc.num_classes,
        dc.num_classes
    );
    let e = &args.entropy_preset;
    let ec = match e.split_once('x').map(|(l, w)| (l.parse::<usize>(), w.parse::<usize>())) {
        Some((Ok(layers), Ok(width))) => {
            anyhow::ensure!(
                layers > 0 && width >= 64 && width % 64 == 0,
                "--entropy-preset {e}: LAYERSxWIDTH needs at least one layer and a width that is a multiple of 64"
            );
            dpar::gpt::GptConfig::gpt_b().with(|it| {
                (it.n_layer, it.dim, it.n_head) = (layers, width, width / 64);
            })
        }
        _ => dpar::gpt::GptConfig::preset(e).context("--entropy-preset (a GPT preset or LAYERSxWIDTH)")?,
    };
    tracing::info!(
        "random models: {g} and {d}; entropy model {e}; calibrating θ for mean patch length {}",
        args.target_mean_len
    );
    Ok(dpar::bench::random_models(&gc, &dc, &ec, args.patcher, args.target_mean_len, device)?)
}

/// PyTorch's reference scripts, run by `--torch`.
const TORCH_SCRIPTS: [&str; 4] =
    ["torch_bench_model.py", "torch_bench_bf16.py", "torch_sample_bench.py", "torch_gemm_shapes.py"];

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Speed(a) => speed(a),
        BenchCmd::Device(a) => device_check(a),
    }
}

fn device_check(args: DeviceCheckArgs) -> Result<()> {
    use dpar::device_check as dc;
    let device = args.device.device()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let name = match (&args.label, device.is_cpu()) {
        (Some(label), true) => format!("{label} (candle's ops against the fused kernels)"),
        (Some(label), false) => label.clone(),
        (None, true) => "cpu (candle's ops against the fused kernels)".to_string(),
        (None, false) => args.device.device.clone(),
    };
    if let Some((rank, world, _)) = dpar::dist::launcher_rank().filter(|&(_, w, _)| w > 1) {
        let row = multi_rank_check(&device, rank, world, &args.out)?;
        if rank == 0 {
            let path = args.out.join("nccl.json");
            dpar::util::write_atomic(&path, serde_json::to_string_pretty(&row)?.as_bytes())?;
            println!(
                "{} ranks: all-reduce max error {:.1e}, bus bandwidth {:.1} GB/s: {}",
                row.world_size,
                row.max_error,
                row.bus_gb_per_s,
                if row.pass { "pass" } else { "FAIL" }
            );
            println!("wrote {}", path.display());
        }
        anyhow::ensure!(row.pass, "rank {rank}: the all-reduce gave wrong values (max error {:e})", row.max_error);
        return Ok(());
    }
    let start = std::time::Instant::now();
    let quick = args.quick;
    let batch = if quick { args.batch_size.min(4) } else { args.batch_size };
    let reps = if quick { 1 } else { args.reps };
    let warmup = if quick { 1 } else { args.warmup };
    let mut report = dc::Report {
        device: name,
        quick,
        smoke: Vec::new(),
        throughput: Vec::new(),
        sampling: Vec::new(),
        nccl: None,
        seconds: 0.0,
    };
    let write = |report: &mut dc::Report| -> Result<()> {
        report.seconds = start.elapsed().as_secs_f64();
        dpar::util::write_atomic(&args.out.join("report.json"), serde_json::to_string_pretty(&*report)?.as_bytes())?;
        dpar::util::write_atomic(&args.out.join("report.md"), dc::markdown(report).as_bytes())?;
        Ok(())
    };
    if let Some(path) = &args.nccl_result {
        let text = std::fs::read_to_string(path).with_context(|| format!("--nccl-result {}", path.display()))?;
        report.nccl = Some(serde_json::from_str(&text).with_context(|| format!("--nccl-result {}", path.display()))?);
    }
    eprintln!("smoke tests: small GPT and DPAR on {} against the CPU", report.device);
    report.smoke = dc::smoke(&device)?;
    write(&mut report)?;
    if !args.smoke_only {
        eprintln!("training throughput: batch {batch}, f32 and bf16");
        report.throughput = dc::throughput(&device, batch, warmup, reps, quick)?;
        write(&mut report)?;
        eprintln!("sampling: batch {batch}, cfg {}", args.cfg);
        report.sampling = vec![dc::sampling(&device, batch, args.cfg, quick)?];
    }
    write(&mut report)?;
    print!("{}", dc::markdown(&report));
    println!("wrote {}/report.json and report.md", args.out.display());
    let failed: Vec<String> =
        report.smoke.iter().filter(|r| !r.pass).map(|r| format!("{} {}", r.model, r.precision)).collect();
    anyhow::ensure!(failed.is_empty(), "smoke tests failed: {}", failed.join(", "));
    Ok(())
}

/// The all-reduce check as one rank of a launcher's group: NCCL on CUDA (`--features nccl`),
/// MPI on the CPU (`--features mpi`).
fn multi_rank_check(
    device: &candle_core::Device,
    rank: usize,
    world: usize,
    out: &std::path::Path,
) -> Result<dpar::device_check::NcclRow> {
    let _ = (rank, world, out);
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        let id = out.join(".nccl-id");
        let c = dpar::dist::NcclCollective::init(rank, world, device, &id, std::time::Duration::from_secs(120))?;
        return Ok(dpar::device_check::all_reduce_check(&c, device, 64 << 20)?);
    }
    #[cfg(feature = "mpi")]
    if dpar::dist::launched_by_mpi() {
        let c = dpar::dist::MpiCollective::init()?;
        return Ok(dpar::device_check::all_reduce_check(&c, device, 1 << 22)?);
    }
    anyhow::bail!(
        "started as rank {rank} of {world}, but this binary has no backend for {device:?} (build with --features nccl for GPUs, --features mpi under mpirun)"
    )
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
                    true,
                )?);
            } else {
                let mut config = dpar::gpt::GptConfig::preset(name)?;
                config.ops = kind;
                tracing::info!("timing {name} with {ops} ops ({} layers, width {})", config.n_layer, config.dim);
                rows.push(dpar::bench::gpt_speed(
                    &label,
                    &config,
                    args.batch_size,
                    args.warmup,
                    args.reps,
                    &device,
                    true,
                )?);
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
        let random = match &args.random {
            Some(spec) => Some(random_models(spec, &args, &device)?),
            None => None,
        };
        let loaded = match &random {
            Some(_) => None,
            None => {
                let (gpt, gs) = dpar::models::gpt(&args.gpt, None, &device)?;
                let (model, store, _) = dpar::models::dpar(&args.dpar, &device)?;
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
                let (entropy, es) = dpar::models::gpt(&entropy_path, None, &device)?;
                Some((gpt, model, entropy, [gs, store, es]))
            }
        };
        let (gpt, model, entropy) = match (&random, &loaded) {
            (Some(r), _) => (&r.gpt, &r.dpar, &r.entropy),
            (None, Some((g, d, e, _))) => (g, d, e),
            (None, None) => unreachable!("one of the two is built above"),
        };
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
        let (gpt_name, dpar_name) = match &args.random {
            Some(spec) => (
                format!("random {}", spec.split(',').next().unwrap_or("")),
                format!("random {}", spec.split(',').nth(1).unwrap_or("")),
            ),
            None => (args.gpt.display().to_string(), args.dpar.display().to_string()),
        };
        tracing::info!(
            "sampling curve: {} ({} layers, width {}) against {} ({}+{}+{} layers, width {}), cfg {}",
            gpt_name,
            gc.n_layer,
            gc.dim,
            dpar_name,
            dc.encoder_layers,
            dc.global_layers,
            dc.decoder_layers,
            dc.dim,
            args.cfg
        );
        let stored_theta = match &random {
            Some(_) => None,
            None => crate::common::stored_threshold(&args.dpar, args.patcher, args.threshold, false)?,
        };
        let machine = dpar::bench::machine(args.reps);
        for &kv in &args.kv_cache {
            let sampling = dpar::sample::SamplingConfig { kv_cache: kv, ..sampling.clone() };
            let patch = match &random {
                Some(r) => {
                    dpar::patching::PatchConfig { threshold: args.threshold.unwrap_or(r.patch.threshold), ..r.patch }
                }
                None => dpar::patching::PatchConfig {
                    threshold: stored_theta.or(args.threshold).unwrap_or(dc.patch.threshold),
                    entropy_from: args.patcher,
                    ..dc.patch
                },
            };
            curve.extend(dpar::bench::sampling_curve(
                gpt,
                model,
                entropy,
                &sampling,
                &patch,
                &batches,
                args.reps,
                Some(&machine),
                &device,
            )?);
        }
        println!();
        print!("{}", dpar::bench::sampling_markdown(&curve, dc.seq_len()));
        println!(
            "whole generations (cfg {}), median of up to {} runs or four seconds per batch size; last-level cache {} MiB",
            args.cfg,
            args.reps,
            dpar::sample::last_level_cache() >> 20
        );
        println!("{}", dpar::bench::machine_line(&machine));
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({ "models": rows, "ops": ops, "torch": torch, "sampling_curve": curve, "decode_gemm": decode });
        dpar::util::write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
