//! A live migration out, driven from the control socket: started (or a parked post-copy
//! resumed) on a worker thread, its progress relayed to the CLI, cancelled if the CLI goes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::control::send;
use super::hosts::resolve;
use super::Agent;
use crate::api::Reply;
use crate::migrate::source::Outcome;
use crate::migrate::{self, MigrateOptions};

/// A migration out to run: a new one, or the resumption of an interrupted post-copy.
pub(super) enum Job {
    Migrate {
        dest: String,
        opts: MigrateOptions,
    },
    /// With the reconnect window to use, if overridden.
    Resume(Option<u64>),
}

/// A job ready to run: the destination resolved, or the parked post-copy taken.
enum Work {
    Migrate {
        addr: SocketAddr,
        dest: String,
        opts: MigrateOptions,
    },
    Resume(Box<migrate::source::Parked>),
}

/// Starts a fresh migration out of `name`: the VM's migration slot in the inventory, then its
/// entry in the registry.
fn begin_outgoing(
    agent: &Agent,
    name: &str,
) -> Result<
    (
        crate::inventory::VmDef,
        Arc<crate::vm::Vm>,
        Arc<migrate::Cancel>,
    ),
    String,
> {
    let (def, vm) = agent.inv.begin_migration(name).map_err(|e| e.to_string())?;
    match agent.migrations.begin_outgoing(name) {
        Ok(cancel) => Ok((def, vm, cancel)),
        Err(e) => {
            agent.inv.end_migration(name, false);
            Err(e.to_string())
        }
    }
}

pub(super) async fn migrate_out(
    agent: Arc<Agent>,
    name: String,
    job: Job,
    mut lines: tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) {
    // What the worker runs: a fresh migration (with the destination's address), or a parked
    // post-copy.
    let start = match job {
        Job::Migrate { dest, opts } => opts
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|_| resolve(&agent, &dest))
            .and_then(|addr| {
                let (def, vm, cancel) = begin_outgoing(&agent, &name)?;
                Ok((def, vm, cancel, Work::Migrate { addr, dest, opts }))
            }),
        Job::Resume(window) => match agent.migrations.resume_parked(&name) {
            Err(e) => Err(e.to_string()),
            Ok((mut parked, cancel)) => match agent.inv.running(&name) {
                Ok((def, vm)) => {
                    if let Some(w) = window {
                        parked.set_resume_window(w);
                    }
                    Ok((def, vm, cancel, Work::Resume(parked)))
                }
                Err(e) => {
                    // Kept for another try: the pages are still the only copy.
                    agent.migrations.park(&name, parked);
                    Err(e.to_string())
                }
            },
        },
    };
    let (def, vm, cancel, work) = match start {
        Ok(x) => x,
        Err(e) => {
            let _ = send(&mut w, &Reply::Error(e)).await;
            return;
        }
    };
    let dest_name = match &work {
        Work::Migrate { dest, .. } => dest.clone(),
        Work::Resume(p) => p.dest_name().to_string(),
    };
    let tracker = Arc::new(Mutex::new(migrate::status::Tracker::new(
        &name,
        &dest_name,
        vm.ram().size(),
    )));
    agent
        .status
        .lock()
        .expect("status")
        .insert(name.clone(), tracker.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let a = agent.clone();
    let c = cancel.clone();
    let n = name.clone();
    let worker = std::thread::Builder::new().name(format!("migrate-{name}")).spawn(move || {
        let dir = a.inv.dir(&n);
        let shared = a.inv.shared_datastore_of(&n);
        let out = migrate::source::Outgoing {
            vm: &vm,
            def: &def,
            dir: &dir,
            agent: &a.cfg.name,
            security: &a.security,
            shared_datastore: shared.as_deref(),
        };
        let ptx = tx.clone();
        let t = tracker.clone();
        let progress = move |p: migrate::Progress| {
            t.lock().expect("tracker").update(&p);
            let _ = ptx.send(Reply::Progress(Box::new(p)));
        };
        // `migrate` turns its own panics into errors; this catches what escapes a resume (past
        // Go: the VM stays paused here, never resumed) so the registry is still cleaned up.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match work {
            Work::Migrate { addr, dest, opts } => {
                migrate::source::migrate(&out, addr, &dest, &opts, &c, &progress)
            }
            Work::Resume(parked) => migrate::source::resume(&out, parked, &c, &progress),
        }))
        .unwrap_or_else(|p| {
            Err(migrate::MigrateError::CommitUnknown(format!(
                "internal error: {}",
                migrate::source::panic_message(&p)
            )))
        });
        drop(vm);
        match &result {
            Ok(Outcome::Committed(r)) => tracker.lock().expect("tracker").complete(r),
            Ok(Outcome::Parked(p)) => tracker.lock().expect("tracker").fail(&p.to_string()),
            Err(e) => tracker.lock().expect("tracker").fail(&e.to_string()),
        }
        let reply = match result {
            Ok(Outcome::Committed(report)) => {
                a.migrations.end_outgoing(&n);
                a.inv.end_migration(&n, true);
                info!(vm = %n, downtime_ms = report.downtime_ms, total_ms = report.total_ms, "migrated");
                Reply::Report(report)
            }
            Ok(Outcome::Parked(parked)) => {
                let why = parked.to_string();
                warn!(vm = %n, cause = %why, "post-copy parked");
                // The VM stays paused and migrating here until resumed or rolled back.
                a.migrations.park(&n, parked);
                Reply::Error(why)
            }
            Err(e) => {
                a.migrations.end_outgoing(&n);
                let unknown = matches!(e, migrate::MigrateError::CommitUnknown(_));
                if !unknown {
                    a.inv.end_migration(&n, false);
                }
                warn!(vm = %n, cause = %e, "migration failed");
                Reply::Error(e.to_string())
            }
        };
        let _ = tx.send(reply);
    });
    if let Err(e) = worker {
        agent.inv.end_migration(&name, false);
        agent.migrations.end_outgoing(&name);
        let _ = send(
            &mut w,
            &Reply::Error(format!("cannot start the migration: {e}")),
        )
        .await;
        return;
    }
    // Relay progress; if the CLI goes away (Ctrl-C), cancel.
    let mut client_gone = false;
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { break };
                let last = !matches!(r, Reply::Progress(_));
                if !client_gone && send(&mut w, &r).await.is_err() {
                    client_gone = true;
                    cancel_on_disconnect(&name, &cancel);
                }
                if last { break; }
            }
            l = lines.next_line(), if !client_gone => {
                if matches!(l, Ok(None) | Err(_)) {
                    client_gone = true;
                    info!(vm = %name, "CLI disconnected: cancelling the migration");
                    cancel_on_disconnect(&name, &cancel);
                }
            }
        }
    }
}

/// The CLI went away: cancel the migration, unless it is past `Go` (then it goes on).
fn cancel_on_disconnect(name: &str, cancel: &migrate::Cancel) {
    if let Err(e) = cancel.cancel() {
        info!(vm = %name, reason = %e, "the migration goes on");
    }
}
