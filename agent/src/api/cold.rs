//! The agent's side of `migrate --offline`, `storage move` and `vm reclaim`: each runs on a
//! thread of its own, its progress relayed to the CLI line by line, then the report.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Reply;
use crate::inventory::journal::{OpKind, Record, Step};
use crate::inventory::{Inventory, VmState};
use crate::migrate::cold::{self, ColdOptions, ColdPhase, ColdProgress, ColdReport, FileReport};
use crate::transport::Security;

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("replies serialize");
    line.push(b'\n');
    w.write_all(&line).await
}

/// What the worker thread runs.
pub(super) enum ColdWork {
    /// A cold migration to `dest` at `addr`.
    Migrate {
        /// Destination host.
        dest: String,
        /// Its address.
        addr: SocketAddr,
        /// What moves where.
        opts: ColdOptions,
    },
    /// A storage move to datastore `to`.
    Move {
        /// Target datastore.
        to: String,
    },
}

/// Runs `work` on VM `name`, relaying progress and the report (or the error) to `w`.
pub(super) async fn serve(
    inv: Arc<Inventory>,
    security: Security,
    agent: String,
    name: String,
    work: ColdWork,
    mut w: tokio::net::unix::OwnedWriteHalf,
) {
    let live = matches!(work, ColdWork::Move { .. })
        && inv.info(&name).is_ok_and(|i| i.state != VmState::Stopped);
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let worker = std::thread::Builder::new()
        .name(format!("cold-{name}"))
        .spawn(move || {
            let ptx = tx.clone();
            let progress = move |p: ColdProgress| {
                let _ = ptx.send(Reply::ColdProgress(Box::new(p)));
            };
            let result = match work {
                ColdWork::Migrate { dest, addr, opts } => {
                    let job = cold::source::ColdJob {
                        inv: &inv,
                        agent: &agent,
                        security: &security,
                        dest: addr,
                        dest_name: &dest,
                        name: &name,
                        opts: &opts,
                    };
                    cold::source::migrate(&job, &progress).map_err(|e| e.to_string())
                }
                ColdWork::Move { to } if live => {
                    storage_move_live(&inv, &agent, &name, &to, &progress)
                }
                ColdWork::Move { to } => storage_move(&inv, &agent, &name, &to, &progress),
            };
            let reply = match result {
                Ok(r) => {
                    info!(vm = %name, to = %r.to, datastore = %r.datastore, ms = r.total_ms, "moved offline");
                    Reply::ColdReport(Box::new(r))
                }
                Err(e) => {
                    warn!(vm = %name, cause = %e, "offline move failed");
                    Reply::Error(e)
                }
            };
            let _ = tx.send(reply);
        });
    if let Err(e) = worker {
        let _ = send(&mut w, &Reply::Error(format!("cannot start: {e}"))).await;
        return;
    }
    // The move goes on if the CLI goes away: its journal makes every step safe to finish.
    let mut client_gone = false;
    while let Some(r) = rx.recv().await {
        let last = !matches!(r, Reply::ColdProgress(_));
        if !client_gone && send(&mut w, &r).await.is_err() {
            client_gone = true;
        }
        if last {
            break;
        }
    }
}

fn storage_move(
    inv: &Inventory,
    agent: &str,
    name: &str,
    to: &str,
    progress: &dyn Fn(ColdProgress),
) -> Result<ColdReport, String> {
    let t0 = std::time::Instant::now();
    let from = inv.info(name).map_err(|e| e.to_string())?.datastore.clone();
    let done = std::cell::Cell::new(0u64);
    let total = crate::storage::cold::vm_files(&inv.dir(name))
        .map(|l| l.iter().map(|f| f.size).sum::<u64>())
        .unwrap_or(0);
    let each = |file: &str, n: u64| {
        done.set(done.get() + n);
        let (rate_mibs, eta_s) = cold::rate_eta(done.get(), total, t0.elapsed());
        progress(ColdProgress {
            phase: ColdPhase::Copying,
            file: file.into(),
            files_done: 0,
            files: 0,
            bytes: done.get(),
            total_bytes: total,
            rate_mibs,
            eta_s,
        });
    };
    let list = inv
        .move_storage(name, to, &each)
        .map_err(|e| e.to_string())?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let files: Vec<FileReport> = list
        .into_iter()
        .map(|(n, digest, sent)| {
            let size = std::fs::metadata(inv.dir(name).join(&n))
                .map(|m| m.len())
                .unwrap_or(0);
            FileReport {
                name: n,
                size,
                sent_bytes: sent,
                source_digest: digest.clone(),
                dest_digest: digest,
                equal: true,
            }
        })
        .collect();
    Ok(ColdReport {
        vm: name.into(),
        from: agent.into(),
        to: agent.into(),
        source_datastore: from,
        datastore: to.into(),
        copy: true,
        keep_source: false,
        sent_bytes: files.iter().map(|f| f.sent_bytes).sum(),
        total_bytes: total,
        files,
        total_ms,
        rate_mibs: total as f64 / 1048576.0 / (total_ms / 1e3).max(1e-6),
        all_equal: true,
        live_disk: None,
    })
}

/// `storage move` of a running VM: the small files copied, the disk mirrored live and
/// switched at a short pause.
fn storage_move_live(
    inv: &Inventory,
    agent: &str,
    name: &str,
    to: &str,
    progress: &dyn Fn(ColdProgress),
) -> Result<ColdReport, String> {
    let t0 = std::time::Instant::now();
    let from = inv.info(name).map_err(|e| e.to_string())?.datastore.clone();
    // What will be copied: the files' sizes (the disk's holes are counted, and skipped fast).
    let listed = crate::storage::cold::vm_files(&inv.dir(name)).map_err(|e| e.to_string())?;
    let total_bytes: u64 = listed.iter().map(|f| f.size).sum();
    let done = std::cell::Cell::new(0u64);
    let started = std::cell::RefCell::new(Vec::<String>::new());
    let last = std::cell::Cell::new(std::time::Instant::now());
    let each = |file: &str, n: u64| {
        done.set(done.get() + n);
        let mut started = started.borrow_mut();
        let new_file = !started.iter().any(|f| f == file);
        if new_file {
            started.push(file.into());
        }
        // At most ten lines a second (the disk's first pass reports every chunk).
        if !new_file && last.get().elapsed() < std::time::Duration::from_millis(100) {
            return;
        }
        last.set(std::time::Instant::now());
        let (rate_mibs, eta_s) = cold::rate_eta(done.get(), total_bytes, t0.elapsed());
        progress(ColdProgress {
            phase: ColdPhase::Copying,
            file: file.into(),
            files_done: started.len() - 1,
            files: listed.len(),
            bytes: done.get().min(total_bytes),
            total_bytes,
            rate_mibs,
            eta_s,
        });
    };
    let (list, disk) = inv
        .move_storage_live(name, to, &each)
        .map_err(|e| e.to_string())?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let dir = inv.dir(name);
    let files: Vec<FileReport> = list
        .into_iter()
        .map(|(n, digest, sent)| FileReport {
            size: std::fs::metadata(dir.join(&n))
                .map(|m| m.len())
                .unwrap_or(0),
            name: n,
            sent_bytes: sent,
            source_digest: digest.clone(),
            dest_digest: digest,
            equal: true,
        })
        .collect();
    let total: u64 = files.iter().map(|f| f.size).sum();
    Ok(ColdReport {
        vm: name.into(),
        from: agent.into(),
        to: agent.into(),
        source_datastore: from,
        datastore: to.into(),
        copy: true,
        keep_source: false,
        sent_bytes: files.iter().map(|f| f.sent_bytes).sum(),
        total_bytes: total,
        files,
        total_ms,
        rate_mibs: total as f64 / 1048576.0 / (total_ms / 1e3).max(1e-6),
        all_equal: true,
        live_disk: Some(disk),
    })
}

/// `vm reclaim NAME`: the copy a `--keep-source` migration left becomes the VM again, once
/// the host it moved to says it has no VM of that name.
pub(super) fn reclaim(
    inv: &Inventory,
    security: &Security,
    resolve: &dyn Fn(&str) -> Result<SocketAddr, String>,
    name: &str,
) -> Result<String, String> {
    let to = inv.moved_to(name).ok_or_else(|| {
        format!("{name} is not a copy left by a cold migration: nothing to reclaim")
    })?;
    let addr = resolve(&to)?;
    // An empty operation asks whether any VM of that name is registered there.
    let q = Record {
        op: String::new(),
        kind: OpKind::ColdOut,
        vm: name.into(),
        step: Step::Intent,
        peer: Some(to.clone()),
        datastore: String::new(),
        target: None,
        keep_source: true,
        copy: true,
    };
    match cold::recover::ask(security, addr, &to, inv.agent(), &q) {
        Ok(true) => Err(format!(
            "{to} still has {name}: destroy it there first (`vmig --host {to} vm destroy {name}`), or migrate it back"
        )),
        Ok(false) => {
            inv.reclaim(name).map_err(|e| e.to_string())?;
            Ok(format!("{name} is this host's again ({to} has no VM of that name)"))
        }
        Err(e) => Err(format!(
            "cannot ask {to} whether it still has {name} ({e}): the copy stays marked moved"
        )),
    }
}
