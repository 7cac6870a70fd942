//! Training batches and their randomness, shared by every model's task (GPT, entropy model,
//! DPAR): which images a step draws, their flip copies, the per-step noise RNG, dropout noise
//! and class dropout. Every choice is a pure function of `(seed, step)` (and the part of a split
//! batch), so a resumed run draws exactly what the uninterrupted one would have.

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::data::shards::CodeShard;
use crate::train::{BatchSampler, Part};

/// Training randomness for one forward pass (dropout and class dropout draw from it).
pub struct TrainNoise<'a, R: Rng> {
    pub rng: &'a mut R,
}

/// Class dropout: each label becomes the null class `null` with probability `p` (drawn from
/// the noise RNG), so the model also learns the unconditional distribution guidance needs.
pub fn drop_classes<R: Rng>(
    labels: &Tensor,
    p: f64,
    null: u32,
    noise: &mut TrainNoise<'_, R>,
) -> candle_core::Result<Tensor> {
    let dropped: Vec<u32> =
        labels.to_vec1::<u32>()?.into_iter().map(|y| if noise.rng.random::<f64>() < p { null } else { y }).collect();
    Tensor::new(dropped, labels.device())
}

/// A batch of codes (B, L) and labels (B) from a shard; `flips[i]` selects the flip copy.
pub fn batch_tensors(
    shard: &CodeShard,
    indices: &[usize],
    flips: &[bool],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let l = shard.info.seq_len();
    let mut codes = Vec::with_capacity(indices.len() * l);
    for (&i, &flip) in indices.iter().zip(flips) {
        codes.extend_from_slice(shard.codes_of(i, flip));
    }
    let labels: Vec<u32> = indices.iter().map(|&i| shard.labels[i]).collect();
    Ok((Tensor::from_vec(codes, (indices.len(), l), device)?, Tensor::new(labels, device)?))
}

/// The images of one training step: dataset indices and, per image, whether its flip copy is
/// used. A pure function of `(seed, step)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepImages {
    pub indices: Vec<usize>,
    pub flips: Vec<bool>,
}

/// Draws step `step`'s images: the sampler's batch, and a flip choice per image when `use_flip`.
pub fn step_images(sampler: &mut BatchSampler, shard: &CodeShard, use_flip: bool, seed: u64, step: u64) -> StepImages {
    let indices = sampler.indices(step);
    let flips = flip_choices(shard, use_flip, indices.len(), seed, step);
    StepImages { indices, flips }
}

/// Refuses `use_flip` on shards that hold no flip copy (instead of silently training without).
pub fn check_flip(shard: &CodeShard, use_flip: bool, what: &str) -> std::result::Result<(), String> {
    if use_flip && shard.flip_codes.is_none() {
        return Err(format!("{what}: flips were asked for (--flip / use_flip), but the shards hold no flip copy; tokenize with `dpar tokenize --flip`, or train without --flip"));
    }
    Ok(())
}

/// Per-image flip choices for a step (all `false` unless `use_flip` and the shards hold a copy).
pub fn flip_choices(shard: &CodeShard, use_flip: bool, n: usize, seed: u64, step: u64) -> Vec<bool> {
    if use_flip && shard.flip_codes.is_some() {
        let mut rng = crate::util::rng_for(seed, "flip", step);
        (0..n).map(|_| rng.random::<bool>()).collect()
    } else {
        vec![false; n]
    }
}

/// The RNG of a step's dropout and class-dropout draws. One process uses one stream per step;
/// each part of a split batch (ranks × micro-batches) has its own stream, so with dropout the
/// split run is a statistically equivalent, not bit-identical, version of the single one.
pub fn noise_rng(seed: u64, step: u64, part: Part) -> rand_chacha::ChaCha8Rng {
    if part.count == 1 {
        crate::util::rng_for(seed, "noise", step)
    } else {
        crate::util::rng_for(seed, &format!("noise-{}-of-{}", part.index, part.count), step)
    }
}
