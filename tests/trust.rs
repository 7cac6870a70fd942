//! Trustworthy runs (issue 13): a run folder is never lost or mixed silently, mismatched parts
//! are refused, and bad input gives an error naming the file or flag instead of a panic. Each
//! test names the numbered problem of the issue it guards against.

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
    assert!(!ok && text.contains("already holds a run") && text.contains("--resume") && text.contains("--overwrite"), "{text}");
    assert_eq!(std::fs::read_to_string(dir.path().join("run/log.jsonl")).unwrap(), log_before, "the refused start touched the log");
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
    let mut first = common::dpar().args(tiny_gpt_flags(&train, &test, &out, "100000")).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
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
    let ckpt = dpar::tensor_io::read_safetensors(&out.join("checkpoint.safetensors"), &candle_core::Device::Cpu).unwrap();
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
    assert!(!ok && text.contains("--max-images 0"), "{text}");
}

/// 13. `export --dtype f16` turned values beyond f16's range into ±inf silently.
#[test]
fn exporting_values_beyond_f16_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("model.safetensors");
    let big = candle_core::Tensor::new(&[1.0f32, -7.0e4, 3.0], &candle_core::Device::Cpu).unwrap();
    let fine = candle_core::Tensor::new(&[0.5f32], &candle_core::Device::Cpu).unwrap();
    dpar::tensor_io::write_safetensors(&from, &[("layers.0.w".into(), big), ("ok".into(), fine)], &Default::default()).unwrap();
    let to = dir.path().join("out/model.safetensors");
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let (ok, text) = run_dpar(&["export", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "f16"]);
    assert!(!ok && text.contains("layers.0.w") && text.contains("f16"), "{text}");
    assert!(!to.exists(), "a refused export left a file");
    let (ok, text) = run_dpar(&["export", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "bf16"]);
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
        "entropy", "train", "--codes", &train, "--val-codes", &test, "--dim", "16", "--heads", "1", "--layers", "1", "--steps", "1", "--val-images", "4",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["batch_size"], 32, "{c}");
    assert_eq!(c["train"]["adamw"]["lr"], 1e-3, "{c}");
    assert_eq!(c["train"]["schedule"]["warmup_steps"], 100, "{c}");
    assert_eq!(c["train"]["schedule"]["cosine"], true, "{c}");
    assert_eq!(c["model"]["token_dropout"], 0.0, "{c}");
}

/// 15. Many `--help` lines of training had no description or default.
#[test]
fn every_training_flag_is_described() {
    let (ok, text) = run_dpar(&["train", "--help"]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if !t.starts_with("--") && !(t.starts_with('-') && t.contains(", --")) {
            continue;
        }
        // clap puts the description after the flag on the same line, or on the next lines.
        let flag_part = t.split("  ").next().unwrap();
        let same_line = t[flag_part.len()..].trim();
        let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
        let described = !same_line.is_empty() || (!next.is_empty() && !next.starts_with('-'));
        assert!(described, "`dpar train --help`: {flag_part} has no description");
    }
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
        let mut child = common::dpar().args(flags(&killed)).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
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

    let read = |run: &str| dpar::tensor_io::read_safetensors(&std::path::Path::new(run).join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (read(&clean), read(&killed));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, ta) in &a.tensors {
        let tb = b.tensors.get(name).unwrap_or_else(|| panic!("{name} missing after {kills} kills"));
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs after {kills} kills");
    }
    let leftovers: Vec<String> = walk(std::path::Path::new(&killed)).into_iter().filter(|p| p.ends_with(".tmp")).collect();
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
