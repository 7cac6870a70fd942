//! Our InceptionV3 reproduces pytorch-fid's FID network (pool3 features and fc logits).
//!
//! The real weights are not available here, so `scripts/make-inception-fixture.py` runs
//! pytorch-fid (in float64) on pseudo-random weights and inputs given by a formula, and stores
//! the outputs in `tests/fixtures/inception/expected.safetensors`. This file rebuilds the same
//! weights and inputs with the Rust twin of that formula and compares. Run in release mode:
//! `cargo nextest run --release --test inception_parity`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use dpar::eval::inception::{stand_in, InceptionV3, LOGITS, POOL_FEATURES};
use dpar::tensor_io::{read_safetensors, write_safetensors, TensorFile};

/// The inputs of the fixture: name → (B, 3, H, W).
const INPUTS: [(&str, [usize; 4]); 4] = [
    ("input.299", [1, 3, 299, 299]),
    ("input.256", [2, 3, 256, 256]),
    ("input.64", [1, 3, 64, 64]),
    ("input.200x341", [1, 3, 200, 341]),
];
/// Largest accepted |ours − torch|, as a fraction of the largest |torch| of each output.
const TOLERANCE: f32 = 1e-4;

fn expected() -> TensorFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inception/expected.safetensors");
    read_safetensors(&path, &Device::Cpu).unwrap()
}

/// The stand-in formula tensor `name` (the library's, which the script mirrors).
fn formula(name: &str, shape: &[usize]) -> Tensor {
    stand_in::tensor(name, shape, &Device::Cpu).unwrap_or_else(|| panic!("no formula for {name}")).unwrap()
}

fn formula_weights(expected: &TensorFile) -> HashMap<String, Tensor> {
    let shapes = InceptionV3::weight_shapes();
    let elements: usize = shapes.iter().map(|(_, shape)| shape.iter().product::<usize>()).sum();
    assert_eq!(shapes.len(), expected.meta_parse::<usize>("weight_tensors").unwrap(), "weight count vs pytorch-fid");
    assert_eq!(elements, expected.meta_parse::<usize>("weight_elements").unwrap(), "weight elements vs pytorch-fid");
    let weights = stand_in::weights(&Device::Cpu).unwrap();
    assert_eq!(weights.len(), shapes.len());
    // The formula itself agrees with the script's, value for value.
    for (key, probe) in &expected.tensors {
        let Some(name) = key.strip_prefix("probe.") else { continue };
        let tensor = match weights.get(name) {
            Some(tensor) => tensor.clone(),
            None => formula(name, &INPUTS.iter().find(|(input, _)| *input == name).unwrap().1),
        };
        let ours = tensor.flatten_all().unwrap().narrow(0, 0, 16).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours, probe.to_vec1::<f32>().unwrap(), "formula values of {name} differ from the script's");
    }
    weights
}

/// (max |ours − want|, that over max |want|, max elementwise |Δ|/|want| where |want| ≥ 1% of
/// max |want|).
fn differences(ours: &Tensor, want: &Tensor) -> (f32, f32, f32) {
    assert_eq!(ours.dims(), want.dims());
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    let max_abs = ours.iter().zip(&want).fold(0f32, |m, (o, w)| m.max((o - w).abs()));
    let max_rel = ours
        .iter()
        .zip(&want)
        .filter(|(_, w)| w.abs() >= 0.01 * scale)
        .fold(0f32, |m, (o, w)| m.max((o - w).abs() / w.abs()));
    (max_abs, max_abs / scale, max_rel)
}

/// Compares pool and logits of `input` with the fixture, printing the differences.
fn check(model: &InceptionV3, expected: &TensorFile, input: &str, shape: [usize; 4]) {
    let images = formula(input, &shape);
    let start = Instant::now();
    let (pool, logits) = model.features(&images).unwrap();
    let per_image = start.elapsed().as_secs_f64() / shape[0] as f64;
    assert_eq!(pool.dims(), [shape[0], POOL_FEATURES]);
    assert_eq!(logits.dims(), [shape[0], LOGITS]);
    for (what, ours) in [("pool", &pool), ("logits", &logits)] {
        let want = expected.tensor(&format!("{what}.{input}")).unwrap();
        let (max_abs, scaled, max_rel) = differences(ours, want);
        eprintln!(
            "{input:>14} {what:>6}: max |Δ| {max_abs:.2e} ({scaled:.2e} of max |torch|), max rel {max_rel:.2e}; \
             {per_image:.2} s/image"
        );
        assert!(scaled <= TOLERANCE, "{input} {what}: max |Δ| is {scaled:.2e} of the scale, over {TOLERANCE:.0e}");
    }
}

#[test]
fn pool_features_and_logits_match_pytorch_fid_on_formula_weights() {
    let expected = expected();
    let model = InceptionV3::from_tensors(&formula_weights(&expected), &Device::Cpu).unwrap();
    for (input, shape) in INPUTS {
        check(&model, &expected, input, shape);
    }
}

#[test]
fn weights_saved_as_safetensors_load_through_the_file_reader() {
    let expected = expected();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("pt_inception_formula.safetensors");
    let mut tensors: Vec<(String, Tensor)> = formula_weights(&expected).into_iter().collect();
    // A real checkpoint also carries BatchNorm counters; they are ignored.
    tensors.push(("Mixed_5b.branch1x1.bn.num_batches_tracked".into(), Tensor::new(0i64, &Device::Cpu).unwrap()));
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let model = InceptionV3::load(&path, &Device::Cpu).unwrap();
    check(&model, &expected, "input.64", [1, 3, 64, 64]);
}
