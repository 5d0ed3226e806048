//! Stage 5 on the destination: on `Go`, the VM is registered (its staging folder moved into
//! the datastore) and runs; `Running`; then the source's `Released` (the VM runs here
//! whether it comes or not).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::reservation::Arrival;
use super::Destination;
use crate::migrate::link::Link;
use crate::migrate::{MigrateError, Phase};
use crate::vm::Vm;
use crate::wire::messages as msg;

/// Waits for `Go`, then registers the arrived VM (at the source's generation + 1); returns
/// it, running or not. In post-copy (`postcopy`) the copy is marked as arriving from its
/// source until every page is here: if this agent dies before, the copy is suspect.
pub(super) fn register(
    link: &mut Link,
    to: &Destination<'_>,
    a: Box<Arrival<'_>>,
    postcopy: bool,
) -> Result<(Arc<Vm>, Instant), MigrateError> {
    let _: msg::Go = link.recv_in(Phase::StopAndCopy)?;
    let t_go = Instant::now();
    let Arrival {
        def,
        reservation,
        vm,
        source,
        _entry,
        ..
    } = *a;
    let vm = Arc::new(vm);
    let name = def.name.clone();
    to.inv.commit(reservation, def, vm.clone())?;
    drop(_entry);
    if postcopy {
        if let Err(e) = to.inv.postcopy_in_started(&name, &source) {
            tracing::error!(vm = %name, cause = %e, "cannot mark the copy arriving in post-copy: if this agent dies before every page is here, its copy will not be known as suspect");
        }
    }
    Ok((vm, t_go))
}

/// Commits a VM that arrived whole: register, run, confirm. With `checked_after_resume` (the
/// source's `--verify` memory check comes after `Running`), the source's verdict decides: its
/// `Released` keeps the VM here, its `Abort` removes this copy (`Discarded`).
pub(super) fn run(
    link: &mut Link,
    to: &Destination<'_>,
    a: Box<Arrival<'_>>,
    checked_after_resume: bool,
) -> Result<String, MigrateError> {
    let (name, source) = (a.def.name.clone(), a.source.clone());
    let (vm, t_go) = register(link, to, a, false)?;
    let registered = t_go.elapsed();
    vm.resume();
    tracing::debug!(
        register_ms = registered.as_secs_f64() * 1e3,
        resume_ms = (t_go.elapsed() - registered).as_secs_f64() * 1e3,
        "committed"
    );
    let resume_us = t_go.elapsed().as_micros() as u64;
    vm.devices().log_line(&format!(
        "migrated in from {source}: running on {}",
        to.agent
    ));
    let _ = link.send(&msg::Running { resume_us });
    if checked_after_resume {
        return verdict(link, to, &name, vm);
    }
    released(link, &name, &vm)?;
    Ok(name)
}

/// How long the destination waits for the source's verdict after `Running`: the source
/// hashes all of its paused memory meanwhile (about a second per GiB in a debug build).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for the source's verdict on its memory check after the resume: `Released`, or an
/// `Abort` (the memories differ) on which this copy stops and is removed, nothing of it left
/// registered, and `Discarded` tells the source to run the VM again. No verdict at all (the
/// connection lost) leaves the VM running here, as after any `Running`: the source then
/// keeps its copy paused and says so.
fn verdict(
    link: &mut Link,
    to: &Destination<'_>,
    name: &str,
    vm: Arc<Vm>,
) -> Result<String, MigrateError> {
    link.reader.set_timeout(VERDICT_TIMEOUT)?;
    match link.recv_in::<msg::Released>(Phase::Commit) {
        Ok(_) => {
            tracing::info!(vm = %name, "the source checked the memory and released the VM");
            Ok(name.to_string())
        }
        Err(MigrateError::Peer(why)) => {
            tracing::error!(vm = %name, cause = %why, "the source's check after the resume failed: removing this copy");
            vm.pause();
            let removed = to.inv.stop(name).map(drop).and_then(|()| {
                drop(vm);
                to.inv.destroy(name)
            });
            if let Err(e) = &removed {
                tracing::error!(vm = %name, error = %e, "cannot remove the refused copy");
                return Err(MigrateError::Verify(format!(
                    "the source refused this copy ({why}) and it could not be removed: {e}"
                )));
            }
            link.send(&msg::Discarded {})?;
            Err(MigrateError::Peer(format!(
                "the source refused this copy: {why}; removed"
            )))
        }
        Err(e) => {
            tracing::warn!(vm = %name, cause = %e, "no verdict from the source after the resume (the VM runs here regardless)");
            Ok(name.to_string())
        }
    }
}

/// Waits a little for the source's `Released`.
pub(super) fn released(link: &mut Link, name: &str, vm: &Vm) -> Result<(), MigrateError> {
    link.reader.set_timeout(Duration::from_secs(10))?;
    match link.recv_in::<msg::Released>(Phase::Commit) {
        Ok(_) => tracing::info!(vm = %name, "source released the VM"),
        Err(MigrateError::Peer(why)) => {
            // The source refused this copy (its verification failed) and keeps its own: this
            // one must not run on beside it.
            vm.pause();
            tracing::error!(vm = %name, cause = %why, "the source refused the VM after post-copy: paused here");
            vm.devices().log_line(&format!(
                "the source refused this copy after post-copy ({why}): paused; stop it with `vmig vm stop {name}`"
            ));
        }
        Err(e) => {
            tracing::warn!(vm = %name, cause = %e, "no release from the source (the VM runs here regardless)")
        }
    }
    Ok(())
}
