//! Plots of a migration [`Report`]: one SVG, panels stacked on a shared round axis.
//!
//! From the top: a header (VM, from → to, mode, total time, downtime, why pre-copy stopped);
//! pages sent and pages found dirty per round ([`rounds`]); the link's bandwidth against the
//! guest's dirty rate, MiB/s; the predicted downtime of each round against the actual one and
//! `--max-downtime`; the switch point (the stop-and-copy pass, or the post-copy switch) marked
//! in each of them; and for post-copy, what the destination fetched and how fast
//! ([`postcopy`]). The report records no time series of the post-copy faults, so that panel
//! shows totals and latency percentiles.
//!
//! The SVG backend writes text as `<text>`: the viewer draws it, no font library is needed.

mod postcopy;
mod rounds;
#[cfg(test)]
mod tests;

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::migrate::{Mode, Report};

/// Width of the picture, pixels.
const WIDTH: u32 = 1200;
/// Height of one panel, pixels.
const PANEL: u32 = 300;
/// Height of the post-copy panel, pixels.
const POSTCOPY_PANEL: u32 = 280;
/// The font every text uses (the viewer picks the face).
const FONT: &str = "sans-serif";
/// Characters of the header's text per line before it wraps (at its 17 px).
const HEADER_WRAP: usize = 140;

/// What the report does not carry but the plot can show.
#[derive(Debug, Clone, Default)]
pub struct PlotOptions {
    /// The migration's `--max-downtime`, ms: drawn on the downtime panel. Without it, read
    /// from the stop reason when pre-copy converged (it names the bound).
    pub max_downtime_ms: Option<f64>,
}

/// Why a report could not be plotted.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The text is not a migration report (nor `vmig demo --json`'s object holding one).
    #[error("not a migration report: {0}")]
    NotAReport(String),
    /// The text is `vmig migrate --json`'s answer to a failed migration.
    #[error("the file holds a failed migration, not a report: {0}")]
    Failed(String),
    /// A report without rounds: nothing ran, nothing to plot.
    #[error("the report of {0} has no rounds: nothing to plot")]
    NoRounds(String),
    /// The drawing library failed.
    #[error("drawing the plot: {0}")]
    Draw(String),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        PlotError::Draw(e.to_string())
    }
}

/// What the panels draw on.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// An axis with ticks where told, linear or logarithmic (plotters' own `WithKeyPoints` has no
/// label formatter over `f64`, and its log axis crowds its labels on short ranges).
#[derive(Debug, Clone)]
struct Ticked {
    range: Range<f64>,
    ticks: Vec<f64>,
    log: bool,
}

impl Ticked {
    /// A linear axis over `range`, labelled at `ticks`.
    fn new(range: Range<f64>, ticks: Vec<f64>) -> Self {
        Self {
            range,
            ticks,
            log: false,
        }
    }

    /// A log axis over `range` (both ends above 0), labelled at powers of ten, and at their
    /// doubles and fives when the range spans fewer than three decades.
    fn log(range: Range<f64>) -> Self {
        let (lo, hi) = (
            range.start.log10().floor() as i32,
            range.end.log10().ceil() as i32,
        );
        let fine = (range.end / range.start).log10() < 3.0;
        let mut ticks = Vec::new();
        for e in lo..=hi {
            let p = 10f64.powi(e);
            let steps: &[f64] = if fine { &[1.0, 2.0, 5.0] } else { &[1.0] };
            ticks.extend(steps.iter().map(|m| m * p).filter(|v| range.contains(v)));
        }
        Self {
            range,
            ticks,
            log: true,
        }
    }

    fn pos(&self, v: f64) -> f64 {
        if self.log {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (a, b) = (self.pos(self.range.start), self.pos(self.range.end));
        if b <= a {
            return (limit.0 + limit.1) / 2;
        }
        let t = (self.pos(*v) - a) / (b - a);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// A tick's label: 0.5, 2, 100, 2k, 100k, 1M.
fn tick_label(v: f64) -> String {
    let (v, unit) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{}{unit}", (v * 100.0).round() / 100.0)
}

/// Reads a report from JSON: the bare report of `vmig migrate --json`, or an object with it
/// under `report` (`vmig demo --json`).
pub fn parse_report(text: &str) -> Result<Report, PlotError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| PlotError::NotAReport(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PlotError::NotAReport("not a JSON object".into()))?;
    let inner = if obj.contains_key("rounds") {
        &v
    } else if let Some(r) = obj.get("report") {
        r
    } else if let Some(e) = obj.get("error") {
        return Err(PlotError::Failed(
            e.as_str().map_or_else(|| e.to_string(), str::to_string),
        ));
    } else {
        return Err(PlotError::NotAReport(
            "no `rounds` (a report) nor `report` (vmig demo --json) in it".into(),
        ));
    };
    serde_json::from_value(inner.clone()).map_err(|e| PlotError::NotAReport(e.to_string()))
}

/// Draws `report` as an SVG document.
pub fn render_svg(report: &Report, opts: &PlotOptions) -> Result<String, PlotError> {
    if report.rounds.is_empty() {
        return Err(PlotError::NoRounds(report.vm.clone()));
    }
    let header = header_lines(report);
    let header_h = 16 + 36 + 22 * (header.len() as u32 - 1) + 4;
    let post_h = if report.postcopy.is_some() {
        POSTCOPY_PANEL
    } else {
        0
    };
    let height = header_h + 3 * PANEL + post_h;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(header_h);
        draw_header(&top, &header)?;
        let (panels, post) = rest.split_vertically(3 * PANEL);
        let max_downtime = opts
            .max_downtime_ms
            .or_else(|| bound_in(&report.stop_reason.detail));
        rounds::draw(&panels, report, max_downtime)?;
        if let Some(pc) = &report.postcopy {
            postcopy::draw(&post, pc)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// The header's lines: the title first.
fn header_lines(r: &Report) -> Vec<String> {
    let mut lines = vec![format!(
        "{}: {} → {}, {}, total {:.2} s, downtime {}",
        r.vm,
        r.from,
        r.to,
        r.mode,
        finite(r.total_ms) / 1e3,
        ms(r.downtime_ms)
    )];
    let mut facts = format!(
        "{} round{} (the last is the {}), {:.1} MiB sent at {:.1} MiB/s over {}, dirty tracking {}",
        r.rounds.len(),
        if r.rounds.len() == 1 { "" } else { "s" },
        switch_name(r.mode),
        r.bytes_sent as f64 / 1048576.0,
        finite(r.achieved_mibs),
        r.io_path,
        r.dirty_tracking
    );
    if r.verify_at_pause_ms > 0.0 {
        facts += &format!(
            "; {} of the downtime verified digests",
            ms(r.verify_at_pause_ms)
        );
    }
    lines.push(facts);
    let why = format!(
        "pre-copy stopped ({}): {}",
        r.stop_reason.cause, r.stop_reason
    );
    lines.extend(wrap(&why, HEADER_WRAP));
    lines
}

fn draw_header(area: &Area<'_>, lines: &[String]) -> Result<(), PlotError> {
    let mut y = 16;
    for (i, l) in lines.iter().enumerate() {
        let (size, color) = if i == 0 {
            (26, BLACK)
        } else {
            (17, RGBColor(60, 60, 60))
        };
        let style = TextStyle::from((FONT, size).into_font()).color(&color);
        area.draw(&Text::new(l.clone(), (20, y), style))?;
        y += if i == 0 { 36 } else { 22 };
    }
    Ok(())
}

/// What the last round of a report in `mode` was.
fn switch_name(mode: Mode) -> &'static str {
    match mode {
        Mode::PreCopy => "stop-and-copy pass",
        Mode::PostCopy => "post-copy switch",
    }
}

/// `--max-downtime` as a converged stop reason names it ("... <= 300 ms ...").
fn bound_in(detail: &str) -> Option<f64> {
    let rest = detail.strip_prefix("converged: ")?;
    let after = &rest[rest.find("<= ")? + 3..];
    let num = after.split_whitespace().next()?;
    num.parse().ok().filter(|v: &f64| v.is_finite() && *v > 0.0)
}

/// Milliseconds for people: "2392.9 ms", "3.93 s".
fn ms(v: f64) -> String {
    let v = finite(v);
    if v >= 10_000.0 {
        format!("{:.2} s", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// `v`, or 0 when it is not a finite number at or above 0 (what a report should never hold).
fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// Splits `s` at spaces into lines of at most `width` characters (longer words stay whole).
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for w in s.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + w.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}
