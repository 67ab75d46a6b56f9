//! SVG plots: throughput against batch or message size (one line per
//! figure name, its reference dashed), and the per-figure ratios of a
//! comparison. Drawn with plotters' SVG backend into a string, so the same
//! text goes to a file and inline into the HTML report.

use std::collections::BTreeMap;

use plotters::prelude::*;

use super::BenchError;
use super::report::Figure;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 420;

fn plot_error(plot: &str) -> impl Fn(String) -> BenchError + '_ {
    move |detail| BenchError::Plot {
        plot: plot.to_owned(),
        detail,
    }
}

/// The points of one line: (size, value in display units).
type Line = Vec<(f64, f64)>;

/// One plot of the `figures` that share `id`: x is their size (log scale),
/// y their value in the unit the table shows; each reference is a dashed
/// line of the same colour.
pub fn throughput_svg(id: &str, figures: &[&Figure]) -> Result<String, BenchError> {
    let error = plot_error(id);
    let first = figures
        .first()
        .ok_or_else(|| error("no figures to plot".into()))?;
    let (unit, factor) = first.unit.display();
    let x_label = first.size.map_or("size", |s| s.axis_label());
    let mut lines: BTreeMap<&str, (Line, Line)> = BTreeMap::new();
    for figure in figures {
        let Some(size) = figure.size else { continue };
        let x = size.value() as f64;
        let (own, reference) = lines.entry(figure.name.as_str()).or_default();
        own.push((x, figure.value / factor));
        if let Some(r) = &figure.reference
            && r.unit == figure.unit
        {
            reference.push((x, r.value / factor));
        }
    }
    for (own, reference) in lines.values_mut() {
        own.sort_by(|a, b| a.0.total_cmp(&b.0));
        reference.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = lines.values().flat_map(|(a, b)| a.iter().chain(b));
    let (mut x_min, mut x_max) = (f64::INFINITY, 0.0f64);
    let (mut y_min, mut y_max) = (f64::INFINITY, 0.0f64);
    for &(x, y) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        if y > 0.0 && y.is_finite() {
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if !x_min.is_finite() || x_max <= 0.0 {
        return Err(error("no sized figures to plot".into()));
    }
    if !y_min.is_finite() {
        return Err(error("no positive values to plot".into()));
    }
    // Both axes logarithmic: sizes grow by powers of two, and one plot holds
    // a sort at 1 M rows/s beside a filter at 500.
    let x_range = (x_min.max(1.0) / 1.5)..(x_max * 1.5);
    let y_range = (y_min / 2.0)..(y_max * 2.0);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| error(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(id, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.log_scale(), y_range.log_scale())
            .map_err(|e| error(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(unit)
            .x_label_formatter(&|x| human(*x))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()
            .map_err(|e| error(e.to_string()))?;
        for (index, (name, (own, reference))) in lines.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(own.iter().copied(), color.stroke_width(2)))
                .map_err(|e| error(e.to_string()))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            chart
                .draw_series(own.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| error(e.to_string()))?;
            if !reference.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(
                        reference.iter().copied(),
                        6,
                        4,
                        color.stroke_width(1),
                    ))
                    .map_err(|e| error(e.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| error(e.to_string()))?;
        root.present().map_err(|e| error(e.to_string()))?;
    }
    Ok(svg)
}

/// A horizontal bar per figure: B/A of a comparison, with 1.0 marked.
pub fn ratio_svg(title: &str, ratios: &[(String, f64)]) -> Result<String, BenchError> {
    let error = plot_error(title);
    if ratios.is_empty() {
        return Err(error("no figures in common".into()));
    }
    let count = ratios.len();
    let x_max = ratios
        .iter()
        .map(|(_, r)| *r)
        .filter(|r| r.is_finite())
        .fold(1.0f64, f64::max)
        * 1.1;
    let height = (80 + 18 * count as u32).max(200);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH + 200, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| error(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(320)
            .build_cartesian_2d(0.0..x_max, (0..count).into_segmented())
            .map_err(|e| error(e.to_string()))?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                ratios.get(*i).map_or_else(String::new, |(n, _)| n.clone())
            }
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .y_labels(count)
            .y_label_formatter(&label)
            .x_desc("B / A")
            .draw()
            .map_err(|e| error(e.to_string()))?;
        chart
            .draw_series(ratios.iter().enumerate().map(|(i, (_, r))| {
                let color = if (*r - 1.0).abs() <= 0.1 { BLUE } else { RED };
                Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (r.max(0.0), SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.6).filled(),
                )
            }))
            .map_err(|e| error(e.to_string()))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                [
                    (1.0, SegmentValue::Exact(0)),
                    (1.0, SegmentValue::Exact(count)),
                ],
                BLACK,
            )))
            .map_err(|e| error(e.to_string()))?;
        root.present().map_err(|e| error(e.to_string()))?;
    }
    Ok(svg)
}

/// A log axis tick: 1000 → "1k", 1000000 → "1M" (the ticks are powers of ten).
fn human(x: f64) -> String {
    let x = x.round();
    let (scaled, suffix) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{}{suffix}", (scaled * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Section, Size, Unit};

    #[test]
    fn a_throughput_plot_names_each_line_and_its_axis() {
        let figures: Vec<Figure> = [(4096u64, 1e9), (65536, 2e9)]
            .into_iter()
            .map(|(bytes, rate)| {
                Figure::new(Section::Network, "shuffle tcp", rate, Unit::BytesPerS)
                    .at(Size::Bytes(bytes))
                    .against("raw tcp", 3e9, Unit::BytesPerS)
            })
            .collect();
        let refs: Vec<&Figure> = figures.iter().collect();
        let svg = throughput_svg("network", &refs).unwrap();
        for text in ["<svg", "shuffle tcp", "GB/s", "bytes per message/block"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(throughput_svg("empty", &[]).is_err());
    }

    #[test]
    fn a_ratio_plot_has_a_bar_per_figure() {
        let svg = ratio_svg(
            "B/A",
            &[("cpu/filter".into(), 1.02), ("memory/copy".into(), 0.5)],
        )
        .unwrap();
        assert!(svg.contains("cpu/filter") && svg.contains("memory/copy"));
        assert_eq!(human(10000.0), "10k");
        assert_eq!(human(1e6), "1M");
    }
}
