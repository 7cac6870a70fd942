//! Counts the candle operations of one DPAR-B training step (forward and backward, packed,
//! batch 64, 16×16 codes, mean patch length 1.81) on the device-native path (`--ops stock`,
//! what a GPU runs) and on the fused CPU path. candle numbers every tensor it creates
//! consecutively (`Tensor::id`), so the ids taken before and after a pass count the tensors
//! that pass made: every op (views such as reshapes included, so an upper bound on kernel
//! launches). The count depends on the model's structure and the batch, not on the width, so
//! the model runs at width 64 (4 heads) and vocabulary 512 with DPAR-B's 1 + 8 + 3 layers.
//!
//! usage: cargo run --release --example count_ops [-- BATCH [forward]]   (`forward`: no backward)

use candle_core::{DType, Device, Tensor};
use dpar::dpar::model::GlobalLayout;
use dpar::dpar::{Dpar, DparConfig};
use dpar::nn::Ops;
use dpar::params::ParamStore;
use rand::Rng;

/// The number in a tensor id (`TensorId(123)`).
fn next_id() -> usize {
    let t = Tensor::zeros(1, DType::F32, &Device::Cpu).expect("a scalar");
    let text = format!("{:?}", t.id());
    text.trim_start_matches("TensorId(").trim_end_matches(')').parse().expect("TensorId(N)")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = std::env::args().nth(1).map(|b| b.parse()).transpose()?.unwrap_or(64);
    let backward = std::env::args().nth(2).as_deref() != Some("forward");
    let device = Device::Cpu;
    let lengths = dpar::bench::synthetic_lengths(16, batch, 1.81, 2)?;
    let patches: usize = lengths.iter().map(|l| l.len()).sum();
    let mut rng = dpar::util::rng_for(0, "count-ops", 0);
    let codes: Vec<u32> = (0..batch * 256).map(|_| rng.random_range(0..512u32)).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let codes = Tensor::from_vec(codes, (batch, 256), &device)?;
    let labels = Tensor::new(labels, &device)?;
    println!(
        "DPAR-B structure (1 + 8 + 3 layers) at width 64, batch {batch}, {patches} patches ({:.2} per image, mean length {:.2})",
        patches as f64 / batch as f64,
        (batch * 256) as f64 / patches as f64
    );
    for ops in [Ops::Stock, Ops::Fused] {
        let config = DparConfig::dpar_b().with(|c| {
            (c.dim, c.n_head, c.vocab_size, c.num_classes) = (64, 4, 512, 10);
            c.ops = ops;
        });
        let store = ParamStore::new(0, &device);
        let model = Dpar::new(&config, &store.root())?;
        let layout = model.layout(lengths.clone(), 256)?;
        let t0 = next_id();
        let loss = model.loss::<rand_chacha::ChaCha8Rng>(&codes, &labels, &layout, GlobalLayout::Packed, None)?;
        let t1 = next_id();
        if !backward {
            println!("{:<6} forward {:>7} ops", format!("{ops:?}").to_lowercase(), t1 - t0 - 1);
            continue;
        }
        let grads = loss.backward()?;
        let t2 = next_id();
        drop(grads);
        let (fwd, bwd) = (t1 - t0 - 1, t2 - t1 - 1);
        println!(
            "{:<6} forward {fwd:>7} ops, backward {bwd:>7} ops, step {:>7} ops",
            format!("{ops:?}").to_lowercase(),
            fwd + bwd
        );
    }
    Ok(())
}
