//! `sequel report`: SVG plots and one self-contained report.html for a set of runs.
//!
//! Plots: the accuracy-matrix heatmap and per-task accuracy over the stream (both the mean over a
//! group's seeds), average accuracy after each task with a ±1 std band over seeds, and forgetting after
//! each task. When runs have `accuracy_matrix_raw.csv` (a consolidator ran), the raw curve is
//! drawn dashed next to the consolidated one. Everything is inlined: the HTML opens from disk
//! with no network.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use plotters::prelude::*;
use sequel_core::metrics::AccuracyMatrix;
use sequel_core::results::{compare, format_table, groups, read_matrix, RunRecord};

const W: u32 = 720;
const H: u32 = 420;

struct Series {
    label: String,
    /// Per seed: the matrix of evaluated weights and, if present, the raw one.
    matrices: Vec<(AccuracyMatrix, Option<AccuracyMatrix>)>,
}

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

type Metric = fn(&AccuracyMatrix, usize) -> Option<f64>;

fn avg_acc(m: &AccuracyMatrix, i: usize) -> Option<f64> {
    Some(m.metrics_after(i).avg_acc)
}

fn forgetting(m: &AccuracyMatrix, i: usize) -> Option<f64> {
    m.metrics_after(i).forgetting
}

fn svg_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e:?}")
}

/// A curve of `metric` after each task per series, mean over seeds with a ±1 std band.
fn curve_plot(series: &[Series], metric: Metric, title: &str, y_label: &str) -> Result<String> {
    let tasks = series
        .iter()
        .flat_map(|s| s.matrices.iter().map(|m| m.0.rows.len()))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.8f64..tasks as f64 + 0.2, 0f64..100f64)
            .map_err(svg_err)?;
        chart
            .configure_mesh()
            .x_desc("after task")
            .y_desc(y_label)
            .x_labels(tasks.min(20))
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .draw()
            .map_err(svg_err)?;
        for (k, s) in series.iter().enumerate() {
            let color = palette(k);
            for raw in [false, true] {
                let mats: Vec<&AccuracyMatrix> = s
                    .matrices
                    .iter()
                    .filter_map(|(m, r)| if raw { r.as_ref() } else { Some(m) })
                    .collect();
                if mats.is_empty() {
                    continue;
                }
                let n = mats.iter().map(|m| m.rows.len()).min().unwrap_or(0);
                let pts: Vec<(f64, f64, f64)> = (1..=n)
                    .filter_map(|i| {
                        let xs: Vec<f64> = mats.iter().filter_map(|m| metric(m, i)).collect();
                        (!xs.is_empty()).then(|| {
                            let (m, sd) = mean_std(&xs);
                            (i as f64, m * 100.0, sd * 100.0)
                        })
                    })
                    .collect();
                if mats.len() > 1 && !raw {
                    let band: Vec<(f64, f64)> = pts
                        .iter()
                        .map(|&(x, m, sd)| (x, m + sd))
                        .chain(pts.iter().rev().map(|&(x, m, sd)| (x, m - sd)))
                        .collect();
                    chart
                        .draw_series(std::iter::once(Polygon::new(band, color.mix(0.15))))
                        .map_err(svg_err)?;
                }
                let label = if raw {
                    format!("{} (raw)", s.label)
                } else {
                    s.label.clone()
                };
                let line: Vec<(f64, f64)> = pts.iter().map(|&(x, m, _)| (x, m)).collect();
                let style = ShapeStyle::from(&color).stroke_width(if raw { 1 } else { 2 });
                if raw {
                    chart
                        .draw_series(DashedLineSeries::new(line.clone(), 6, 4, style))
                        .map_err(svg_err)?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                } else {
                    chart
                        .draw_series(LineSeries::new(line.clone(), style))
                        .map_err(svg_err)?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(svg_err)?;
                }
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(svg_err)?;
        root.present().map_err(svg_err)?;
    }
    Ok(svg)
}

/// The element-wise mean of a series' matrices over the seeds that finished as many tasks as the
/// longest one (a failed seed's partial matrix is left out), with the number of seeds averaged.
fn mean_matrix(s: &Series) -> (AccuracyMatrix, usize) {
    let longest = s.matrices.iter().map(|m| m.0.rows.len()).max().unwrap_or(0);
    let full: Vec<&AccuracyMatrix> = s
        .matrices
        .iter()
        .map(|m| &m.0)
        .filter(|m| m.rows.len() == longest)
        .collect();
    let n = full.len().max(1) as f64;
    let mean = |pick: &dyn Fn(&AccuracyMatrix) -> &Vec<f64>| -> Vec<f64> {
        let len = full.first().map_or(0, |m| pick(m).len());
        (0..len)
            .map(|j| full.iter().map(|m| pick(m)[j]).sum::<f64>() / n)
            .collect()
    };
    let m = AccuracyMatrix {
        init: mean(&|m| &m.init),
        rows: (0..longest).map(|i| mean(&|m| &m.rows[i])).collect(),
        counts: full.first().map_or_else(Vec::new, |m| m.counts.clone()),
    };
    (m, full.len())
}

fn seeds_note(n: usize) -> String {
    if n > 1 {
        format!(" (mean of {n} seeds)")
    } else {
        String::new()
    }
}

/// Accuracy on each task (one line per task) after each training task, mean over seeds.
fn per_task_plot(s: &Series) -> Result<String> {
    let (m, seeds) = mean_matrix(s);
    let m = &m;
    let t = m.num_tasks();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: accuracy on each task{}", s.label, seeds_note(seeds)),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.2f64..t as f64 + 0.2, 0f64..100f64)
            .map_err(svg_err)?;
        chart
            .configure_mesh()
            .x_desc("after task (0 = untrained)")
            .y_desc("accuracy (%)")
            .x_labels((t + 1).min(21))
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .draw()
            .map_err(svg_err)?;
        for j in 0..t {
            let color = palette(j);
            let pts: Vec<(f64, f64)> = std::iter::once((0.0, m.init[j] * 100.0))
                .chain(
                    m.rows
                        .iter()
                        .enumerate()
                        .map(|(i, r)| ((i + 1) as f64, r[j] * 100.0)),
                )
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(svg_err)?
                .label(format!("task {}", j + 1))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(svg_err)?;
        root.present().map_err(svg_err)?;
    }
    Ok(svg)
}

/// The accuracy matrix as a heatmap with the values written in the cells.
fn heatmap(s: &Series) -> Result<String> {
    let (m, seeds) = mean_matrix(s);
    let m = &m;
    let t = m.num_tasks();
    let rows: Vec<(String, &Vec<f64>)> = std::iter::once(("init".to_string(), &m.init))
        .chain(
            m.rows
                .iter()
                .enumerate()
                .map(|(i, r)| ((i + 1).to_string(), r)),
        )
        .collect();
    let cell = (560 / t.max(1)).clamp(24, 80) as i32;
    let (w, h) = (
        90 + cell * t as i32 + 20,
        70 + cell * rows.len() as i32 + 20,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w as u32, h as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_err)?;
        root.draw(&Text::new(
            format!("{}: accuracy matrix (%){}", s.label, seeds_note(seeds)),
            (10, 10),
            ("sans-serif", 18),
        ))
        .map_err(svg_err)?;
        let (x0, y0) = (80, 60);
        for j in 0..t {
            root.draw(&Text::new(
                format!("T{}", j + 1),
                (x0 + cell * j as i32 + cell / 2 - 8, y0 - 18),
                ("sans-serif", 13),
            ))
            .map_err(svg_err)?;
        }
        for (i, (name, vals)) in rows.iter().enumerate() {
            let y = y0 + cell * i as i32;
            root.draw(&Text::new(
                name.clone(),
                (10, y + cell / 2 - 6),
                ("sans-serif", 13),
            ))
            .map_err(svg_err)?;
            for (j, v) in vals.iter().enumerate() {
                let x = x0 + cell * j as i32;
                // White (0 %) to dark blue (100 %).
                let a = v.clamp(0.0, 1.0);
                let color = RGBColor(
                    (255.0 - 220.0 * a) as u8,
                    (255.0 - 160.0 * a) as u8,
                    (255.0 - 75.0 * a) as u8,
                );
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    color.filled(),
                ))
                .map_err(svg_err)?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    WHITE.stroke_width(1),
                ))
                .map_err(svg_err)?;
                if cell >= 32 {
                    let ink = if a > 0.6 { WHITE } else { BLACK };
                    root.draw(&Text::new(
                        format!("{:.0}", v * 100.0),
                        (x + cell / 2 - 8, y + cell / 2 - 6),
                        ("sans-serif", 12).into_font().color(&ink),
                    ))
                    .map_err(svg_err)?;
                }
            }
        }
        root.present().map_err(svg_err)?;
    }
    Ok(svg)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Write the plots and report.html for the runs under `paths` into `out` (default: the run
/// directory itself when there is exactly one run, else `./report`). Returns the HTML path.
pub fn run(paths: &[PathBuf], by: &[String], out: Option<PathBuf>) -> Result<PathBuf> {
    let records = sequel_core::results::find_runs(paths)?;
    let completed: Vec<RunRecord> = records
        .iter()
        .filter(|r| !r.summary["final"].is_null())
        .cloned()
        .collect();
    anyhow::ensure!(
        !completed.is_empty(),
        "no run with at least one finished task under the given paths"
    );
    let out = out.unwrap_or_else(|| {
        if completed.len() == 1 {
            completed[0].dir.clone()
        } else {
            PathBuf::from("report")
        }
    });
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut series = Vec::new();
    for (label, runs) in groups(&completed, by)? {
        let mut matrices = Vec::new();
        for r in runs {
            let m = read_matrix(&r.dir.join("accuracy_matrix.csv"))?;
            let raw_path = r.dir.join("accuracy_matrix_raw.csv");
            let raw = if raw_path.is_file() {
                Some(read_matrix(&raw_path)?)
            } else {
                None
            };
            if !m.rows.is_empty() {
                matrices.push((m, raw));
            }
        }
        if !matrices.is_empty() {
            series.push(Series { label, matrices });
        }
    }
    let mut figures: Vec<(String, String)> = vec![
        (
            "avg_acc.svg".into(),
            curve_plot(
                &series,
                avg_acc,
                "Average accuracy on seen tasks",
                "average accuracy (%)",
            )?,
        ),
        (
            "forgetting.svg".into(),
            curve_plot(
                &series,
                forgetting,
                "Forgetting (max-based)",
                "forgetting (%)",
            )?,
        ),
    ];
    for s in &series {
        figures.push((format!("matrix-{}.svg", slug(&s.label)), heatmap(s)?));
        figures.push((
            format!("per-task-{}.svg", slug(&s.label)),
            per_task_plot(s)?,
        ));
    }
    for (name, svg) in &figures {
        sequel_core::run::write_atomic(&out.join(name), svg.as_bytes())?;
    }
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sequel report</title>\n<style>\
         body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}\
         figure{margin:1em 0}</style></head><body>\n<h1>sequel report</h1>\n",
    );
    let rows = compare(&completed, by)?;
    let _ = writeln!(
        html,
        "<h2>Final metrics (mean ± std over seeds)</h2>\n<table>"
    );
    let table = format_table(&rows, false);
    for (i, line) in table.lines().enumerate() {
        if i == 1 {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let tag = if i == 0 { "th" } else { "td" };
        let _ = write!(html, "<tr>");
        for c in cells {
            let _ = write!(html, "<{tag}>{}</{tag}>", escape(c));
        }
        let _ = writeln!(html, "</tr>");
    }
    let _ = writeln!(html, "</table>");
    for (name, svg) in &figures {
        // Inline the SVG markup itself so the page needs no other file.
        let _ = writeln!(
            html,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            escape(name)
        );
    }
    let _ = writeln!(html, "<h2>Configs</h2>");
    for r in &completed {
        let cfg = std::fs::read_to_string(r.dir.join("config.yaml")).unwrap_or_default();
        let _ = writeln!(
            html,
            "<h3>{}</h3>\n<pre>{}</pre>",
            escape(&r.dir.display().to_string()),
            escape(&cfg)
        );
    }
    html.push_str("</body></html>\n");
    let path = out.join("report.html");
    sequel_core::run::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: &[[f64; 2]]) -> AccuracyMatrix {
        AccuracyMatrix {
            init: vec![0.1, 0.2],
            rows: rows.iter().map(|r| r.to_vec()).collect(),
            counts: vec![10, 10],
        }
    }

    #[test]
    fn heatmaps_average_the_seeds_that_finished() {
        let s = Series {
            label: "x".into(),
            matrices: vec![
                (matrix(&[[0.9, 0.0], [0.5, 0.8]]), None),
                (matrix(&[[0.7, 0.0], [0.3, 1.0]]), None),
                // A failed seed with one task only is left out.
                (matrix(&[[0.0, 0.0]]), None),
            ],
        };
        let (m, n) = mean_matrix(&s);
        assert_eq!(n, 2);
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&m.rows[0], &[0.8, 0.0]), "{:?}", m.rows);
        assert!(close(&m.rows[1], &[0.4, 0.9]), "{:?}", m.rows);
        assert!(close(&m.init, &[0.1, 0.2]));
        assert!(heatmap(&s).unwrap().contains("mean of 2 seeds"));
    }
}
