//! The checks a GPU machine runs once (`dpar bench device`, driven by `scripts/gpu-check`):
//!
//! 1. **smoke tests**: small GPT and DPAR models, the same weights on the CPU (fused f32
//!    kernels, the reference) and on the device (candle's ops), compared on the loss, every
//!    gradient and the codes of a seeded cached generation; in f32 and in mixed precision
//!    (bf16 activations with f32 masters, against the CPU's f32);
//! 2. **training throughput** of `gpt-b` and `dpar-b` (batch 64, 256² images: 16×16 codes), f32
//!    and bf16, in images/s and GFLOP/s (the analytic counts of [`crate::flops`]);
//! 3. **sampling throughput** of both with classifier-free guidance, images/s;
//! 4. with the `nccl` feature and several ranks, an all-reduce check ([`all_reduce_check`]).
//!
//! On `--device cpu` the same code runs with candle's ops forced on the "device" side, so the
//! script and its report are tested without a GPU (with small presets under `quick`).

use candle_core::{DType, Device, Tensor};

use crate::bench::{BenchError, Result};
use crate::dpar::{Dpar, DparConfig};
use crate::gpt::{Gpt, GptConfig};
use crate::nn::{Ops, Precision};
use crate::params::ParamStore;

/// Tolerances of the smoke tests.
pub const F32_LOSS_REL: f64 = 1e-4;
pub const F32_GRAD_REL: f64 = 2e-3;
pub const BF16_LOSS_REL: f64 = 2e-2;
pub const BF16_GRAD_COSINE: f64 = 0.95;

/// One smoke test: a model on the device against the CPU reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SmokeRow {
    pub model: String,
    /// `f32` or `bf16` (mixed precision) on the device; the reference is always CPU f32.
    pub precision: String,
    pub params: usize,
    pub reference_loss: f64,
    pub device_loss: f64,
    /// |Δloss| / loss.
    pub loss_rel: f64,
    /// The largest |Δ| of a parameter's gradient over that gradient's largest |value|, worst
    /// parameter.
    pub worst_grad_rel: f64,
    /// The lowest cosine between a parameter's device and reference gradients.
    pub min_grad_cosine: f64,
    /// f32: the share of codes of a seeded generation (cfg 2) equal to the reference's.
    pub codes_equal: Option<f64>,
    pub pass: bool,
}

/// One row of the training-throughput table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputRow {
    pub model: String,
    pub precision: String,
    pub batch: usize,
    pub train_ms: f64,
    pub images_per_s: f64,
    pub train_gflops: f64,
    pub forward_ms: f64,
}

/// Sampling throughput with guidance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingRow {
    pub batch: usize,
    pub cfg: f64,
    pub gpt_images_per_s: f64,
    pub dpar_images_per_s: f64,
    pub dpar_steps_per_image: f64,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub device: String,
    pub quick: bool,
    pub smoke: Vec<SmokeRow>,
    pub throughput: Vec<ThroughputRow>,
    pub sampling: Vec<SamplingRow>,
    /// Filled by the caller when a multi-rank check ran.
    pub nccl: Option<NcclRow>,
    pub seconds: f64,
}

/// The result of a multi-rank all-reduce check.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NcclRow {
    pub world_size: usize,
    /// The largest |mean − expected| over a buffer whose values depend on the rank.
    pub max_error: f64,
    /// Bus bandwidth of the large f32 all-reduce, GB/s (NCCL's convention: 2(n−1)/n · bytes / t).
    pub bus_gb_per_s: f64,
    pub pass: bool,
}

fn bad(e: impl std::fmt::Display) -> BenchError {
    BenchError::Bad(e.to_string())
}

fn small_gpt(cls: usize) -> GptConfig {
    GptConfig::mnist().with(|c| {
        (c.dim, c.n_head, c.n_layer, c.ffn_hidden) = (64, 4, 2, None);
        (c.vocab_size, c.num_classes, c.grid_size, c.cls_token_num) = (64, 10, 8, cls);
        (c.token_dropout, c.resid_dropout, c.ffn_dropout, c.class_dropout) = (0.0, 0.0, 0.0, 0.0);
    })
}

fn small_dpar() -> DparConfig {
    DparConfig::mnist().with(|c| {
        (c.dim, c.n_head, c.encoder_layers, c.global_layers, c.decoder_layers) = (64, 4, 1, 2, 1);
        (c.vocab_size, c.num_classes, c.grid_size) = (64, 10, 8);
        c.class_dropout = 0.0;
    })
}

/// Random values for the zero-initialised output head and the class table, so that every
/// gradient carries signal; the values depend only on the parameter's name, so stores of the
/// same seed on two devices stay equal.
fn randomise_heads(store: &ParamStore, std: f32) -> Result<()> {
    for (name, var) in store.vars() {
        if name == "output.weight" || name.starts_with("cls_embedding") {
            let mut rng = crate::util::rng_for(11, &name, 0);
            let normal = rand_distr::Normal::new(0f32, std).map_err(bad)?;
            let v: Vec<f32> =
                (0..var.elem_count()).map(|_| rand_distr::Distribution::sample(&normal, &mut rng)).collect();
            var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
        }
    }
    Ok(())
}

/// Compares the reference gradients `g_ref` (of `reference`'s parameters) with those of
/// `loss_dev` (over `device`'s, same names): (worst relative max difference, lowest cosine).
fn compare_grads(
    reference: &ParamStore,
    g_ref: &candle_core::backprop::GradStore,
    device: &ParamStore,
    loss_dev: &Tensor,
) -> Result<(f64, f64)> {
    let g_dev = loss_dev.backward()?;
    let mut worst = 0f64;
    let mut min_cos = 1f64;
    for (name, var) in reference.vars() {
        let other = device.var(&name).ok_or_else(|| bad(format!("{name}: missing on the device")))?;
        let want = g_ref.get(var.as_tensor()).ok_or_else(|| bad(format!("{name}: no reference gradient")))?;
        let got = g_dev.get(other.as_tensor()).ok_or_else(|| bad(format!("{name}: no device gradient")))?;
        if got.dtype() != DType::F32 {
            return Err(bad(format!("{name}: the device gradient is {:?}, not f32", got.dtype())));
        }
        let w = want.flatten_all()?.to_vec1::<f32>()?;
        let g = got.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = w.iter().fold(1e-12f64, |a, &x| a.max(x.abs() as f64));
        let diff = w.iter().zip(&g).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
        if g.iter().any(|x| !x.is_finite()) {
            worst = f64::INFINITY;
        }
        worst = worst.max(diff / scale);
        let dot: f64 = w.iter().zip(&g).map(|(&x, &y)| x as f64 * y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        min_cos = min_cos.min(dot / (norm(&w) * norm(&g)).max(1e-30));
    }
    Ok((worst, min_cos))
}

fn log_row(row: Option<&SmokeRow>) {
    if let Some(r) = row {
        tracing::info!(
            "smoke {} {}: loss {:.6} vs {:.6}, worst gradient {:.1e} of scale, lowest cosine {:.5}: {}",
            r.model,
            r.precision,
            r.device_loss,
            r.reference_loss,
            r.worst_grad_rel,
            r.min_grad_cosine,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
}

fn share_equal(a: &[Vec<u32>], b: &[Vec<u32>]) -> f64 {
    let total: usize = a.iter().map(|r| r.len()).sum();
    let same: usize = a.iter().zip(b).map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count()).sum();
    same as f64 / total.max(1) as f64
}

fn smoke_row(
    model: &str,
    precision: Precision,
    params: usize,
    (reference_loss, device_loss): (f64, f64),
    (worst_grad_rel, min_grad_cosine): (f64, f64),
    codes_equal: Option<f64>,
) -> SmokeRow {
    let loss_rel = (reference_loss - device_loss).abs() / reference_loss.abs().max(1e-12);
    let pass = match precision {
        Precision::F32 => loss_rel < F32_LOSS_REL && worst_grad_rel < F32_GRAD_REL,
        Precision::Bf16 => loss_rel < BF16_LOSS_REL && min_grad_cosine > BF16_GRAD_COSINE,
    };
    SmokeRow {
        model: model.to_string(),
        precision: precision.name().into(),
        params,
        reference_loss,
        device_loss,
        loss_rel,
        worst_grad_rel,
        min_grad_cosine,
        codes_equal,
        pass,
    }
}

/// The smoke tests on `device` (on the CPU: candle's ops against the fused kernels).
pub fn smoke(device: &Device) -> Result<Vec<SmokeRow>> {
    let cpu = Device::Cpu;
    let mut rows = Vec::new();
    let sampling = crate::sample::SamplingConfig { cfg_scale: 2.0, seed: 5, ..Default::default() };
    let labels_v = [3u32, 7, 0, 9];
    let labels_cpu = Tensor::new(&labels_v, &cpu)?;
    let labels_dev = labels_cpu.to_device(device)?;
    let mut rng = crate::util::rng_for(1, "device-check-codes", 0);
    let codes_v: Vec<u32> = (0..4 * 64).map(|_| rand::Rng::random_range(&mut rng, 0..64u32)).collect();
    let codes_cpu = Tensor::from_vec(codes_v, (4, 64), &cpu)?;
    let codes_dev = codes_cpu.to_device(device)?;

    // The baseline GPT.
    let ref_store = ParamStore::new(3, &cpu);
    let reference = Gpt::new(&small_gpt(1), &ref_store.root())?;
    randomise_heads(&ref_store, 0.5)?;
    let ref_codes = crate::sample::generate_gpt(&reference, &labels_v, &sampling, &cpu).map_err(bad)?;
    let lr = reference.loss::<rand_chacha::ChaCha8Rng>(&codes_cpu, Some(&labels_cpu), None)?;
    let (ref_loss, g_ref) = (lr.to_scalar::<f32>()? as f64, lr.backward()?);
    for precision in [Precision::F32, Precision::Bf16] {
        let store = ParamStore::new(3, device);
        let config = small_gpt(1).with(|c| {
            c.ops = Ops::Stock;
            c.precision = precision;
        });
        let model = Gpt::new(&config, &store.root())?;
        randomise_heads(&store, 0.5)?;
        let ld = model.loss::<rand_chacha::ChaCha8Rng>(&codes_dev, Some(&labels_dev), None)?;
        let losses = (ref_loss, ld.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64);
        let grads = compare_grads(&ref_store, &g_ref, &store, &ld)?;
        let codes = if precision == Precision::F32 {
            let got = crate::sample::generate_gpt(&model, &labels_v, &sampling, device).map_err(bad)?;
            Some(share_equal(&ref_codes, &got))
        } else {
            None
        };
        rows.push(smoke_row("gpt (small)", precision, ref_store.num_params(), losses, grads, codes));
        log_row(rows.last());
    }

    // DPAR, with a small random entropy model for its generation.
    let ent_ref_store = ParamStore::new(4, &cpu);
    let ent_ref = Gpt::new(&small_gpt(0), &ent_ref_store.root())?;
    randomise_heads(&ent_ref_store, 1.0)?;
    let ent_store = ParamStore::new(4, device);
    let ent = Gpt::new(&small_gpt(0).with(|c| c.ops = Ops::Stock), &ent_store.root())?;
    randomise_heads(&ent_store, 1.0)?;
    let patch = crate::patching::PatchConfig::dpar((64f64).ln() - 0.35, 4);
    let ref_store = ParamStore::new(5, &cpu);
    let reference = Dpar::new(&small_dpar(), &ref_store.root()).map_err(bad)?;
    randomise_heads(&ref_store, 0.5)?;
    let lengths = crate::bench::synthetic_lengths(8, 4, 1.8, 3)?;
    let layout = reference.layout(lengths.clone(), 64).map_err(bad)?;
    let ref_gen =
        crate::dpar::generate::generate(&reference, &ent_ref, &labels_v, &sampling, &patch, &cpu).map_err(bad)?;
    let mode = crate::dpar::model::GlobalLayout::Packed;
    let lr = reference.loss::<rand_chacha::ChaCha8Rng>(&codes_cpu, &labels_cpu, &layout, mode, None).map_err(bad)?;
    let (ref_loss, g_ref) = (lr.to_scalar::<f32>()? as f64, lr.backward()?);
    for precision in [Precision::F32, Precision::Bf16] {
        let store = ParamStore::new(5, device);
        let config = small_dpar().with(|c| {
            c.ops = Ops::Stock;
            c.precision = precision;
        });
        let model = Dpar::new(&config, &store.root()).map_err(bad)?;
        randomise_heads(&store, 0.5)?;
        let layout_dev = model.layout(lengths.clone(), 64).map_err(bad)?;
        let ld =
            model.loss::<rand_chacha::ChaCha8Rng>(&codes_dev, &labels_dev, &layout_dev, mode, None).map_err(bad)?;
        let losses = (ref_loss, ld.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64);
        let grads = compare_grads(&ref_store, &g_ref, &store, &ld)?;
        let codes = if precision == Precision::F32 {
            let got =
                crate::dpar::generate::generate(&model, &ent, &labels_v, &sampling, &patch, device).map_err(bad)?;
            Some(share_equal(&ref_gen.codes, &got.codes))
        } else {
            None
        };
        rows.push(smoke_row("dpar (small)", precision, ref_store.num_params(), losses, grads, codes));
        log_row(rows.last());
    }
    Ok(rows)
}

/// The models of the throughput table: `gpt-b` and `dpar-b` at 256² (16×16 codes, vocabulary
/// 16384, 1000 classes), or the MNIST presets under `quick`.
fn throughput_models(quick: bool) -> (GptConfig, DparConfig) {
    if quick {
        (GptConfig::mnist(), DparConfig::mnist())
    } else {
        (GptConfig::gpt_b(), DparConfig::dpar_b())
    }
}

fn throughput_row(model: &str, precision: &str, r: &crate::bench::SpeedRow) -> ThroughputRow {
    ThroughputRow {
        model: model.into(),
        precision: precision.into(),
        batch: r.batch,
        train_ms: r.train_ms,
        images_per_s: r.batch as f64 / r.train_ms * 1e3,
        train_gflops: r.train_gflops,
        forward_ms: r.forward_ms,
    }
}

/// Training throughput rows (f32 and bf16 for both models); candle's ops on every device.
pub fn throughput(
    device: &Device,
    batch: usize,
    warmup: usize,
    reps: usize,
    quick: bool,
) -> Result<Vec<ThroughputRow>> {
    let (gpt, dpar) = throughput_models(quick);
    let entropy = GptConfig::mnist_entropy();
    let mut rows = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let name = precision.name();
        let g = gpt.clone().with(|c| {
            c.ops = Ops::Stock;
            c.precision = precision;
        });
        tracing::info!("timing the baseline ({} layers, width {}), {name}, batch {batch}", g.n_layer, g.dim);
        let r = crate::bench::gpt_speed(&format!("gpt ({name})"), &g, batch, warmup, reps, device, false)?;
        rows.push(throughput_row(if quick { "gpt-mnist" } else { "gpt-b" }, name, &r));
        let d = dpar.clone().with(|c| {
            c.ops = Ops::Stock;
            c.precision = precision;
        });
        tracing::info!(
            "timing DPAR ({}+{}+{} layers, width {}), {name}, batch {batch}",
            d.encoder_layers,
            d.global_layers,
            d.decoder_layers,
            d.dim
        );
        let r = crate::bench::dpar_speed(&format!("dpar ({name})"), &d, &entropy, batch, warmup, reps, device, false)?;
        rows.push(throughput_row(if quick { "dpar-mnist" } else { "dpar-b" }, name, &r));
    }
    Ok(rows)
}

/// Sampling images/s of both models (random weights; a random entropy model with θ near its
/// typical entropy, so patches of about two codes) with guidance `cfg`, f32.
pub fn sampling(device: &Device, batch: usize, cfg: f64, quick: bool) -> Result<SamplingRow> {
    let (gpt, dpar) = throughput_models(quick);
    let stock = |c: &mut crate::nn::TransformerConfig| c.ops = Ops::Stock;
    let gstore = ParamStore::new(0, device);
    let g = Gpt::new(&gpt.clone().with(|c| stock(c)), &gstore.root())?;
    let dstore = ParamStore::new(1, device);
    let d = Dpar::new(&dpar.clone().with(|c| stock(c)), &dstore.root()).map_err(bad)?;
    let estore = ParamStore::new(2, device);
    let ec = GptConfig::mnist_entropy().with(|c| {
        (c.vocab_size, c.grid_size) = (dpar.vocab_size, dpar.grid_size);
        c.ops = Ops::Stock;
    });
    let e = Gpt::new(&ec, &estore.root())?;
    randomise_heads(&gstore, 0.5)?;
    randomise_heads(&dstore, 0.5)?;
    // As in the speed bench: θ = ln V − 0.35 on a head of std 1 gives patches of about two.
    randomise_heads(&estore, 1.0)?;
    let sampling = crate::sample::SamplingConfig { cfg_scale: cfg, seed: 0, ..Default::default() };
    let patch = crate::patching::PatchConfig::dpar(((dpar.vocab_size as f64).ln() - 0.35).max(0.0), 4);
    let rows = crate::bench::sampling_curve(&g, &d, &e, &sampling, &patch, &[batch], 1, None, device)?;
    let r = rows.into_iter().next().ok_or_else(|| bad("no sampling row"))?;
    Ok(SamplingRow {
        batch,
        cfg,
        gpt_images_per_s: r.gpt_images_per_s,
        dpar_images_per_s: r.dpar_images_per_s,
        dpar_steps_per_image: r.dpar_steps_per_image,
    })
}

/// The report as markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# DPAR device check\n\ndevice: {}{}; {:.0} s in all.\n\n## Smoke tests (device vs CPU f32 reference)\n\n",
        r.device,
        if r.quick { " (quick: small presets)" } else { "" },
        r.seconds
    );
    s += &format!(
        "Tolerances: f32 loss within {F32_LOSS_REL:e} (relative) and every gradient within {F32_GRAD_REL:e} of its scale; bf16 (mixed precision) loss within {BF16_LOSS_REL:e} and every gradient at cosine > {BF16_GRAD_COSINE} from the f32 reference.\n\n"
    );
    s += "| model | precision | params | CPU loss | device loss | loss rel. Δ | worst grad rel. Δ | lowest grad cosine | generated codes equal | result |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.smoke {
        s += &format!(
            "| {} | {} | {} | {:.6} | {:.6} | {:.1e} | {:.1e} | {:.5} | {} | {} |\n",
            row.model,
            row.precision,
            row.params,
            row.reference_loss,
            row.device_loss,
            row.loss_rel,
            row.worst_grad_rel,
            row.min_grad_cosine,
            row.codes_equal.map(|c| format!("{:.1} %", 100.0 * c)).unwrap_or_else(|| "—".into()),
            if row.pass { "pass" } else { "FAIL" }
        );
    }
    if !r.throughput.is_empty() {
        s += "\n## Training throughput (forward, backward, clip, AdamW; medians)\n\n| model | precision | batch | ms/step | images/s | GFLOP/s | forward ms |\n|---|---|---|---|---|---|---|\n";
        for t in &r.throughput {
            s += &format!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1} |\n",
                t.model, t.precision, t.batch, t.train_ms, t.images_per_s, t.train_gflops, t.forward_ms
            );
        }
        // DPAR's training speed over the baseline's, per precision (rows come in pairs).
        let ratios: Vec<String> = r
            .throughput
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| format!("{:.2}× ({})", p[1].images_per_s / p[0].images_per_s, p[0].precision))
            .collect();
        if !ratios.is_empty() {
            s += &format!("\nDPAR's training images/s over the baseline's: {}.\n", ratios.join(", "));
        }
    }
    if !r.sampling.is_empty() {
        s += "\n## Sampling (whole generations, f32, random weights)\n\n| batch | cfg | baseline images/s | DPAR images/s | DPAR ÷ baseline | DPAR patch steps per image |\n|---|---|---|---|---|---|\n";
        for t in &r.sampling {
            s += &format!(
                "| {} | {} | {:.2} | {:.2} | {:.2}× | {:.1} |\n",
                t.batch,
                t.cfg,
                t.gpt_images_per_s,
                t.dpar_images_per_s,
                t.dpar_images_per_s / t.gpt_images_per_s,
                t.dpar_steps_per_image
            );
        }
    }
    match &r.nccl {
        Some(n) => {
            s += &format!(
                "\n## NCCL all-reduce ({} ranks)\n\nmax error {:.1e}, bus bandwidth {:.1} GB/s (256 MiB of f32): {}\n",
                n.world_size,
                n.max_error,
                n.bus_gb_per_s,
                if n.pass { "pass" } else { "FAIL" }
            );
        }
        None => s += "\n## NCCL all-reduce\n\nnot run (one GPU, or a build without `nccl`).\n",
    }
    s
}

/// A multi-rank check through `collective`: every rank contributes values that depend on its
/// rank, the device all-reduce must give their mean everywhere; then the bus bandwidth of a
/// all-reduce of `big` f32 values (256 MiB: 64 Mi values).
pub fn all_reduce_check(collective: &dyn crate::dist::Collective, device: &Device, big: usize) -> Result<NcclRow> {
    let world = collective.world_size();
    let rank = collective.rank() as f32;
    let n = 1 << 20;
    let values: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + 1000.0 * rank).collect();
    let t = Tensor::from_vec(values, n, device)?;
    let mean = crate::dist::all_reduce_mean_tensor(collective, &t).map_err(bad)?;
    let got = mean.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let offset = 1000.0 * (world as f64 - 1.0) / 2.0;
    let max_error =
        got.iter().enumerate().fold(0f64, |a, (i, &x)| a.max((x as f64 - ((i % 97) as f64 + offset)).abs()));
    let big_t = Tensor::zeros(big, DType::F32, device)?;
    crate::dist::all_reduce_mean_tensor(collective, &big_t).map_err(bad)?;
    device.synchronize()?;
    let reps = 5;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        crate::dist::all_reduce_mean_tensor(collective, &big_t).map_err(bad)?;
    }
    device.synchronize()?;
    let t = start.elapsed().as_secs_f64() / reps as f64;
    let bytes = big as f64 * 4.0;
    let bus = 2.0 * (world as f64 - 1.0) / world as f64 * bytes / t / 1e9;
    Ok(NcclRow { world_size: world, max_error, bus_gb_per_s: bus, pass: max_error < 1e-3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the smoke tests compare candle's ops with the fused kernels: every row passes,
    /// and a corrupted device model would not.
    #[test]
    fn cpu_smoke_tests_pass_and_the_report_renders() {
        let rows = smoke(&Device::Cpu).unwrap();
        assert_eq!(rows.len(), 4);
        for r in &rows {
            assert!(r.pass, "{r:?}");
            if r.precision == "f32" {
                assert_eq!(r.codes_equal, Some(1.0), "{r:?}");
            }
        }
        let bad_row = smoke_row("x", Precision::F32, 1, (2.0, 2.1), (0.0, 1.0), None);
        assert!(!bad_row.pass);
        let report = Report {
            device: "cpu".into(),
            quick: true,
            smoke: rows,
            throughput: Vec::new(),
            sampling: Vec::new(),
            nccl: None,
            seconds: 1.0,
        };
        let md = markdown(&report);
        assert!(md.contains("| gpt (small) | f32 |") && md.contains("| dpar (small) | bf16 |"), "{md}");
    }

    /// The all-reduce check over two thread ranks on the CPU (the host path NCCL replaces).
    #[test]
    fn the_all_reduce_check_passes_over_thread_ranks() {
        let group = crate::dist::ThreadGroup::new(2, std::time::Duration::from_secs(60));
        let rows: Vec<NcclRow> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|c| s.spawn(move || all_reduce_check(&c, &Device::Cpu, 1 << 16).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in rows {
            assert!(r.pass && r.max_error == 0.0, "{r:?}");
        }
    }
}
