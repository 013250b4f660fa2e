//! `bench/ratios.png`: throughput ÷ direct on top, cost ÷ HAProxy's below.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};

use super::results::{DIRECT, HAPROXY, Results, Row, ratio};
use super::workloads::{bulk, connect, idle, select};

/// Finds a TrueType font plotters can draw text with (Debian's fonts-dejavu-core).
fn load_font() -> Result<&'static [u8]> {
    for path in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    Err(anyhow!(
        "no TrueType font found (apt-get install fonts-dejavu-core)"
    ))
}

/// One half of the chart: bars of each proxy's median ÷ the reference target's, per category.
struct Panel {
    title: &'static str,
    /// The target the ratios are taken to.
    reference: usize,
    /// Category labels.
    cats: Vec<String>,
    /// Series name, colour index, one value per category.
    series: Vec<(&'static str, usize, Vec<Option<f64>>)>,
}

impl Panel {
    /// A panel of the targets after direct, in order, named by `series`.
    fn new(title: &'static str, reference: usize, series: &[&'static str]) -> Panel {
        Panel {
            title,
            reference,
            cats: Vec::new(),
            series: series
                .iter()
                .enumerate()
                .map(|(k, name)| (*name, k, Vec::new()))
                .collect(),
        }
    }

    /// One category: every series' median of `row` ÷ the reference's.
    fn push(&mut self, label: String, row: &Row) {
        self.cats.push(label);
        let reference = row.median(self.reference);
        for (k, s) in self.series.iter_mut().enumerate() {
            s.2.push(ratio(row.median(k + 1), reference));
        }
    }
}

fn panels(r: &Results) -> (Panel, Panel) {
    let mut top = Panel::new(
        "Throughput ÷ direct (higher is better; 1 = no proxy)",
        DIRECT,
        &["patroxy-bpf", "patroxy-fallback", "haproxy"],
    );
    for row in r.rows_of(select::TPS) {
        top.push(format!("TPS {}", row.case), row);
    }
    for row in r.rows_of(connect::CONNECTIONS) {
        top.push("conn/s (-C)".to_owned(), row);
    }
    for row in r.rows_of(bulk::THROUGHPUT) {
        let label = if row.case.starts_with("COPY TO") {
            "COPY out MB/s"
        } else {
            "COPY in MB/s"
        };
        top.push(label.to_owned(), row);
    }

    let mut bottom = Panel::new(
        "Cost ÷ HAProxy's (lower is better; 1 = as costly as HAProxy)",
        HAPROXY,
        &["patroxy-bpf", "patroxy-fallback"],
    );
    for row in r.rows_of(select::LATENCY_ADDED) {
        bottom.push(format!("added lat {}", row.case), row);
    }
    for row in r.rows_of(select::PROXY_TOTAL) {
        bottom.push(format!("CPU/tx {}", row.case), row);
    }
    for row in r.rows_of(idle::RSS_PER_SESSION) {
        bottom.push("RSS/session".to_owned(), row);
    }
    (top, bottom)
}

/// Draws the two panels of ratios into a PNG.
pub fn draw(r: &Results, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    let font = load_font()?;
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("the font file is not a usable TrueType font"))?;
    let colours = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
    ];

    let (top, bottom) = panels(r);
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let halves = root.split_evenly((2, 1));
    for (area, panel, reference) in [
        (&halves[0], &top, "direct"),
        (&halves[1], &bottom, "HAProxy"),
    ] {
        if panel.cats.is_empty() {
            continue;
        }
        let n = panel.cats.len() as f64;
        let values = panel
            .series
            .iter()
            .flat_map(|s| s.2.iter().flatten().copied());
        let (lo, hi) = values.fold((0.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = (if lo < 0.0 { lo * 1.15 } else { 0.0 }, hi * 1.45);
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, lo..hi)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc(format!("ratio to {reference}"))
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let k = panel.series.len() as f64;
        let width = 0.8 / k;
        for (si, (name, colour, vals)) in panel.series.iter().enumerate() {
            let colour = colours[*colour];
            let bars: Vec<_> = vals
                .iter()
                .enumerate()
                .filter_map(|(ci, v)| v.map(|v| (ci, v)))
                .collect();
            chart
                .draw_series(bars.iter().map(|&(ci, v)| {
                    let x0 = ci as f64 + 0.1 + si as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], colour.filled())
                }))
                .map_err(|e| anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled())
                });
            // The value above (or below) each bar.
            for &(ci, v) in &bars {
                let x = ci as f64 + 0.1 + (si as f64 + 0.46) * width;
                let (px, py) = chart.backend_coord(&(x, v));
                let dy = if v >= 0.0 { -16 } else { 4 };
                root.draw(&Text::new(
                    format!("{v:.2}"),
                    (px - 14, py + dy),
                    ("sans-serif", 13).into_font().color(&BLACK),
                ))
                .map_err(|e| anyhow!("{e}"))?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (n, 1.0)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        // Category labels under the axis, centred on each group.
        for (ci, cat) in panel.cats.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(ci as f64 + 0.5, lo));
            let w = cat.chars().count() as i32 * 8;
            root.draw(&Text::new(
                cat.clone(),
                (px - w / 2, py + 10),
                ("sans-serif", 16).into_font().color(&BLACK),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
