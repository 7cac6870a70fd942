//! Writes InceptionV3 stand-in weights (deterministic, untrained; see
//! `dpar::eval::inception::stand_in`) as a safetensors file with pytorch-fid's key names, for dry
//! runs of `dpar eval fid` where the real FID weights are not at hand. A distance computed with
//! them is an FD (and `dpar eval fid` says so), never FID.
//!
//! `cargo run --release --example stand_in_inception -- FILE.safetensors`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: stand_in_inception FILE.safetensors")?;
    let weights = dpar::eval::inception::stand_in::weights(&candle_core::Device::Cpu)?;
    let mut tensors: Vec<(String, candle_core::Tensor)> = weights.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("note".to_string(), "InceptionV3 stand-in weights by formula, untrained: not FID weights".to_string());
    dpar::tensor_io::write_safetensors(std::path::Path::new(&out), &tensors, &meta)?;
    println!("wrote {out} ({} tensors; untrained stand-in weights, not FID weights)", tensors.len());
    Ok(())
}
