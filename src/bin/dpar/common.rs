//! Flags and helpers shared by several commands.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

/// `--allow-mismatch` (a global flag): mismatched parts are warnings, not errors.
pub static ALLOW_MISMATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn allow_mismatch() -> bool {
    ALLOW_MISMATCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// A mismatch between parts: an error ending with `fix` and the flag, or with `--allow-mismatch`
/// a warning.
pub fn mismatch(msg: String, fix: &str) -> Result<()> {
    if !allow_mismatch() {
        bail!("{msg} ({fix}, or pass --allow-mismatch)");
    }
    tracing::warn!("--allow-mismatch: {msg}");
    Ok(())
}

/// Where the images come from.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset folder: IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-…`) or class sub-folders
    /// of PNG/JPEG images (optionally under `train/` and `test/`).
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Explicit IDX image file (overrides --data; needs --labels).
    #[arg(long, requires = "labels")]
    pub images: Option<PathBuf>,
    /// Explicit IDX label file.
    #[arg(long, requires = "images")]
    pub labels: Option<PathBuf>,
    /// Class names of an IDX dataset, in label order (`--class-names 'T-shirt,Trouser,…'`):
    /// labels must lie below their count. Default: the label values `0`, `1`, …, which must cover
    /// 0..=max without a gap. Class folders are named by their folders.
    #[arg(long, value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
}

impl DataArgs {
    /// Loads `split`, prepared to `size × size × channels`.
    pub fn load(&self, split: &str, size: usize, channels: usize) -> Result<dpar::data::ImageDataset> {
        let source = match (&self.images, &self.labels) {
            (Some(images), Some(labels)) => {
                dpar::data::DataSource::Idx { images: images.clone(), labels: labels.clone() }
            }
            _ => dpar::data::resolve(&self.data, split)?,
        };
        let t = std::time::Instant::now();
        let data = match (&source, &self.class_names) {
            (_, None) => dpar::data::load(&source, size, channels),
            (dpar::data::DataSource::Idx { images, labels }, Some(names)) => {
                dpar::data::idx::load_idx_with_classes(images, labels, Some(names))
                    .and_then(|d| d.prepare(size, channels))
            }
            (dpar::data::DataSource::Folder { root }, Some(_)) => {
                bail!(
                    "--class-names: {} is a folder of class sub-folders, which name the classes themselves",
                    root.display()
                )
            }
        }
        .with_context(|| format!("loading the {split} split"))?;
        tracing::info!(
            "loaded {} {split} images ({} classes) from {} in {:.1}s",
            data.len(),
            data.num_classes(),
            data.source,
            t.elapsed().as_secs_f64()
        );
        Ok(data)
    }
}

/// How a training command treats its run folder (`--resume`, `--overwrite`, neither).
pub fn start(resume: bool, overwrite: bool) -> dpar::train::Start {
    match (resume, overwrite) {
        (true, _) => dpar::train::Start::Resume,
        (false, true) => dpar::train::Start::Overwrite,
        (false, false) => dpar::train::Start::Fresh,
    }
}

/// The compute device.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda` / `cuda:N` in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<candle_core::Device> {
        match self.device.as_str() {
            "cpu" => Ok(candle_core::Device::Cpu),
            d if d == "cuda" || d.starts_with("cuda:") => {
                // Plain `cuda` under a multi-process launcher: one GPU per process, by local rank.
                let default =
                    dpar::dist::launcher_rank().map(|(_, _, local)| local.to_string()).unwrap_or_else(|| "0".into());
                let ordinal: usize =
                    d.strip_prefix("cuda:").unwrap_or(&default).parse().context("--device cuda:N needs a number")?;
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device {d}: this binary was built without CUDA (rebuild with `--features cuda`)");
                }
                Ok(candle_core::Device::new_cuda(ordinal)?)
            }
            other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        }
    }
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Print a summary of a dataset split: count, size, classes.
    Info {
        #[command(flatten)]
        data: DataArgs,
        /// Split to describe: `train` or `test`.
        #[arg(long, default_value = "train")]
        split: String,
    },
}

pub fn run_data(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Info { data, split } => {
            let source = match (&data.images, &data.labels) {
                (Some(i), Some(l)) => dpar::data::DataSource::Idx { images: i.clone(), labels: l.clone() },
                _ => dpar::data::resolve(&data.data, &split)?,
            };
            let set = match &source {
                dpar::data::DataSource::Idx { images, labels } => {
                    dpar::data::idx::load_idx_with_classes(images, labels, data.class_names.as_deref())?
                }
                dpar::data::DataSource::Folder { root } => dpar::data::folder::load_image_folder(root, 64, 3)?,
            };
            let mut counts = vec![0usize; set.num_classes()];
            for &y in &set.labels {
                counts[y as usize] += 1;
            }
            println!("source   {:?}", source);
            println!("images   {} of {}×{}×{}", set.len(), set.channels, set.height, set.width);
            println!("classes  {}", set.num_classes());
            for (name, n) in set.class_names.iter().zip(&counts) {
                println!("  {name:>12}: {n}");
            }
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct PlotLogsArgs {
    /// Run folders or log.jsonl files, each as NAME=PATH or PATH.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// The metric to plot (a key of the log lines, e.g. loss or val_loss).
    #[arg(long, default_value = "loss")]
    pub metric: String,
    /// The x axis: step, train_seconds (training wall-clock), train_flops or epoch.
    #[arg(long, default_value = "step")]
    pub x: String,
    /// Where the PNG goes.
    #[arg(long, default_value = "out/losses.png")]
    pub out: PathBuf,
    /// Linear y axis (default: log scale).
    #[arg(long)]
    pub linear: bool,
}

fn name_and_path(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => (spec.to_string(), PathBuf::from(spec)),
    }
}

pub fn plot_logs(args: PlotLogsArgs) -> Result<()> {
    let mut series = Vec::new();
    for spec in &args.runs {
        let (name, path) = name_and_path(spec);
        let log = dpar::runs::read_log(&path)?;
        let mut points = dpar::runs::curve(&log, &args.x, &args.metric);
        if args.x == "train_flops" {
            points.iter_mut().for_each(|p| p.0 /= 1e15);
        } else if args.x == "train_seconds" {
            points.iter_mut().for_each(|p| p.0 /= 60.0);
        }
        if points.is_empty() {
            bail!("{}: no lines with both `{}` and `{}`", path.display(), args.x, args.metric);
        }
        series.push(dpar::plot::Series { name, points });
    }
    let x_label = match args.x.as_str() {
        "train_flops" => "training PFLOP".to_string(),
        "train_seconds" => "training wall-clock (minutes)".to_string(),
        other => other.to_string(),
    };
    dpar::plot::line_plot(
        &args.out,
        &format!("{} vs {x_label}", args.metric),
        &x_label,
        &args.metric,
        &series,
        !args.linear,
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct SummarizeArgs {
    /// Run folders, each as NAME=PATH or PATH.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Also write the summaries as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Prints a markdown table of runs: shape, budget, cost and final validation loss.
pub fn summarize(args: SummarizeArgs) -> Result<()> {
    println!("{}", dpar::runs::RunSummary::markdown_header());
    let mut all = Vec::new();
    for spec in &args.runs {
        let (name, path) = name_and_path(spec);
        let s = dpar::runs::RunSummary::read(&path)?;
        println!("{}", s.markdown_row(&name));
        all.push(serde_json::json!({ "name": name, "summary": s }));
    }
    if let Some(path) = &args.json {
        dpar::util::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A weight file (or run folder with model.safetensors) written by dpar.
    #[arg(long)]
    pub from: PathBuf,
    /// Output weight file.
    #[arg(long)]
    pub to: PathBuf,
    /// Storage type: f32, f16 or bf16 (loading converts back to f32).
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

/// Copies weights with their metadata (config) in another storage type, e.g. to ship small files.
pub fn export(args: ExportArgs) -> Result<()> {
    let file = if args.from.is_dir() { args.from.join("model.safetensors") } else { args.from.clone() };
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    let loaded = dpar::tensor_io::read_safetensors(&file, &candle_core::Device::Cpu)?;
    let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::with_capacity(loaded.tensors.len());
    // The largest finite value of the target type: anything beyond would become ±inf.
    let max = match dtype {
        candle_core::DType::F16 => 65504.0,
        candle_core::DType::BF16 => 3.3895e38,
        _ => f64::from(f32::MAX),
    };
    for (name, t) in loaded.tensors {
        let t = if t.dtype().is_float() {
            let largest = t.to_dtype(candle_core::DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            if !largest.is_finite() || largest > max {
                bail!("{}: tensor {name} holds {largest:e}, which {} cannot store (largest {max:e}); keep f32 or use bf16", file.display(), args.dtype);
            }
            t.to_dtype(dtype)?
        } else {
            t
        };
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: std::collections::BTreeMap<String, String> = loaded.metadata.into_iter().collect();
    dpar::tensor_io::write_safetensors(&args.to, &tensors, &meta)?;
    let size = std::fs::metadata(&args.to).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({} tensors as {}, {:.1} MB)", args.to.display(), tensors.len(), args.dtype, size as f64 / 1e6);
    if let Some(parent) = args.to.parent() {
        if let Ok(config) = std::fs::read_to_string(file.with_file_name("config.json")) {
            dpar::util::write_atomic(&parent.join("config.json"), config.as_bytes())?;
        }
    }
    Ok(())
}
