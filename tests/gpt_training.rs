//! The GPT baseline through the shared loop: loss falls on a tiny synthetic dataset, resume is
//! bit-identical, and bad inputs give clear errors.

mod common;

use candle_core::Device;
use dpar::data::shards::{write_shard_set, CodeShard, ShardInfo};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;
use dpar::optim::AdamWConfig;
use dpar::train::{LoopConfig, Task};

/// Class c's images: code (c + row) mod V everywhere in a row, with a little noise.
fn synthetic(n: usize, grid: usize, vocab: u32, classes: u32, seed: u64) -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(seed, "synthetic", 0);
    let mut codes = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let c = (i as u32) % classes;
        labels.push(c);
        for k in 0..grid * grid {
            let row = (k / grid) as u32;
            codes.push(if rng.random::<f64>() < 0.05 { rng.random_range(0..vocab) } else { (c + row) % vocab });
        }
    }
    let flip_codes = Some(codes.clone());
    CodeShard {
        info: ShardInfo {
            grid_size: grid,
            codebook_size: vocab as usize,
            num_classes: classes as usize,
            class_names: (0..classes).map(|c| c.to_string()).collect(),
            tokenizer_id: "synthetic".into(),
        },
        codes,
        labels,
        flip_codes,
    }
}

fn config(steps: u64) -> GptTrainConfig {
    let model = GptConfig::mnist().with(|it| {
        it.dim = 32;
        it.n_layer = 2;
        it.n_head = 2;
        it.ffn_hidden = Some(64);
        it.vocab_size = 8;
        it.num_classes = 4;
        it.grid_size = 4;
    });
    GptTrainConfig {
        kind: "gpt".into(),
        model,
        seed: 5,
        batch_size: 8,
        codes: "synthetic".into(),
        val_codes: Some("synthetic".into()),
        val_images: 16,
        use_flip: true,
        tokenizer_id: "synthetic".into(),
        train: LoopConfig {
            steps,
            adamw: AdamWConfig { lr: 3e-3, ..Default::default() },
            log_every: 5,
            checkpoint_every: 10,
            ..Default::default()
        },
    }
}

fn params_bits(task: &GptTask) -> Vec<(String, Vec<u32>)> {
    task.params()
        .vars()
        .into_iter()
        .map(|(n, v)| {
            (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn loss_falls_on_a_tiny_synthetic_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(60);
    let mut task =
        GptTask::new(c.clone(), synthetic(64, 4, 8, 4, 1), Some(synthetic(16, 4, 8, 4, 2)), &Device::Cpu).unwrap();
    let before = task.validate().unwrap()[0].1;
    let report = dpar::train::run(&mut task, &c.train, dir.path(), false).unwrap();
    let after = report.validation[0].1;
    assert!((before - 8f64.ln()).abs() < 0.05, "zero-initialised head starts at ln V: {before}");
    assert!(after < 0.6 * before, "validation loss {before} -> {after}");
}

#[test]
fn resume_after_an_interruption_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(40, 4, 8, 4, 3);
    let mut straight = GptTask::new(config(20), data.clone(), None, &Device::Cpu).unwrap();
    dpar::train::run(&mut straight, &config(20).train, &dir.path().join("a"), false).unwrap();

    // Interrupted at step 10 (the checkpoint), resumed by a fresh task in a "new process".
    let mut first = GptTask::new(config(10), data.clone(), None, &Device::Cpu).unwrap();
    dpar::train::run(&mut first, &config(10).train, &dir.path().join("b"), false).unwrap();
    let mut resumed = GptTask::new(config(20), data, None, &Device::Cpu).unwrap();
    let report = dpar::train::run(&mut resumed, &config(20).train, &dir.path().join("b"), true).unwrap();
    assert_eq!(report.resumed_from, Some(10));
    assert_eq!(params_bits(&straight), params_bits(&resumed));
}

#[test]
fn shards_that_do_not_fit_are_rejected() {
    let err = GptTask::new(config(1), synthetic(8, 3, 8, 4, 1), None, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("3×3 grid, the model expects 4×4"), "{err}");
    let err = GptTask::new(config(1), synthetic(8, 4, 8, 6, 1), None, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("6 classes, the model 4"), "{err}");
}

fn run(args: &[&str]) -> (bool, String) {
    let out = common::dpar().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

/// The CLI end to end on synthetic shards: train, resume, then the sampler's error messages.
#[test]
fn cli_train_resume_and_sampling_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).display().to_string();
    write_shard_set(&dir.path().join("codes"), &[synthetic(32, 4, 8, 4, 1)], false).unwrap();
    write_shard_set(&dir.path().join("codes-val"), &[synthetic(8, 4, 8, 4, 2)], false).unwrap();
    let cfg = dir.path().join("exp.json");
    std::fs::write(&cfg, serde_json::to_string(&config(6)).unwrap()).unwrap();
    let (ok, text) = run(&[
        "train",
        "--config",
        &cfg.display().to_string(),
        "--codes",
        &p("codes"),
        "--val-codes",
        &p("codes-val"),
        "--out",
        &p("run"),
        "--steps",
        "4",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("trained gpt: 4 steps"), "{text}");
    let (ok, text) = run(&[
        "train",
        "--codes",
        &p("codes"),
        "--val-codes",
        &p("codes-val"),
        "--out",
        &p("run"),
        "--steps",
        "6",
        "--resume",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("trained gpt: 6 steps"), "{text}");

    // A checkpoint missing keys.
    let broken = dir.path().join("broken.safetensors");
    let file = dpar::tensor_io::read_safetensors(&dir.path().join("run/model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        file.tensors.into_iter().filter(|(k, _)| !k.starts_with("layers.1.")).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = file.metadata.into_iter().collect();
    dpar::tensor_io::write_safetensors(&broken, &tensors, &meta).unwrap();
    let (ok, text) = run(&["sample", "--ckpt", &broken.display().to_string(), "--tokenizer", "/nonexistent"]);
    assert!(!ok && text.contains("missing") && text.contains("layers.1."), "{text}");

    let (ok, text) = run(&["sample", "--ckpt", &p("run"), "--cfg=-1"]);
    assert!(!ok && text.contains("cfg scale must be finite and ≥ 0"), "{text}");
    let (ok, text) = run(&["sample", "--ckpt", &p("run"), "--top-p", "1.5"]);
    assert!(!ok && text.contains("top-p must lie in (0, 1]"), "{text}");
    let (ok, text) = run(&[
        "train",
        "--codes",
        &p("codes"),
        "--out",
        &p("run2"),
        "--preset",
        "mnist",
        "--steps",
        "1",
        "--val-codes",
        "none",
    ]);
    assert!(ok, "{text}");
    // A shard with another grid size than the model.
    write_shard_set(&dir.path().join("codes3"), &[synthetic(8, 3, 8, 4, 1)], false).unwrap();
    let (ok, text) = run(&[
        "train",
        "--config",
        &cfg.display().to_string(),
        "--codes",
        &p("codes3"),
        "--val-codes",
        "none",
        "--out",
        &p("run3"),
    ]);
    assert!(!ok && text.contains("3×3 grid, the model expects 4×4"), "{text}");
}
