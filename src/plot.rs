//! PNG line plots (loss curves, metric-vs-step curves) with plotters, written atomically.

use std::path::Path;

use plotters::prelude::*;

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to plot.
    #[error("{0}")]
    NoData(String),
    /// plotters failed.
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

pub type Result<T> = std::result::Result<T, PlotError>;

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

/// One chart: a title, axis labels and its series.
pub struct Panel<'a> {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: &'a [Series],
    /// Log scale for the y axis (when every value is positive).
    pub log_y: bool,
}

/// Draws line series into a PNG at `path`. `log_y` uses a log scale for the y axis when every
/// value is positive.
pub fn line_plot(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> Result<()> {
    panels_plot(path, &[Panel { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), series, log_y }])
}

/// DejaVu Sans (its licence: `assets/fonts/DejaVuSans-LICENSE.txt`), compiled in and rendered by
/// plotters' pure-Rust `ab_glyph` path, so labels need no system font libraries or fonts.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Registers [`FONT`] as plotters' "sans-serif", once per process.
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw("the bundled font could not be read".into()))
    }
}

/// A copy of `grid` (rows of cells `cell_h` pixels high, `pad` apart, as [`crate::viz::grid`]
/// lays them out) with a column on the left that names each row: the class names of a sample
/// grid. Names longer than 24 characters are cut.
pub fn label_rows(grid: &image::RgbImage, labels: &[String], cell_h: u32, pad: u32) -> Result<image::RgbImage> {
    register_font()?;
    let font_px = (cell_h as f64 * 0.3).clamp(11.0, 22.0);
    let texts: Vec<String> = labels.iter().map(|l| l.chars().take(24).collect()).collect();
    let widest = texts.iter().map(|t| t.chars().count()).max().unwrap_or(1).max(1);
    let label_w = (widest as f64 * font_px * 0.62).ceil() as u32 + 2 * pad + 4;
    let (w, h) = (grid.width() + label_w, grid.height());
    let mut buffer = vec![96u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let style = TextStyle::from(("sans-serif", font_px).into_font()).color(&WHITE).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            ),
        );
        for (r, text) in texts.iter().enumerate() {
            let y = pad + r as u32 * (cell_h + pad) + cell_h / 2;
            root.draw_text(text, &style, (pad as i32 + 2, y as i32)).map_err(|e| PlotError::Draw(e.to_string()))?;
        }
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    let mut out = image::RgbImage::from_raw(w, h, buffer)
        .ok_or_else(|| PlotError::Draw("label column: buffer of the wrong size".into()))?;
    image::imageops::overlay(&mut out, grid, label_w as i64, 0);
    Ok(out)
}

/// Draws several charts side by side into one PNG at `path` (800 × 500 pixels each).
pub fn panels_plot(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font()?;
    let (w, h) = (800u32 * panels.len().max(1) as u32, 500u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| PlotError::Draw(e.to_string()))?;
        for (area, panel) in root.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buffer)
        .ok_or_else(|| PlotError::Draw("plot buffer has the wrong size".into()))?;
    crate::viz::save_png(&img, path).map_err(|e| PlotError::Draw(e.to_string()))?;
    Ok(())
}

/// An axis label without float noise (0.15, not 0.15000000000000002): whole numbers from 100 on,
/// else at most four decimals with trailing zeros dropped.
fn tick_label(x: f64) -> String {
    if x.abs() >= 100.0 {
        return format!("{x:.0}");
    }
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn draw_panel(root: &DrawingArea<BitMapBackend, plotters::coord::Shift>, panel: &Panel) -> Result<()> {
    let (title, x_label, y_label, series) = (&panel.title, &panel.x_label, &panel.y_label, panel.series);
    let all: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if all.is_empty() {
        return Err(PlotError::NoData(format!("{title}: no finite points to plot")));
    }
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    {
        let x_min = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let x_max = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let y_min = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let y_max = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
        // A log axis over less than a decade gets no tick labels from plotters: use linear.
        let log_y = panel.log_y && y_min > 0.0 && y_max > 10.0 * y_min;
        let mut builder = ChartBuilder::on(root);
        builder.caption(title, ("sans-serif", 22)).margin(15).x_label_area_size(40).y_label_area_size(70);
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label.as_str())
                    .y_desc(y_label.as_str())
                    .x_label_formatter(&|x| tick_label(*x))
                    .y_label_formatter(&|y| tick_label(*y))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|e| draw(&e))?;
                for (i, s) in series.iter().enumerate() {
                    let color = COLORS[i % COLORS.len()];
                    let pts: Vec<(f64, f64)> =
                        s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
                    // Few points (evaluation curves): mark each one.
                    if pts.len() <= 40 {
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                            .map_err(|e| draw(&e))?;
                    }
                    chart
                        .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                        .map_err(|e| draw(&e))?
                        .label(s.name.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                }
                if series.len() > 1 {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| draw(&e))?;
                }
            }};
        }
        if log_y {
            let chart = builder
                .build_cartesian_2d(x_min..x_max, (y_min * 0.9..y_max * 1.1).log_scale())
                .map_err(|e| draw(&e))?;
            finish!(chart);
        } else {
            let pad = ((y_max - y_min) * 0.05).max(1e-9);
            let chart = builder.build_cartesian_2d(x_min..x_max, (y_min - pad)..(y_max + pad)).map_err(|e| draw(&e))?;
            finish!(chart);
        }
    }
    Ok(())
}

/// Reads a training `log.jsonl` and plots every `loss`-like key (and `val_*` keys) against step.
pub fn loss_curve_from_log(log: &Path, png: &Path, title: &str) -> Result<()> {
    let text = std::fs::read_to_string(log).map_err(|e| PlotError::NoData(format!("{}: {e}", log.display())))?;
    let mut series: Vec<Series> = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = value.get("step").and_then(|s| s.as_f64()) else { continue };
        let Some(obj) = value.as_object() else { continue };
        for (key, v) in obj {
            let wanted = key == "loss" || (key.starts_with("val_") && key.contains("loss")) || key == "val_recon_mse";
            let Some(y) = v.as_f64() else { continue };
            if !wanted {
                continue;
            }
            match series.iter_mut().find(|s| &s.name == key) {
                Some(s) => s.points.push((step, y)),
                None => series.push(Series { name: key.clone(), points: vec![(step, y)] }),
            }
        }
    }
    series.retain(|s| !s.points.is_empty());
    line_plot(png, &format!("{title}: loss"), "step", "loss", &series, true)
}

/// A labelled point with error bars: (x, y) with ranges [x_lo, x_hi] and [y_lo, y_hi].
pub struct ErrorPoint {
    pub name: String,
    pub x: f64,
    pub x_lo: f64,
    pub x_hi: f64,
    pub y: f64,
    pub y_lo: f64,
    pub y_hi: f64,
}

/// One chart of labelled points with error bars.
pub struct ErrorPanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<ErrorPoint>,
    /// A dashed vertical line at this x (a goal), when given.
    pub x_guide: Option<f64>,
}

/// Draws labelled points with horizontal and vertical error bars, panels side by side (800 ×
/// 560 pixels each), into a PNG at `path`.
pub fn error_plot(path: &Path, panels: &[ErrorPanel]) -> Result<()> {
    register_font()?;
    let (w, h) = (800u32 * panels.len().max(1) as u32, 560u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        for (area, panel) in root.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
            let finite = |p: &&ErrorPoint| [p.x, p.x_lo, p.x_hi, p.y, p.y_lo, p.y_hi].iter().all(|v| v.is_finite());
            let pts: Vec<&ErrorPoint> = panel.points.iter().filter(finite).collect();
            if pts.is_empty() {
                return Err(PlotError::NoData(format!("{}: no finite points to plot", panel.title)));
            }
            let fold = |f: fn(&ErrorPoint) -> f64, min: bool| {
                pts.iter().map(|p| f(p)).fold(if min { f64::INFINITY } else { f64::NEG_INFINITY }, |a, b| {
                    if min {
                        a.min(b)
                    } else {
                        a.max(b)
                    }
                })
            };
            let mut x_min = fold(|p| p.x_lo, true);
            let mut x_max = fold(|p| p.x_hi, false);
            if let Some(g) = panel.x_guide {
                x_min = x_min.min(g);
                x_max = x_max.max(g);
            }
            let (y_min, y_max) = (fold(|p| p.y_lo, true), fold(|p| p.y_hi, false));
            let xp = ((x_max - x_min) * 0.12).max(0.05);
            let yp = ((y_max - y_min) * 0.08).max(0.5);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 20))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d((x_min - xp)..(x_max + xp), (y_min - yp)..(y_max + yp))
                .map_err(|e| draw(&e))?;
            chart
                .configure_mesh()
                .x_desc(panel.x_label.as_str())
                .y_desc(panel.y_label.as_str())
                .x_label_formatter(&|x| tick_label(*x))
                .y_label_formatter(&|y| tick_label(*y))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| draw(&e))?;
            if let Some(g) = panel.x_guide {
                let style = RGBColor(150, 150, 150).stroke_width(1);
                let (y0, y1) = (y_min - yp, y_max + yp);
                let steps = 30;
                let dashes = (0..steps).step_by(2).map(|i| {
                    let a = y0 + (y1 - y0) * i as f64 / steps as f64;
                    let b = y0 + (y1 - y0) * (i + 1) as f64 / steps as f64;
                    PathElement::new(vec![(g, a), (g, b)], style)
                });
                chart.draw_series(dashes).map_err(|e| draw(&e))?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{}× goal", tick_label(g)),
                        (g, y1 - yp * 0.5),
                        ("sans-serif", 14).into_font().color(&RGBColor(110, 110, 110)),
                    )))
                    .map_err(|e| draw(&e))?;
            }
            for (i, p) in pts.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let style = color.stroke_width(2);
                chart
                    .draw_series([
                        PathElement::new(vec![(p.x_lo, p.y), (p.x_hi, p.y)], style),
                        PathElement::new(vec![(p.x, p.y_lo), (p.x, p.y_hi)], style),
                    ])
                    .map_err(|e| draw(&e))?;
                chart
                    .draw_series(std::iter::once(Circle::new((p.x, p.y), 5, color.filled())))
                    .map_err(|e| draw(&e))?
                    .label(p.name.clone())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
                chart
                    .draw_series(std::iter::once(Text::new(
                        p.name.clone(),
                        (p.x + xp * 0.08, p.y + yp * 0.15),
                        ("sans-serif", 13).into_font().color(&color),
                    )))
                    .map_err(|e| draw(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| draw(&e))?;
        }
        root.present().map_err(|e| draw(&e))?;
    }
    let img = image::RgbImage::from_raw(w, h, buffer)
        .ok_or_else(|| PlotError::Draw("plot buffer has the wrong size".into()))?;
    crate::viz::save_png(&img, path).map_err(|e| PlotError::Draw(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_carry_no_float_noise() {
        assert_eq!(tick_label(0.1 + 0.05), "0.15");
        assert_eq!(tick_label(0.39999999999999997), "0.4");
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(-0.00001), "0");
        assert_eq!(tick_label(1234.56), "1235");
        assert_eq!(tick_label(1.4202), "1.4202");
    }

    #[test]
    fn loss_curve_is_written_from_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let lines: Vec<String> = (1..=20).map(|s| format!("{{\"step\":{s},\"loss\":{}}}", 5.0 / s as f64)).collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        let png = dir.path().join("loss.png");
        loss_curve_from_log(&log, &png, "test").unwrap();
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (800, 500));
    }

    /// Labels are drawn with the compiled-in font (no system fonts involved): the title strip of
    /// a plot holds dark text pixels, and a plot without a title has none there.
    #[test]
    fn titles_render_with_the_bundled_font() {
        let dir = tempfile::tempdir().unwrap();
        let series = [Series { name: "a".into(), points: vec![(0.0, 1.0), (1.0, 2.0)] }];
        let dark_in_title_strip = |title: &str| {
            let png = dir.path().join("t.png");
            line_plot(&png, title, "x", "y", &series, false).unwrap();
            let img = image::open(&png).unwrap().to_rgb8();
            (250..550)
                .flat_map(|x| (8..40).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 128)
                .count()
        };
        assert!(dark_in_title_strip("Validation loss of every run") > 100);
        assert_eq!(dark_in_title_strip(""), 0);
    }

    #[test]
    fn an_empty_log_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        std::fs::write(&log, "").unwrap();
        assert!(loss_curve_from_log(&log, &dir.path().join("x.png"), "t").is_err());
    }
}
