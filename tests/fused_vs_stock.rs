//! Training with our fused kernels follows the same loss curve as with candle's stock ops.

use candle_core::Device;
use dpar::data::shards::{CodeShard, ShardInfo};
use dpar::gpt::train::{GptTask, GptTrainConfig};
use dpar::gpt::GptConfig;
use dpar::nn::Ops;
use dpar::train::{LoopConfig, Task};

fn shard() -> CodeShard {
    use rand::Rng;
    let mut rng = dpar::util::rng_for(3, "fvs", 0);
    let n = 32;
    CodeShard {
        info: ShardInfo {
            grid_size: 8,
            codebook_size: 16,
            num_classes: 4,
            class_names: (0..4).map(|c| c.to_string()).collect(),
            tokenizer_id: "t".into(),
        },
        codes: (0..n * 64).map(|k| if k % 5 == 0 { rng.random_range(0..16) } else { ((k / 64) % 4) as u32 }).collect(),
        labels: (0..n).map(|i| (i % 4) as u32).collect(),
        flip_codes: None,
    }
}

fn losses(ops: Ops, kind: &str) -> Vec<f64> {
    let model = GptConfig::mnist().with(|it| {
        it.dim = 64;
        it.n_layer = 2;
        it.n_head = 4;
        it.ffn_hidden = Some(96);
        it.vocab_size = 16;
        it.num_classes = 4;
        it.grid_size = 8;
        it.ops = ops;
    });
    let config = GptTrainConfig {
        kind: kind.into(),
        model: if kind == "entropy" {
            model.with(|it| {
                it.cls_token_num = 0;
                it.class_dropout = 0.0;
            })
        } else {
            model
        },
        seed: 1,
        batch_size: 8,
        codes: "x".into(),
        val_codes: None,
        val_images: 8,
        use_flip: false,
        tokenizer_id: "t".into(),
        train: LoopConfig {
            steps: 8,
            adamw: dpar::optim::AdamWConfig { lr: 3e-3, ..Default::default() },
            ..Default::default()
        },
    };
    let mut task = GptTask::new(config, shard(), None, &Device::Cpu).unwrap();
    let mut opt =
        dpar::optim::AdamW::new(task.params().vars(), dpar::optim::AdamWConfig { lr: 3e-3, ..Default::default() })
            .unwrap();
    (0..8)
        .map(|step| {
            let out = task.step_loss(step).unwrap();
            let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
            let grads = out.loss.backward().unwrap();
            opt.step(&grads).unwrap();
            loss
        })
        .collect()
}

/// Same seed, same data, same dropout masks: the losses of 8 steps agree to 1e-4 relative
/// (f32 summation order differs between the kernels).
#[test]
fn fused_training_follows_the_stock_loss_curve() {
    for kind in ["gpt", "entropy"] {
        let fused = losses(Ops::Fused, kind);
        let stock = losses(Ops::Stock, kind);
        for (step, (a, b)) in fused.iter().zip(&stock).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind} step {step}: fused {a} vs stock {b}");
        }
        assert!(fused.last().unwrap() < &fused[0], "{kind}: loss did not fall: {fused:?}");
    }
}
