//! The command line: bad input gives a clear message and a non-zero exit, never a panic.

mod common;

fn run(args: &[&str]) -> (bool, String) {
    let out = common::dpar().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

#[test]
fn missing_and_corrupt_data_are_named() {
    let (ok, text) = run(&["data", "info", "--data", "/nonexistent/mnist"]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/mnist") && text.contains("no dataset found"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0, 0, 9]).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), [0u8, 0, 8, 1, 0, 0, 0, 9]).unwrap();
    let (ok, text) = run(&["data", "info", "--data", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("train-images-idx3-ubyte: truncated"), "{text}");
}

#[test]
fn a_missing_tokenizer_is_named() {
    let (ok, text) = run(&["tokenize", "--tokenizer", "/nonexistent/tok"]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/tok: no such tokenizer") && text.contains("dpar tokenizer train"), "{text}");
}

#[test]
fn impossible_hyper_parameters_are_rejected() {
    let dir = common::mnist_dir();
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = run(&[
        "tokenizer",
        "train",
        "--data",
        dir.to_str().unwrap(),
        "--max-images",
        "8",
        "--steps",
        "1",
        "--lr=-1",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(text.contains("--lr") && text.contains("finite number > 0"), "{text}");
}

#[test]
fn tokenizer_train_reconstruct_and_tokenize_run_end_to_end() {
    let dir = common::mnist_dir();
    let out = tempfile::tempdir().unwrap();
    let run_dir = out.path().join("tok");
    let data = dir.to_str().unwrap();
    let (ok, text) = run(&[
        "tokenizer",
        "train",
        "--data",
        data,
        "--max-images",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--val-images",
        "8",
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(run_dir.join("model.safetensors").is_file() && run_dir.join("reconstruction.png").is_file());
    assert!(run_dir.join("config.json").is_file() && run_dir.join("loss.png").is_file());
    let codes = out.path().join("codes");
    let (ok, text) = run(&[
        "tokenize",
        "--tokenizer",
        run_dir.to_str().unwrap(),
        "--data",
        data,
        "--split",
        "test",
        "--max-images",
        "10",
        "--flip",
        "--out",
        codes.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("tokenized 10 test images into 16×16 = 256 codes each (+ flip copy)"), "{text}");
    assert!(codes.join("shard-00000.safetensors").is_file());
}

/// `dpar bench speed --torch PYTHON` runs the three reference scripts and prints the ratio table.
/// A stand-in "python" prints the scripts' output format (the real run needs torch; its numbers
/// are in the README).
#[test]
fn bench_speed_runs_the_torch_reference_and_prints_ratios() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let python = dir.path().join("python");
    std::fs::write(
        &python,
        "#!/bin/sh\ncase \"$1\" in\n*bench_model.py) echo 'MATMUL torch.float32 1024^3: median 10.00 ms, 214.7 GFLOP/s'; echo 'FWD(no_grad) sdpa=True median 190.0 ms'; echo 'TRAIN sdpa=True median 570.0 ms loss 7.0' ;;\n*bf16.py) echo 'AUTOCAST-BF16 FWD sdpa=True median 97.0 ms'; echo 'AUTOCAST-BF16 TRAIN sdpa=True median 267.0 ms loss 7.1' ;;\n*sample_bench.py) echo 'TORCH SAMPLE batch 16: 2.51 ms per step (mean over 256 steps, median of 3 runs)' ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let json = dir.path().join("speed.json");
    let (ok, text) = run(&[
        "bench",
        "speed",
        "--models",
        "bench",
        "--ops",
        "fused",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--torch",
        python.to_str().unwrap(),
        "--torch-scripts",
        concat!(env!("CARGO_MANIFEST_DIR"), "/bench"),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("| training step | 570.0 | 267.0 |")
            && text.contains("bench (bf16)")
            && text.contains("PyTorch torch.float32 | 214.7"),
        "{text}"
    );
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(saved["torch"]["reference"]["sample_step_ms"], 2.51);
    // A failing script is an error naming it.
    std::fs::write(&python, "#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2; exit 1\n").unwrap();
    let (ok, text) = run(&[
        "bench",
        "speed",
        "--models",
        "bench",
        "--ops",
        "fused",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--torch",
        python.to_str().unwrap(),
        "--torch-scripts",
        concat!(env!("CARGO_MANIFEST_DIR"), "/bench"),
    ]);
    assert!(!ok && text.contains("torch_bench_model.py failed") && text.contains("No module named torch"), "{text}");
}

/// `dpar patchify --on-samples`: θ found by sampling from the shipped DPAR (self-entropy
/// patching here); an unreachable target is an error naming the flag.
#[test]
fn theta_is_calibrated_on_sampled_images() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("theta.json");
    let json_arg = json.to_str().unwrap();
    let (ok, text) = common::run_dpar(&[
        "patchify",
        "--on-samples",
        "models/mnist/dpar",
        "--patcher",
        "self",
        "--target-mean-len",
        "1.8",
        "--per-class",
        "1",
        "--json",
        json_arg,
    ]);
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let theta = report["threshold"].as_f64().unwrap();
    assert!(theta > 0.5 && theta < 4.0, "θ {theta}: {text}");
    assert!(text.contains("mean patch length"), "{text}");
    let (ok, text) = common::run_dpar(&["patchify", "--on-samples", "models/mnist/dpar", "--target-mean-len", "9"]);
    assert!(!ok && text.contains("--target-mean-len 9"), "{text}");
}

/// The paper-scale timing path on random weights, at MNIST size: both patchers give a curve
/// whose DPAR took fewer patch steps than codes; presets that do not make the same images are
/// refused by name.
#[test]
fn sampling_curve_on_random_presets() {
    let dir = tempfile::tempdir().unwrap();
    for patcher in ["model", "self"] {
        let json = dir.path().join(format!("{patcher}.json"));
        let (ok, text) = common::run_dpar(&[
            "bench",
            "speed",
            "--no-models",
            "--random",
            "mnist,mnist",
            "--entropy-preset",
            "1x64",
            "--patcher",
            patcher,
            "--sampling-curve",
            "2",
            "--reps",
            "1",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let steps = report["sampling_curve"][0]["dpar_steps_per_image"].as_f64().unwrap();
        assert!(steps > 64.0 && steps < 256.0, "{patcher}: {steps} patch steps per image\n{text}");
        assert!(text.contains("random mnist"), "{text}");
    }
    let (ok, text) =
        common::run_dpar(&["bench", "speed", "--no-models", "--random", "gpt-b,mnist", "--sampling-curve", "1"]);
    assert!(!ok && text.contains("--random gpt-b,mnist"), "{text}");
    let (ok, text) = common::run_dpar(&[
        "bench",
        "speed",
        "--no-models",
        "--random",
        "mnist,mnist",
        "--entropy-preset",
        "2x100",
        "--sampling-curve",
        "1",
    ]);
    assert!(!ok && text.contains("--entropy-preset 2x100"), "{text}");
}

/// Self-entropies of real codes: written beside a copy of the shards with the DPAR model's id;
/// a θ that is not an entropy is refused by flag.
#[test]
fn self_entropies_are_stored_beside_the_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) =
        common::run_dpar(&["entropy", "compute", "--self-of", "models/mnist/dpar", "--threshold=-1", "--codes", "x"]);
    assert!(!ok && text.contains("--threshold -1"), "{text}");
    // Ten made-up images of the MNIST grid, written as a shard.
    let shard = dpar::data::shards::CodeShard {
        info: dpar::data::shards::ShardInfo {
            grid_size: 16,
            codebook_size: 512,
            num_classes: 10,
            class_names: (0..10).map(|c| c.to_string()).collect(),
            tokenizer_id: "t".into(),
        },
        codes: (0..10 * 256u32).map(|k| (k * 37 + k / 256) % 512).collect(),
        labels: (0..10).collect(),
        flip_codes: None,
    };
    let file = dir.path().join("shard-00000.safetensors");
    dpar::data::shards::write_shard(&file, &shard).unwrap();
    let (ok, text) = common::run_dpar(&[
        "entropy",
        "compute",
        "--self-of",
        "models/mnist/dpar",
        "--threshold",
        "2.3",
        "--codes",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let stored = dpar::entropy::read(&file, &shard, None).unwrap();
    let dpar_id = dpar::parts::id_of(std::path::Path::new("models/mnist/dpar")).unwrap();
    assert_eq!(stored.entropy_model_id, dpar_id);
    assert_eq!(stored.entropy.len(), 10 * 256);
    assert!(stored.entropy[0].is_infinite() && stored.entropy[1..256].iter().all(|h| h.is_finite()));
}

/// `--patcher self` without --threshold takes the θ stored beside the model; a model without
/// one is refused with the command that stores it; `--sampling-threshold` takes the entropy
/// model's stored θ.
#[test]
fn self_entropy_sampling_takes_the_stored_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let stored = dpar::patching::SamplingThresholds::read(std::path::Path::new("models/mnist/dpar")).unwrap();
    let out = dir.path().join("s");
    for (flag, from) in [
        ("--patcher=self", dpar::patching::EntropyFrom::Decoder),
        ("--sampling-threshold", dpar::patching::EntropyFrom::Model),
    ] {
        let theta = stored.get(from).expect("the shipped DPAR stores both θ").threshold;
        let (ok, text) = common::run_dpar(&[
            "sample",
            "--ckpt",
            "models/mnist/dpar",
            flag,
            "--classes",
            "3",
            "--per-class",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains(&format!("θ={theta:.3}")), "{flag}: θ {theta} not used:\n{text}");
    }
    // A copy of the model without the stored thresholds.
    let bare = dir.path().join("dpar");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(std::path::Path::new("models/mnist/dpar").join(f), bare.join(f)).unwrap();
    }
    let (ok, text) = common::run_dpar(&[
        "sample",
        "--ckpt",
        bare.to_str().unwrap(),
        "--patcher",
        "self",
        "--classes",
        "3",
        "--per-class",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("--store") && text.contains("sampling-thresholds.json"), "{text}");
}
