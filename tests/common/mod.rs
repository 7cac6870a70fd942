//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The MNIST folder (`DPAR_MNIST_DIR`, default `data/mnist` in the repository). Tests that need
/// real digits fail with a clear message when it is missing: run `scripts/fetch-mnist`.
pub fn mnist_dir() -> PathBuf {
    let dir = std::env::var_os("DPAR_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist"));
    assert!(
        dir.join("train-images-idx3-ubyte").is_file(),
        "MNIST not found in {}: run scripts/fetch-mnist (or set DPAR_MNIST_DIR)",
        dir.display()
    );
    dir
}

/// The `dpar` binary built for this test run.
pub fn dpar() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_dpar"))
}

/// Runs `dpar ARGS`, returning success and stdout + stderr; fails the test on a panic.
pub fn run_dpar(args: &[&str]) -> (bool, String) {
    let out = dpar().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

/// Small synthetic code shards (4×4 grid, 6 codes, 3 classes) written as `train` and `test`
/// shard sets under `dir/codes`, for CLI tests that train for a few steps.
pub fn synthetic_codes(dir: &std::path::Path) -> (String, String) {
    use dpar::data::shards::{write_shard_set, CodeShard, ShardInfo};
    use rand::Rng;
    let make = |n: usize, seed: u64| {
        let mut rng = dpar::util::rng_for(seed, "synthetic-codes", 0);
        let labels: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
        let codes: Vec<u32> = (0..n * 16)
            .map(|k| {
                if (k % 16) / 4 == (k / 16) % 3 {
                    1 + ((k / 16) % 3) as u32
                } else if rng.random::<f64>() < 0.1 {
                    rng.random_range(0..6)
                } else {
                    0
                }
            })
            .collect();
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
    };
    let train = dir.join("codes/train");
    let test = dir.join("codes/test");
    write_shard_set(&train, &[make(48, 1)], true).unwrap();
    write_shard_set(&test, &[make(12, 2)], true).unwrap();
    (train.display().to_string(), test.display().to_string())
}

/// Flags of a tiny GPT training run on [`synthetic_codes`].
pub fn tiny_gpt_flags<'a>(train: &'a str, test: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "gpt",
        "--preset",
        "mnist",
        "--dim",
        "16",
        "--heads",
        "1",
        "--layers",
        "1",
        "--batch-size",
        "4",
        "--codes",
        train,
        "--val-codes",
        test,
        "--val-images",
        "4",
        "--out",
        out,
        "--steps",
        steps,
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--lr",
        "3e-3",
    ]
}
