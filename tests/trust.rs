//! Trustworthy runs: a run folder is never lost or mixed silently, mismatched parts
//! are refused, and bad input gives an error naming the file or flag instead of a panic. Each
//! test is named after the problem it guards against.

mod common;

use common::{run_dpar, synthetic_codes, tiny_gpt_flags};

/// 1. Training into a folder that holds a run, without --resume, used to delete its log and
///    overwrite its checkpoint silently.
#[test]
fn a_fresh_start_over_an_existing_run_is_refused_until_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run").display().to_string();
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &test, &out, "4"));
    assert!(ok, "{text}");
    let log_before = std::fs::read_to_string(dir.path().join("run/log.jsonl")).unwrap();
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &test, &out, "4"));
    assert!(
        !ok && text.contains("already holds a run") && text.contains("--resume") && text.contains("--overwrite"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run/log.jsonl")).unwrap(),
        log_before,
        "the refused start touched the log"
    );
    let mut flags = tiny_gpt_flags(&train, &test, &out, "4");
    flags.push("--overwrite");
    let (ok, text) = run_dpar(&flags);
    assert!(ok, "{text}");
    let mut flags = tiny_gpt_flags(&train, &test, &out, "6");
    flags.push("--resume");
    let (ok, text) = run_dpar(&flags);
    assert!(ok, "{text}");
}

/// 2. Two runs on the same --out both used to succeed, interleaving the log.
#[test]
fn a_second_run_on_a_busy_folder_is_refused_with_the_first_ones_pid() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run").display().to_string();
    let mut first = common::dpar()
        .args(tiny_gpt_flags(&train, &test, &out, "100000"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the folder (its lock file names its pid).
    let lock = dir.path().join("run/.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&lock).map(|s| s.trim() != first.id().to_string()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the first run never took its folder");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut flags = tiny_gpt_flags(&train, &test, &out, "4");
    flags.push("--resume");
    let (ok, text) = run_dpar(&flags);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!ok && text.contains(&format!("pid {}", first.id())), "{text}");
}

/// 3. A killed atomic write left `.<name>.<pid>.tmp` behind forever.
#[test]
fn temporaries_of_a_killed_write_are_removed_when_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run");
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &test, out.to_str().unwrap(), "4"));
    assert!(ok, "{text}");
    // What a process killed during a checkpoint write leaves: a pid that no longer runs.
    let stale = out.join(".checkpoint.safetensors.4194301.tmp");
    std::fs::write(&stale, vec![0u8; 1 << 20]).unwrap();
    let mut flags = tiny_gpt_flags(&train, &test, out.to_str().unwrap(), "6");
    flags.push("--resume");
    let (ok, text) = run_dpar(&flags);
    assert!(ok, "{text}");
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert!(text.contains("left by an interrupted write"), "{text}");
}

/// 5. The NaN stop was a dead end: the last checkpoint could hold exploded but finite weights, a
///    plain resume diverged again, and resuming with the advised lower rate was refused.
#[test]
fn a_diverged_run_keeps_a_sane_checkpoint_and_resumes_with_a_lower_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run");
    let out_s = out.display().to_string();
    // A healthy start, then the same run continued at an absurd rate.
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &test, &out_s, "4"));
    assert!(ok, "{text}");
    let mut flags = with_lr(tiny_gpt_flags(&train, &test, &out_s, "40"), "1e9");
    flags.push("--resume");
    let (ok, text) = run_dpar(&flags);
    assert!(!ok, "a run at lr 1e9 finished:\n{text}");
    assert!(text.contains("--resume --lr 1e8"), "no recovery command in:\n{text}");
    // Whatever was checkpointed is sane.
    let ckpt =
        dpar::tensor_io::read_safetensors(&out.join("checkpoint.safetensors"), &candle_core::Device::Cpu).unwrap();
    for (name, t) in &ckpt.tensors {
        if name.starts_with("adam") || name.starts_with("extra.") {
            continue;
        }
        let max = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max.is_finite() && max < 1e6, "{name}: |w| up to {max} in the kept checkpoint");
    }
    // The advised recovery works and the change is in the log.
    let mut flags = with_lr(tiny_gpt_flags(&train, &test, &out_s, "40"), "1e-3");
    flags.push("--resume");
    let (ok, text) = run_dpar(&flags);
    assert!(ok, "{text}");
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert!(log.contains("\"change\"") && log.contains("learning rate"), "{log}");
}

/// `flags` with the learning rate replaced.
fn with_lr<'a>(mut flags: Vec<&'a str>, lr: &'a str) -> Vec<&'a str> {
    let i = flags.iter().position(|f| *f == "--lr").expect("the flags set a learning rate");
    flags[i + 1] = lr;
    flags
}

/// `flags` with the value of `flag` replaced, or the flag and value appended.
fn with_flag<'a>(mut flags: Vec<&'a str>, flag: &'a str, value: &'a str) -> Vec<&'a str> {
    match flags.iter().position(|f| *f == flag) {
        Some(i) => flags[i + 1] = value,
        None => flags.extend([flag, value]),
    }
    flags
}

/// 13. Degenerate settings were reported as numbers: `--val-images 0` gave "validation loss
///     0.0000" and `--cosine --min-lr -1` was accepted.
#[test]
fn degenerate_training_settings_are_errors_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run").display().to_string();
    let (ok, text) = run_dpar(&with_flag(tiny_gpt_flags(&train, &test, &out, "2"), "--val-images", "0"));
    assert!(!ok && text.contains("--val-images"), "{text}");
    let mut flags = with_flag(tiny_gpt_flags(&train, &test, &out, "2"), "--min-lr", "-1");
    flags.push("--cosine");
    let (ok, text) = run_dpar(&flags);
    assert!(!ok && text.contains("--min-lr"), "{text}");
    let (ok, text) = run_dpar(&with_flag(tiny_gpt_flags(&train, &test, &out, "2"), "--min-lr", "1"));
    assert!(!ok && text.contains("--min-lr"), "a floor above the learning rate was accepted: {text}");
    let (ok, text) = run_dpar(&["tokenizer", "eval", "--max-images", "0"]);
    assert!(!ok && text.contains("--max-images") && text.contains("at least 1"), "{text}");
}

/// 13. `export --dtype f16` turned values beyond f16's range into ±inf silently.
#[test]
fn exporting_values_beyond_f16_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("model.safetensors");
    let big = candle_core::Tensor::new(&[1.0f32, -7.0e4, 3.0], &candle_core::Device::Cpu).unwrap();
    let fine = candle_core::Tensor::new(&[0.5f32], &candle_core::Device::Cpu).unwrap();
    dpar::tensor_io::write_safetensors(&from, &[("layers.0.w".into(), big), ("ok".into(), fine)], &Default::default())
        .unwrap();
    let to = dir.path().join("out/model.safetensors");
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let (ok, text) =
        run_dpar(&["export", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "f16"]);
    assert!(!ok && text.contains("layers.0.w") && text.contains("f16"), "{text}");
    assert!(!to.exists(), "a refused export left a file");
    let (ok, text) =
        run_dpar(&["export", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(ok, "{text}");
}

/// 15. `entropy train` defaulted to batch 16 and lr 1e-4, not the recipe, which at 400 steps gave
///     nearly useless entropies.
#[test]
fn entropy_train_defaults_to_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("entropy");
    let (ok, text) = run_dpar(&[
        "entropy",
        "train",
        "--codes",
        &train,
        "--val-codes",
        &test,
        "--dim",
        "16",
        "--heads",
        "1",
        "--layers",
        "1",
        "--steps",
        "240",
        "--val-images",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["batch_size"], 32, "{c}");
    assert_eq!(c["train"]["adamw"]["lr"], 1e-3, "{c}");
    // The recipe's warm-up (100 of 2400 steps) and validations (6 per run) scale with --steps.
    assert_eq!(c["train"]["schedule"]["warmup_steps"], 10, "{c}");
    assert_eq!(c["train"]["eval_every"], 40, "{c}");
    assert_eq!(c["train"]["schedule"]["cosine"], true, "{c}");
    assert_eq!(c["model"]["token_dropout"], 0.0, "{c}");
}

/// 15. Many `--help` lines (`--steps`, `--batch-size`, `--lr`, `--out`, …) had no description.
///     Every flag of every command has one now ("[default: …]" alone does not count).
#[test]
fn every_flag_of_every_command_is_described() {
    let commands: &[&[&str]] = &[
        &["data", "info"],
        &["tokenizer", "train"],
        &["tokenizer", "reconstruct"],
        &["tokenizer", "eval"],
        &["tokenize"],
        &["train"],
        &["sample"],
        &["entropy", "train"],
        &["entropy", "compute"],
        &["patchify"],
        &["bench"],
        &["bench", "speed"],
        &["ablate", "patching"],
        &["ablate", "threshold"],
        &["ablate", "max-len"],
        &["ablate", "inference"],
        &["ablate", "train"],
        &["ablate", "probe"],
        &["ablate", "all"],
        &["eval", "train-classifier"],
        &["eval", "samples"],
        &["eval", "real"],
        &["export"],
        &["plot-logs"],
        &["summarize"],
    ];
    let mut undescribed = Vec::new();
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let (ok, text) = run_dpar(&args);
        assert!(ok, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !(t.starts_with("--") || (t.starts_with('-') && t.contains(", --"))) {
                continue;
            }
            // clap puts the description after the flag on the same line, or on the next lines.
            let flag_part = t.split("  ").next().unwrap();
            let mut same_line = t[flag_part.len()..].trim().to_string();
            while let Some(start) = same_line.find("[default") {
                let end = same_line[start..].find(']').map_or(same_line.len(), |e| start + e + 1);
                same_line.replace_range(start..end, "");
            }
            let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
            if same_line.trim().is_empty() && (next.is_empty() || next.starts_with('-')) {
                undescribed.push(format!("dpar {}: {flag_part}", command.join(" ")));
            }
        }
    }
    assert!(undescribed.is_empty(), "flags without a description:\n{}", undescribed.join("\n"));
}

/// The kill-and-resume test: a run SIGKILLed at seeded random moments (often during one of its
/// checkpoint writes, as it writes one every step) and resumed each time ends with the
/// bit-identical weights of an uninterrupted run, and leaves no temporary file behind.
#[test]
fn a_run_killed_at_random_moments_resumes_to_bit_identical_weights() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let steps = "60";
    let flags = |out: &str| -> Vec<String> {
        let mut f: Vec<String> = tiny_gpt_flags(&train, &test, out, steps).into_iter().map(String::from).collect();
        let i = f.iter().position(|x| x == "--checkpoint-every").unwrap();
        f[i + 1] = "1".into();
        f.push("--resume".into());
        f
    };
    let clean = dir.path().join("clean").display().to_string();
    let t0 = std::time::Instant::now();
    let (ok, text) = run_dpar(&flags(&clean).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{text}");
    // Kill moments scale with how long a whole run takes on this machine: each attempt lives at
    // most a quarter of it, so at least three kills land before the run can finish; an attempt
    // that saved no new checkpoint before its kill makes the next ones live longer.
    let whole = t0.elapsed().as_millis() as u64;
    let (mut lo, hi) = ((whole / 10).max(10), (whole / 4).max(20));
    let checkpoint_step = |run: &str| -> u64 {
        dpar::tensor_io::read_safetensors_metadata(&std::path::Path::new(run).join("checkpoint.safetensors"))
            .ok()
            .and_then(|m| m.get("step").and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };

    let killed = dir.path().join("killed").display().to_string();
    let mut rng = dpar::util::rng_for(13, "kill-and-resume", 0);
    let (mut kills, mut attempts) = (0, 0);
    loop {
        attempts += 1;
        assert!(attempts < 200, "the killed run never finished");
        let mut child = common::dpar()
            .args(flags(&killed))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let before = checkpoint_step(&killed);
        let delay = std::time::Duration::from_millis(rng.random_range(lo..hi.max(lo + 1)));
        let start = std::time::Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "a resumed run failed: {status}");
                break true;
            }
            if start.elapsed() >= delay {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        if finished {
            break;
        }
        kills += 1;
        if checkpoint_step(&killed) == before {
            lo = (lo * 2).min(whole.max(lo));
        }
    }
    assert!(kills >= 2, "only {kills} kills landed before the run finished; the test did not exercise resumption");

    let read = |run: &str| {
        dpar::tensor_io::read_safetensors(
            &std::path::Path::new(run).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (read(&clean), read(&killed));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, ta) in &a.tensors {
        let tb = b.tensors.get(name).unwrap_or_else(|| panic!("{name} missing after {kills} kills"));
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs after {kills} kills");
    }
    let leftovers: Vec<String> =
        walk(std::path::Path::new(&killed)).into_iter().filter(|p| p.ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left after {kills} kills: {leftovers:?}");
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

/// 12. `sample --per-class 100000` was accepted without a bound, and an unwritable `--out` was
///     reported only after all the sampling.
#[test]
fn sample_bounds_its_size_and_checks_its_output_folder_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        let out = common::dpar().current_dir(root).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("panicked"), "{text}");
        (out.status.success(), text)
    };
    let out = dir.path().join("s").display().to_string();
    let (ok, text) = run(&["sample", "--per-class", "100000", "--out", &out]);
    assert!(!ok && text.contains("--max-images"), "{text}");
    let (ok, text) = run(&["sample", "--per-class", "2000", "--out", &out]);
    assert!(!ok && text.contains("20000 images") && text.contains("--max-images"), "{text}");
    // A regular file where the output folder should be: refused before any sampling.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let bad_out = blocker.join("samples").display().to_string();
    let (ok, text) = run(&["sample", "--per-class", "1", "--out", &bad_out]);
    assert!(!ok && text.contains("--out") && !text.contains("sampled"), "{text}");
}

/// A tiny GPT trained for two steps on [`synthetic_codes`] (tokenizer id `synthetic`).
fn tiny_gpt(dir: &std::path::Path, name: &str, extra: &[&str]) -> String {
    let (train, test) = synthetic_codes(dir);
    let out = dir.join(name).display().to_string();
    let mut flags = tiny_gpt_flags(&train, &test, &out, "2");
    if extra.contains(&"entropy") {
        flags[2] = "entropy";
    } else {
        flags.extend_from_slice(extra);
    }
    let (ok, text) = run_dpar(&flags);
    assert!(ok, "{text}");
    out
}

/// Synthetic shards like [`synthetic_codes`]' but made by another tokenizer (id `other`).
fn other_tokenizer_codes(dir: &std::path::Path) -> String {
    let (train, _) = synthetic_codes(dir);
    let (mut shard, _) = dpar::data::shards::read_shard_set(std::path::Path::new(&train)).unwrap();
    shard.info.tokenizer_id = "other".into();
    let path = dir.join("codes/other");
    dpar::data::shards::write_shard_set(&path, &[shard], false).unwrap();
    path.display().to_string()
}

/// 4. A tokenize into a folder of an earlier, bigger set left the stale shards (training read
///    them all), and a tokenize killed halfway left a partial set that trained without complaint.
#[test]
fn tokenize_refuses_stale_shards_and_readers_refuse_a_set_without_manifest() {
    common::mnist_dir();
    let dir = tempfile::tempdir().unwrap();
    let codes = dir.path().join("codes");
    let c = codes.display().to_string();
    let data = common::mnist_dir().display().to_string();
    let tokenize = |extra: &[&str]| {
        let mut args = vec!["tokenize", "--data", &data, "--split", "test", "--out", &c, "--shard-size", "8"];
        args.extend_from_slice(extra);
        run_dpar(&args)
    };
    let (ok, text) = tokenize(&["--max-images", "20"]);
    assert!(ok, "{text}");
    assert_eq!(dpar::data::shards::read_shard_set(&codes).unwrap().0.len(), 20);
    let (ok, text) = tokenize(&["--max-images", "10"]);
    assert!(!ok && text.contains("already holds 4 file(s)") && text.contains("--overwrite"), "{text}");
    let (ok, text) = tokenize(&["--max-images", "10", "--overwrite"]);
    assert!(ok, "{text}");
    assert_eq!(dpar::data::shards::read_shard_set(&codes).unwrap().0.len(), 10, "stale shards were read");
    assert!(!codes.join("shard-00002.safetensors").exists());
    // A set whose manifest never got written (the tokenize was killed) does not train.
    std::fs::remove_file(codes.join("manifest.json")).unwrap();
    let out = dir.path().join("run").display().to_string();
    let (ok, text) = run_dpar(&tiny_gpt_flags(&c, "none", &out, "1"));
    assert!(!ok && text.contains("no manifest.json") && text.contains("interrupted"), "{text}");
}

/// 6. `sample` decoded a model's codes with whatever tokenizer it was given.
#[test]
fn sample_refuses_a_tokenizer_other_than_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_gpt(dir.path(), "gpt", &[]);
    let out = dir.path().join("s").display().to_string();
    let (ok, text) = run_dpar(&[
        "sample",
        "--ckpt",
        &run,
        "--tokenizer",
        "models/mnist/tokenizer",
        "--per-class",
        "1",
        "--out",
        &out,
    ]);
    assert!(!ok && text.contains("is not the one the model") && text.contains("--allow-mismatch"), "{text}");
    assert!(text.contains("3a432d981626") || text.contains("this tokenizer ("), "{text}");
    // Without --tokenizer, the usual places are searched for the recorded one, and the error
    // lists what they hold.
    let (ok, text) = run_dpar(&["sample", "--ckpt", &run, "--per-class", "1", "--out", &out]);
    assert!(!ok && text.contains("none of the usual places") && text.contains("models/mnist/tokenizer is"), "{text}");
    // --allow-mismatch goes on past the hash check (and stops at the next real problem: the
    // shipped tokenizer's grid is not the tiny model's).
    let (ok, text) = run_dpar(&[
        "sample",
        "--ckpt",
        &run,
        "--tokenizer",
        "models/mnist/tokenizer",
        "--per-class",
        "1",
        "--out",
        &out,
        "--allow-mismatch",
    ]);
    assert!(!ok && text.contains("WARN") && text.contains("does not fit the model"), "{text}");
}

/// 7. The wrong entropy model got only a warning; `entropy compute` and `--val-codes` accepted
///    codes of another tokenizer.
#[test]
fn a_wrong_entropy_model_or_foreign_codes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s").display().to_string();
    let (ok, text) = run_dpar(&["sample", "--entropy-model", "models/mnist/gpt", "--per-class", "1", "--out", &out]);
    assert!(
        !ok && text.contains("this entropy model")
            && text.contains("6d5f9b2e3446")
            && text.contains("--allow-mismatch"),
        "{text}"
    );

    let entropy = tiny_gpt(dir.path(), "ent", &["entropy"]);
    let other = other_tokenizer_codes(dir.path());
    let (ok, text) = run_dpar(&["entropy", "compute", "--model", &entropy, "--codes", &other]);
    assert!(!ok && text.contains("codes of tokenizer other") && text.contains("synthetic"), "{text}");

    let (train, _) = synthetic_codes(dir.path());
    let run = dir.path().join("val").display().to_string();
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &other, &run, "1"));
    assert!(!ok && text.contains("--val-codes") && text.contains("tokenizer other"), "{text}");
}

/// 8. `eval` compared samples against whatever dataset --data pointed at (precision 0.028, no
///    message) when it was not the classifier's.
#[test]
fn eval_refuses_reference_data_the_classifier_was_not_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dpar::data::load(&dpar::data::resolve(&common::mnist_dir(), "test").unwrap(), 28, 1).unwrap().take(300);
    // Another "dataset": the same pictures under other names (every label shifted by one).
    let other =
        dpar::data::ImageDataset { labels: mnist.labels.iter().map(|y| (y + 1) % 10).collect(), ..mnist.clone() };
    let fake = dir.path().join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    for split in ["train", "t10k"] {
        dpar::data::idx::write_idx(
            &other,
            &fake.join(format!("{split}-images-idx3-ubyte")),
            &fake.join(format!("{split}-labels-idx1-ubyte")),
        )
        .unwrap();
    }
    let (ok, text) = run_dpar(&["eval", "real", "--n", "300", "--data", fake.to_str().unwrap()]);
    assert!(!ok && text.contains("not its dataset") && text.contains("--data"), "{text}");
    let (ok, text) = run_dpar(&["eval", "real", "--n", "300", "--data", common::mnist_dir().to_str().unwrap()]);
    assert!(ok, "{text}");
}

/// 9. Weights loaded although the file held tensors the model does not know.
#[test]
fn a_weight_file_with_unknown_tensors_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_gpt(dir.path(), "gpt", &[]);
    let file = std::path::Path::new(&run).join("model.safetensors");
    let loaded = dpar::tensor_io::read_safetensors(&file, &candle_core::Device::Cpu).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = loaded.tensors.into_iter().collect();
    tensors.push((
        "decoder.extra.weight".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    ));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = loaded.metadata.into_iter().collect();
    let extra = dir.path().join("extra.safetensors");
    dpar::tensor_io::write_safetensors(&extra, &tensors, &meta).unwrap();
    let out = dir.path().join("s").display().to_string();
    let (ok, text) = run_dpar(&["sample", "--ckpt", extra.to_str().unwrap(), "--per-class", "1", "--out", &out]);
    assert!(
        !ok && text.contains("1 unexpected parameter(s): decoder.extra.weight") && text.contains("--allow-extra-keys"),
        "{text}"
    );
    let (ok, text) = run_dpar(&[
        "sample",
        "--ckpt",
        extra.to_str().unwrap(),
        "--per-class",
        "1",
        "--out",
        &out,
        "--allow-extra-keys",
    ]);
    assert!(!ok && text.contains("ignoring 1 unexpected") && !text.contains("loads it anyway"), "{text}");
}

/// 11. Sizes from headers and configs were trusted: these aborted the process ("memory
///     allocation of N bytes failed") instead of giving an error.
#[test]
fn absurd_sizes_in_files_and_flags_are_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    // A small PNG that declares 100 000 000 × 1 pixels (the IHDR width patched, CRC fixed).
    let class = dir.path().join("images/a");
    std::fs::create_dir_all(&class).unwrap();
    let mut png = Vec::new();
    image::GrayImage::from_pixel(4, 1, image::Luma([7]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&100_000_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    std::fs::write(class.join("huge.png"), &png).unwrap();
    let err = dpar::data::folder::load_image_folder(&dir.path().join("images"), 28, 1).unwrap_err().to_string();
    assert!(err.contains("huge.png"), "{err}");

    // A config of 10⁹ layers, and a batch of 10⁸ images.
    let (train, test) = synthetic_codes(dir.path());
    let out = dir.path().join("run").display().to_string();
    let mut flags = tiny_gpt_flags(&train, &test, &out, "1");
    let at = flags.iter().position(|f| *f == "--layers").unwrap() + 1;
    flags[at] = "1000000000";
    let (ok, text) = run_dpar(&flags);
    assert!(!ok && text.contains("1000000000 layers") && text.contains("memory"), "{text}");
    let flags = with_flag(tiny_gpt_flags(&train, &test, &out, "1"), "--batch-size", "100000000");
    let (ok, text) = run_dpar(&flags);
    assert!(!ok && text.contains("--batch-size 100000000 needs about") && text.contains("budget"), "{text}");

    // A tokenizer with a codebook of 4·10⁹ codes.
    let (ok, text) = run_dpar(&["tokenizer", "train", "--codebook-size", "4000000000", "--steps", "1", "--out", &out]);
    assert!(!ok && text.contains("codebook 4000000000") && text.contains("memory"), "{text}");

    // A shard declaring 10¹² classes.
    let shard = dir.path().join("classes.safetensors");
    let t = |v: Vec<u32>, n: usize| candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap();
    let meta: std::collections::BTreeMap<String, String> = [
        ("format", "dpar-codes-v1"),
        ("grid_size", "1"),
        ("codebook_size", "4"),
        ("num_classes", "1000000000000"),
        ("class_names", "[]"),
        ("tokenizer_id", "t"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    dpar::tensor_io::write_safetensors(
        &shard,
        &[("codes".into(), t(vec![1], 1).reshape((1, 1)).unwrap()), ("labels".into(), t(vec![0], 1))],
        &meta,
    )
    .unwrap();
    let err = dpar::data::shards::read_shard(&shard).unwrap_err().to_string();
    assert!(err.contains("1000000000000 classes") && err.contains("classes.safetensors"), "{err}");
}

/// 11. A gzip bomb was inflated completely before its IDX header was checked.
#[test]
fn a_gzip_bomb_is_inflated_only_as_far_as_its_header_says() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let gz = |header: &[u8], zeros: usize| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(header).unwrap();
        let block = vec![0u8; 1 << 20];
        for _ in 0..zeros >> 20 {
            e.write_all(&block).unwrap();
        }
        e.finish().unwrap()
    };
    // One 2×2 image declared, followed by 256 MiB of zeros: the 4 declared bytes are read, then
    // at most 1 MiB more to find that the stream does not end there (an error: a file must be
    // what its header says), never the 256 MiB.
    let path = dir.path().join("bomb-images-idx3-ubyte.gz");
    std::fs::write(&path, gz(&dpar::data::idx::encode_idx(&[1, 2, 2], &[1, 2, 3, 4]), 256 << 20)).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
    let t = std::time::Instant::now();
    let err = dpar::data::idx::read_idx(&path, 3).unwrap_err().to_string();
    assert!(
        err.contains("bomb-images-idx3-ubyte.gz") && err.contains("after the data its IDX header declares"),
        "{err}"
    );
    eprintln!("read the bomb's header, data and 1 MiB more in {:?}", t.elapsed());
    // The same image with nothing after it reads back.
    std::fs::write(&path, gz(&dpar::data::idx::encode_idx(&[1, 2, 2], &[1, 2, 3, 4]), 0)).unwrap();
    let idx = dpar::data::idx::read_idx(&path, 3).unwrap();
    assert_eq!((idx.dims.clone(), idx.data.len()), (vec![1, 2, 2], 4));
    // A header that declares more than any machine holds is refused before inflating.
    let path = dir.path().join("big-images-idx3-ubyte.gz");
    let mut header = vec![0, 0, 8, 3];
    for d in [u32::MAX, u32::MAX, 16] {
        header.extend(d.to_be_bytes());
    }
    std::fs::write(&path, gz(&header, 0)).unwrap();
    let err = dpar::data::idx::read_idx(&path, 3).unwrap_err().to_string();
    assert!(err.contains("big-images-idx3-ubyte.gz") && err.contains("memory budget"), "{err}");
}

/// 13. An IDX label of 255 among 0–9 made a 256-class dataset silently.
#[test]
fn an_idx_label_outside_the_classes_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut labels: Vec<u32> = (0..20).map(|i| i % 10).collect();
    labels[7] = 255;
    let data = dpar::data::ImageDataset {
        images: vec![0; 20 * 4],
        labels,
        channels: 1,
        height: 2,
        width: 2,
        class_names: vec![],
        source: "t".into(),
    };
    let (images, labels) = (dir.path().join("train-images-idx3-ubyte"), dir.path().join("train-labels-idx1-ubyte"));
    dpar::data::idx::write_idx(&data, &images, &labels).unwrap();
    let err = dpar::data::idx::load_idx(&images, &labels).unwrap_err().to_string();
    assert!(
        err.contains("train-labels-idx1-ubyte") && err.contains("255 (1×)") && err.contains("--class-names"),
        "{err}"
    );
    let ten: Vec<String> = (0..10).map(|c| c.to_string()).collect();
    let err = dpar::data::idx::load_idx_with_classes(&images, &labels, Some(&ten)).unwrap_err().to_string();
    assert!(err.contains("label 255 (item 7) is outside the 10 declared classes"), "{err}");
    // Through the CLI: the flag declares the names.
    let (ok, text) = run_dpar(&["data", "info", "--data", dir.path().to_str().unwrap()]);
    assert!(!ok && text.contains("255"), "{text}");
    let names: String = (0..256).map(|c| format!("c{c}")).collect::<Vec<_>>().join(",");
    let (ok, text) = run_dpar(&["data", "info", "--data", dir.path().to_str().unwrap(), "--class-names", &names]);
    assert!(ok && text.contains("256 classes") && text.contains("c255: 1"), "{text}");
}

/// 14. `dpar bench` exited 1 with "no finite points to plot" when the runs had no weight
///     snapshots (trained without `--eval-every`).
#[test]
fn bench_without_snapshots_says_how_to_get_curves_instead_of_failing() {
    let mnist = common::mnist_dir().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = |s: &str| dir.path().join(s).display().to_string();
    let (train, test) = (d("codes/train"), d("codes/test"));
    let steps: Vec<Vec<&str>> = vec![
        vec!["tokenize", "--data", &mnist, "--split", "test", "--max-images", "40", "--out", &train],
        vec!["tokenize", "--data", &mnist, "--split", "test", "--max-images", "40", "--out", &test],
        vec!["entropy", "compute", "--model", "models/mnist/entropy", "--codes", &train, "--codes", &test],
    ];
    for args in steps {
        let (ok, text) = run_dpar(&args);
        assert!(ok, "{text}");
    }
    let (gpt, dpar) = (d("gpt"), d("dpar"));
    for (model, layers, out) in [("gpt", "1", &gpt), ("dpar", "1+1+1", &dpar)] {
        let (ok, text) = run_dpar(&[
            "train",
            "--model",
            model,
            "--preset",
            "mnist",
            "--dim",
            "16",
            "--heads",
            "1",
            "--layers",
            layers,
            "--batch-size",
            "4",
            "--codes",
            &train,
            "--val-codes",
            "none",
            "--steps",
            "2",
            "--eval-every",
            "0",
            "--out",
            out,
        ]);
        assert!(ok, "{text}");
    }
    let exp = d("exp");
    let bench = [
        "bench",
        "--gpt-run",
        &gpt,
        "--dpar-run",
        &dpar,
        "--train-codes",
        &train,
        "--test-codes",
        &test,
        "--data",
        &mnist,
        "--samples",
        "20",
        "--out",
        &exp,
    ];
    let (ok, text) = run_dpar(&bench);
    assert!(ok && text.contains("no quality curves") && text.contains("--eval-every"), "{text}");
    assert!(dir.path().join("exp/bench.md").is_file());
    let mut no_curves = bench.to_vec();
    no_curves.extend(["--curve-samples", "0"]);
    let (ok, text) = run_dpar(&no_curves);
    assert!(ok && !text.contains("no quality curves"), "{text}");
}
