//! The `--plot` chart of a bench run, drawn with plotters as SVG: GB/s of every op, backend and
//! copy ceiling. One shape gives labelled bars; a sweep gives one line per series over the shapes
//! ordered by size, on a log scale, each series with its own colour and marker.

use std::path::Path;

use plotters::coord::combinators::IntoLogRange;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::{Report, ShapeFacts, OPS};

/// One line (or bar) of the chart: a name and a GB/s figure per shape, shapes in chart order.
struct Series {
    name: String,
    values: Vec<Option<f64>>,
}

/// Distinct colours; with the four markers, no two of the 20 series a full run draws look alike.
const COLOURS: [RGBColor; 10] = [
    RGBColor(0x99, 0x99, 0x99),
    RGBColor(0x33, 0x33, 0x33),
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0xe6, 0xab, 0x02),
    RGBColor(0xa6, 0x76, 0x1d),
    RGBColor(0x1f, 0x78, 0xb4),
];
/// Width of the legend beside a sweep's plot, in pixels.
const LEGEND: u32 = 300;

/// Draws `report` as an SVG chart at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let mut shapes: Vec<&ShapeFacts> = report.shapes.iter().collect();
    shapes.sort_by_key(|f| (f.rows * f.features, f.features));
    let series = collect(report, &shapes);
    // The adapter's name, without the API and driver that follow it.
    let device = report.backend.split(" (").next().unwrap_or(&report.backend);
    let title = format!("gpunorm bench on {device}: GB/s, input read once + output written once");
    let root = SVGBackend::new(path, (1200, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let drawn = if shapes.len() == 1 {
        bars(&root, &title, &shapes[0].shape, &series)
    } else {
        lines(&root, &title, &shapes, &series)
    };
    drawn.map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// The ceilings, then each op's CPU, GPU end-to-end and GPU kernel figures, where measured.
fn collect(report: &Report, shapes: &[&ShapeFacts]) -> Vec<Series> {
    let mut all = vec![Series {
        name: "copy ceiling, CPU 1 thread".into(),
        values: shapes
            .iter()
            .map(|f| Some(f.cpu_copy_1thread_gbps))
            .collect(),
    }];
    all.push(Series {
        name: "copy ceiling, GPU kernel".into(),
        values: shapes.iter().map(|f| f.gpu_copy_kernel_gbps).collect(),
    });
    for op in OPS {
        for (backend, kernel, what) in [
            ("cpu", false, "CPU fallback"),
            ("gpu", false, "GPU end to end"),
            ("gpu", true, "GPU kernel"),
        ] {
            let values = shapes
                .iter()
                .map(|f| {
                    let r = report
                        .results
                        .iter()
                        .find(|r| r.op == *op && r.backend == backend && r.shape == f.shape)?;
                    if kernel {
                        r.kernel_gbps
                    } else {
                        Some(r.gbps)
                    }
                })
                .collect();
            all.push(Series {
                name: format!("{op}, {what}"),
                values,
            });
        }
    }
    all.retain(|s| s.values.iter().any(|v| v.is_some_and(|v| v > 0.0)));
    all
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// One shape: a horizontal bar per series, named on the left, its figure at its end, on a log
/// scale (copy ceilings and software adapters span orders of magnitude).
fn bars(root: &Area<'_>, title: &str, shape: &str, series: &[Series]) -> Drawn {
    let values: Vec<f64> = series.iter().map(|s| s.values[0].unwrap_or(0.0)).collect();
    let positive = values.iter().copied().filter(|v| *v > 0.0);
    let max = positive.clone().fold(0.0, f64::max).max(1e-9);
    let start = positive.fold(f64::INFINITY, f64::min).min(max) / 2.0;
    let n = series.len();
    // Series 0 at the top.
    let row = |i: usize| n - 1 - i;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(280)
        .build_cartesian_2d((start..max * 4.0).log_scale(), (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(r) => series
                .get(row(*r))
                .map_or(String::new(), |s| s.name.clone()),
            _ => String::new(),
        })
        .x_desc(format!("GB/s at {shape} (log scale)"))
        .draw()?;
    for (i, &v) in values.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let r = row(i);
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (start, SegmentValue::Exact(r)),
                (v.max(start), SegmentValue::Exact(r + 1)),
            ],
            colour.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!(" {v:.2}"),
            (v.max(start), SegmentValue::CenterOf(r)),
            ("sans-serif", 13),
        )))?;
    }
    Ok(())
}

/// A sweep: one line per series over the shapes, smallest first, log scale.
fn lines(root: &Area<'_>, title: &str, shapes: &[&ShapeFacts], series: &[Series]) -> Drawn {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min) / 1.5;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .margin_right(LEGEND + 16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..shapes.len() - 1).into_segmented(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(shapes.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => shapes.get(*i).map_or(String::new(), |f| f.shape.clone()),
            _ => String::new(),
        })
        .x_desc("shape (rows x features), smallest first")
        .y_desc("GB/s (log scale)")
        .draw()?;
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let points: Vec<(SegmentValue<usize>, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.filter(|v| *v > 0.0)
                    .map(|v| (SegmentValue::CenterOf(i), v))
            })
            .collect();
        let shape = marker(k);
        chart.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?;
        chart.draw_series(
            points
                .into_iter()
                .map(|p| EmptyElement::at(p) + Polygon::new(shape.clone(), colour.filled())),
        )?;
    }
    // The legend, beside the plot: plotters cannot measure text without a font backend, so
    // its own legend box would not fit its labels.
    let (width, _) = root.dim_in_pixel();
    let x = width as i32 - LEGEND as i32;
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let y = 60 + 18 * k as i32;
        root.draw(&PathElement::new(
            vec![(x, y), (x + 24, y)],
            colour.stroke_width(2),
        ))?;
        root.draw(&(EmptyElement::at((x + 12, y)) + Polygon::new(marker(k), colour.filled())))?;
        root.draw(&Text::new(
            s.name.clone(),
            (x + 32, y - 6),
            ("sans-serif", 12),
        ))?;
    }
    Ok(())
}

/// Series `k`'s marker, as pixel offsets of a filled polygon: octagons, triangles, squares and
/// diamonds in turn, so series stay apart without colour.
fn marker(k: usize) -> Vec<(i32, i32)> {
    match (k / COLOURS.len() + k) % 4 {
        0 => vec![
            (4, 0),
            (3, 3),
            (0, 4),
            (-3, 3),
            (-4, 0),
            (-3, -3),
            (0, -4),
            (3, -3),
        ],
        1 => vec![(0, -5), (5, 4), (-5, 4)],
        2 => vec![(-4, -4), (4, -4), (4, 4), (-4, 4)],
        _ => vec![(0, -5), (5, 0), (0, 5), (-5, 0)],
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Record, Report, ShapeFacts};
    use super::*;

    /// A report of `shapes` (given largest first) with every op on both backends.
    fn report(shapes: &[(usize, usize)]) -> Report {
        let mut results = Vec::new();
        for (i, &(rows, features)) in shapes.iter().enumerate() {
            for (k, op) in OPS.iter().enumerate() {
                for backend in ["cpu", "gpu"] {
                    let gbps = 1.0 + (i * 7 + k) as f64;
                    results.push(Record {
                        op: op.to_string(),
                        dtype: "f32",
                        shape: format!("{rows}x{features}"),
                        rows,
                        features,
                        backend,
                        seconds: 1.0 / gbps,
                        gbps,
                        kernel_seconds: (backend == "gpu").then_some(0.5 / gbps),
                        kernel_gbps: (backend == "gpu").then_some(2.0 * gbps),
                    });
                }
            }
        }
        Report {
            backend: "Test GPU (Vulkan, DiscreteGpu, driver 1)".into(),
            cpu_threads: 2,
            reps: 1,
            shapes: shapes
                .iter()
                .map(|&(rows, features)| ShapeFacts {
                    shape: format!("{rows}x{features}"),
                    rows,
                    features,
                    cpu_copy_1thread_gbps: 20.0,
                    gpu_copy_kernel_gbps: Some(2000.0),
                    ..Default::default()
                })
                .collect(),
            results,
            small_batch: Vec::new(),
        }
    }

    /// A sweep puts its shapes in size order and names every series; one shape draws bars.
    #[test]
    fn draws_a_sweep_in_size_order_and_one_shape_as_bars() {
        let dir = std::env::temp_dir();
        let sweep = dir.join("gpunorm-chart-sweep.svg");
        draw(
            &report(&[(2048, 32768), (4096, 768), (65536, 1024)]),
            &sweep,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&sweep).unwrap();
        let at = |s: &str| svg.find(s).unwrap_or_else(|| panic!("{s} missing"));
        // plotters writes each label on a line of its own.
        let (small, mid, big) = (
            at("\n4096x768\n"),
            at("\n65536x1024\n"),
            at("\n2048x32768\n"),
        );
        assert!(small < mid && mid < big, "shapes out of size order");
        for op in OPS {
            assert!(svg.contains(&format!("{op}, GPU kernel")), "{op}");
        }
        let one = dir.join("gpunorm-chart-one.svg");
        draw(&report(&[(4096, 768)]), &one).unwrap();
        let svg = std::fs::read_to_string(&one).unwrap();
        assert!(svg.contains("<rect") && svg.contains("\nlayer_norm, CPU fallback\n"));
    }
}
