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

/// Distinct, saturated colours for neighbouring patches.
const PATCH_COLORS: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
];

/// Draws patches over an image of a `grid × grid` code layout: each patch is tinted with its own
/// colour (cycling through 8, so neighbours differ) and separated from the next by a dark line. `lengths` are the
/// patch lengths in raster order (summing to at most grid²; uncovered cells stay untinted).
pub fn patch_overlay(img: &image::RgbImage, grid: usize, lengths: &[usize]) -> image::RgbImage {
    draw_patches(img, grid, lengths, true)
}

/// Patch edges only (white lines), no tint: for drawing patches over a heat map.
pub fn patch_outline(img: &image::RgbImage, grid: usize, lengths: &[usize]) -> image::RgbImage {
    draw_patches(img, grid, lengths, false)
}

fn draw_patches(img: &image::RgbImage, grid: usize, lengths: &[usize], tint: bool) -> image::RgbImage {
    let mut out = img.clone();
    let cell_w = img.width() as usize / grid.max(1);
    let cell_h = img.height() as usize / grid.max(1);
    let ids = crate::patching::patch_ids(lengths);
    let id_at = |k: usize| ids.get(k).copied();
    // Dark edges between tinted patches; white edges over a heat map.
    let border = if tint { [0, 0, 0] } else { [255, 255, 255] };
    for (k, &pid) in ids.iter().enumerate() {
        let (r, c) = (k / grid, k % grid);
        let color = PATCH_COLORS[pid % PATCH_COLORS.len()];
        let left_edge = c == 0 || id_at(k - 1) != Some(pid);
        for y in r * cell_h..(r + 1) * cell_h {
            for x in c * cell_w..(c + 1) * cell_w {
                let p = out.get_pixel_mut(x as u32, y as u32);
                // One line per edge: the top of every row after the first (patches never cross
                // rows) and the left side of every patch after the row's first.
                let on_border = (r > 0 && y == r * cell_h) || (c > 0 && left_edge && x == c * cell_w);
                if on_border {
                    p.0 = border;
                } else if tint {
                    for (v, &c) in p.0.iter_mut().zip(&color).take(3) {
                        *v = ((*v as u32 * 60 + c as u32 * 40) / 100) as u8;
                    }
                }
            }
        }
    }
    out
}

/// A perceptually ordered colour map (viridis, sampled at 5 points and interpolated).
pub fn viridis(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 1.0 };
    let pos = t * (STOPS.len() - 1) as f32;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f32;
    let mut out = [0u8; 3];
    for ch in 0..3 {
        out[ch] = (STOPS[i][ch] * (1.0 - f) + STOPS[i + 1][ch] * f).round() as u8;
    }
    out
}

/// A heat map of `grid × grid` values with `cell` pixels per value, scaled to [vmin, vmax]
/// (non-finite values, like H_0 = +∞, are drawn at the top of the scale).
pub fn heatmap(values: &[f32], grid: usize, cell: u32, vmin: f32, vmax: f32) -> image::RgbImage {
    let span = (vmax - vmin).max(1e-6);
    image::RgbImage::from_fn(grid as u32 * cell, grid as u32 * cell, |x, y| {
        let k = (y / cell) as usize * grid + (x / cell) as usize;
        image::Rgb(viridis((values.get(k).copied().unwrap_or(f32::NAN) - vmin) / span))
    })
}

/// A vertical colour bar of `height` pixels for the heat map scale (top = vmax).
pub fn colorbar(height: u32, width: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |_, y| image::Rgb(viridis(1.0 - y as f32 / height.max(1) as f32)))
}

/// Places images side by side with `pad` pixels between them on a dark background.
pub fn hstack(parts: &[image::RgbImage], pad: u32) -> image::RgbImage {
    let w = parts.iter().map(|p| p.width()).sum::<u32>() + pad * parts.len().saturating_sub(1) as u32;
    let h = parts.iter().map(|p| p.height()).max().unwrap_or(1);
    let mut out = image::RgbImage::from_pixel(w.max(1), h, image::Rgb([40, 40, 40]));
    let mut x = 0;
    for p in parts {
        image::imageops::overlay(&mut out, p, x as i64, 0);
        x += p.width() + pad;
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

    #[test]
    fn patch_overlay_outlines_patch_edges_only() {
        // 2×2 grid, cells of 4 px: patches {0}, {1}, {2, 3}.
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 0]));
        let out = patch_overlay(&img, 2, &[1, 1, 2]);
        // Inside cell 2 next to cell 3 (same patch): tinted, not white.
        assert_ne!(out.get_pixel(3, 5).0, [255, 255, 255]);
        assert_ne!(out.get_pixel(4, 5).0, [0, 0, 0]);
        // Between cells 0 and 1 (different patches): a dark edge; between the rows too.
        assert_eq!(out.get_pixel(4, 2).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 4).0, [0, 0, 0]);
        assert_ne!(out.get_pixel(1, 2).0, [0, 0, 0]);
        // Different patches get different tints.
        assert_ne!(out.get_pixel(1, 1).0, out.get_pixel(5, 1).0);
        let hm = heatmap(&[0.0, 1.0, f32::INFINITY, 0.5], 2, 3, 0.0, 1.0);
        assert_eq!(hm.get_pixel(0, 0).0, viridis(0.0));
        assert_eq!(hm.get_pixel(4, 0).0, viridis(1.0));
        assert_eq!(hm.get_pixel(0, 4).0, viridis(1.0));
    }
}
