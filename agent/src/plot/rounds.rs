//! The round panels: pages, rates, downtime, each with the switch point marked.
//!
//! They share one x axis, a slot per round (round `r` is centred on `r`); the last round is
//! the stop-and-copy pass or the post-copy switch, shaded in every panel. Each panel keeps its
//! legend to its right, outside the data.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{finite, ms, switch_name, tick_label, Area, PlotError, Ticked, FONT};
use crate::migrate::{Mode, Report, RoundStats};

/// Width of a panel's chart; the rest of the line is its legend.
const CHART_W: u32 = 930;
/// Guest page size, bytes: dirty rates are pages/s.
const PAGE: f64 = 4096.0;
const MIB: f64 = 1048576.0;

const SENT: RGBColor = RGBColor(31, 119, 180);
const DIRTY: RGBColor = RGBColor(255, 127, 14);
const HELD: RGBColor = RGBColor(127, 127, 127);
const BANDWIDTH: RGBColor = RGBColor(44, 160, 44);
const DIRTY_RATE: RGBColor = RGBColor(214, 39, 40);
const KERNEL: RGBColor = RGBColor(148, 103, 189);
const PREDICTED: RGBColor = RGBColor(31, 119, 180);
const ACTUAL: RGBColor = RGBColor(0, 0, 0);
const BOUND: RGBColor = RGBColor(214, 39, 40);
const NO_VERIFY: RGBColor = RGBColor(127, 127, 127);
const SWITCH: RGBColor = RGBColor(255, 187, 120);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Swatch {
    Bar,
    Line,
    Dashed,
    Points,
    Triangles,
    Band,
    Blank,
}

/// Draws the three round panels on `area`, top to bottom.
pub(super) fn draw(
    area: &Area<'_>,
    r: &Report,
    max_downtime: Option<f64>,
) -> Result<(), PlotError> {
    let parts = area.split_evenly((3, 1));
    pages(&parts[0], r)?;
    rates(&parts[1], r)?;
    downtime(&parts[2], r, max_downtime)?;
    Ok(())
}

/// The x axis: a slot per round, a label on each (on every k-th past 20 rounds).
fn x_axis(n: usize) -> Ticked {
    let step = n.div_ceil(20).max(1);
    let keys: Vec<f64> = (1..=n)
        .filter(|r| (r - 1) % step == 0)
        .map(|r| r as f64)
        .collect();
    Ticked::new(0.5..n as f64 + 0.5, keys)
}

/// The switch round's slot, shaded, with its name at the top.
fn switch_band<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<impl Ranged<ValueType = f64>, Y>>,
    r: &Report,
    y: (f64, f64),
    label: bool,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let n = r.rounds.len() as f64;
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(n - 0.5, y.0), (n + 0.5, y.1)],
            SWITCH.mix(0.35).filled(),
        )))
        .map_err(|e| PlotError::Draw(e.to_string()))?;
    if label {
        let style = TextStyle::from((FONT, 15).into_font())
            .color(&RGBColor(160, 82, 0))
            .pos(Pos::new(HPos::Right, VPos::Top));
        // Right-aligned in the band: past a few rounds the band is narrower than its name.
        chart
            .draw_series(std::iter::once(Text::new(
                switch_name(r.mode).to_string(),
                (n + 0.45, y.1),
                style,
            )))
            .map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    Ok(())
}

/// Splits a panel into its chart and its legend; draws the legend.
fn with_legend<'a>(
    area: &Area<'a>,
    entries: &[(RGBColor, Swatch, String)],
) -> Result<Area<'a>, PlotError> {
    let (chart, legend) = area.split_horizontally(CHART_W);
    let mut y = 40;
    for (color, swatch, text) in entries {
        let (x0, x1, yc) = (10, 36, y);
        match swatch {
            Swatch::Bar => legend.draw(&Rectangle::new(
                [(x0 + 6, yc - 7), (x1 - 6, yc + 7)],
                color.filled(),
            ))?,
            Swatch::Band => legend.draw(&Rectangle::new(
                [(x0, yc - 7), (x1, yc + 7)],
                color.mix(0.35).filled(),
            ))?,
            Swatch::Line => {
                legend.draw(&PathElement::new(
                    vec![(x0, yc), (x1, yc)],
                    color.stroke_width(2),
                ))?;
                legend.draw(&Circle::new(((x0 + x1) / 2, yc), 3, color.filled()))?
            }
            Swatch::Dashed => {
                for k in 0..3 {
                    let a = x0 + k * 10;
                    legend.draw(&PathElement::new(
                        vec![(a, yc), (a + 6, yc)],
                        color.stroke_width(2),
                    ))?;
                }
            }
            Swatch::Blank => {}
            Swatch::Triangles => {
                legend.draw(&PathElement::new(
                    vec![(x0, yc), (x1, yc)],
                    color.stroke_width(2),
                ))?;
                legend.draw(&TriangleMarker::new(((x0 + x1) / 2, yc), 5, color.filled()))?
            }
            Swatch::Points => {
                legend.draw(&Cross::new(((x0 + x1) / 2, yc), 5, color.stroke_width(2)))?
            }
        }
        let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        legend.draw(&Text::new(text.clone(), (x1 + 8, yc), style))?;
        y += 26;
    }
    Ok(chart)
}

/// (a) Pages sent and dirty pages per round, log scale.
fn pages(area: &Area<'_>, r: &Report) -> Result<(), PlotError> {
    let rs = &r.rounds;
    let held = rs.iter().any(|x| x.held_pages > 0);
    let mut legend = vec![
        (SENT, Swatch::Bar, "pages sent in the round".to_string()),
        (DIRTY, Swatch::Bar, "pages dirty at its end".to_string()),
    ];
    if held {
        legend.push((HELD, Swatch::Points, "hot pages held back".into()));
    }
    legend.push((SWITCH, Swatch::Band, switch_name(r.mode).into()));
    if r.mode == Mode::PostCopy {
        legend.push((
            WHITE,
            Swatch::Blank,
            "(its dirty: left to post-copy)".into(),
        ));
    }
    let area = with_legend(area, &legend)?;
    let top = rs
        .iter()
        .flat_map(|x| [x.pages, x.dirty_pages, x.held_pages])
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // Bars start below 1 page so a one-page bar shows; headroom above for the labels.
    let (lo, hi) = (0.5, top * 4.0);
    let mut chart = ChartBuilder::on(&area)
        .caption("(a) pages per round", (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_axis(rs.len()), Ticked::log(lo..hi))?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .disable_x_mesh()
        .bold_line_style(GRID)
        .x_desc("round")
        .y_desc("pages (4 KiB, log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick_label(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    switch_band(&mut chart, r, (lo, hi), true)?;
    let bar = |x0: f64, x1: f64, v: u64, c: RGBColor| {
        Rectangle::new([(x0, lo), (x1, (v as f64).max(lo))], c.filled())
    };
    chart.draw_series(
        rs.iter()
            .map(|x| bar(x.round as f64 - 0.36, x.round as f64 - 0.01, x.pages, SENT)),
    )?;
    chart.draw_series(rs.iter().filter(|x| x.dirty_pages > 0).map(|x| {
        bar(
            x.round as f64 + 0.01,
            x.round as f64 + 0.36,
            x.dirty_pages,
            DIRTY,
        )
    }))?;
    if held {
        chart.draw_series(rs.iter().filter(|x| x.held_pages > 0).map(|x| {
            Cross::new(
                (x.round as f64, x.held_pages as f64),
                5,
                HELD.stroke_width(2),
            )
        }))?;
    }
    if rs.len() <= 12 {
        // Each bar's figure above it.
        let style =
            TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        let label = |x: f64, v: u64| {
            Text::new(v.to_string(), (x, (v as f64).max(lo) * 1.15), style.clone())
        };
        chart.draw_series(rs.iter().map(|x| label(x.round as f64 - 0.185, x.pages)))?;
        chart.draw_series(
            rs.iter()
                .map(|x| label(x.round as f64 + 0.185, x.dirty_pages)),
        )?;
    }
    Ok(())
}

/// The guest's dirty rate during a round, MiB/s; none for the switch pass (the vCPUs were
/// paused: its rate is 0 by construction).
fn dirty_mibs(r: &Report, x: &RoundStats) -> Option<f64> {
    let last = x.round as usize == r.rounds.len();
    (!last || x.dirty_rate > 0.0).then(|| finite(x.dirty_rate) * PAGE / MIB)
}

/// The kernel's (BPF probes') dirty rate of a round, MiB/s: round 1's end-of-round rate, else
/// distinct pages over the window.
fn kernel_mibs(x: &RoundStats) -> Option<f64> {
    let k = x.kernel?;
    let pages_s = if k.rate_pages_per_s > 0.0 {
        k.rate_pages_per_s
    } else if k.window_s > 0.0 {
        k.distinct_pages as f64 / k.window_s
    } else {
        return None;
    };
    Some(finite(pages_s) * PAGE / MIB)
}

/// (b) Bandwidth and dirty rate per round, MiB/s.
fn rates(area: &Area<'_>, r: &Report) -> Result<(), PlotError> {
    let rs = &r.rounds;
    let bw: Vec<(f64, f64)> = rs
        .iter()
        .filter(|x| finite(x.bandwidth) > 0.0)
        .map(|x| (x.round as f64, x.bandwidth / MIB))
        .collect();
    let dirty: Vec<(f64, f64)> = rs
        .iter()
        .filter_map(|x| Some((x.round as f64, dirty_mibs(r, x)?)))
        .collect();
    let kernel: Vec<(f64, f64)> = rs
        .iter()
        .filter_map(|x| Some((x.round as f64, kernel_mibs(x)?)))
        .collect();
    let mut legend = vec![
        (BANDWIDTH, Swatch::Line, "bandwidth achieved".to_string()),
        (
            DIRTY_RATE,
            Swatch::Triangles,
            "guest dirty rate (dirty log)".into(),
        ),
    ];
    if !kernel.is_empty() {
        legend.push((KERNEL, Swatch::Points, "dirty rate, kernel probes".into()));
    }
    if rs.iter().any(|x| x.throttle_pct > 0) {
        legend.push((BLACK, Swatch::Blank, "throttle: vCPUs slowed from".into()));
        legend.push((BLACK, Swatch::Blank, "that round on (auto-converge)".into()));
    }
    legend.push((SWITCH, Swatch::Band, switch_name(r.mode).into()));
    let area = with_legend(area, &legend)?;
    let top = bw
        .iter()
        .chain(&dirty)
        .chain(&kernel)
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let hi = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(&area)
        .caption("(b) link bandwidth and guest dirty rate", (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_axis(rs.len()), 0.0..hi)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .disable_x_mesh()
        .bold_line_style(GRID)
        .x_desc("round")
        .y_desc("MiB/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    switch_band(&mut chart, r, (0.0, hi), true)?;
    for (points, color) in [(&bw, BANDWIDTH), (&dirty, DIRTY_RATE)] {
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?;
    }
    // Larger triangles under the circles: a dirty rate equal to the bandwidth stays visible.
    chart.draw_series(
        dirty
            .iter()
            .map(|p| TriangleMarker::new(*p, 7, DIRTY_RATE.stroke_width(2))),
    )?;
    chart.draw_series(bw.iter().map(|p| Circle::new(*p, 4, BANDWIDTH.filled())))?;
    chart.draw_series(
        kernel
            .iter()
            .map(|p| Cross::new(*p, 6, KERNEL.stroke_width(2))),
    )?;
    let style = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    // The throttle where it changes, over the round's bandwidth.
    let changes = rs.iter().enumerate().filter(|(i, x)| {
        let before = if *i == 0 { 0 } else { rs[i - 1].throttle_pct };
        x.throttle_pct != before
    });
    chart.draw_series(changes.map(|(_, x)| {
        let y = finite(x.bandwidth) / MIB;
        let text = format!("throttle {} %", x.throttle_pct);
        Text::new(text, (x.round as f64, y + hi * 0.03), style.clone())
    }))?;
    Ok(())
}

/// (c) The predicted downtime of each round against the actual downtime, log scale.
fn downtime(area: &Area<'_>, r: &Report, max_downtime: Option<f64>) -> Result<(), PlotError> {
    let rs = &r.rounds;
    let n = rs.len() as f64;
    // The switch pass predicts nothing (0): what it predicted is the actual downtime.
    let predicted: Vec<(f64, f64)> = rs
        .iter()
        .filter(|x| x.predicted_downtime_ms > 0.0 && x.predicted_downtime_ms.is_finite())
        .map(|x| (x.round as f64, x.predicted_downtime_ms))
        .collect();
    let actual = finite(r.downtime_ms);
    let no_verify = (r.verify_at_pause_ms > 0.0).then(|| finite(r.downtime_without_verify_ms));
    let bound = max_downtime.filter(|v| v.is_finite() && *v > 0.0);
    let mut legend = vec![(
        PREDICTED,
        Swatch::Line,
        "predicted downtime if stopped".to_string(),
    )];
    legend.push((
        ACTUAL,
        Swatch::Line,
        format!("actual downtime {}", ms(actual)),
    ));
    if let Some(v) = no_verify {
        legend.push((
            NO_VERIFY,
            Swatch::Dashed,
            format!("without --verify {}", ms(v)),
        ));
    }
    if let Some(b) = bound {
        legend.push((BOUND, Swatch::Dashed, format!("--max-downtime {}", ms(b))));
    }
    legend.push((SWITCH, Swatch::Band, switch_name(r.mode).into()));
    let area = with_legend(area, &legend)?;
    let values = predicted
        .iter()
        .map(|p| p.1)
        .chain([actual])
        .chain(no_verify)
        .chain(bound)
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo / 3.0, hi * 3.0)
    } else {
        (0.01, 1.0)
    };
    let mut chart = ChartBuilder::on(&area)
        .caption(
            match r.mode {
                Mode::PreCopy => "(c) downtime: predicted after each round, and actual",
                Mode::PostCopy => {
                    "(c) downtime: predicted after each round, and actual (the switch's pause)"
                }
            },
            (FONT, 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_axis(rs.len()), Ticked::log(lo..hi))?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .disable_x_mesh()
        .bold_line_style(GRID)
        .x_desc("round")
        .y_desc("ms (log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick_label(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    switch_band(&mut chart, r, (lo, hi), true)?;
    let across = |v: f64| vec![(0.5, v), (n + 0.5, v)];
    if let Some(b) = bound {
        chart.draw_series(DashedLineSeries::new(
            across(b),
            8,
            5,
            BOUND.stroke_width(2),
        ))?;
    }
    if actual > 0.0 {
        chart.draw_series(LineSeries::new(across(actual), ACTUAL.stroke_width(2)))?;
        chart.draw_series(std::iter::once(Circle::new(
            (n, actual),
            5,
            ACTUAL.filled(),
        )))?;
    }
    if let Some(v) = no_verify.filter(|v| *v > 0.0) {
        chart.draw_series(DashedLineSeries::new(
            across(v),
            8,
            5,
            NO_VERIFY.stroke_width(2),
        ))?;
    }
    chart.draw_series(LineSeries::new(
        predicted.iter().copied(),
        PREDICTED.stroke_width(2),
    ))?;
    chart.draw_series(
        predicted
            .iter()
            .map(|p| Circle::new(*p, 4, PREDICTED.filled())),
    )?;
    if rs.len() <= 12 {
        let style = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom));
        chart.draw_series(
            predicted
                .iter()
                .map(|p| Text::new(ms(p.1), (p.0 + 0.06, p.1 * 1.15), style.clone())),
        )?;
    }
    Ok(())
}
