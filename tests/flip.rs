//! The flip copy is a dataset choice: training uses it only when the config asks for it
//! (`use_flip`, `dpar train --flip`), the choice per image is seeded, and asking for it on shards
//! without a copy is an error rather than a silent no-op. Checked for the baseline and for DPAR.

use candle_core::Device;
use dpar::data::shards::{CodeShard, ShardInfo};
use dpar::dpar::train::{DparTask, DparTrainConfig, EntropyCodes};
use dpar::dpar::DparConfig;
use dpar::entropy::ShardEntropies;
use dpar::gpt::train::{batch_tensors, GptTask, GptTrainConfig, StepImages};
use dpar::gpt::GptConfig;
use dpar::train::LoopConfig;

const N: usize = 40;
const BATCH: usize = 8;
const STEPS: u64 = 20;

/// Original codes lie in 0..4 and flip codes in 4..8, so every code tells which copy it is from.
fn shard(with_flip: bool) -> CodeShard {
    let codes: Vec<u32> = (0..N * 16).map(|k| ((k * 7 + k / 16) % 4) as u32).collect();
    let flip = codes.iter().map(|c| c + 4).collect();
    CodeShard {
        info: ShardInfo {
            grid_size: 4,
            codebook_size: 8,
            num_classes: 2,
            class_names: vec!["a".into(), "b".into()],
            tokenizer_id: "t".into(),
        },
        codes,
        labels: (0..N).map(|i| (i % 2) as u32).collect(),
        flip_codes: with_flip.then_some(flip),
    }
}

fn gpt_config(use_flip: bool) -> GptTrainConfig {
    GptTrainConfig {
        kind: "gpt".into(),
        model: GptConfig::mnist().with(|it| {
            it.dim = 16;
            it.n_layer = 1;
            it.n_head = 1;
            it.ffn_hidden = Some(32);
            it.vocab_size = 8;
            it.num_classes = 2;
            it.grid_size = 4;
        }),
        seed: 11,
        batch_size: BATCH,
        codes: "synthetic".into(),
        val_codes: None,
        val_images: 4,
        use_flip,
        tokenizer_id: "t".into(),
        train: LoopConfig { steps: STEPS, ..Default::default() },
    }
}

fn entropy_codes(with_flip: bool) -> EntropyCodes {
    let shard = shard(with_flip);
    let entropy: Vec<f32> = (0..N * 16).map(|k| (k % 5) as f32).collect();
    let entropies = ShardEntropies {
        entropy_flip: with_flip.then(|| entropy.iter().map(|h| 4.0 - h).collect()),
        entropy,
        entropy_model_id: "e".into(),
    };
    EntropyCodes { shard, entropies }
}

fn dpar_config(use_flip: bool) -> DparTrainConfig {
    let mut model = DparConfig::mnist().with(|it| {
        it.dim = 32;
        it.n_head = 2;
        it.encoder_layers = 1;
        it.global_layers = 1;
        it.decoder_layers = 1;
        it.ffn_hidden = Some(48);
        it.vocab_size = 8;
        it.num_classes = 2;
        it.grid_size = 4;
    });
    model.patch.threshold = 2.5;
    DparTrainConfig {
        kind: "dpar".into(),
        model,
        seed: 11,
        batch_size: BATCH,
        codes: "synthetic".into(),
        val_codes: None,
        val_images: 4,
        use_flip,
        tokenizer_id: "t".into(),
        entropy_model_id: "e".into(),
        train: LoopConfig { steps: STEPS, ..Default::default() },
    }
}

/// Checks the codes a step trains on against its flip choices and returns how many flip copies
/// were used.
fn check_step(data: &CodeShard, images: &StepImages) -> usize {
    let (codes, _) = batch_tensors(data, &images.indices, &images.flips, &Device::Cpu).unwrap();
    let rows = codes.to_vec2::<u32>().unwrap();
    for ((row, &i), &flip) in rows.iter().zip(&images.indices).zip(&images.flips) {
        assert_eq!(row.as_slice(), data.codes_of(i, flip), "image {i}");
        assert!(
            row.iter().all(|&c| (c >= 4) == flip),
            "image {i}: codes {row:?} are not all from the {} copy",
            if flip { "flip" } else { "original" }
        );
    }
    images.flips.iter().filter(|&&f| f).count()
}

#[test]
fn the_baseline_trains_on_flip_copies_only_when_asked_and_the_choice_is_seeded() {
    let data = shard(true);
    for use_flip in [false, true] {
        let mut task = GptTask::new(gpt_config(use_flip), data.clone(), None, &Device::Cpu).unwrap();
        let mut again = GptTask::new(gpt_config(use_flip), data.clone(), None, &Device::Cpu).unwrap();
        let mut flips = 0;
        for step in (0..STEPS).rev() {
            let images = task.step_images(step);
            assert_eq!(images, again.step_images(step), "step {step}: the choice must be a function of (seed, step)");
            flips += check_step(&data, &images);
        }
        let draws = (STEPS as usize) * BATCH;
        if use_flip {
            assert!(flips > draws / 4 && flips < 3 * draws / 4, "{flips} flip copies in {draws} draws");
        } else {
            assert_eq!(flips, 0, "use_flip is off, yet {flips} flip copies were used");
        }
    }
}

#[test]
fn dpar_trains_on_flip_copies_only_when_asked_and_the_choice_is_seeded() {
    let data = entropy_codes(true);
    for use_flip in [false, true] {
        let mut task = DparTask::new(dpar_config(use_flip), data.clone(), None, &Device::Cpu).unwrap();
        let mut again = DparTask::new(dpar_config(use_flip), data.clone(), None, &Device::Cpu).unwrap();
        let mut flips = 0;
        for step in 0..STEPS {
            let images = task.step_images(step);
            assert_eq!(images, again.step_images(step));
            flips += check_step(&data.shard, &images);
        }
        let draws = (STEPS as usize) * BATCH;
        if use_flip {
            assert!(flips > draws / 4 && flips < 3 * draws / 4, "{flips} flip copies in {draws} draws");
        } else {
            assert_eq!(flips, 0);
        }
    }
}

#[test]
fn asking_for_flips_on_shards_without_a_flip_copy_is_an_error() {
    let err =
        GptTask::new(gpt_config(true), shard(false), None, &Device::Cpu).err().expect("must be refused").to_string();
    assert!(err.contains("flip") && err.contains("synthetic"), "{err}");
    let err = DparTask::new(dpar_config(true), entropy_codes(false), None, &Device::Cpu)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(err.contains("no flip copy"), "{err}");
    // Without the request the same shards train normally.
    assert!(GptTask::new(gpt_config(false), shard(false), None, &Device::Cpu).is_ok());
}
