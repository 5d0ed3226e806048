//! `migrate --offline`, `storage move` and `vm reclaim` on the CLI side: a progress bar of
//! bytes and files, then the report (or `--json`).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use vmig::api::client::Call;
use vmig::api::{Reply, Request};
use vmig::migrate::cold::ColdReport;

/// `vmig storage ...`.
#[derive(Debug, Subcommand)]
pub enum StorageCmd {
    /// Move a stopped VM's files (definition, NVRAM, disk, logs) to another datastore of its
    /// host, crash-safely.
    Move(MoveArgs),
}

/// `vmig storage move`.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// VM to move.
    pub name: String,
    /// Target datastore (see `vmig datastore list`).
    #[arg(long)]
    pub to: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `MigrateCold` or `StorageMove` request through the agent at `a`, with a progress
/// bar; prints the report.
pub async fn run(a: &Path, name: &str, req: Request, json: bool) -> Result<ColdReport> {
    let mut c = Call::start(a, &req).await?;
    let pb = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    loop {
        match c.next().await? {
            Reply::ColdProgress(p) => {
                pb.set_prefix(format!("{:?}", p.phase).to_lowercase());
                pb.set_length(p.total_bytes);
                pb.set_position(p.bytes);
                pb.set_message(format!(
                    "{} ({}/{} files) {:.0} MiB/s, ETA {:.0} s",
                    p.file, p.files_done, p.files, p.rate_mibs, p.eta_s
                ));
            }
            Reply::ColdReport(r) => {
                pb.finish_and_clear();
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", r.render());
                }
                return Ok(*r);
            }
            Reply::Error(e) => {
                pb.finish_and_clear();
                bail!("moving {name} failed: {e}");
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }
}
