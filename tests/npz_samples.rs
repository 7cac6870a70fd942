//! `dpar sample --npz` writes the same images as the PNG path would decode from its codes (same
//! seed, same batches), in class-balanced order, readable as `[N, H, W, 3]` uint8: issue 16.

mod common;

use candle_core::{Device, Tensor};

#[test]
fn npz_samples_equal_the_decoded_codes_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("s/samples.npz");
    let out = dir.path().join("png");
    let base = ["sample", "--per-class", "3", "--classes", "2,5", "--seed", "11", "--batch-size", "4"];
    let (ok, text) = common::run_dpar(&[&base[..], &["--npz", npz.to_str().unwrap()]].concat());
    assert!(ok, "{text}");
    assert!(text.contains("arr_0: uint8 [6, 32, 32, 3]"), "{text}");
    let (ok, text) = common::run_dpar(&[&base[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(ok, "{text}");

    let shard = dpar::data::shards::read_shard(&out.join("codes.safetensors")).unwrap();
    assert_eq!(shard.labels, [2, 2, 2, 5, 5, 5]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer = dpar::models::tokenizer(&root.join("models/mnist/tokenizer"), None, &Device::Cpu).unwrap();
    let codes = Tensor::from_vec(shard.codes.clone(), (6, shard.info.seq_len()), &Device::Cpu).unwrap();
    let want: Vec<u8> = dpar::viz::tensor_to_images(&tokenizer.decode(&codes).unwrap())
        .unwrap()
        .into_iter()
        .flat_map(|i| i.into_raw())
        .collect();
    let mut got = Vec::new();
    let mut reader = dpar::data::npz::NpzReader::open(&npz).unwrap();
    let dims = reader
        .for_each_image_batch("arr_0", 4, |bytes, _| {
            got.extend_from_slice(bytes);
            Ok(())
        })
        .unwrap();
    assert_eq!(dims, (6, 32, 32, 3));
    assert_eq!(got, want);
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(npz.with_extension("json")).unwrap()).unwrap();
    assert_eq!(settings["per_class"], 3);
    assert_eq!(settings["sampling"]["seed"], 11);
}
