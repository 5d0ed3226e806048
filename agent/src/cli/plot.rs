//! `vmig report plot REPORT.json` and `vmig migrate ... --plot FILE`: a migration report as an
//! SVG (see [`vmig::plot`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use vmig::migrate::Report;
use vmig::plot::{self, PlotOptions};

/// Saved migration reports.
#[derive(Debug, Subcommand)]
pub enum ReportCmd {
    /// Draw a saved report (`vmig migrate --json` or `vmig demo --json`) as an SVG: pages,
    /// bandwidth and dirty rate, predicted and actual downtime per round, the switch point,
    /// the post-copy figures.
    Plot(PlotArgs),
}

/// Options of `vmig report plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// The JSON report.
    report: PathBuf,
    /// The SVG to write [default: REPORT with the extension .svg].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The migration's --max-downtime, ms, drawn with the downtimes (the report names it only
    /// when pre-copy converged).
    #[arg(long)]
    max_downtime: Option<f64>,
}

/// Runs a `vmig report` command.
pub fn run(cmd: ReportCmd) -> Result<()> {
    let ReportCmd::Plot(a) = cmd;
    let text = std::fs::read_to_string(&a.report)
        .with_context(|| format!("cannot read the report {}", a.report.display()))?;
    let report = plot::parse_report(&text).with_context(|| format!("{}", a.report.display()))?;
    let out = a.output.unwrap_or_else(|| a.report.with_extension("svg"));
    if out == a.report {
        bail!(
            "the plot would overwrite the report {}: give -o FILE",
            a.report.display()
        );
    }
    let opts = PlotOptions {
        max_downtime_ms: a.max_downtime,
    };
    write(&report, &out, &opts)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Before a migration: refuses a `--plot` path whose folder does not exist (the migration would
/// run and its plot be lost).
pub fn check_target(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("--plot {}: no folder {}", path.display(), dir.display());
    }
    Ok(())
}

/// Draws `report` into the SVG file `path`.
pub fn write(report: &Report, path: &Path, opts: &PlotOptions) -> Result<()> {
    let svg = plot::render_svg(report, opts)?;
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

/// `--plot FILE` after a migration that succeeded: a failed plot is a warning on stderr, not
/// a failure (the VM moved; the exit status says so).
pub fn after_migration(report: &Report, path: &Path, max_downtime_ms: f64) {
    let opts = PlotOptions {
        max_downtime_ms: Some(max_downtime_ms),
    };
    match write(report, path, &opts) {
        Ok(()) => eprintln!("plot: wrote {}", path.display()),
        Err(e) => eprintln!("warning: the migration succeeded, but its plot failed: {e:#}"),
    }
}
