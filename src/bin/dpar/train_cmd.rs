//! `dpar train` (and `dpar entropy train`): flags → [`dpar::recipe::train`] → a summary.

use anyhow::Result;

use crate::common::{DeviceArgs, EntropyTrainArgs, TrainArgs};

/// Adds to a divergence error the command that continues from the last good checkpoint with a
/// tenth of the learning rate.
fn recovery_hint(err: dpar::recipe::RecipeError, request: &dpar::recipe::TrainRequest) -> anyhow::Error {
    if !err.diverged() {
        return err.into();
    }
    let out = request.out();
    // The learning rate the run used: the flag, else its saved config.
    let lr = request.overrides.lr.or_else(|| {
        let saved: serde_json::Value = dpar::recipe::read_config(&out.join("config.json")).ok()?;
        saved["train"]["adamw"]["lr"].as_f64()
    });
    let lr = lr.map(|lr| format!(" --lr {:e}", lr / 10.0)).unwrap_or_default();
    anyhow::anyhow!(
        "{:#}\nto continue from the last good checkpoint with a tenth of the learning rate:\n  {} --out {} --resume{lr}",
        anyhow::Error::from(err),
        request.kind.command(),
        out.display()
    )
}

/// `dpar train`.
pub fn train(args: TrainArgs) -> Result<()> {
    run(args.request(), &args.run.device)
}

/// `dpar entropy train`.
pub fn train_entropy(args: EntropyTrainArgs) -> Result<()> {
    run(args.request(), &args.run.device)
}

fn run(request: dpar::recipe::TrainRequest, device: &DeviceArgs) -> Result<()> {
    let device = device.device()?;
    let trained = dpar::recipe::train(&request, &device).map_err(|e| recovery_hint(e, &request))?;
    let report = &trained.report;
    if report.already_finished {
        println!(
            "{} is finished: its checkpoint is at step {}, the end of the run; nothing was trained or written (train further with `{} --out {} --resume --steps N`, N > {})",
            trained.out.display(),
            report.steps,
            trained.kind.command(),
            trained.out.display(),
            report.steps
        );
        return Ok(());
    }
    let patches = match trained.kind {
        dpar::recipe::ModelKind::Dpar => {
            let n = report.final_metrics.iter().find(|(k, _)| k == "patches_per_image").map(|(_, v)| *v);
            format!(", {:.1} patches per image", n.unwrap_or(f64::NAN))
        }
        _ => String::new(),
    };
    println!(
        "trained {}: {} steps in {} ({:.0} ms/step, {:.0} codes/s{patches}), final train loss {:.4}",
        trained.kind.name(),
        report.steps,
        dpar::util::human_duration(report.seconds),
        report.ms_per_step,
        report.throughput,
        report.final_loss
    );
    for (k, v) in &report.validation {
        println!("  validation {k}: {v:.4}");
    }
    println!(
        "wrote {}/{{model.safetensors, checkpoint.safetensors, config.json, log.jsonl, loss.png}}",
        trained.out.display()
    );
    Ok(())
}
