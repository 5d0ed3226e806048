//! The post-copy panel: what the destination lacked at the switch and how it got it (on
//! demand or from the background push), and how long a faulting vCPU waited.
//!
//! The report keeps totals and percentiles only (no time series of the faults), so these are
//! bars, not a timeline.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{ms, tick_label, Area, PlotError, Ticked, FONT};
use crate::migrate::PostcopyStats;

const DEMAND: RGBColor = RGBColor(214, 39, 40);
const PUSHED: RGBColor = RGBColor(44, 160, 44);
const OTHER: RGBColor = RGBColor(127, 127, 127);
const LATENCY: RGBColor = RGBColor(148, 103, 189);

/// Draws the post-copy figures on `area`: pages on the left, fault latency on the right.
pub(super) fn draw(area: &Area<'_>, pc: &PostcopyStats) -> Result<(), PlotError> {
    let (left, right) = area.split_horizontally(area.dim_in_pixel().0 * 58 / 100);
    let pages = [
        ("missing at the switch", pc.pages_missing, OTHER),
        ("placed on demand", pc.pages_demand, DEMAND),
        ("placed by the push", pc.pages_pushed, PUSHED),
        ("faults read", pc.faults, OTHER),
        ("page requests sent", pc.requests, OTHER),
    ];
    bars(
        &left,
        &format!(
            "(d) post-copy: pages, {} until the last page was placed",
            ms(pc.duration_ms)
        ),
        "pages",
        &pages,
        false,
    )?;
    let latency = [
        ("p50", pc.latency_p50_us, LATENCY),
        ("p99", pc.latency_p99_us, LATENCY),
        ("max", pc.latency_max_us, LATENCY),
    ];
    bars(
        &right,
        &format!("fault latency over {} faulted pages", pc.latency_count),
        "µs, fault to placement (log scale)",
        &latency,
        true,
    )?;
    Ok(())
}

/// Horizontal bars, one per `(name, value, color)`, top to bottom, each with its figure.
fn bars(
    area: &Area<'_>,
    caption: &str,
    x_desc: &str,
    rows: &[(&str, u64, RGBColor)],
    log: bool,
) -> Result<(), PlotError> {
    let k = rows.len();
    let top = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    // Row i is drawn at y = k - 1 - i: the first row on top.
    let y = Ticked::new(-0.5..k as f64 - 0.5, (0..k).map(|i| i as f64).collect());
    let names: Vec<String> = rows.iter().rev().map(|r| r.0.to_string()).collect();
    let name_of = |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FONT, 18))
        .margin(10)
        .margin_right(if log { 90 } else { 60 })
        .x_label_area_size(40)
        .y_label_area_size(if log { 50 } else { 160 });
    let style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    if log {
        let (lo, hi) = (0.5, top * 8.0);
        let mut chart = builder.build_cartesian_2d(Ticked::log(lo..hi), y)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .disable_y_mesh()
            .x_desc(x_desc)
            .y_label_formatter(&name_of)
            .x_label_formatter(&|v| tick_label(*v))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()?;
        for (i, (_, v, c)) in rows.iter().enumerate() {
            let yc = (k - 1 - i) as f64;
            let end = (*v as f64).max(lo);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(lo, yc - 0.3), (end, yc + 0.3)],
                c.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{v} µs"),
                (end * 1.1, yc),
                style.clone(),
            )))?;
        }
    } else {
        let hi = top * 1.25;
        let mut chart = builder.build_cartesian_2d(0.0..hi, y)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .disable_y_mesh()
            .x_desc(x_desc)
            .y_label_formatter(&name_of)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()?;
        for (i, (_, v, c)) in rows.iter().enumerate() {
            let yc = (k - 1 - i) as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, yc - 0.3), (*v as f64, yc + 0.3)],
                c.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                v.to_string(),
                (*v as f64 + hi * 0.01, yc),
                style.clone(),
            )))?;
        }
    }
    Ok(())
}
