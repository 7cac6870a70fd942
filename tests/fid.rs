//! `dpar eval fid`'s pipeline on stand-in InceptionV3 weights: the same images from a `.npz` and
//! from a folder give the same features; a set against itself is at distance ≈ 0; statistics
//! saved and read back give the same distance as the features; the result is not called FID with
//! weights other than pytorch-fid's.

mod common;

use candle_core::Device;
use dpar::eval::fid::{self, Reference};
use dpar::eval::inception::{stand_in, InceptionV3};

#[test]
fn fid_of_a_set_against_itself_is_zero_and_sources_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (n, side) = (6usize, 48usize);
    let images: Vec<Vec<u8>> =
        (0..n).map(|i| (0..side * side * 3).map(|j| ((j * (i + 3) / 7 + 40 * i) % 256) as u8).collect()).collect();
    let npz = dir.path().join("set.npz");
    let mut writer = dpar::data::npz::ImageNpzWriter::create(&npz, n, side, side).unwrap();
    let folder = dir.path().join("folder/class-a");
    std::fs::create_dir_all(&folder).unwrap();
    for (i, image) in images.iter().enumerate() {
        writer.push(image).unwrap();
        let png = image::RgbImage::from_raw(side as u32, side as u32, image.clone()).unwrap();
        png.save(folder.join(format!("{i}.png"))).unwrap();
    }
    writer.finish().unwrap();

    let model = InceptionV3::from_tensors(&stand_in::weights(&Device::Cpu).unwrap(), &Device::Cpu).unwrap();
    let from_npz = fid::features(&model, &npz, 4, &Device::Cpu, |_| {}).unwrap();
    let from_folder = fid::features(&model, &dir.path().join("folder"), 4, &Device::Cpu, |_| {}).unwrap();
    assert_eq!(from_npz.len(), n);
    assert_eq!(fid::count_images(&npz).unwrap(), n);
    let max_diff = from_npz.pool.iter().zip(&from_folder.pool).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff < 1e-5, "npz and folder features differ by {max_diff}");

    let against_itself = Reference::Features { features: from_folder.clone(), source: "folder".into() };
    let report = fid::report(&from_npz, &against_itself, "not-the-fid-weights", true, true).unwrap();
    assert!(report.value < 1e-6, "a set against itself: {}", report.value);
    assert!(!report.metric.starts_with("FID") && report.metric.contains("not FID"), "{}", report.metric);
    assert_eq!(report.precision_recall, Some((1.0, 1.0)));

    // Statistics written and read back (as an ADM reference batch would be) give the same value.
    let half = fid::InceptionFeatures { pool: from_npz.pool[..3 * 2048].to_vec(), logits: Vec::new() };
    let stats = dir.path().join("stats.npz");
    fid::save_stats(&stats, &from_npz).unwrap();
    let read = fid::reference(&stats, &model, 4, &Device::Cpu, |_| {}).unwrap();
    assert!(matches!(read, Reference::Stats { .. }));
    let with_features = fid::report(&half, &against_itself, "x", false, false).unwrap().value;
    let with_stats = fid::report(&half, &read, "x", false, false).unwrap().value;
    assert!((with_features - with_stats).abs() < 1e-6 * with_features.max(1.0), "{with_features} vs {with_stats}");
    assert!(with_features > 0.0);
    let named = fid::report(&half, &read, &format!("{}abc", fid::FID_WEIGHTS_SHA256_PREFIX), false, false).unwrap();
    assert_eq!(named.metric, "FID");
}

#[test]
fn eval_fid_names_a_missing_input() {
    let (ok, text) = common::run_dpar(&[
        "eval",
        "fid",
        "--inception",
        "/nonexistent/pt_inception.pth",
        "--samples",
        ".",
        "--ref",
        ".",
    ]);
    assert!(!ok && text.contains("--inception /nonexistent/pt_inception.pth: no such file"), "{text}");
}
