//! `torch.save` checkpoints load whatever their inner archive name, and equal their safetensors
//! twins. The fixtures come from `scripts/make-pt-name-fixtures.py`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pt-names")
}

#[test]
fn checkpoints_with_every_inner_name_length_load_and_equal_their_twin() {
    let twin = dpar::tensor_io::read_safetensors(&fixtures().join("twin.safetensors"), &Device::Cpu).unwrap();
    let mut zip_crate_fails = Vec::new();
    for n in 1..=40 {
        let path = fixtures().join(format!("name-{n:02}.pt"));
        let tensors = dpar::tensor_io::read_pytorch(&path, Some("model"))
            .unwrap_or_else(|e| panic!("inner name of {n} characters: {e}"));
        assert_eq!(tensors.len(), twin.tensors.len(), "{}", path.display());
        for (name, want) in &twin.tensors {
            let got = &tensors[name];
            assert_eq!(got.dims(), want.dims(), "{name} in {}", path.display());
            assert_eq!(got.dtype(), want.dtype(), "{name} in {}", path.display());
            // Compare as f64 (exact for every dtype here) element by element.
            let flat = |t: &candle_core::Tensor| {
                t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
            };
            assert_eq!(flat(got), flat(want), "{name} in {}", path.display());
        }
        // For the record: which lengths the `zip` crate (through candle's loader) cannot open.
        // (Only the archive and its pickle: candle cannot read the strided view's data at all.)
        if candle_core::pickle::read_pth_tensor_info(&path, false, Some("model")).is_err() {
            zip_crate_fails.push(n);
        }
    }
    eprintln!("inner-name lengths that candle's own loader (zip crate) fails on: {zip_crate_fails:?}");
}

#[test]
fn a_legacy_torch_file_loads_and_equals_the_twin() {
    let twin = dpar::tensor_io::read_safetensors(&fixtures().join("twin.safetensors"), &Device::Cpu).unwrap();
    let tensors = dpar::tensor_io::read_pytorch(&fixtures().join("legacy.pt"), Some("model")).unwrap();
    assert_eq!(tensors.len(), twin.tensors.len());
    for (name, want) in &twin.tensors {
        assert_eq!(flat(&tensors[name]), flat(want), "{name}");
        assert_eq!(tensors[name].dims(), want.dims(), "{name}");
    }
    // A cut-off legacy file is an error naming it.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.pt");
    let bytes = std::fs::read(fixtures().join("legacy.pt")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = dpar::tensor_io::read_pytorch(&cut, Some("model")).unwrap_err().to_string();
    assert!(err.contains("cut.pt") && err.contains("truncated"), "{err}");
}

#[test]
fn a_state_dict_under_module_is_found_when_model_is_asked_for() {
    let twin = dpar::tensor_io::read_safetensors(&fixtures().join("twin.safetensors"), &Device::Cpu).unwrap();
    let tensors = dpar::tensor_io::read_pytorch(&fixtures().join("module-key.pt"), Some("model")).unwrap();
    assert_eq!(tensors.len(), twin.tensors.len());
    assert_eq!(flat(&tensors["sliced"]), flat(twin.tensor("sliced").unwrap()));
}

fn flat(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}
