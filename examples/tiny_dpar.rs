//! Train a tiny DPAR on 1000 MNIST digits with the shipped tokenizer and entropy model, then
//! sample it: the whole pipeline as library calls (`cargo run --release --example tiny_dpar`).
use std::path::{Path, PathBuf};

use dpar::recipe::{ModelKind, Overrides, TrainRequest};
use dpar::sample_set::{class_labels, sample_dpar, SampleSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, models) = (candle_core::Device::Cpu, Path::new("models/mnist"));
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "out/tiny-dpar".into()));
    // 1. Codes: digits through the shipped VQ tokenizer, then the entropy model's H_k beside them.
    let tokenizer = dpar::models::tokenizer(&models.join("tokenizer"), None, &device)?;
    let (size, channels) = (tokenizer.config.image_size, tokenizer.config.in_channels);
    let digits = dpar::data::load(&dpar::data::resolve(Path::new("data/mnist"), "train")?, size, channels)?.take(1000);
    let codes = out.join("codes");
    tokenizer.tokenize_to_set(&digits, &codes, true, false, 1000, 100, &device, |_| {})?;
    let (entropy_model, _weights) = dpar::models::gpt(&models.join("entropy"), None, &device)?;
    dpar::entropy::store_for_set(&entropy_model, &models.join("entropy"), &codes, 100, false, &device, |_| {})?;
    // 2. A tiny DPAR (width 64, 1+1+1 blocks, θ calibrated for mean patch length 1.8): 150 steps.
    let mut request = TrainRequest::new(ModelKind::Dpar, &codes);
    (request.out, request.val_codes, request.start) = (Some(out.join("run")), Some("none".into()), true.into());
    let layers = Some("1+1+1".to_string());
    request.overrides = Overrides { steps: Some(150), dim: Some(64), layers, lr: Some(3e-3), ..Default::default() };
    let trained = dpar::recipe::train(&request, &device)?;
    println!("trained: final loss {:.3} in {:.0} s", trained.report.final_loss, trained.report.seconds);
    // 3. Four samples of each digit, with their patches drawn.
    let (model, _store, _config) = dpar::models::dpar(&trained.out, &device)?;
    let (classes, sampling) = ((0..10).collect::<Vec<u32>>(), dpar::sample::SamplingConfig::default());
    let labels = class_labels(&classes, 4);
    let patch = model.config().patch;
    let samples = sample_dpar(&model, &entropy_model, &labels, 40, &sampling, &patch, &device, |_| {})?;
    let set = SampleSet {
        tokenizer: &tokenizer,
        class_names: &model.config().class_names,
        classes: &classes,
        per_class: 4,
        codes: &samples.codes,
        record: serde_json::json!({ "sampling": sampling }),
    };
    for file in set.write(&out.join("samples"), &device, Some((model.config().grid_size, &samples.lengths)))? {
        println!("wrote {}", file.display());
    }
    Ok(())
}
