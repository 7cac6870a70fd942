//! MPI data parallelism on loopback: `mpirun -n 2 dpar train` with batch 2b ends where one
//! process with batch 2b ends. Built only with `--features mpi` (see .ci/run); needs OpenMPI's
//! `mpirun` on the PATH.
#![cfg(feature = "mpi")]

mod common;

use candle_core::Device;
use dpar::data::shards::{write_shard_set, CodeShard, ShardInfo};

fn shard() -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(11, "mpi", 0);
    let n = 64;
    CodeShard {
        info: ShardInfo {
            grid_size: 4,
            codebook_size: 8,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            tokenizer_id: "t".into(),
        },
        codes: (0..n * 16).map(|k| if k % 3 == 0 { rng.random_range(0..8) } else { ((k / 16) % 3) as u32 }).collect(),
        labels: (0..n).map(|i| (i % 3) as u32).collect(),
        flip_codes: None,
    }
}

#[test]
fn two_mpi_ranks_match_one_process_with_the_double_batch() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).display().to_string();
    write_shard_set(&dir.path().join("codes"), &[shard()], false).unwrap();
    let config = serde_json::json!({
        "kind": "gpt",
        "model": dpar::gpt::GptConfig::mnist().with(|it| { it.dim = 32; it.n_layer = 2; it.n_head = 2; it.ffn_hidden = Some(48); it.vocab_size = 8; it.num_classes = 3; it.grid_size = 4; it.token_dropout = 0.0; it.resid_dropout = 0.0; it.ffn_dropout = 0.0; it.class_dropout = 0.0; }),
        "seed": 2, "batch_size": 8, "codes": "x", "val_codes": null, "val_images": 8, "use_flip": false, "tokenizer_id": "t",
        "train": dpar::train::LoopConfig { steps: 5, log_every: 1, checkpoint_every: 5, ..Default::default() },
    });
    std::fs::write(dir.path().join("exp.json"), config.to_string()).unwrap();
    let bin = env!("CARGO_BIN_EXE_dpar");
    let args = |out: &str| {
        vec![
            "train".to_string(),
            "--config".into(),
            p("exp.json"),
            "--codes".into(),
            p("codes"),
            "--val-codes".into(),
            "none".into(),
            "--out".into(),
            p(out),
        ]
    };
    let one = std::process::Command::new(bin).args(args("one")).output().unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let two = std::process::Command::new("mpirun")
        .args(["-n", "2", "--oversubscribe", "--allow-run-as-root", bin])
        .args(args("two"))
        .env("OMPI_MCA_btl", "self,tcp")
        .output()
        .expect("mpirun (OpenMPI) must be installed for this test");
    let log = format!("{}{}", String::from_utf8_lossy(&two.stdout), String::from_utf8_lossy(&two.stderr));
    assert!(two.status.success(), "{log}");
    assert!(log.contains("rank 1 of 2 (mpi backend)"), "{log}");
    let load = |run: &str| {
        let file =
            dpar::tensor_io::read_safetensors(&dir.path().join(run).join("model.safetensors"), &Device::Cpu).unwrap();
        let mut names: Vec<_> = file.tensors.keys().cloned().collect();
        names.sort();
        names
            .iter()
            .flat_map(|n| file.tensors[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<f32>>()
    };
    let (a, b) = (load("one"), load("two"));
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
    eprintln!("MPI 2 ranks vs 1 process: max |Δparam| / max |param| = {diff:e}");
    assert!(diff < 1e-4, "{diff}");
}
