//! Hostile inputs, round 2: one test per rule (sizes checked before allocation, files exactly
//! what their headers say, implausible contents refused, config files supply their data paths,
//! errors name their file, read-only commands write nothing into model folders, a finished run
//! resumed changes nothing). `scripts/hostile-sweep.py` runs the wider sweep these come from.

mod common;

use std::path::{Path, PathBuf};

use common::{run_dpar, synthetic_codes, tiny_gpt_flags};

fn shipped(part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mnist").join(part)
}

/// The safetensors header and data of a file.
fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    [&(text.len() as u64).to_le_bytes()[..], &text, data].concat()
}

/// A copy of a shipped model folder whose weights go through `edit(header, data)`.
fn edited_model(part: &str, to: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(shipped(part).join(f), to.join(f)).unwrap();
    }
    let (mut header, mut data) = split_safetensors(&std::fs::read(to.join("model.safetensors")).unwrap());
    edit(&mut header, &mut data);
    std::fs::write(to.join("model.safetensors"), join_safetensors(&header, &data)).unwrap();
    to.to_path_buf()
}

/// Changes the config embedded in the weights (and the config.json beside them).
fn with_config(part: &str, to: &Path, change: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = edited_model(part, to, |header, _| {
        let text = header["__metadata__"]["config"].as_str().unwrap().to_string();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        change(&mut config);
        header["__metadata__"]["config"] = config.to_string().into();
    });
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    change(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn idx_bytes(dims: &[usize], data: &[u8]) -> Vec<u8> {
    dpar::data::idx::encode_idx(dims, data)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Rule 1: Every size a config or a flag sets is checked before the first allocation or thread:
/// a tokenizer declaring image_size 2^32 (a panic before) or 4096 (an allocation abort before),
/// in each of the three tokenizer commands, and `--world-size 1000`/`100000` (an abort and a
/// panic before).
#[test]
fn sizes_set_by_configs_and_flags_are_checked_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = common::mnist_dir().display().to_string();
    for size in [1u64 << 32, 4096] {
        let tok = with_config("tokenizer", &dir.path().join(format!("tok-{size}")), |c| {
            c["model"]["image_size"] = size.into();
        });
        let tok = tok.display().to_string();
        let codes = dir.path().join(format!("codes-{size}")).display().to_string();
        let png = dir.path().join(format!("r-{size}.png")).display().to_string();
        for cmd in [
            vec!["tokenizer", "eval", "--tokenizer", &tok, "--data", &mnist, "--max-images", "4"],
            vec![
                "tokenize",
                "--tokenizer",
                &tok,
                "--data",
                &mnist,
                "--split",
                "test",
                "--max-images",
                "4",
                "--out",
                &codes,
            ],
            vec!["tokenizer", "reconstruct", "--tokenizer", &tok, "--data", &mnist, "--n", "4", "--out", &png],
        ] {
            let (ok, text) = run_dpar(&cmd);
            assert!(!ok && text.contains("image_size") && text.contains("tok-"), "{cmd:?}: {text}");
            assert!(!text.contains("memory allocation"), "{cmd:?}: {text}");
        }
    }
    let (train, test) = synthetic_codes(dir.path());
    for ranks in ["1000", "100000"] {
        let out = dir.path().join(format!("ranks-{ranks}")).display().to_string();
        let mut flags = tiny_gpt_flags(&train, &test, &out, "2");
        flags.extend(["--world-size", ranks]);
        let t = std::time::Instant::now();
        let (ok, text) = run_dpar(&flags);
        assert!(!ok && text.contains("--world-size"), "{text}");
        assert!(t.elapsed().as_secs() < 20, "the check came after the ranks started: {text}");
    }
}

/// Rule 2: A file must be exactly what its header says: bytes after an IDX file's declared data,
/// raw or inside a gzip stream, a wrong gzip CRC and bytes after the gzip stream are errors, and
/// so is a streamed `.npz` entry whose CRC-32 does not match; a raw file larger than the memory
/// budget is refused before it is read, like a gzipped one.
#[test]
fn files_must_be_exactly_what_their_headers_say() {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        dpar::data::idx::read_idx(&path, 1).map(|a| a.data.len()).map_err(|e| e.to_string())
    };
    let labels = idx_bytes(&[4], &[0, 1, 2, 3]);
    assert_eq!(read("ok", labels.clone()), Ok(4));
    assert_eq!(read("ok.gz", gzip(&labels)), Ok(4));
    let err = read("trailing", [&labels[..], b"junk"].concat()).unwrap_err();
    assert!(err.contains("trailing") && err.contains("4 bytes after"), "{err}");
    let err = read("trailing-in.gz", gzip(&[&labels[..], b"junk"].concat())).unwrap_err();
    assert!(err.contains("trailing-in.gz") && err.contains("after the data"), "{err}");
    let err = read("trailing-out.gz", [gzip(&labels), b"junk".to_vec()].concat()).unwrap_err();
    assert!(err.contains("trailing-out.gz") && err.contains("after the gzip stream"), "{err}");
    let mut bad_crc = gzip(&labels);
    let at = bad_crc.len() - 8;
    bad_crc[at] ^= 0xff;
    let err = read("crc.gz", bad_crc).unwrap_err();
    assert!(err.contains("crc.gz") && err.contains("checksum"), "{err}");
    // A ZIP entry carries a CRC-32: a damaged image in a streamed `.npz` is found.
    let npz = dir.path().join("s.npz");
    let mut writer = dpar::data::npz::ImageNpzWriter::create(&npz, 2, 2, 2).unwrap();
    writer.push(&[7u8; 12]).unwrap();
    writer.push(&[9u8; 12]).unwrap();
    writer.finish().unwrap();
    let mut bytes = std::fs::read(&npz).unwrap();
    let at = bytes.windows(12).position(|w| w == [9u8; 12]).unwrap();
    bytes[at] = 8;
    std::fs::write(&npz, bytes).unwrap();
    let mut reader = dpar::data::npz::NpzReader::open(&npz).unwrap();
    let err = reader.for_each_image_batch("arr_0", 1, |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("s.npz") && err.contains("CRC-32"), "{err}");
    // The budget (DPAR_MEMORY_BUDGET) covers raw files too: a child process with a small one.
    let images = dir.path().join("big");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("train-images-idx3-ubyte"), idx_bytes(&[2000, 28, 28], &vec![0; 2000 * 784])).unwrap();
    std::fs::write(images.join("train-labels-idx1-ubyte"), idx_bytes(&[2000], &vec![0; 2000])).unwrap();
    let out = common::dpar()
        .args(["data", "info", "--data", images.to_str().unwrap()])
        .env("DPAR_MEMORY_BUDGET", "1000000")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("train-images-idx3-ubyte") && text.contains("memory budget"),
        "{text}"
    );
}

/// Rule 3: Contents that cannot be right are refused where they are loaded: weights whose bytes are
/// another dtype than their label (F16 labelled BF16), entropies that are negative, NaN or −∞,
/// a manifest that lists a shard twice or a shard of 0 images, and config keys nobody reads.
#[test]
fn implausible_contents_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let relabelled = edited_model("gpt", &dir.path().join("relabelled"), |header, _| {
        for (name, t) in header.as_object_mut().unwrap() {
            if name != "__metadata__" && t["dtype"] == "F16" {
                t["dtype"] = "BF16".into();
            }
        }
    });
    let out = dir.path().join("s").display().to_string();
    let (ok, text) = run_dpar(&["sample", "--ckpt", relabelled.to_str().unwrap(), "--per-class", "1", "--out", &out]);
    assert!(!ok && text.contains("relabelled") && text.contains("F16 labelled BF16"), "{text}");

    let (train, _) = synthetic_codes(dir.path());
    let shard_file = Path::new(&train).join("shard-00000.safetensors");
    let shard = dpar::data::shards::read_shard(&shard_file).unwrap();
    for (bad, what) in [(-1.0f32, "-1"), (f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let l = shard.info.seq_len();
        let entropy: Vec<f32> = (0..shard.len() * l)
            .map(|i| {
                if i % l == 0 {
                    f32::INFINITY
                } else if i == 5 {
                    bad
                } else {
                    1.0
                }
            })
            .collect();
        let e = dpar::entropy::ShardEntropies { entropy, entropy_flip: None, entropy_model_id: "m".into() };
        dpar::entropy::write(&shard_file, &shard, &e).unwrap();
        let err = dpar::entropy::read(&shard_file, &shard, None).unwrap_err().to_string();
        assert!(err.contains("entropy.safetensors") && err.contains(what) && err.contains("finite and ≥ 0"), "{err}");
    }

    let manifest = Path::new(&train).join(dpar::data::shards::MANIFEST);
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let mut twice = original.clone();
    let entry = twice["shards"][0].clone();
    twice["shards"].as_array_mut().unwrap().push(entry);
    twice["images"] = (original["images"].as_u64().unwrap() * 2).into();
    std::fs::write(&manifest, twice.to_string()).unwrap();
    let err = dpar::data::shards::read_shard_set(Path::new(&train)).unwrap_err().to_string();
    assert!(err.contains("manifest.json") && err.contains("twice"), "{err}");
    let mut empty = original.clone();
    empty["shards"][0]["images"] = 0.into();
    empty["images"] = 0.into();
    std::fs::write(&manifest, empty.to_string()).unwrap();
    let err = dpar::data::shards::read_shard_set(Path::new(&train)).unwrap_err().to_string();
    assert!(err.contains("manifest.json") && err.contains("0 images"), "{err}");

    // Unknown keys: in a weight file's embedded config, and in a --config file.
    let misspelt = with_config("gpt", &dir.path().join("misspelt"), |c| c["model"]["n_layers"] = 6.into());
    let (ok, text) = run_dpar(&["sample", "--ckpt", misspelt.to_str().unwrap(), "--per-class", "1", "--out", &out]);
    assert!(!ok && text.contains("misspelt") && text.contains("`model.n_layers`"), "{text}");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped("gpt").join("config.json")).unwrap()).unwrap();
    config["batchsize"] = 8.into();
    let file = dir.path().join("typo.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let (ok, text) = run_dpar(&["train", "--model", "gpt", "--config", file.to_str().unwrap(), "--out", &out]);
    assert!(!ok && text.contains("typo.json") && text.contains("`batchsize`"), "{text}");
}

/// Rule 4: `train --config FILE` trains on the file's `codes` and `val_codes` unless the flags name
/// others (it used to train on the flags' default, data/codes/train).
#[test]
fn train_config_uses_the_codes_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let first = dir.path().join("first").display().to_string();
    let (ok, text) = run_dpar(&tiny_gpt_flags(&train, &test, &first, "2"));
    assert!(ok, "{text}");
    // Run from a folder without data/codes: only the config knows where the shards are.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = Path::new(&first).join("config.json");
    let out = dir.path().join("second");
    let status = common::dpar()
        .current_dir(&elsewhere)
        .args(["train", "--model", "gpt", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let used: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((used["codes"].as_str().unwrap(), used["val_codes"].as_str().unwrap()), (train.as_str(), test.as_str()));
    // A flag still wins.
    let third = dir.path().join("third").display().to_string();
    let (ok, text) = run_dpar(&[
        "train",
        "--model",
        "gpt",
        "--config",
        config.to_str().unwrap(),
        "--val-codes",
        "none",
        "--out",
        &third,
    ]);
    assert!(ok, "{text}");
    let used: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&third).join("config.json")).unwrap()).unwrap();
    assert!(used["val_codes"].is_null(), "{used}");
}

/// Rule 5: Errors name the file or flag they are about, and their stated cause is the real one.
#[test]
fn errors_name_their_file_and_the_real_cause() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s").display().to_string();
    let sample =
        |ckpt: &Path| run_dpar(&["sample", "--ckpt", ckpt.to_str().unwrap(), "--per-class", "1", "--out", &out]);
    // An invalid embedded config (width 0).
    let zero = with_config("dpar", &dir.path().join("zero-width"), |c| c["model"]["dim"] = 0.into());
    let (ok, text) = sample(&zero);
    assert!(!ok && text.contains("zero-width") && text.contains("width 0"), "{text}");
    // A folder where the weights should be; an empty weight file.
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(folder.join("model.safetensors")).unwrap();
    let (ok, text) = sample(&folder);
    assert!(!ok && text.contains("model.safetensors") && text.contains("is a folder"), "{text}");
    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    let (ok, text) = run_dpar(&["sample", "--per-class", "1", "--tokenizer", empty.to_str().unwrap(), "--out", &out]);
    assert!(
        !ok && text.contains("empty.safetensors") && text.contains("empty") && !text.contains("is not the one"),
        "{text}"
    );
    // Weights without an embedded config and a broken config.json beside them.
    let broken = edited_model("gpt", &dir.path().join("broken-json"), |header, _| {
        header["__metadata__"].as_object_mut().unwrap().remove("config");
    });
    std::fs::write(broken.join("config.json"), "{ broken").unwrap();
    let (ok, text) = sample(&broken);
    assert!(!ok && text.contains("config.json") && text.contains("not a JSON config"), "{text}");
    // An IDX "file" that is a folder.
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(data.join("train-labels-idx1-ubyte"), idx_bytes(&[1], &[0])).unwrap();
    let (ok, text) = run_dpar(&["data", "info", "--data", data.to_str().unwrap()]);
    assert!(!ok && text.contains("train-images-idx3-ubyte: is a folder"), "{text}");
    // An entropy sidecar of the wrong dtype.
    let (train, _) = synthetic_codes(dir.path());
    let shard_file = Path::new(&train).join("shard-00000.safetensors");
    let shard = dpar::data::shards::read_shard(&shard_file).unwrap();
    let e = dpar::entropy::ShardEntropies {
        entropy: vec![f32::INFINITY; shard.len() * shard.info.seq_len()],
        entropy_flip: None,
        entropy_model_id: "m".into(),
    };
    dpar::entropy::write(&shard_file, &shard, &e).unwrap();
    let sidecar = dpar::data::shards::entropy_path(&shard_file);
    let (mut header, data) = split_safetensors(&std::fs::read(&sidecar).unwrap());
    header["entropy"]["dtype"] = "I32".into();
    std::fs::write(&sidecar, join_safetensors(&header, &data)).unwrap();
    let err = dpar::entropy::read(&shard_file, &shard, None).unwrap_err().to_string();
    assert!(err.contains("entropy.safetensors") && err.contains("I32"), "{err}");
    // --npz into a folder that cannot be made is reported against --npz, not --out.
    let (ok, text) = run_dpar(&["sample", "--per-class", "1", "--npz", "/proc/no/s.npz"]);
    assert!(!ok && text.contains("--npz /proc/no/s.npz") && !text.contains("--out"), "{text}");
    // A resumed run whose config.json is broken.
    let (train, test) = (train.clone(), Path::new(&train).with_file_name("test").display().to_string());
    let run = dir.path().join("run").display().to_string();
    assert!(run_dpar(&tiny_gpt_flags(&train, &test, &run, "2")).0);
    std::fs::write(Path::new(&run).join("config.json"), "{\"kind\": \"gpt\"").unwrap();
    let (ok, text) = run_dpar(&["train", "--model", "gpt", "--out", &run, "--resume", "--steps", "4"]);
    assert!(!ok && text.contains("config.json"), "{text}");
}

/// Rule 6: Read-only commands never write inside a model folder: `tokenizer eval` prints (and
/// writes `--json` where asked, naming the data it measured), `tokenizer reconstruct` writes to
/// `--out` in the working directory.
#[test]
fn read_only_commands_never_write_into_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(shipped("tokenizer").join(f), tok.join(f)).unwrap();
    }
    let listing = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = listing(&tok);
    let mnist = common::mnist_dir().display().to_string();
    let json = dir.path().join("eval.json");
    let (ok, text) = run_dpar(&[
        "tokenizer",
        "eval",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--data",
        &mnist,
        "--max-images",
        "8",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("8 images"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["data"].as_str().unwrap().contains("t10k-images") && report["images"] == 8, "{report}");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let status = common::dpar()
        .current_dir(&work)
        .args(["tokenizer", "reconstruct", "--tokenizer", tok.to_str().unwrap(), "--data", &mnist, "--n", "8"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(work.join("out/reconstruction.png").is_file());
    assert!(listing(&tok) == before, "the tokenizer's folder changed");
}

/// Rule 7: `--resume` on a finished run says so, exits 0 and leaves its log, weights and checkpoint
/// alone (it used to print NaN timings and append a second final line).
#[test]
fn resuming_a_finished_run_changes_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = synthetic_codes(dir.path());
    let run = dir.path().join("run").display().to_string();
    assert!(run_dpar(&tiny_gpt_flags(&train, &test, &run, "3")).0);
    let files = ["log.jsonl", "model.safetensors", "checkpoint.safetensors"];
    let read = || files.map(|f| std::fs::read(Path::new(&run).join(f)).unwrap());
    let before = read();
    let (ok, text) = run_dpar(&["train", "--model", "gpt", "--out", &run, "--resume"]);
    assert!(ok && text.contains("is finished") && text.contains("--steps N") && !text.contains("NaN"), "{text}");
    assert!(read() == before, "a finished run changed when resumed");
}
