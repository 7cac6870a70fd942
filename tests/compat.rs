//! Files written by earlier versions keep working: every config in `models/` parses into its
//! type, every shipped model loads, and the models give the outputs recorded when the fixture
//! was made (`tests/fixtures/compat/outputs.json`: GPT and DPAR logits, entropies, patch
//! lengths, decoded pixels and classifier features on fixed codes, and codes and patches
//! sampled from the baseline and DPAR). A change to a loader, a
//! config field's default or a kernel that alters what a shipped model computes fails here.
//!
//! To record the fixture again (only when a change of the outputs is intended, and say so in
//! the commit): `DPAR_WRITE_COMPAT_FIXTURE=1 cargo nextest run --release --test compat`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/compat/outputs.json")
}

/// A summary of a tensor that a wrong weight, config or layout would change: shape, sum, sum of
/// squares and a few values from the start, middle and end.
fn summary(t: &Tensor) -> Value {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len();
    let finite: Vec<f64> = v.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
    let picks: Vec<f32> = [0, 1, 2, n / 3, n / 2, n / 2 + 1, 2 * n / 3, n - 2, n - 1].iter().map(|&i| v[i]).collect();
    json!({
        "shape": t.dims(),
        "sum": finite.iter().sum::<f64>(),
        "sum_sq": finite.iter().map(|x| x * x).sum::<f64>(),
        "infinite": n - finite.len(),
        "picks": picks,
    })
}

/// Compares two JSON trees: numbers within `rel` (relative to the larger magnitude, at least
/// 1e-3 absolute), everything else exactly; returns the paths that differ.
fn differences(want: &Value, got: &Value, path: &str, rel: f64, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            if (a - b).abs() > (rel * a.abs().max(b.abs())).max(1e-3) {
                out.push(format!("{path}: recorded {a}, now {b}"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{path}[{i}]"), rel, out);
            }
        }
        (Value::Object(a), Value::Object(b)) if a.len() == b.len() => {
            for (k, x) in a {
                match b.get(k) {
                    Some(y) => differences(x, y, &format!("{path}.{k}"), rel, out),
                    None => out.push(format!("{path}.{k}: missing now")),
                }
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: recorded {want}, now {got}")),
    }
}

#[test]
fn every_config_in_models_parses_into_its_type() {
    let dir = root().join("models/mnist");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("config.json");
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let kind = serde_json::from_str::<Value>(&text).unwrap()["kind"].as_str().unwrap().to_string();
        // A model config written back gives the file it came from (the layout did not change
        // when the shared transformer settings moved into `TransformerConfig`), less `ops`.
        fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(text: &str) -> serde_json::Result<()> {
            let parsed: T = serde_json::from_str(text)?;
            let mut original: Value = serde_json::from_str(text)?;
            // The kernel choice (`model.ops`) is read from older files but no longer written.
            original["model"].as_object_mut().map(|m| m.remove("ops"));
            assert_eq!(serde_json::to_value(&parsed)?, original, "a config did not survive a round trip");
            Ok(())
        }
        let parsed = match kind.as_str() {
            "gpt" | "entropy" => round_trip::<dpar::gpt::train::GptTrainConfig>(&text),
            "dpar" => round_trip::<dpar::dpar::train::DparTrainConfig>(&text),
            "tokenizer" => serde_json::from_str::<dpar::tokenizer::train::TokenizerTrainConfig>(&text).map(|_| ()),
            "classifier" => serde_json::from_str::<dpar::eval::classifier::ClassifierTrainConfig>(&text).map(|_| ()),
            other => panic!("{}: unknown kind {other}", path.display()),
        };
        parsed.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The recipe's reader (JSON by extension) takes it too.
        let _: Value = dpar::recipe::read_config(&path).unwrap();
        seen += 1;
    }
    assert_eq!(seen, 5, "expected the five shipped models in {}", dir.display());
}

/// H_1 … H_{L−1} of each image (rows of L − 1).
fn flat_h(model: &dpar::gpt::Gpt, codes: &Tensor) -> Vec<Vec<f32>> {
    model.entropies(codes).unwrap().to_vec2().unwrap()
}

/// Fixed codes (2 images × 256) that look nothing like a digit but exercise every code path.
fn fixed_codes(vocab: u32, l: usize, device: &Device) -> Tensor {
    let codes: Vec<u32> = (0..2 * l as u32).map(|i| (i * 37 + 11 + (i / 16) * 5) % vocab).collect();
    Tensor::from_vec(codes, (2, l), device).unwrap()
}

#[test]
fn shipped_models_load_and_give_the_recorded_outputs() {
    let device = Device::Cpu;
    let models = root().join("models/mnist");
    let (gpt, _g) = dpar::gpt::load(&models.join("gpt"), None, &device).unwrap();
    let (entropy, _e) = dpar::gpt::load(&models.join("entropy"), None, &device).unwrap();
    let (model, _d, config) = dpar::dpar::train::load(&models.join("dpar"), &device).unwrap();
    let tokenizer = dpar::tokenizer::train::Tokenizer::load(&models.join("tokenizer"), None, &device).unwrap();
    let (classifier, _c, _hash) = dpar::eval::classifier::load(&models.join("classifier"), &device).unwrap();
    let l = gpt.config().seq_len();
    let codes = fixed_codes(gpt.config().vocab_size as u32, l, &device);
    let labels = Tensor::new(&[3u32, 7], &device).unwrap();

    let gpt_logits = gpt.forward::<rand_chacha::ChaCha8Rng>(&codes, Some(&labels), None).unwrap();
    // The shipped entropy model records bf16 kernels. Its entropies as shipped are compared
    // loosely: without AVX512-BF16 (another x86 CPU, aarch64) the bf16 products are emulated
    // and, since every GEMM input is rounded to 8 mantissa bits, a last-bit difference upstream
    // moves an entropy by up to ~1e-2. The patches and DPAR's logits come from the same
    // weights run with f32 kernels, which agree across CPUs to ~1e-6.
    let h_shipped = flat_h(&entropy, &codes);
    let file = models.join("entropy/model.safetensors");
    let store = dpar::params::ParamStore::new(0, &device);
    let f32_config = entropy.config().clone().with(|it| {
        it.ops = dpar::nn::Ops::Fused;
    });
    let entropy_f32 = dpar::gpt::Gpt::new(&f32_config, &store.root()).unwrap();
    store.load_model_file(&file, Some("model")).unwrap();
    let h = flat_h(&entropy_f32, &codes);
    let lengths: Vec<Vec<usize>> = h
        .iter()
        .map(|row| {
            let full: Vec<f32> = std::iter::once(f32::INFINITY).chain(row.iter().copied()).collect();
            dpar::patching::patch_lengths(&full, config.model.grid_size, &config.model.patch, l).unwrap()
        })
        .collect();
    let layout = model.layout(lengths.clone(), l).unwrap();
    let dpar_logits = model
        .forward::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, dpar::dpar::model::GlobalLayout::Packed, None)
        .unwrap();
    let pixels = tokenizer.decode(&codes).unwrap();
    let (features, probs) = classifier.features_and_probs(&pixels).unwrap();
    // Sampling from the shipped models (2 images, cfg 2): the baseline's codes and DPAR's codes
    // and patches under its entropy model and under self-entropy. Recorded on one CPU, they
    // must come out the same on every other (the patch decisions run f32 kernels, design §4).
    let sampling = dpar::sample::SamplingConfig { cfg_scale: 2.0, seed: 7, ..Default::default() };
    let gpt_codes = dpar::sample::generate_gpt(&gpt, &[3, 7], &sampling, &device).unwrap();
    let mut sampled = json!({ "gpt_codes": gpt_codes });
    for (name, patch) in [
        ("dpar", config.model.patch),
        (
            "dpar_self_entropy",
            dpar::patching::PatchConfig {
                entropy_from: dpar::patching::EntropyFrom::Decoder,
                threshold: 2.0,
                ..config.model.patch
            },
        ),
    ] {
        let g = dpar::dpar::generate::generate(&model, &entropy, &[3, 7], &sampling, &patch, &device).unwrap();
        sampled[name] = json!({ "codes": g.codes, "patch_lengths": g.lengths });
    }
    let got = json!({
        "sampled": sampled,
        "gpt_logits": summary(&gpt_logits),
        "entropies": summary(&Tensor::new(h, &device).unwrap()),
        "entropies_as_shipped_bf16": summary(&Tensor::new(h_shipped, &device).unwrap()),
        "patch_lengths": lengths,
        "dpar_logits": summary(&dpar_logits),
        "pixels": summary(&pixels),
        "features": summary(&Tensor::new(features, &device).unwrap()),
        "probs": summary(&Tensor::new(probs, &device).unwrap()),
    });
    if std::env::var_os("DPAR_WRITE_COMPAT_FIXTURE").is_some() {
        std::fs::create_dir_all(fixture().parent().unwrap()).unwrap();
        std::fs::write(fixture(), serde_json::to_string_pretty(&got).unwrap()).unwrap();
        eprintln!("wrote {}", fixture().display());
        return;
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(fixture()).unwrap()).unwrap();
    let mut diffs = Vec::new();
    let (mut want, mut got) = (want, got);
    let loose = (want["entropies_as_shipped_bf16"].take(), got["entropies_as_shipped_bf16"].take());
    differences(&want, &got, "outputs", 1e-4, &mut diffs);
    differences(&loose.0, &loose.1, "outputs.entropies_as_shipped_bf16", 2e-2, &mut diffs);
    assert!(diffs.is_empty(), "the shipped models no longer compute what they did:\n{}", diffs.join("\n"));
}

#[test]
fn the_comparison_notices_a_changed_output() {
    // The check above can fail: one changed logit (or a changed shape) is reported.
    let a = json!({ "x": { "sum": 10.0, "picks": [1.0, 2.0] }, "n": [4, 4] });
    let b = json!({ "x": { "sum": 10.0, "picks": [1.0, 2.1] }, "n": [4, 4] });
    let c = json!({ "x": { "sum": 10.0, "picks": [1.0, 2.0] }, "n": [4, 3] });
    let mut d = Vec::new();
    differences(&a, &a, "o", 1e-4, &mut d);
    assert!(d.is_empty());
    differences(&a, &b, "o", 1e-4, &mut d);
    assert_eq!(d, vec!["o.x.picks[1]: recorded 2, now 2.1".to_string()]);
    d.clear();
    differences(&a, &c, "o", 1e-4, &mut d);
    assert_eq!(d.len(), 1);
}
