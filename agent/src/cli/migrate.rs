//! `vmig migrate`: live, cold (`--offline`), status, cancel, resume and rollback; the progress
//! bar of a running migration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use vmig::api::client::{call, Call};
use vmig::api::{Reply, Request};
use vmig::dirty::DirtyTracking;
use vmig::migrate::{
    defaults, validate, MigrateOptions, NoConverge, PostcopyPolicy, ProgressPhase, Report,
    StorageMode,
};
use vmig::transport::IoPath;

use super::client::{expect_ok, local_agents, pick_agent};
use super::cold;

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    /// VM to move.
    name: String,
    /// Destination host (a name from the hosts file, or ADDR:PORT).
    #[arg(required_unless_present_any = ["cancel", "resume", "rollback", "status"])]
    dest: Option<String>,
    /// Show the live state of NAME's migration (phase, round, elapsed, remaining, dirty rate,
    /// bandwidth, expected downtime, ETA); with --json, the fields of QEMU's query-migrate.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "rollback", "dest"])]
    status: bool,
    /// Cancel the migration of NAME in progress.
    #[arg(long)]
    cancel: bool,
    /// Finish the interrupted post-copy migration of NAME (it lost its connection): reconnect
    /// to its destination and send the pages it still lacks.
    #[arg(long, conflicts_with_all = ["cancel", "rollback", "dest"])]
    resume: bool,
    /// Give up the interrupted post-copy migration of NAME and run it here again from the
    /// switch point. Only when the destination is lost for good: what the VM did there is lost.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "dest"])]
    rollback: bool,
    /// Seconds to keep reconnecting when the connection drops during post-copy, before the
    /// migration is parked for --resume (0: park at once) [default: 30; with --resume: as the
    /// migration was started].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    resume_window: Option<u64>,
    /// Largest acceptable downtime, ms.
    #[arg(long, default_value_t = defaults::MAX_DOWNTIME_MS, value_parser = validate::parse::max_downtime)]
    max_downtime: f64,
    /// Most pre-copy rounds before stop-and-copy is forced.
    #[arg(long, default_value_t = defaults::MAX_ROUNDS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_rounds: u32,
    /// Bandwidth cap, MiB/s.
    #[arg(long, value_parser = validate::parse::bandwidth)]
    bandwidth: Option<f64>,
    /// Whole-migration timeout, seconds.
    #[arg(long, default_value_t = defaults::TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    timeout: u64,
    /// Dirty tracking: ring, bitmap, or auto (what the VM was built with).
    #[arg(long, value_enum, default_value_t = defaults::DIRTY_TRACKING)]
    dirty_tracking: DirtyTracking,
    /// io_uring or plain sockets.
    #[arg(long, value_enum, default_value_t = defaults::IO)]
    io: IoPath,
    /// Compare memory and vCPU digests of both sides before committing.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// After a successful migration, draw its report as an SVG into FILE (as `vmig report
    /// plot` does).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Post-copy: never (pre-copy only), auto (switch when pre-copy cannot converge), always
    /// (one pre-copy round, then post-copy).
    #[arg(long, value_enum, default_value_t = defaults::POSTCOPY)]
    postcopy: PostcopyPolicy,
    /// With --postcopy never, when pre-copy cannot converge: force (stop and copy anyway),
    /// throttle (auto-converge: slow the vCPUs down), abort (stay on the source).
    #[arg(long, value_enum, default_value_t = defaults::ON_NO_CONVERGE)]
    on_no_converge: NoConverge,
    /// Pre-copy is hopeless when dirty rate × page size / bandwidth stays at or above this
    /// for 2 rounds (or the dirty set stops shrinking by 10 % over 2 rounds).
    #[arg(long, default_value_t = defaults::CONVERGE_THRESHOLD, value_parser = validate::parse::converge_threshold)]
    converge_threshold: f64,
    /// Rounds before the convergence judgement starts.
    #[arg(long, default_value_t = defaults::MIN_ROUNDS, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    min_rounds: u32,
    /// Do not judge non-convergence after round 1 from the kernel-measured dirty rate (BPF
    /// probes on the dirty rings); wait for --min-rounds rounds of the dirty log instead.
    #[arg(long)]
    no_kernel_judge: bool,
    /// Cold migration: move the stopped VM (its definition, NVRAM, logs and, unless it stays
    /// on a datastore both hosts share, its disk), register it on DEST, then delete it here.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "rollback", "status"])]
    offline: bool,
    /// With --offline: copy the files even when both hosts share the VM's datastore.
    #[arg(long, requires = "offline")]
    move_storage: bool,
    /// With --offline: copy instead of move; the copy here stays, marked `moved` (it cannot
    /// start until `vmig vm reclaim`).
    #[arg(long, requires = "offline")]
    keep_source: bool,
    /// Hot-page holdback: a page dirty again within this many rounds is held back until
    /// stop-and-copy instead of being sent again (0: off).
    #[arg(long, default_value_t = defaults::HOLDBACK_ROUNDS, value_parser = clap::value_parser!(u32).range(0..=1000))]
    holdback_rounds: u32,
    /// How the disk goes: `copy` mirrors it live into the destination's datastore; `shared`
    /// leaves it on a datastore both hosts see (the destination opens it in place); `auto` is
    /// shared when the VM's datastore is shared with the destination, a copy otherwise.
    #[arg(long, value_enum, default_value_t = defaults::STORAGE)]
    storage: StorageMode,
    /// The destination's datastore to put the VM on (its default one if not given), live or
    /// --offline.
    #[arg(long)]
    target_datastore: Option<String>,
    /// Compress page frames for slow links: `zstd` (level 1) or `zstd:LEVEL` (1 to 19); a
    /// frame that does not shrink by an eighth goes as it is. Costs the source's CPU.
    #[arg(long, default_value_t = defaults::COMPRESS, value_parser = |s: &str| s.parse::<vmig::migrate::Compression>())]
    compress: vmig::migrate::Compression,
}

pub(super) async fn migrate(
    agent: Option<PathBuf>,
    host: Option<String>,
    m: MigrateArgs,
) -> Result<()> {
    let json = m.json;
    let r = migrate_inner(agent, host, m).await;
    if json {
        if let Err(e) = &r {
            // A failure is a JSON object too, for scripts; the exit status still says it.
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"error": format!("{e:#}")}))?
            );
        }
    }
    r
}

async fn migrate_inner(agent: Option<PathBuf>, host: Option<String>, m: MigrateArgs) -> Result<()> {
    if m.status {
        // The source of the migration: --host, else every local agent that tracks one.
        let candidates = match (agent, host) {
            (None, None) => local_agents(),
            (a, h) => vec![pick_agent(a, h, None).await?],
        };
        let mut last_err = None;
        for a in candidates {
            match expect_ok(
                &a,
                Request::Status {
                    name: m.name.clone(),
                },
            )
            .await
            {
                Ok(v) => {
                    if m.json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        let st: vmig::migrate::status::MigrationStatus = serde_json::from_value(v)?;
                        print!("{}", st.render());
                    }
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        return Err(last_err.unwrap_or_else(|| anyhow!("no agent is running")));
    }
    let a = pick_agent(agent, host, Some(&m.name)).await?;
    if m.cancel {
        let v = expect_ok(&a, Request::Cancel { name: m.name }).await?;
        println!("{}", v.as_str().unwrap_or("cancelling"));
        return Ok(());
    }
    if m.rollback {
        let v = expect_ok(&a, Request::Rollback { name: m.name }).await?;
        println!("{}", v.as_str().unwrap_or("rolled back"));
        return Ok(());
    }
    if m.offline {
        let req = Request::MigrateCold {
            name: m.name.clone(),
            dest: m.dest.clone().unwrap_or_default(),
            opts: vmig::migrate::cold::ColdOptions {
                move_storage: m.move_storage,
                target_datastore: m.target_datastore.clone(),
                keep_source: m.keep_source,
            },
        };
        cold::run(&a, &m.name, req, m.json).await?;
        return Ok(());
    }
    let req = if m.resume {
        Request::Resume {
            name: m.name.clone(),
            resume_window_s: m.resume_window,
        }
    } else {
        Request::Migrate {
            name: m.name.clone(),
            dest: m.dest.clone().unwrap_or_default(),
            opts: migrate_options(&m),
        }
    };
    if let Some(p) = &m.plot {
        super::plot::check_target(p)?;
    }
    let report = run_migration(&a, &m.name, req, !m.json).await?;
    if m.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if let Some(p) = &m.plot {
        super::plot::after_migration(&report, p, m.max_downtime);
    }
    Ok(())
}

fn migrate_options(m: &MigrateArgs) -> MigrateOptions {
    MigrateOptions {
        max_downtime_ms: m.max_downtime,
        max_rounds: m.max_rounds,
        bandwidth_mibs: m.bandwidth,
        timeout_s: m.timeout,
        dirty_tracking: m.dirty_tracking,
        io: m.io,
        verify: m.verify,
        postcopy: m.postcopy,
        on_no_converge: m.on_no_converge,
        converge_threshold: m.converge_threshold,
        min_rounds: m.min_rounds,
        kernel_judge: !m.no_kernel_judge,
        resume_window_s: m.resume_window.unwrap_or(defaults::RESUME_WINDOW_S),
        holdback_rounds: m.holdback_rounds,
        storage: m.storage,
        target_datastore: m.target_datastore.clone(),
        compress: m.compress,
    }
}

/// Runs a migration (`Migrate` or `Resume` request) through the agent at `a`, with a progress
/// bar, cancelling on Ctrl-C.
pub async fn run_migration(a: &Path, name: &str, req: Request, bar: bool) -> Result<Report> {
    let mut c = Call::start(a, &req).await?;
    let pb = if bar {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    let style = |unit: &str| {
        ProgressStyle::with_template(&format!(
            "{{prefix:>18}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} elapsed, pass ETA {{eta}} {{msg}}"
        ))
        .expect("template")
        .progress_chars("=> ")
    };
    let pages = style("pages");
    pb.set_style(pages.clone());
    let mut on_disk = false;
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut cancelled = false;
    loop {
        let reply = tokio::select! {
            r = c.next() => r?,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                // The agent says what a cancel can do now: before commitment the VM stays
                // here; in post-copy it already runs on the destination and cannot come back.
                match call(a, &Request::Cancel { name: name.into() }).await {
                    Ok(Reply::Ok(v)) => {
                        cancelled = true;
                        pb.println(format!("Ctrl-C: {}", v.as_str().unwrap_or("cancelling")));
                    }
                    Ok(Reply::Error(e)) => pb.println(format!("Ctrl-C: {e}")),
                    Ok(other) => pb.println(format!("Ctrl-C: unexpected reply {other:?}")),
                    Err(e) => pb.println(format!("Ctrl-C: cannot reach the agent: {e}")),
                }
                continue;
            }
        };
        match reply {
            Reply::Progress(p) => {
                let prefix = match p.phase {
                    ProgressPhase::PreCopy => format!("pre-copy round {}", p.round),
                    other => other.to_string(),
                };
                pb.set_prefix(prefix);
                if p.phase == ProgressPhase::DiskCopy {
                    // MiB of the image, not pages.
                    if !on_disk {
                        on_disk = true;
                        pb.set_style(style("MiB of the disk image"));
                    }
                    pb.set_length(p.total >> 20);
                    pb.set_position(p.sent >> 20);
                    continue;
                }
                if on_disk {
                    on_disk = false;
                    pb.set_style(pages.clone());
                }
                pb.set_length(p.total);
                pb.set_position(p.sent);
                if let Some(d) = &p.decision {
                    pb.println(format!("controller: {d}"));
                }
                if p.phase == ProgressPhase::PostCopy && p.last.is_none() {
                    pb.set_message(format!(
                        "| {} pages remaining, {:.0} faults/s",
                        p.remaining, p.faults_per_s
                    ));
                }
                if let Some(l) = p.last {
                    let msg = format!(
                        "| round {}: {} dirty, {:.0} pages/s dirtied, {:.0} MiB/s, predicted downtime {:.1} ms",
                        l.round,
                        l.dirty_pages,
                        l.dirty_rate,
                        l.bandwidth / 1048576.0,
                        l.predicted_downtime_ms
                    );
                    pb.println(msg.trim_start_matches("| "));
                    pb.set_message(msg);
                }
            }
            Reply::Report(r) => {
                pb.finish_and_clear();
                return Ok(*r);
            }
            Reply::Error(e) => {
                pb.finish_and_clear();
                bail!("migration of {name} failed: {e}");
            }
            Reply::Ok(v) => bail!("unexpected reply {v}"),
            other => bail!("unexpected reply {other:?}"),
        }
    }
}
