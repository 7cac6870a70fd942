//! `.npz` files made by numpy (`scripts/make-npz-fixtures.py`, stored and compressed) read back
//! with the values numpy wrote.

use std::path::Path;

use dpar::data::npz::NpzReader;

#[test]
fn numpy_written_archives_read_back_exactly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/npz");
    let images: Vec<u8> = (0..4 * 8 * 8 * 3).map(|i: usize| (i * 7 % 256) as u8).collect();
    for file in ["ref.npz", "ref-compressed.npz"] {
        let mut npz = NpzReader::open(&dir.join(file)).unwrap();
        let mut names = npz.names();
        names.sort();
        assert_eq!(names, ["arr_0", "labels", "mu", "sigma"], "{file}");
        let mut back = Vec::new();
        let dims = npz
            .for_each_image_batch("arr_0", 3, |bytes, _| {
                back.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
        assert_eq!(dims, (4, 8, 8, 3), "{file}");
        assert_eq!(back, images, "{file}");
        let (shape, mu) = npz.read_f64("mu").unwrap();
        assert_eq!(shape, [6]);
        assert_eq!(mu, (0..6).map(|i| i as f64 / 3.0 - 0.5).collect::<Vec<_>>(), "{file}");
        let (shape, labels) = npz.read_f64("labels").unwrap();
        assert_eq!((shape, labels), (vec![4], vec![3.0, -1.0, 0.0, 999.0]), "{file}");
        let (shape, sigma) = npz.read_f64("sigma").unwrap();
        assert_eq!(shape, [6, 6]);
        // sigma = A·Aᵀ with A[i][j] = (6i + j) / 10, in float32.
        for i in 0..6 {
            for j in 0..6 {
                let want: f64 = (0..6).map(|k| ((6 * i + k) as f64 / 10.0) * ((6 * j + k) as f64 / 10.0)).sum();
                assert!((sigma[i * 6 + j] - want).abs() < 1e-4 * want.max(1.0), "{file} sigma[{i}][{j}]");
            }
        }
        let err = npz.read_f64("nope").unwrap_err().to_string();
        assert!(err.contains(file) && err.contains("no array `nope`"), "{err}");
    }
}

/// An image `.npz` past 4 GiB (ZIP64 records): written and streamed back. Slow and 4.5 GB of
/// disk, so ignored by default: `DPAR_BIG_NPZ=/path/big.npz cargo nextest run --release
/// --run-ignored only --test npz_numpy` (keeps the file for a check with numpy:
/// `np.load(path)["arr_0"].shape`).
#[test]
#[ignore]
fn an_npz_past_four_gibibytes_round_trips() {
    let keep = std::env::var_os("DPAR_BIG_NPZ").map(std::path::PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    let path = keep.unwrap_or_else(|| dir.path().join("big.npz"));
    let (n, side) = (23_000usize, 256usize); // 23 000 × 196 608 bytes = 4.52 GB
    let image = |i: usize| -> Vec<u8> { (0..side * side * 3).map(|j| ((i * 131 + j) % 251) as u8).collect() };
    let mut writer = dpar::data::npz::ImageNpzWriter::create(&path, n, side, side).unwrap();
    for i in 0..n {
        writer.push(&image(i)).unwrap();
    }
    writer.finish().unwrap();
    let mut npz = NpzReader::open(&path).unwrap();
    let mut seen = 0usize;
    npz.for_each_image_batch("arr_0", 1000, |bytes, k| {
        for (j, got) in bytes.chunks(side * side * 3).enumerate().take(k) {
            if (seen + j).is_multiple_of(997) || seen + j == n - 1 {
                assert!(got == image(seen + j), "image {}", seen + j);
            }
        }
        seen += k;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);
}
