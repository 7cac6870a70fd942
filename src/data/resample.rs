//! Image resizing as Pillow does it, so that images fed to a tokenizer are the pixels LlamaGen
//! feeds its own: `center_crop_arr` (from ADM, used by LlamaGen's code extraction) halves large
//! images with a BOX filter, resizes with BICUBIC and crops the centre.
//!
//! [`resize`] follows Pillow's `ImagingResample` for 8-bit images: separable passes
//! (horizontal, then vertical), each output pixel a normalised filter window centred at
//! `(x + 0.5)·scale`, the filter widened by the scale when shrinking (antialiasing), and the
//! weights in 22-bit fixed point with Pillow's rounding and clipping. Tested to equal Pillow's
//! output pixel for pixel (`tests/fixtures/pil-resize`).

/// Pillow's resampling filters that LlamaGen's preprocessing uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX`: each output pixel the mean of the input pixels it covers.
    Box,
    /// `Image.BICUBIC`: cubic convolution with a = −0.5.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output position: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates towards zero; the bounds are clamped to the image.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    (k * (1 << PRECISION_BITS) as f64 + if k < 0.0 { -0.5 } else { 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over an interleaved RGB buffer of `rows × cols`, along rows
/// (`horizontal`) or columns.
fn pass(src: &[u8], rows: usize, cols: usize, out_len: usize, horizontal: bool, filter: Filter) -> Vec<u8> {
    let in_len = if horizontal { cols } else { rows };
    let coeffs = coefficients(in_len, out_len, filter);
    let (out_rows, out_cols) = if horizontal { (rows, out_len) } else { (out_len, cols) };
    let mut out = vec![0u8; out_rows * out_cols * 3];
    for r in 0..out_rows {
        for c in 0..out_cols {
            let (start, k) = if horizontal { &coeffs[c] } else { &coeffs[r] };
            for ch in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    let (y, x) = if horizontal { (r, start + i) } else { (start + i, c) };
                    acc += src[(y * cols + x) * 3 + ch] as i64 * w as i64;
                }
                out[(r * out_cols + c) * 3 + ch] = clip8(acc);
            }
        }
    }
    out
}

/// `img.resize((width, height), filter)` as Pillow computes it for an RGB image.
pub fn resize(img: &image::RgbImage, width: u32, height: u32, filter: Filter) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = (width as usize, height as usize);
    let mut buf = img.as_raw().clone();
    let mut cols = w;
    if nw != w {
        buf = pass(&buf, h, w, nw, true, filter);
        cols = nw;
    }
    if nh != h {
        buf = pass(&buf, h, cols, nh, false, filter);
    }
    image::RgbImage::from_raw(width, height, buf).expect("the passes produce width × height × 3 bytes")
}

/// ADM's and LlamaGen's `center_crop_arr(image, size)`: halve with BOX while the shorter side
/// is at least 2·size, resize with BICUBIC so that the shorter side is `size` (each side
/// rounded as Python's `round`: halves to even), then take the centre `size × size` crop.
pub fn center_crop_arr(img: &image::RgbImage, size: usize) -> image::RgbImage {
    let mut img = img.clone();
    while (img.width().min(img.height()) as usize) >= 2 * size {
        img = resize(&img, img.width() / 2, img.height() / 2, Filter::Box);
    }
    let scale = size as f64 / img.width().min(img.height()) as f64;
    let nw = (img.width() as f64 * scale).round_ties_even() as u32;
    let nh = (img.height() as f64 * scale).round_ties_even() as u32;
    let img = resize(&img, nw, nh, Filter::Bicubic);
    let (top, left) = ((nh as usize - size) / 2, (nw as usize - size) / 2);
    image::imageops::crop_imm(&img, left as u32, top as u32, size as u32, size as u32).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_halving_averages_two_by_two_blocks_with_rounding() {
        let img = image::RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x * 10 + y * 100) as u8, 1, (x % 2) as u8]));
        let half = resize(&img, 2, 1, Filter::Box);
        // mean of {0, 10, 100, 110} = 55; of {20, 30, 120, 130} = 75; (0+1+0+1)/4 = 0.5 → 1
        // (Pillow rounds half up).
        assert_eq!(half.get_pixel(0, 0).0, [55, 1, 1]);
        assert_eq!(half.get_pixel(1, 0).0, [75, 1, 1]);
    }

    #[test]
    fn a_same_size_resize_is_the_identity_and_constants_stay_constant() {
        let img = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 31 + y * 7) as u8, 200, 3]));
        assert_eq!(resize(&img, 7, 5, Filter::Bicubic), img);
        let flat = image::RgbImage::from_pixel(9, 13, image::Rgb([17, 128, 250]));
        for (w, h) in [(4, 4), (20, 7), (9, 26)] {
            for f in [Filter::Box, Filter::Bicubic] {
                assert!(resize(&flat, w, h, f).pixels().all(|p| p.0 == [17, 128, 250]), "{w}×{h} {f:?}");
            }
        }
    }

    /// The formula image of `scripts/make-pil-resize-fixture.py`.
    fn source() -> image::RgbImage {
        image::RgbImage::from_fn(301, 203, |x, y| {
            image::Rgb([((7 * x + 13 * y) % 256) as u8, ((x * y) % 256) as u8, ((5 * (x ^ y)) % 256) as u8])
        })
    }

    fn fixture(name: &str) -> image::RgbImage {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pil-resize").join(name);
        image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
    }

    /// Pillow's own output (tests/fixtures/pil-resize), pixel for pixel.
    #[test]
    fn resizes_and_centre_crops_equal_pillows() {
        let img = source();
        let cases: [(&str, image::RgbImage); 4] = [
            ("center-crop-64.png", center_crop_arr(&img, 64)),
            ("center-crop-100.png", center_crop_arr(&img, 100)),
            ("bicubic-97x61.png", resize(&img, 97, 61, Filter::Bicubic)),
            ("box-150x101.png", resize(&img, 150, 101, Filter::Box)),
        ];
        for (name, ours) in cases {
            let want = fixture(name);
            assert_eq!(ours.dimensions(), want.dimensions(), "{name}");
            let differ = ours.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{name}: {differ} of {} values differ from Pillow's", want.as_raw().len());
        }
        // Upscaling (the shorter side 203 → 256): the SHA-256 of Pillow's raw RGB bytes.
        use sha2::Digest;
        let up = center_crop_arr(&img, 256);
        let ours: String = sha2::Sha256::digest(up.as_raw()).iter().map(|b| format!("{b:02x}")).collect();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pil-resize/center-crop-256.sha256");
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(ours, want.trim(), "center_crop_arr(256) differs from Pillow's");
    }

    #[test]
    fn center_crop_arr_has_the_asked_size() {
        let img = image::RgbImage::from_fn(301, 203, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        for size in [16, 64, 100, 203, 256] {
            let out = center_crop_arr(&img, size);
            assert_eq!((out.width(), out.height()), (size as u32, size as u32));
        }
    }
}
