//! Writes a tiny image set in the ImageNet layout, and the small VQ-16-layout tokenizer config
//! that goes with `tests/fixtures/vq16_tiny.pt`, so the README's ImageNet recipe can be run end
//! to end on a CPU (`scripts/tiny-imagenet-recipe` does):
//!
//! ```text
//! cargo run --release --example make_tiny_imagenet -- DIR [CLASSES] [PER_CLASS]
//! DIR/train/class-0/0000.png …   RGB images of varied sizes around 300 px (as ImageNet's are)
//! DIR/vq16-tiny.json             VQ-16's layout at 4 base channels, 16 codes, 256 px
//! ```
//!
//! Each class is a procedural pattern (stripes at a class angle over a class colour, plus a
//! blob), drawn with a seeded RNG: made-up pictures for a pipeline check, not a dataset.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: make_tiny_imagenet DIR [CLASSES] [PER_CLASS]")?);
    let classes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let per_class: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for class in 0..classes {
        let folder = dir.join("train").join(format!("class-{class}"));
        std::fs::create_dir_all(&folder)?;
        let angle = std::f64::consts::PI * class as f64 / classes as f64;
        let base = [(60 + 50 * class) % 256, (200 + 90 * class) % 256, (120 + 130 * class) % 256];
        for i in 0..per_class {
            let (w, h) = (rng.random_range(280..340u32), rng.random_range(260..320u32));
            let (cx, cy, r) = (rng.random_range(0.3..0.7) * w as f64, rng.random_range(0.3..0.7) * h as f64, 40.0);
            let period = rng.random_range(14.0..28.0);
            let image = image::RgbImage::from_fn(w, h, |x, y| {
                let (x, y) = (x as f64, y as f64);
                let stripe = ((x * angle.cos() + y * angle.sin()) / period).sin() * 0.5 + 0.5;
                let blob = (-((x - cx).powi(2) + (y - cy).powi(2)) / (2.0 * r * r)).exp();
                let px = |c: usize| (base[c] as f64 * (0.55 + 0.45 * stripe) * (1.0 - blob) + 255.0 * blob) as u8;
                image::Rgb([px(0), px(1), px(2)])
            });
            dpar::viz::save_png(&image, &folder.join(format!("{i:04}.png")))?;
        }
    }
    let config = dpar::tokenizer::VqConfig {
        ch: 4,
        norm_groups: 4,
        z_channels: 8,
        codebook_size: 16,
        image_size: 256,
        ..dpar::tokenizer::VqConfig::vq16()
    };
    std::fs::write(dir.join("vq16-tiny.json"), serde_json::to_string_pretty(&config)?)?;
    println!(
        "wrote {} classes × {per_class} images under {}/train, and {}/vq16-tiny.json",
        classes,
        dir.display(),
        dir.display()
    );
    Ok(())
}
