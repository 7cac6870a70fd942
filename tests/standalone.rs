//! The project stands on its own: the binary works from any folder, nothing in the repository
//! points outside it, and class names given at tokenize time reach a model and its samples.

mod common;

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs `bin ARGS` in `cwd` with `DPAR_HOME` set to `home` (or unset); returns success and
/// the output.
fn run_in(bin: &Path, cwd: &Path, home: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(cwd).args(args).env_remove("DPAR_HOME");
    if let Some(home) = home {
        cmd.env("DPAR_HOME", home);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "dpar {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

fn recorded_checkpoint(out: &Path) -> PathBuf {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sample.json")).unwrap()).unwrap();
    PathBuf::from(record["checkpoint"].as_str().unwrap())
}

/// What `cargo install --path .` leaves: the binary alone, in a folder of its own (a copy of
/// the one built for the tests; installing would compile everything again). Run from an
/// unrelated working directory, it samples with the shipped models: first found in the source
/// tree it was built from, then in `$DPAR_HOME` when that is set.
#[test]
fn the_installed_binary_samples_with_the_shipped_models_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin/dpar");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_dpar"), &bin).unwrap();
    let work = dir.path().join("somewhere/else");
    std::fs::create_dir_all(&work).unwrap();
    let args = ["sample", "--per-class", "1", "--classes", "3,7", "--out", "out"];

    let (ok, text) = run_in(&bin, &work, None, &args);
    assert!(ok, "{text}");
    assert!(work.join("out/samples.png").is_file() && work.join("out/samples-patches.png").is_file(), "{text}");
    assert_eq!(recorded_checkpoint(&work.join("out")), root().join("models/mnist/dpar"));

    let home = dir.path().join("home");
    copy_dir(&root().join("models/mnist"), &home.join("models/mnist"));
    std::fs::remove_dir_all(work.join("out")).unwrap();
    let (ok, text) = run_in(&bin, &work, Some(&home), &args);
    assert!(ok, "{text}");
    assert_eq!(recorded_checkpoint(&work.join("out")), home.join("models/mnist/dpar"));

    // A model that no place holds is an error naming the places tried.
    let (ok, text) = run_in(&bin, &work, Some(&home), &["sample", "--ckpt", "models/none/dpar"]);
    assert!(!ok);
    assert!(text.contains("models/none/dpar") && text.contains("DPAR_HOME") && text.contains("source tree"), "{text}");
}

/// No tracked or untracked file of the repository refers to the workspace folder beside it or
/// to another absolute location: a clone must be complete on its own.
#[test]
fn no_file_in_the_repository_refers_to_a_path_outside_it() {
    // Built from pieces so that this file does not match itself.
    let patterns: Vec<String> = ["design", "paper", "bench", "hooks"]
        .iter()
        .map(|sub| format!("{}/{sub}", ["sha", "red"].concat()))
        .chain([format!("../{}", ["sha", "red"].concat()), format!("/{}/", ["wo", "rk"].concat())])
        .collect();
    let skip = ["target", ".git", "data", "runs", "out"];
    let mut offenders = Vec::new();
    let mut stack = vec![root()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                if !(dir == root() && skip.contains(&name.as_str())) {
                    stack.push(path);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue }; // binary files
            for (i, line) in text.lines().enumerate() {
                if let Some(p) = patterns.iter().find(|p| line.contains(p.as_str())) {
                    offenders.push(format!("{}:{}: `{p}`", path.strip_prefix(root()).unwrap().display(), i + 1));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "files that point outside the repository:\n{}", offenders.join("\n"));
}

/// Class names given to `dpar tokenize` are recorded in the shards, carried into the trained
/// model's config, and come back as the rows of the sample grid and in `sample.json`.
#[test]
fn class_names_given_at_tokenize_time_reach_the_model_and_its_samples() {
    let mnist = common::mnist_dir();
    let dir = tempfile::tempdir().unwrap();
    let (codes, run, out) = (dir.path().join("codes/train"), dir.path().join("run"), dir.path().join("samples"));
    let names = "zero,one,two,three,four,five,six,seven,eight,nine";
    let (ok, text) = common::run_dpar(&[
        "tokenize",
        "--data",
        mnist.to_str().unwrap(),
        "--class-names",
        names,
        "--max-images",
        "40",
        "--out",
        codes.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = common::run_dpar(&[
        "train",
        "--model",
        "gpt",
        "--codes",
        codes.to_str().unwrap(),
        "--val-codes",
        "none",
        "--dim",
        "32",
        "--heads",
        "2",
        "--layers",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let want: Vec<&str> = names.split(',').collect();
    assert_eq!(config["model"]["class_names"], serde_json::json!(want));

    let (ok, text) = common::run_dpar(&[
        "sample",
        "--ckpt",
        run.to_str().unwrap(),
        "--classes",
        "three,7",
        "--per-class",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sample.json")).unwrap()).unwrap();
    assert_eq!(record["classes"], serde_json::json!([3, 7]));
    assert_eq!(record["class_names"], serde_json::json!(["three", "seven"]));
    let shard = dpar::data::shards::read_shard(&out.join("codes.safetensors")).unwrap();
    assert_eq!(shard.info.class_names, want);
    // The grid carries a label column: wider than two 96-px cells and their padding, with text
    // (light pixels) in it.
    let grid = image::open(out.join("samples.png")).unwrap().to_rgb8();
    assert!(grid.width() > 2 * 96 + 3 * 4, "{}", grid.width());
    let lit =
        (0..grid.height()).flat_map(|y| (0..20).map(move |x| (x, y))).filter(|&(x, y)| grid.get_pixel(x, y)[0] > 200);
    assert!(lit.count() > 10, "no label text drawn");
}
