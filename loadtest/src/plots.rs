//! SVG plots (plotters): lines for curves, step lines for CDFs.

use std::path::Path;

use plotters::prelude::*;

pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let lo = lo.min(0.0);
    (lo, if hi > lo { hi * 1.05 } else { lo + 1.0 })
}

/// An axis label: whole numbers with thousands separators, else one decimal.
fn tick(v: &f64) -> String {
    if v.fract() != 0.0 || v.abs() < 10.0 {
        return format!("{v:.1}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if *v < 0.0 { format!("-{out}") } else { out }
}

/// A line chart of `series`.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        // Markers only where they stay readable.
        let markers = if s.points.len() <= 40 {
            s.points.as_slice()
        } else {
            &[]
        };
        chart
            .draw_series(markers.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The cumulative distribution of each sample set (fraction ≤ x).
pub fn cdf(
    path: &Path,
    title: &str,
    x_desc: &str,
    samples: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let series: Vec<Series> = samples
        .iter()
        .map(|(label, values)| {
            let mut v = values.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len().max(1) as f64;
            let points = v
                .iter()
                .enumerate()
                .map(|(i, x)| (*x, (i + 1) as f64 / n))
                .collect();
            Series {
                label: format!("{label} ({} samples)", values.len()),
                points,
            }
        })
        .collect();
    lines(path, title, x_desc, "fraction detected", &series)
}

#[cfg(test)]
mod tests {
    use super::tick;

    #[test]
    fn ticks_read_like_numbers() {
        assert_eq!(tick(&100_000.0), "100,000");
        assert_eq!(tick(&2_500.0), "2,500");
        assert_eq!(tick(&500.0), "500");
        assert_eq!(tick(&0.5), "0.5");
        assert_eq!(tick(&5.0), "5.0");
        assert_eq!(tick(&-1_000.0), "-1,000");
    }
}
