//! The control socket: one JSON request per connection from the CLI, answered with one reply
//! (migrations and cold operations are handed to their own servers).

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{instrument, warn};

use super::hosts::{peers, resolve};
use super::outgoing::{migrate_out, Job};
use super::Agent;
use crate::api::{cold, guard};
use crate::api::{AgentInfo, DigestInfo, Reply, Request};
use crate::migrate;
use crate::migrate::registry::RegistryError;

pub(super) async fn send(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Reply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("replies serialize");
    line.push(b'\n');
    w.write_all(&line).await
}

#[instrument(skip_all)]
pub(super) async fn control(agent: Arc<Agent>, s: UnixStream) {
    let admitted = guard::admit(&s, agent.control_gid);
    let (r, mut w) = s.into_split();
    if let Err(why) = admitted {
        warn!(%why, "control connection refused");
        let _ = send(&mut w, &Reply::Error(why)).await;
        return;
    }
    let mut lines = BufReader::new(r.take(guard::MAX_CONTROL_LINE)).lines();
    let first = tokio::time::timeout(guard::CONTROL_REQUEST_TIMEOUT, lines.next_line()).await;
    let Ok(Ok(Some(line))) = first else {
        return;
    };
    if line.len() as u64 >= guard::MAX_CONTROL_LINE - 1 {
        let why = format!("request longer than {} bytes", guard::MAX_CONTROL_LINE);
        let _ = send(&mut w, &Reply::Error(why)).await;
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(&mut w, &Reply::Error(format!("bad request: {e}"))).await;
            return;
        }
    };
    if let Request::Migrate { name, dest, opts } = req {
        migrate_out(agent, name, Job::Migrate { dest, opts }, lines, w).await;
        return;
    }
    if let Request::MigrateCold { name, dest, opts } = req {
        let work = match resolve(&agent, &dest) {
            Ok(addr) => cold::ColdWork::Migrate { dest, addr, opts },
            Err(e) => {
                let _ = send(&mut w, &Reply::Error(e)).await;
                return;
            }
        };
        let (inv, sec, me) = (
            agent.inv.clone(),
            agent.security.clone(),
            agent.cfg.name.clone(),
        );
        cold::serve(inv, sec, me, name, work, w).await;
        return;
    }
    if let Request::StorageMove { name, to } = req {
        let (inv, sec, me) = (
            agent.inv.clone(),
            agent.security.clone(),
            agent.cfg.name.clone(),
        );
        cold::serve(inv, sec, me, name, cold::ColdWork::Move { to }, w).await;
        return;
    }
    if let Request::Resume {
        name,
        resume_window_s,
    } = req
    {
        migrate_out(agent, name, Job::Resume(resume_window_s), lines, w).await;
        return;
    }
    let a = agent.clone();
    let reply = tokio::task::spawn_blocking(move || handle(&a, req))
        .await
        .unwrap_or_else(|e| Reply::Error(format!("agent task failed: {e}")));
    let _ = send(&mut w, &reply).await;
}

/// After a rollback: tells `dest` (best effort) that this host holds `name` at `generation`,
/// so that its copy is fenced now; says how that went.
fn tell_fenced(agent: &Agent, dest: &str, name: &str, generation: u64) -> String {
    let told = resolve(agent, dest)
        .map_err(|e| e.to_string())
        .and_then(|addr| {
            migrate::fence::tell(
                &agent.security,
                addr,
                dest,
                &agent.cfg.name,
                name,
                generation,
            )
            .map_err(|e| e.to_string())
        });
    match told {
        Ok(Ok(())) => format!("{dest} was told: its copy is fenced"),
        Ok(Err(why)) => {
            warn!(vm = %name, %dest, %why, "the destination did not fence its copy");
            format!("{dest} did not fence its copy ({why}): make sure it does not run there")
        }
        Err(e) => {
            warn!(vm = %name, %dest, cause = %e, "the destination cannot be told of the rollback: its copy is fenced when its agent starts again");
            format!("{dest} does not answer ({e}): its copy is fenced when its agent starts again")
        }
    }
}

fn ok<T: serde::Serialize>(v: T) -> Reply {
    Reply::Ok(serde_json::to_value(v).expect("serializes"))
}

fn handle(agent: &Agent, req: Request) -> Reply {
    let inv = &agent.inv;
    let r = match req {
        Request::Ping => {
            return ok(AgentInfo {
                name: agent.cfg.name.clone(),
                listen: agent.cfg.listen.to_string(),
                datastore: inv.datastore().display().to_string(),
                pid: std::process::id(),
                dirty_ring: kvm_ioctls::Kvm::new()
                    .map(|k| k.check_extension(kvm_ioctls::Cap::DirtyLogRing))
                    .unwrap_or(false),
            })
        }
        Request::Create { def, datastore } => inv.create_on(def, datastore.as_deref()).map(ok),
        Request::Datastores => Ok(ok(inv.datastore_infos())),
        Request::Recovered => Ok(ok(inv.recovered())),
        Request::Reclaim { name } => {
            return match cold::reclaim(inv, &agent.security, &|h| resolve(agent, h), &name)
            {
                Ok(m) => ok(m),
                Err(e) => Reply::Error(e),
            }
        }
        Request::Start { name } => {
            // Another host may hold a newer copy: asked first (a peer that does not answer
            // fences nothing).
            agent.wait_fenced();
            migrate::fence::check(inv, &agent.security, &peers(agent), Some(&name));
            inv.start(&name).map(ok)
        }
        Request::Stop { name } => {
            // A VM that arrived in post-copy and lost its source waits on its faults: powering
            // it off gives its missing pages up (the source still holds the VM).
            if agent.migrations.discard_postcopy_in(&name) {
                warn!(vm = %name, "stopping a VM whose post-copy was interrupted: its missing pages are given up here");
            }
            inv.stop(&name).map(ok)
        }
        Request::Destroy { name } => inv.destroy(&name).map(|_| ok(name)),
        Request::List => {
            agent.wait_fenced();
            Ok(ok(inv.list()))
        }
        Request::Show { name } => {
            agent.wait_fenced();
            inv.info(&name).map(ok)
        }
        // Holding the VM's migration slot keeps a migration from pausing (and this from
        // resuming) it concurrently.
        Request::Digest { name } => inv
            .begin_migration(&name)
            .map_err(|e| match e {
                crate::inventory::InventoryError::State { name, state, .. } => {
                    crate::inventory::InventoryError::State {
                        name,
                        state,
                        op: "take a digest now",
                    }
                }
                e => e,
            })
            .map(|(_, vm)| {
                vm.pause();
                let memory = vm.ram().digest();
                let counter = vm.stats().counter;
                vm.resume();
                inv.end_migration(&name, false);
                match memory {
                    Ok(memory) => ok(DigestInfo { memory, counter }),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }),
        Request::Status { name } => {
            return match agent.status.lock().expect("status").get(&name) {
                Some(t) => ok(t.lock().expect("tracker").snapshot()),
                None => Reply::Error(format!(
                    "no migration of {name:?} from this host since the agent started"
                )),
            }
        }
        Request::Cancel { name } => {
            return match agent.migrations.cancel(&name) {
                Ok(()) => ok(format!(
                    "cancelling the migration of {name}: the VM stays on this host"
                )),
                Err(RegistryError::Cancel(migrate::MigrateError::NotAllowed { .. })) => {
                    Reply::Error(format!(
                        "the migration of {name} is past its commit point (the VM runs on the destination, in post-copy): it cannot be cancelled; it completes, or parks if the connection is lost (then `vmig migrate --rollback {name}` gives it up)"
                    ))
                }
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::Rollback { name } => {
            let parked = match agent.migrations.take_parked(&name) {
                Ok(p) => p,
                Err(e) => return Reply::Error(e.to_string()),
            };
            return match inv.running(&name) {
                Ok((def, vm)) => {
                    let dir = inv.dir(&name);
                    let shared = inv.shared_datastore_of(&name);
                    let out = migrate::source::Outgoing {
                        vm: &vm,
                        def: &def,
                        dir: &dir,
                        agent: &agent.cfg.name,
                        security: &agent.security,
                        shared_datastore: shared.as_deref(),
                    };
                    let dest = parked.dest_name().to_string();
                    // The destination's copy holds generation + 1: this one takes + 2, durably,
                    // before it runs again.
                    let generation = match inv.take_back(&name) {
                        Ok(g) => g,
                        Err(e) => {
                            agent.migrations.park(&name, parked);
                            return Reply::Error(format!(
                                "cannot record the new ownership generation of {name}, so it does not run here again: {e}"
                            ));
                        }
                    };
                    let told = tell_fenced(agent, &dest, &name, generation);
                    migrate::source::rollback(&out, parked);
                    inv.end_migration(&name, false);
                    ok(format!(
                        "{name} runs here again from the post-copy switch point (ownership generation {generation}); what it did on {dest} since is lost; {told}"
                    ))
                }
                Err(e) => {
                    agent.migrations.park(&name, parked);
                    Reply::Error(e.to_string())
                }
            };
        }
        Request::Migrate { .. }
        | Request::Resume { .. }
        | Request::MigrateCold { .. }
        | Request::StorageMove { .. } => {
            unreachable!("handled by migrate_out and cold::serve")
        }
    };
    r.unwrap_or_else(|e| Reply::Error(e.to_string()))
}
