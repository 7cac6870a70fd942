//! Pictures: image tensors to PNG grids, scaled up so that 32-pixel digits are visible.

use std::path::Path;

use candle_core::Tensor;

/// Errors of picture making.
#[derive(Debug, thiserror::Error)]
pub enum VizError {
    /// The input cannot be drawn.
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, VizError>;

/// Encodes `img` as PNG and writes it atomically.
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::util::write_atomic(path, &bytes)?;
    Ok(())
}

/// (B, C, H, W) tensor with values in [−1, 1] (C = 1 or 3) → RGB images (values clamped).
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if !(c == 1 || c == 3) {
        return Err(VizError::BadInput(format!("cannot draw images with {c} channels")));
    }
    let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let to_byte = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    Ok((0..b)
        .map(|i| {
            let img = &values[i * c * h * w..(i + 1) * c * h * w];
            image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |ch: usize| to_byte(img[(ch * h + y as usize) * w + x as usize]);
                if c == 1 {
                    image::Rgb([at(0); 3])
                } else {
                    image::Rgb([at(0), at(1), at(2)])
                }
            })
        })
        .collect())
}

/// Nearest-neighbour upscaling by an integer factor.
pub fn upscale(img: &image::RgbImage, factor: u32) -> image::RgbImage {
    image::imageops::resize(img, img.width() * factor, img.height() * factor, image::imageops::FilterType::Nearest)
}

/// Lays out rows of images (each row may have its own length) on a grey background with
/// `pad` pixels between cells. Cells are top-left aligned in a uniform cell size.
pub fn grid(rows: &[Vec<image::RgbImage>], pad: u32) -> image::RgbImage {
    let cell_w = rows.iter().flatten().map(|i| i.width()).max().unwrap_or(1);
    let cell_h = rows.iter().flatten().map(|i| i.height()).max().unwrap_or(1);
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1) as u32;
    let n_rows = rows.len().max(1) as u32;
    let width = cols * cell_w + (cols + 1) * pad;
    let height = n_rows * cell_h + (n_rows + 1) * pad;
    let mut out = image::RgbImage::from_pixel(width, height, image::Rgb([96, 96, 96]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let x = pad + c as u32 * (cell_w + pad);
            let y = pad + r as u32 * (cell_h + pad);
            image::imageops::overlay(&mut out, img, x as i64, y as i64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tensors_become_scaled_grids() {
        let t = Tensor::new(&[[[[-1.0f32, 1.0], [0.0, 2.0]]]], &Device::Cpu).unwrap();
        let imgs = tensor_to_images(&t).unwrap();
        assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(imgs[0].get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(imgs[0].get_pixel(1, 1).0, [255, 255, 255]); // clamped
        let big = upscale(&imgs[0], 3);
        assert_eq!((big.width(), big.height()), (6, 6));
        let g = grid(&[vec![big.clone(), big.clone()], vec![big]], 2);
        assert_eq!((g.width(), g.height()), (2 * 6 + 3 * 2, 2 * 6 + 3 * 2));
    }
}
