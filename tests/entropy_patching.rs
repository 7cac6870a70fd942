//! Entropies stored beside the shards equal a fresh computation; mismatched sidecars, models and
//! settings give clear errors; `dpar entropy compute` and `dpar patchify` run end to end.

mod common;

use candle_core::{Device, Tensor};
use dpar::data::shards::{write_shard, write_shard_set, CodeShard, ShardInfo};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;
use dpar::train::LoopConfig;

fn shard(n: usize, seed: u64) -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(seed, "ent", 0);
    let codes: Vec<u32> = (0..n * 16).map(|k| if k % 3 == 0 { rng.random_range(0..8) } else { 0 }).collect();
    let flip: Vec<u32> = codes.iter().rev().copied().collect();
    CodeShard {
        info: ShardInfo {
            grid_size: 4,
            codebook_size: 8,
            num_classes: 2,
            class_names: vec!["a".into(), "b".into()],
            tokenizer_id: "tok".into(),
        },
        codes,
        labels: (0..n).map(|i| (i % 2) as u32).collect(),
        flip_codes: Some(flip),
    }
}

/// Trains a tiny entropy model for a few steps into `dir` and returns its config.
fn entropy_model(dir: &std::path::Path, data: &CodeShard) -> GptTrainConfig {
    let model = GptConfig::mnist_entropy().with(|it| {
        it.dim = 16;
        it.n_layer = 1;
        it.n_head = 1;
        it.ffn_hidden = Some(32);
        it.vocab_size = 8;
        it.num_classes = 2;
        it.grid_size = 4;
        it.cls_token_num = 0;
    });
    let config = GptTrainConfig {
        kind: "entropy".into(),
        model,
        seed: 1,
        batch_size: 4,
        codes: "x".into(),
        val_codes: None,
        val_images: 4,
        use_flip: true,
        tokenizer_id: "tok".into(),
        train: LoopConfig {
            steps: 5,
            log_every: 5,
            checkpoint_every: 5,
            adamw: dpar::optim::AdamWConfig { lr: 1e-2, ..Default::default() },
            ..Default::default()
        },
    };
    let mut task = GptTask::new(config.clone(), data.clone(), None, &Device::Cpu).unwrap();
    dpar::train::run(&mut task, &config.train, dir, false).unwrap();
    config
}

#[test]
fn stored_entropies_equal_a_fresh_computation_and_mismatches_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard(12, 1);
    entropy_model(&dir.path().join("ent"), &data);
    let (model, _s) = dpar::gpt::load(&dir.path().join("ent"), None, &Device::Cpu).unwrap();
    let id = dpar::util::sha256_file(&dir.path().join("ent/model.safetensors")).unwrap();
    let shard_path = dir.path().join("codes/shard-00000.safetensors");
    write_shard(&shard_path, &data).unwrap();
    let e = dpar::entropy::ShardEntropies {
        entropy: dpar::entropy::compute(&model, &data, false, 5, &Device::Cpu, |_| {}).unwrap(),
        entropy_flip: Some(dpar::entropy::compute(&model, &data, true, 5, &Device::Cpu, |_| {}).unwrap()),
        entropy_model_id: id.clone(),
    };
    dpar::entropy::write(&shard_path, &data, &e).unwrap();
    let back = dpar::entropy::read(&shard_path, &data, Some(&id)).unwrap();
    assert_eq!(back, e);
    // A sample of images, recomputed one at a time.
    for i in [0usize, 5, 11] {
        for flip in [false, true] {
            let codes = Tensor::from_slice(data.codes_of(i, flip), (1, 16), &Device::Cpu).unwrap();
            let fresh = model.entropies(&codes).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let stored = back.of(i, 16, flip);
            assert!(stored[0].is_infinite());
            for (a, b) in stored[1..].iter().zip(&fresh) {
                assert!((a - b).abs() < 1e-5, "image {i} flip {flip}: {a} vs {b}");
            }
            assert!(fresh.iter().all(|&h| h >= 0.0 && h <= (8f32).ln() + 1e-5));
        }
    }
    // The wrong entropy model.
    let err = dpar::entropy::read(&shard_path, &data, Some("0123456789abcdef")).unwrap_err().to_string();
    assert!(err.contains("entropy.safetensors") && err.contains("was expected"), "{err}");
    // A sidecar from other codes.
    let other = shard(12, 2);
    let err = dpar::entropy::read(&shard_path, &other, None).unwrap_err().to_string();
    assert!(err.contains("computed for other codes"), "{err}");
    // Entropies whose shape does not match the codes: a sidecar tied to this shard but with
    // rows for 11 images.
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "dpar-entropy-v1".to_string());
    meta.insert("entropy_model_id".to_string(), id.clone());
    meta.insert("codes_hash".to_string(), dpar::entropy::codes_hash(&data));
    let wrong = Tensor::zeros((11, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    dpar::tensor_io::write_safetensors(
        &dpar::data::shards::entropy_path(&shard_path),
        &[("entropy".into(), wrong)],
        &meta,
    )
    .unwrap();
    let err = dpar::entropy::read(&shard_path, &data, None).unwrap_err().to_string();
    assert!(err.contains("`entropy` has shape [11, 16], the shard has 12 images of 16 codes"), "{err}");
    // The entropy model must be unconditional and fit the grid.
    let (gpt, _s) = {
        let store = dpar::params::ParamStore::new(0, &Device::Cpu);
        let m = dpar::gpt::Gpt::new(
            &GptConfig::mnist().with(|it| {
                it.dim = 16;
                it.n_layer = 1;
                it.n_head = 1;
                it.vocab_size = 8;
                it.num_classes = 2;
                it.grid_size = 4;
            }),
            &store.root(),
        )
        .unwrap();
        (m, store)
    };
    assert!(dpar::entropy::check_model_fits(&gpt, &data, &shard_path)
        .unwrap_err()
        .to_string()
        .contains("unconditional"));
}

fn run(args: &[&str]) -> (bool, String) {
    let out = common::dpar().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

#[test]
fn cli_entropy_compute_and_patchify() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).display().to_string();
    let data = shard(16, 3);
    write_shard_set(&dir.path().join("codes"), std::slice::from_ref(&data), false).unwrap();
    entropy_model(&dir.path().join("ent"), &data);
    let (ok, text) = run(&["patchify", "--codes", &p("codes")]);
    assert!(!ok && text.contains("run `dpar entropy compute`"), "{text}");
    let (ok, text) = run(&["entropy", "compute", "--model", &p("ent"), "--codes", &p("codes")]);
    assert!(ok, "{text}");
    assert!(text.contains("16 images + flip copies"), "{text}");
    let (ok, text) = run(&[
        "patchify",
        "--codes",
        &p("codes"),
        "--target-mean-len",
        "1.5",
        "--max-patch-len",
        "4",
        "--percentiles",
        "--json",
        &p("stats.json"),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("mean patch length") && text.contains("30th entropy percentile"), "{text}");
    let (ok, text) = run(&["patchify", "--codes", &p("codes"), "--threshold", "NaN"]);
    assert!(!ok && text.contains("NaN"), "{text}");
    let (ok, text) = run(&["patchify", "--codes", &p("codes"), "--threshold", "1", "--max-patch-len", "0"]);
    assert!(!ok && text.contains("P must be ≥ 1"), "{text}");
    // A model for another grid.
    let other = CodeShard {
        info: ShardInfo { grid_size: 2, ..data.info.clone() },
        codes: vec![0; 8],
        labels: vec![0, 1],
        flip_codes: None,
    };
    write_shard_set(&dir.path().join("codes2"), &[other], false).unwrap();
    let (ok, text) = run(&["entropy", "compute", "--model", &p("ent"), "--codes", &p("codes2")]);
    assert!(!ok && text.contains("2×2 grid") && text.contains("expects 4×4"), "{text}");
}
