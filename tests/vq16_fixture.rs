//! LlamaGen VQ-16 checkpoints load by key name: a miniature with VQ-16's exact key layout
//! (written by `scripts/make-vq16-fixture.py` as both `.pt` and `.safetensors`) loads into our
//! `vq16` architecture, and our encoder/decoder reproduce an independent torch forward pass.

use std::path::Path;

use candle_core::{DType, Device};
use dpar::params::ParamStore;
use dpar::tokenizer::{VqConfig, VqModel};

fn tiny_vq16() -> VqConfig {
    VqConfig { ch: 4, norm_groups: 4, z_channels: 8, codebook_size: 16, image_size: 32, ..VqConfig::vq16() }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn vq16_layout_loads_from_pt_and_safetensors_and_matches_torch() {
    let expected = dpar::tensor_io::read_safetensors(&fixture("vq16_tiny_expected.safetensors"), &Device::Cpu).unwrap();
    for file in ["vq16_tiny.pt", "vq16_tiny.safetensors"] {
        let store = ParamStore::new(0, &Device::Cpu);
        let model = VqModel::new(&tiny_vq16(), &store.root()).unwrap();
        // Every model key must be in the file; the only extra key is LlamaGen's usage buffer.
        let ignored = store.load_file(&fixture(file), false, Some("model")).unwrap();
        assert_eq!(ignored, vec!["quantize.codebook_used".to_string()], "{file}");

        let input = expected.tensor("input").unwrap();
        let codes = model.encode(input).unwrap().to_dtype(DType::I64).unwrap();
        assert_eq!(
            codes.to_vec2::<i64>().unwrap(),
            expected.tensor("codes").unwrap().to_vec2::<i64>().unwrap(),
            "{file}: codes differ from the torch reference"
        );
        let fixed = expected.tensor("fixed_codes").unwrap().to_dtype(DType::U32).unwrap();
        let decoded = model.decode_codes(&fixed).unwrap();
        let want = expected.tensor("decoded").unwrap();
        let diff =
            (decoded - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{file}: decoded pixels differ from torch by {diff}");
    }
}

#[test]
fn a_checkpoint_with_missing_keys_is_a_clear_error() {
    let mut cfg = tiny_vq16();
    cfg.num_res_blocks = 3; // the fixture has 2 res blocks per level
    let store = ParamStore::new(0, &Device::Cpu);
    VqModel::new(&cfg, &store.root()).unwrap();
    let err = store.load_file(&fixture("vq16_tiny.safetensors"), false, None).unwrap_err().to_string();
    assert!(err.contains("vq16_tiny.safetensors: missing 100 parameter(s): decoder.conv_blocks.0.attn.3"), "{err}");
}
