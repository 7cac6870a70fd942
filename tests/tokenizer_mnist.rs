//! The tokenizer on real digits: a few hundred steps on a small MNIST subset lower the
//! reconstruction loss, and the trained tokenizer writes code shards that read back intact.

mod common;

use candle_core::Device;
use dpar::data::{self, shards};
use dpar::optim::AdamWConfig;
use dpar::tokenizer::train::{evaluate, Tokenizer, TokenizerTask, TokenizerTrainConfig};
use dpar::tokenizer::VqConfig;
use dpar::train::LoopConfig;

#[test]
fn a_few_hundred_steps_on_mnist_lower_the_reconstruction_loss_and_shards_round_trip() {
    let dir = common::mnist_dir();
    let preset = VqConfig::mnist();
    let train =
        data::load(&data::resolve(&dir, "train").unwrap(), preset.image_size, preset.in_channels).unwrap().take(512);
    let test =
        data::load(&data::resolve(&dir, "test").unwrap(), preset.image_size, preset.in_channels).unwrap().take(64);
    assert_eq!((train.height, train.width, train.channels), (32, 32, 1));

    let config = TokenizerTrainConfig {
        kind: "tokenizer".into(),
        model: preset.clone(),
        seed: 1,
        batch_size: 8,
        restart_every: 50,
        data: "mnist subset".into(),
        train_images: train.len(),
        train: LoopConfig {
            steps: 200,
            adamw: AdamWConfig { lr: 1e-3, weight_decay: 0.0, ..Default::default() },
            log_every: 50,
            checkpoint_every: 200,
            ..Default::default()
        },
    };
    let out = tempfile::tempdir().unwrap();
    let mut task = TokenizerTask::new(config.clone(), train.clone(), None, &Device::Cpu).unwrap();
    let before = evaluate(task.model(), &test, 64, &Device::Cpu).unwrap();
    dpar::train::run(&mut task, &config.train, out.path(), false).unwrap();
    let after = evaluate(task.model(), &test, 64, &Device::Cpu).unwrap();
    assert!(after.mse < 0.3 * before.mse, "held-out MSE {} -> {}", before.mse, after.mse);
    assert!(after.psnr > 15.0, "held-out PSNR {}", after.psnr);

    let tok = Tokenizer::load(out.path(), None, &Device::Cpu).unwrap();
    let shard = tok.tokenize(&test, true, 32, &Device::Cpu, |_| {}).unwrap();
    shards::write_shard_set(&out.path().join("codes"), std::slice::from_ref(&shard), false).unwrap();
    let (back, _) = shards::read_shard_set(&out.path().join("codes")).unwrap();
    assert_eq!(back, shard);
    assert_eq!(back.info.grid_size, 16);
    assert_eq!(back.codes.len(), 64 * 256);
    assert_eq!(back.labels, test.labels);
    // Decoding the stored codes gives the evaluated reconstruction quality.
    let codes = candle_core::Tensor::from_slice(&back.codes[..4 * 256], (4, 256), &Device::Cpu).unwrap();
    let images = tok.decode(&codes).unwrap();
    assert_eq!(images.dims(), &[4, 1, 32, 32]);
}
