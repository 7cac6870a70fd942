//! The `dpar` command line: thin wrappers that parse flags, call the library and print what was
//! done and where it was written. Each `*_cmd` module imports only `common` (the flags several
//! commands share) and the library; this file dispatches.

mod bench_cmd;
mod common;
mod eval_cmd;
mod experiment_cmd;
mod patch_cmd;
mod sample_cmd;
#[cfg(feature = "serve")]
mod serve;
mod tokenizer_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dpar", version, about = "DPAR: dynamic patchification for autoregressive image generation")]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Go on (with a loud warning) when a tokenizer, entropy model or code set is not the one a
    /// model records by hash; without it such a mismatch is an error.
    #[arg(long, global = true)]
    allow_mismatch: bool,
    /// Load weight files that hold tensors the model does not know (ignored, with a warning);
    /// without it such a file is refused as belonging to another model.
    #[arg(long, global = true)]
    allow_extra_keys: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect datasets.
    #[command(subcommand)]
    Data(common::DataCmd),
    /// Train, evaluate and look at the VQ tokenizer.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::TokenizerCmd),
    /// Encode a dataset split into code shards.
    Tokenize(tokenizer_cmd::TokenizeArgs),
    /// Train a model on code shards (the shared training loop).
    Train(common::TrainArgs),
    /// Generate images with a trained model.
    Sample(sample_cmd::SampleArgs),
    /// The entropy model: train it, then store per-code entropies beside the shards.
    #[command(subcommand)]
    Entropy(patch_cmd::EntropyCmd),
    /// Patch statistics, threshold calibration and patch pictures.
    Patchify(patch_cmd::PatchifyArgs),
    /// Side-by-side benchmark of the baseline and DPAR (`dpar bench`), or speed (`dpar bench speed`).
    Bench(BenchArgs),
    /// The paper's ablations as commands (small scale).
    #[command(subcommand)]
    Ablate(experiment_cmd::AblateCmd),
    /// Quality metrics in a classifier's feature space (FD, IS, precision/recall, accuracy).
    #[command(subcommand)]
    Eval(eval_cmd::EvalCmd),
    /// Copy weights (with their config) in another storage type, e.g. f16 for shipping.
    Export(common::ExportArgs),
    /// Overlay the loss curves of several runs (their log.jsonl) in one PNG.
    PlotLogs(common::PlotLogsArgs),
    /// The speed–quality picture of DPAR's patchers: images/s ÷ the baseline's against FD,
    /// with seed and sitting spreads (from `scripts/pareto`'s folder).
    PlotPareto(common::PlotParetoArgs),
    /// A markdown table of run folders: shape, budget, wall-clock, FLOPs, final validation loss.
    Summarize(common::SummarizeArgs),
    /// A local web page: watch DPAR generate code by code, turn θ, compare with the baseline.
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
}

/// `dpar bench` alone runs the side-by-side comparison; `dpar bench speed` times the kernels.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<bench_cmd::BenchCmd>,
    #[command(flatten)]
    side: experiment_cmd::SideBySideArgs,
}

/// Where default paths point, shown under every command's `--help`.
const PATHS_NOTE: &str = "Default paths: those under models/ (the shipped models) are looked up in the working \
directory, then $DPAR_HOME, beside the executable and in the source tree the binary was built from; every other \
relative path (data/, runs/, out/) means the working directory.";

/// `cmd` and all its subcommands with [`PATHS_NOTE`] under their help.
fn with_paths_note(cmd: clap::Command) -> clap::Command {
    cmd.after_help(PATHS_NOTE).mut_subcommands(with_paths_note)
}

fn main() {
    dpar::util::tune_allocator();
    let matches = with_paths_note(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let level = if cli.quiet {
        tracing::Level::WARN
    } else {
        match cli.verbose {
            0 => tracing::Level::INFO,
            1 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        }
    };
    dpar::params::set_allow_extra_keys(cli.allow_extra_keys);
    common::ALLOW_MISMATCH.store(cli.allow_mismatch, std::sync::atomic::Ordering::Relaxed);
    tracing_subscriber::fmt().with_max_level(level).with_target(false).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Data(cmd) => common::run_data(cmd),
        Command::Tokenizer(cmd) => tokenizer_cmd::run(cmd),
        Command::Tokenize(args) => tokenizer_cmd::tokenize(args),
        Command::Train(args) => train_cmd::train(args),
        Command::Sample(mut args) => {
            let sub = matches.subcommand_matches("sample").expect("the sample subcommand was parsed");
            args.apply_config(sub).and_then(|()| sample_cmd::sample(args))
        }
        Command::Bench(BenchArgs { cmd: Some(cmd), .. }) => bench_cmd::run(cmd),
        Command::Bench(BenchArgs { cmd: None, side }) => experiment_cmd::side_by_side(side),
        Command::Ablate(cmd) => experiment_cmd::ablate(cmd),
        Command::PlotLogs(args) => common::plot_logs(args),
        Command::PlotPareto(args) => common::plot_pareto(args),
        Command::Summarize(args) => common::summarize(args),
        Command::Export(args) => common::export(args),
        Command::Eval(cmd) => eval_cmd::run(cmd),
        Command::Entropy(patch_cmd::EntropyCmd::Train(args)) => train_cmd::train_entropy(args),
        Command::Entropy(patch_cmd::EntropyCmd::Compute(args)) => patch_cmd::run_compute(args),
        Command::Entropy(patch_cmd::EntropyCmd::Count(args)) => patch_cmd::run_count(args),
        Command::Patchify(args) => patch_cmd::run_patchify(args),
        #[cfg(feature = "serve")]
        Command::Serve(args) => serve::serve(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
