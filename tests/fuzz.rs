//! Fuzzing every loader: random bytes and mutations of valid files (bytes
//! overwritten, files cut short) fed to the IDX reader (raw and gzipped), image folders,
//! safetensors weights, PyTorch `.pt` files, configs, code shards, their manifests and entropy
//! sidecars. Each must return Ok or a typed error, never panic or abort.
//!
//! Cases per loader: `DPAR_FUZZ_CASES` (default 1000, what CI runs). The long run is
//! `DPAR_FUZZ_CASES=100000 cargo nextest run --release --test fuzz`.

use std::io::Write;
use std::path::Path;

use candle_core::Device;
use dpar::data::shards::{self, CodeShard, ShardInfo};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("DPAR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// A mutation of a valid file: some bytes overwritten, maybe cut short, or pure random bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Edit { edits: Vec<(usize, u8)>, cut: Option<usize> },
    Random(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), prop::option::of(any::<usize>()))
            .prop_map(|(edits, cut)| Mutation::Edit { edits, cut }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Mutation::Random),
    ]
}

impl Mutation {
    fn apply(&self, valid: &[u8]) -> Vec<u8> {
        match self {
            Mutation::Random(bytes) => bytes.clone(),
            Mutation::Edit { edits, cut } => {
                let mut out = valid.to_vec();
                if out.is_empty() {
                    return out;
                }
                // Most edits land in the first bytes, where the headers are.
                for &(pos, byte) in edits {
                    let limit = if pos % 2 == 0 { out.len().min(64) } else { out.len() };
                    let i = pos % limit;
                    out[i] = byte;
                }
                if let Some(c) = cut {
                    out.truncate(c % (out.len() + 1));
                }
                out
            }
        }
    }
}

/// Runs `check` on `cases()` mutations of `valid`; a panic inside fails the test with the
/// offending input (proptest shrinks it).
fn fuzz(name: &str, valid: &[u8], check: impl Fn(&[u8])) {
    fuzz_n(name, valid, cases(), check)
}

fn fuzz_n(name: &str, valid: &[u8], cases: u32, check: impl Fn(&[u8])) {
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&mutation(), |m| {
        let bytes = m.apply(valid);
        check(&bytes);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {cases} cases, no panic");
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn idx_bytes() -> Vec<u8> {
    dpar::data::idx::encode_idx(&[3, 4, 5], &(0..60).map(|i| i as u8).collect::<Vec<_>>())
}

#[test]
fn idx_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x-images-idx3-ubyte");
    fuzz("IDX", &idx_bytes(), |b| {
        let _ = dpar::data::idx::parse_idx(&path, b, 3);
        let _ = dpar::data::idx::parse_idx(&path, b, 1);
    });
}

#[test]
fn gzip_idx_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x-images-idx3-ubyte.gz");
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let valid = idx_bytes();
    // Mutations of the compressed stream, and valid gzip around mutated IDX bytes (huge
    // declared sizes included).
    fuzz("gzip IDX (compressed bytes)", &gz(&valid), |b| {
        write(&path, b);
        let _ = dpar::data::idx::read_idx(&path, 3);
    });
    fuzz("gzip IDX (content)", &valid, |b| {
        write(&path, &gz(b));
        let _ = dpar::data::idx::read_idx(&path, 3);
    });
}

#[test]
fn image_folder_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("a");
    std::fs::create_dir_all(&class).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_pixel(5, 3, image::Rgb([10, 200, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let path = class.join("x.png");
    fuzz("image folder (PNG)", &png, |b| {
        write(&path, b);
        let _ = dpar::data::folder::load_image_folder(dir.path(), 8, 1);
    });
}

fn tiny_gpt_file(dir: &Path) -> Vec<u8> {
    let config = dpar::gpt::GptConfig::mnist().with(|it| {
        it.dim = 16;
        it.n_layer = 1;
        it.n_head = 1;
        it.vocab_size = 6;
        it.num_classes = 3;
        it.grid_size = 2;
    });
    let store = dpar::params::ParamStore::new(0, &Device::Cpu);
    dpar::gpt::Gpt::new(&config, &store.root()).unwrap();
    let meta =
        [("config".to_string(), serde_json::json!({"kind": "gpt", "model": config}).to_string())].into_iter().collect();
    let path = dir.join("valid.safetensors");
    store.save(&path, &meta).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn safetensors_weights_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let valid = tiny_gpt_file(dir.path());
    let path = dir.path().join("model.safetensors");
    fuzz("safetensors weights", &valid, |b| {
        let _ = dpar::tensor_io::read_safetensors_bytes(&path, b, &Device::Cpu);
        write(&path, b);
        let _ = dpar::tensor_io::read_safetensors_metadata(&path);
        let _ = dpar::gpt::load(&path, None, &Device::Cpu);
    });
}

#[test]
fn pytorch_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = dir.path().join("m.pt");
    // A 3 KB checkpoint (tests/fixtures/make_tiny_pt.py) for the full count, and the 397 KB
    // VQ-16 layout for a twentieth of it.
    let tiny = std::fs::read(fixtures.join("tiny.pt")).unwrap();
    fuzz(".pt (tiny)", &tiny, |b| {
        write(&path, b);
        let _ = dpar::tensor_io::read_weights(&path, &Device::Cpu, Some("model"));
    });
    let vq = std::fs::read(fixtures.join("vq16_tiny.pt")).unwrap();
    fuzz_n(".pt (VQ-16 layout)", &vq, (cases() / 20).max(50), |b| {
        write(&path, b);
        let _ = dpar::tensor_io::read_weights(&path, &Device::Cpu, Some("model"));
    });
    // The legacy (pre-1.6, not zip) format has its own reader.
    let legacy = std::fs::read(fixtures.join("pt-names/legacy.pt")).unwrap();
    fuzz(".pt (legacy format)", &legacy, |b| {
        write(&path, b);
        let _ = dpar::tensor_io::read_weights(&path, &Device::Cpu, Some("model"));
    });
}

/// What the long fuzz run found: one byte (0x80) at this place of the VQ-16 checkpoint made
/// candle's pickle reader panic ("removal index (is 4) should be < len (is 4)"). It is an error
/// naming the file now.
#[test]
fn the_pt_file_the_fuzzer_found_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let valid = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vq16_tiny.pt")).unwrap();
    let bad = Mutation::Edit { edits: vec![(6449533152911135153, 128)], cut: None }.apply(&valid);
    let path = dir.path().join("found.pt");
    write(&path, &bad);
    let err = dpar::tensor_io::read_weights(&path, &Device::Cpu, Some("model")).unwrap_err().to_string();
    assert!(err.contains("found.pt") && err.contains("damaged"), "{err}");
}

#[test]
fn configs_never_panic() {
    let gpt = serde_json::to_vec(&dpar::gpt::GptConfig::mnist()).unwrap();
    fuzz("GPT config", &gpt, |b| {
        if let Ok(c) = serde_json::from_slice::<dpar::gpt::GptConfig>(b) {
            let _ = c.validate();
        }
    });
    let dpar_config = serde_json::to_vec(&dpar::dpar::DparConfig::mnist()).unwrap();
    fuzz("DPAR config", &dpar_config, |b| {
        if let Ok(c) = serde_json::from_slice::<dpar::dpar::DparConfig>(b) {
            let _ = c.validate();
        }
    });
    let vq = serde_json::to_vec(&dpar::tokenizer::VqConfig::mnist()).unwrap();
    fuzz("tokenizer config", &vq, |b| {
        if let Ok(c) = serde_json::from_slice::<dpar::tokenizer::VqConfig>(b) {
            let _ = c.validate();
        }
    });
}

/// Structured config fuzzing: valid configs with some fields set to extreme or degenerate
/// values (0, huge, negative, fractional, NaN-like null), which must parse to an error or
/// validate to Ok or an error without panicking (checked arithmetic on absurd sizes).
fn config_values<T: serde::Serialize + serde::de::DeserializeOwned>(name: &str, valid: &T, validate: impl Fn(&T)) {
    let base = serde_json::to_value(valid).unwrap();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    let values = [
        serde_json::json!(0),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(u32::MAX),
        serde_json::json!(u64::MAX),
        serde_json::json!(1u64 << 62),
        serde_json::json!(-1),
        serde_json::json!(0.5),
        serde_json::json!(1e300),
        serde_json::json!(-1e-300),
        serde_json::json!(null),
        serde_json::json!([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]),
        serde_json::json!([u32::MAX, u32::MAX]),
    ];
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let strategy = prop::collection::vec((0..keys.len(), 0..values.len()), 1..5);
    let result = runner.run(&strategy, |edits| {
        let mut v = base.clone();
        for &(k, val) in &edits {
            v[&keys[k]] = values[val].clone();
        }
        if let Ok(c) = serde_json::from_value::<T>(v) {
            validate(&c);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {} cases, no panic", cases());
}

#[test]
fn extreme_config_values_never_panic() {
    config_values("GPT config values", &dpar::gpt::GptConfig::mnist(), |c| {
        let _ = c.validate();
    });
    config_values("DPAR config values", &dpar::dpar::DparConfig::mnist(), |c| {
        let _ = c.validate();
    });
    config_values("tokenizer config values", &dpar::tokenizer::VqConfig::mnist(), |c| {
        let _ = c.validate();
    });
}

fn tiny_shard() -> CodeShard {
    CodeShard {
        info: ShardInfo {
            grid_size: 2,
            codebook_size: 6,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            tokenizer_id: "t".into(),
        },
        codes: (0..20).map(|i| (i % 6) as u32).collect(),
        labels: vec![0, 1, 2, 0, 1],
        flip_codes: Some((0..20).map(|i| (5 - i % 6) as u32).collect()),
    }
}

#[test]
fn code_shards_manifests_and_entropy_sidecars_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    let shard = tiny_shard();
    let files = shards::write_shard_set(&set, std::slice::from_ref(&shard), false).unwrap();
    let entropies = dpar::entropy::ShardEntropies {
        entropy: (0..20).map(|i| if i % 4 == 0 { f32::INFINITY } else { i as f32 / 10.0 }).collect(),
        entropy_flip: Some((0..20).map(|i| if i % 4 == 0 { f32::INFINITY } else { 0.5 }).collect()),
        entropy_model_id: "e".into(),
    };
    dpar::entropy::write(&files[0], &shard, &entropies).unwrap();
    let shard_bytes = std::fs::read(&files[0]).unwrap();
    let manifest_bytes = std::fs::read(set.join(shards::MANIFEST)).unwrap();
    let sidecar = shards::entropy_path(&files[0]);
    let sidecar_bytes = std::fs::read(&sidecar).unwrap();

    fuzz("code shard", &shard_bytes, |b| {
        write(&files[0], b);
        let _ = shards::read_shard(&files[0]);
        let _ = shards::read_shard_set(&set);
    });
    write(&files[0], &shard_bytes);
    fuzz("shard-set manifest", &manifest_bytes, |b| {
        write(&set.join(shards::MANIFEST), b);
        let _ = shards::read_shard_set(&set);
    });
    write(&set.join(shards::MANIFEST), &manifest_bytes);
    fuzz("entropy sidecar", &sidecar_bytes, |b| {
        write(&sidecar, b);
        let _ = dpar::entropy::read(&files[0], &shard, None);
        let _ = dpar::entropy::read_set(&set, Some("e"));
    });
    // The unmutated files still read back.
    write(&sidecar, &sidecar_bytes);
    assert!(dpar::entropy::read_set(&set, Some("e")).is_ok());
}
