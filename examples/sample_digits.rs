//! Load the shipped MNIST models and sample one digit of each class with DPAR: the library
//! calls behind `dpar sample` (`cargo run --release --example sample_digits [OUT]`).
use dpar::sample_set::{class_labels, sample_dpar, SampleSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = candle_core::Device::Cpu;
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "out/sample-digits".into()));
    // The shipped models, found from any working directory (see `dpar::home`).
    let (model, _weights, _config) = dpar::models::dpar(&dpar::home::shipped("dpar")?, &device)?;
    let (entropy_model, _weights) = dpar::models::gpt(&dpar::home::shipped("entropy")?, None, &device)?;
    let tokenizer = dpar::models::tokenizer(&dpar::home::shipped("tokenizer")?, None, &device)?;
    // Digits 0-9, one each, in one batch: guidance scale 2, temperature 1, seed 0 (the defaults).
    let (classes, sampling) = ((0..10).collect::<Vec<u32>>(), dpar::sample::SamplingConfig::default());
    let (labels, patch, c) = (class_labels(&classes, 1), model.config().patch, model.config());
    let samples = sample_dpar(&model, &entropy_model, &labels, 10, &sampling, &patch, &device, |_| {})?;
    let steps = samples.lengths.iter().map(Vec::len).sum::<usize>() as f64 / 10.0;
    println!("sampled 10 digits: {steps:.0} patch-transformer steps per image for {} codes", c.seq_len());
    let record = serde_json::json!({ "sampling": sampling, "patch": patch });
    let (class_names, codes) = (&c.class_names, &samples.codes);
    let set = SampleSet { tokenizer: &tokenizer, class_names, classes: &classes, per_class: 1, codes, record };
    for file in set.write(&out, &device, Some((c.grid_size, &samples.lengths)))? {
        println!("wrote {}", file.display());
    }
    Ok(())
}
