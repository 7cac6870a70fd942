//! Data parallelism: 2 ranks × batch b end where 1 rank × batch 2b ends; gradient accumulation
//! of 2 × b equals one batch of 2b. (Dropout off: with dropout each part draws its own masks.)

use std::time::Duration;

use candle_core::Device;
use dpar::data::shards::{CodeShard, ShardInfo};
use dpar::dist::{Single, ThreadGroup};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;
use dpar::train::{run_parallel, LoopConfig, Task};

fn shard() -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(9, "dist", 0);
    let n = 48;
    let codes: Vec<u32> =
        (0..n * 16).map(|k| if k % 4 == 0 { rng.random_range(0..8) } else { ((k / 16) % 3) as u32 }).collect();
    let flip = codes.iter().rev().copied().collect();
    CodeShard {
        info: ShardInfo {
            grid_size: 4,
            codebook_size: 8,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            tokenizer_id: "t".into(),
        },
        codes,
        labels: (0..n).map(|i| (i % 3) as u32).collect(),
        flip_codes: Some(flip),
    }
}

fn config(batch: usize) -> GptTrainConfig {
    GptTrainConfig {
        kind: "gpt".into(),
        model: GptConfig::mnist().with(|it| {
            it.dim = 32;
            it.n_layer = 2;
            it.n_head = 2;
            it.ffn_hidden = Some(48);
            it.vocab_size = 8;
            it.num_classes = 3;
            it.grid_size = 4;
            it.token_dropout = 0.0;
            it.resid_dropout = 0.0;
            it.ffn_dropout = 0.0;
            it.class_dropout = 0.0;
        }),
        seed: 4,
        batch_size: batch,
        codes: "x".into(),
        val_codes: None,
        val_images: 8,
        use_flip: true,
        tokenizer_id: "t".into(),
        train: LoopConfig {
            steps: 6,
            log_every: 3,
            checkpoint_every: 6,
            adamw: dpar::optim::AdamWConfig { lr: 3e-3, ..Default::default() },
            ..Default::default()
        },
    }
}

fn params(task: &GptTask) -> Vec<f32> {
    task.params()
        .vars()
        .into_iter()
        .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Largest |a − b| relative to the parameter scale (the largest |parameter|): Adam turns
/// f32 rounding differences of tiny gradients into updates of up to one learning rate, so an
/// element-wise relative tolerance would be meaningless for near-zero parameters.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

fn single(batch: usize, accum: usize, dir: &std::path::Path) -> Vec<f32> {
    let c = config(batch);
    let mut task = GptTask::new(c.clone(), shard(), None, &Device::Cpu).unwrap();
    run_parallel(&mut task, &c.train, dir, false, &Single, accum).unwrap();
    params(&task)
}

#[test]
fn two_thread_ranks_match_one_rank_with_the_double_batch() {
    let dir = tempfile::tempdir().unwrap();
    let reference = single(8, 1, &dir.path().join("one"));
    let c = config(8);
    let out = dir.path().join("two");
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2, Duration::from_secs(120))
            .into_iter()
            .map(|rank| {
                let (c, out) = (c.clone(), out.clone());
                s.spawn(move || {
                    let mut task = GptTask::new(c.clone(), shard(), None, &Device::Cpu).unwrap();
                    run_parallel(&mut task, &c.train, &out, false, &rank, 1).unwrap();
                    params(&task)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Both ranks hold identical parameters, equal to the single-rank run within f32 tolerance.
    assert_eq!(results[0], results[1]);
    let d = max_rel_diff(&results[0], &reference);
    assert!(d < 1e-4, "max relative difference {d}");
    assert!(out.join("checkpoint.safetensors").is_file(), "rank 0 writes the checkpoint");
}

#[test]
fn gradient_accumulation_of_two_halves_equals_the_full_batch() {
    let dir = tempfile::tempdir().unwrap();
    let full = single(8, 1, &dir.path().join("full"));
    let accum = single(8, 2, &dir.path().join("accum"));
    let d = max_rel_diff(&full, &accum);
    assert!(d < 1e-4, "max relative difference {d}");
    // A batch that does not split evenly is a clear error.
    let c = config(6);
    let mut task = GptTask::new(c.clone(), shard(), None, &Device::Cpu).unwrap();
    let err = run_parallel(&mut task, &c.train, &dir.path().join("bad"), false, &Single, 4).unwrap_err().to_string();
    assert!(err.contains("cannot be split into 4 equal parts"), "{err}");
}
