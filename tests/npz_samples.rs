//! `dpar sample --npz` writes the images the sampler draws for the requested labels (same seed,
//! same batches), class-interleaved so that any contiguous split holds every class, readable as
//! `[N, H, W, 3]` uint8.

mod common;

use candle_core::{Device, Tensor};

/// The shipped tokenizer, and the codes the shipped DPAR draws for `labels` in batches of
/// `batch` from `seed` with the sampler's defaults: the library calls `dpar sample` makes.
fn draw(labels: &[u32], batch: usize, seed: u64) -> (dpar::tokenizer::train::Tokenizer, Vec<Vec<u32>>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mnist");
    let device = Device::Cpu;
    let (model, _store, _config) = dpar::models::dpar(&root.join("dpar"), &device).unwrap();
    let (entropy_model, _es) = dpar::models::gpt(&root.join("entropy"), None, &device).unwrap();
    let tokenizer = dpar::models::tokenizer(&root.join("tokenizer"), None, &device).unwrap();
    let sampling = dpar::sample::SamplingConfig { seed, ..Default::default() };
    let patch = model.config().patch;
    let drawn =
        dpar::sample_set::sample_dpar(&model, &entropy_model, labels, batch, &sampling, &patch, &device, |_| {})
            .unwrap();
    (tokenizer, drawn.codes)
}

#[test]
fn npz_samples_are_the_decoded_codes_of_interleaved_labels() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("s/samples.npz");
    let args = ["sample", "--per-class", "3", "--classes", "2,5", "--seed", "11", "--batch-size", "4"];
    let (ok, text) = common::run_dpar(&[&args[..], &["--npz", npz.to_str().unwrap()]].concat());
    assert!(ok, "{text}");
    assert!(text.contains("arr_0: uint8 [6, 32, 32, 3]"), "{text}");

    // The same draws through the library: labels 2, 5, 2, 5, 2, 5 in batches of 4, seed 11.
    let labels = dpar::sample_set::interleaved_labels(&[2, 5], 3);
    assert_eq!(labels, [2, 5, 2, 5, 2, 5]);
    let (tokenizer, drawn) = draw(&labels, 4, 11);
    let codes = Tensor::from_vec(drawn.concat(), (6, drawn[0].len()), &Device::Cpu).unwrap();
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
    assert_eq!(settings["order"], "interleaved");
    assert_eq!(settings["sampling"]["seed"], 11);
    assert_eq!(dpar::sample_set::npz_labels(&settings, 6), Some(labels));
}

/// `dpar eval samples` scores a `.npz` like the codes it was drawn from: the same images up to
/// uint8 rounding, the same labels (read from the settings beside the `.npz`).
#[test]
fn eval_samples_reads_an_npz_like_the_codes() {
    let mnist = common::mnist_dir();
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("s.npz");
    let base = ["sample", "--per-class", "4", "--seed", "5", "--batch-size", "40"];
    assert!(common::run_dpar(&[&base[..], &["--npz", npz.to_str().unwrap()]].concat()).0);
    // The same 40 draws as a code shard with their labels.
    let classes: Vec<u32> = (0..10).collect();
    let labels = dpar::sample_set::interleaved_labels(&classes, 4);
    let (tokenizer, drawn) = draw(&labels, 40, 5);
    let shard = dpar::data::shards::CodeShard {
        info: dpar::data::shards::ShardInfo {
            grid_size: tokenizer.config.grid_size(),
            codebook_size: tokenizer.config.codebook_size,
            num_classes: 10,
            class_names: classes.iter().map(|c| c.to_string()).collect(),
            tokenizer_id: tokenizer.id.clone(),
        },
        codes: drawn.concat(),
        labels,
        flip_codes: None,
    };
    let codes = dir.path().join("codes.safetensors");
    dpar::data::shards::write_shard(&codes, &shard).unwrap();
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
    let from_codes = report(&codes, "codes.json");
    let from_npz = report(&npz, "npz.json");
    assert_eq!(from_npz["samples"], 40);
    let (a, b) = (from_codes["fd"].as_f64().unwrap(), from_npz["fd"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.02 * a.max(1.0), "FD from codes {a}, from the npz {b}");
    let (a, b) = (from_codes["accuracy"].as_f64().unwrap(), from_npz["accuracy"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.05, "class accuracy from codes {a}, from the npz {b}");
}
