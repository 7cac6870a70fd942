//! `dpar sample --npz` writes the same images as the PNG path would decode from its codes (same
//! seed, same batches), in class-balanced order, readable as `[N, H, W, 3]` uint8.

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

/// `dpar eval samples` scores a `.npz` like the codes it was drawn from: the same images up to
/// uint8 rounding, the same labels (read from the settings beside the `.npz`).
#[test]
fn eval_samples_reads_an_npz_like_the_codes() {
    let mnist = common::mnist_dir();
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("s.npz");
    let out = dir.path().join("png");
    let base = ["sample", "--per-class", "4", "--seed", "5", "--batch-size", "40"];
    assert!(common::run_dpar(&[&base[..], &["--npz", npz.to_str().unwrap()]].concat()).0);
    assert!(common::run_dpar(&[&base[..], &["--out", out.to_str().unwrap()]].concat()).0);
    let report = |codes: &std::path::Path, json: &str| {
        let json = dir.path().join(json);
        let (ok, text) = common::run_dpar(&[
            "eval",
            "samples",
            "--codes",
            codes.to_str().unwrap(),
            "--n",
            "40",
            "--data",
            mnist.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(json).unwrap()).unwrap()
    };
    let from_codes = report(&out.join("codes.safetensors"), "codes.json");
    let from_npz = report(&npz, "npz.json");
    assert_eq!(from_npz["samples"], 40);
    let (a, b) = (from_codes["fd"].as_f64().unwrap(), from_npz["fd"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.02 * a.max(1.0), "FD from codes {a}, from the npz {b}");
    let (a, b) = (from_codes["accuracy"].as_f64().unwrap(), from_npz["accuracy"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.05, "class accuracy from codes {a}, from the npz {b}");
}
