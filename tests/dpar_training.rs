//! DPAR through the shared loop on synthetic shards with stored entropies: the loss falls, the
//! CLI trains and samples, and the wrong checkpoint type or an impossible patcher is refused.

mod common;

use candle_core::Device;
use dpar::data::shards::{write_shard_set, CodeShard, ShardInfo};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;
use dpar::train::LoopConfig;

/// Class c: a row of code c+1 at row c, zeros elsewhere (long low-entropy runs).
fn synthetic(n: usize, seed: u64) -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(seed, "dpar-synth", 0);
    let mut codes = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let c = (i % 3) as u32;
        labels.push(c);
        for k in 0..16u32 {
            let v = if k / 4 == c {
                c + 1
            } else if rng.random::<f64>() < 0.05 {
                rng.random_range(0..6)
            } else {
                0
            };
            codes.push(v);
        }
    }
    CodeShard {
        info: ShardInfo {
            grid_size: 4,
            codebook_size: 6,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            tokenizer_id: "synthetic".into(),
        },
        flip_codes: None,
        codes,
        labels,
    }
}

fn run(args: &[&str]) -> (bool, String) {
    let out = common::dpar().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

/// Writes train/val shards, trains a tiny entropy model and stores entropies.
fn prepare(dir: &std::path::Path) {
    write_shard_set(&dir.join("codes/train"), &[synthetic(48, 1)], false).unwrap();
    write_shard_set(&dir.join("codes/test"), &[synthetic(12, 2)], false).unwrap();
    let config = GptTrainConfig {
        kind: "entropy".into(),
        model: GptConfig::mnist_entropy().with(|it| {
            it.dim = 16;
            it.n_layer = 1;
            it.n_head = 1;
            it.ffn_hidden = Some(32);
            it.vocab_size = 6;
            it.num_classes = 3;
            it.grid_size = 4;
        }),
        seed: 0,
        batch_size: 8,
        codes: "x".into(),
        val_codes: None,
        val_images: 4,
        use_flip: false,
        tokenizer_id: "synthetic".into(),
        train: LoopConfig {
            steps: 30,
            log_every: 10,
            checkpoint_every: 30,
            adamw: dpar::optim::AdamWConfig { lr: 1e-2, ..Default::default() },
            ..Default::default()
        },
    };
    let (train, _) = dpar::data::shards::read_shard_set(&dir.join("codes/train")).unwrap();
    let mut task = GptTask::new(config.clone(), train, None, &Device::Cpu).unwrap();
    dpar::train::run(&mut task, &config.train, &dir.join("entropy"), false).unwrap();
    let p = |s: &str| dir.join(s).display().to_string();
    let (ok, text) = run(&[
        "entropy",
        "compute",
        "--model",
        &p("entropy"),
        "--codes",
        &p("codes/train"),
        "--codes",
        &p("codes/test"),
    ]);
    assert!(ok, "{text}");
}

#[test]
fn cli_trains_and_samples_dpar_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let p = |s: &str| dir.path().join(s).display().to_string();
    let exp = dir.path().join("exp.json");
    let config = serde_json::json!({
        "kind": "dpar",
        "model": dpar::dpar::DparConfig::mnist().with(|it| { it.dim = 32; it.n_head = 2; it.encoder_layers = 1; it.global_layers = 1; it.decoder_layers = 1; it.ffn_hidden = Some(48); it.vocab_size = 6; it.num_classes = 3; it.grid_size = 4; }),
        "seed": 0, "batch_size": 8, "codes": "x", "val_codes": null, "val_images": 12, "use_flip": false,
        "tokenizer_id": "synthetic",
        "entropy_model_id": dpar::util::sha256_file(&dir.path().join("entropy/model.safetensors")).unwrap(),
        "train": LoopConfig { steps: 60, log_every: 10, checkpoint_every: 30, adamw: dpar::optim::AdamWConfig { lr: 3e-3, ..Default::default() }, ..Default::default() },
    });
    std::fs::write(&exp, serde_json::to_string(&config).unwrap()).unwrap();
    let (ok, text) = run(&[
        "train",
        "--model",
        "dpar",
        "--config",
        &exp.display().to_string(),
        "--codes",
        &p("codes/train"),
        "--val-codes",
        &p("codes/test"),
        "--out",
        &p("dpar"),
        "--target-mean-len",
        "2.0",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("calibrated θ") && text.contains("trained dpar: 60 steps"), "{text}");
    let log = std::fs::read_to_string(dir.path().join("dpar/log.jsonl")).unwrap();
    let losses: Vec<f64> =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64()).collect();
    assert!(losses.last().unwrap() < &(0.7 * losses[0]), "loss did not fall: {losses:?}");
    assert!(log.contains("patches_per_image"));

    // The wrong checkpoint type, both ways.
    let err = dpar::dpar::train::load(&dir.path().join("entropy"), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("holds a `entropy` model, not a DPAR model"), "{err}");
    let (ok, text) = run(&["entropy", "compute", "--model", &p("dpar"), "--codes", &p("codes/train")]);
    assert!(!ok && text.contains("holds a `dpar` model, not a GPT"), "{text}");
    // A patcher that makes no patches.
    let (ok, text) = run(&[
        "train",
        "--model",
        "dpar",
        "--config",
        &exp.display().to_string(),
        "--codes",
        &p("codes/train"),
        "--out",
        &p("dpar2"),
        "--max-patch-len",
        "0",
        "--threshold",
        "1",
    ]);
    assert!(!ok && text.contains("P must be ≥ 1"), "{text}");
    let (ok, text) = run(&[
        "train",
        "--model",
        "dpar",
        "--config",
        &exp.display().to_string(),
        "--codes",
        &p("codes/train"),
        "--out",
        &p("dpar2"),
        "--target-mean-len",
        "50",
    ]);
    assert!(!ok && text.contains("out of reach"), "{text}");
    // Resume continues where it stopped.
    let (ok, text) = run(&[
        "train",
        "--model",
        "dpar",
        "--codes",
        &p("codes/train"),
        "--val-codes",
        "none",
        "--out",
        &p("dpar"),
        "--steps",
        "70",
        "--resume",
    ]);
    assert!(ok && text.contains("trained dpar: 70 steps"), "{text}");
}
