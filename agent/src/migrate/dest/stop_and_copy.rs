//! Stage 4 on the destination: the state loaded into the VM's vCPUs and devices (not running),
//! digests when the source asked (the memory's kept up to date as pages came), `Ready`.

use std::time::Instant;

use super::disk::DiskSink;
use super::precopy::{Loaded, Placed};
use super::reservation::Arrival;
use super::Destination;
use crate::migrate::link::Link;
use crate::migrate::MigrateError;
use crate::wire::messages as msg;

/// Loads the state and answers `Ready`.
pub(super) fn load(
    link: &mut Link,
    to: &Destination<'_>,
    a: &Arrival<'_>,
    state: Loaded,
    mut disk: DiskSink,
    placed: Placed,
) -> Result<(), MigrateError> {
    let vm = &a.vm;
    let t0 = Instant::now();
    // The image is durable before the VM may run from it.
    disk.sync()?;
    let t_sync = t0.elapsed();
    let log = to.inv.open_log(&a.reservation.staging)?;
    vm.attach_disk(
        &a.reservation.staging.join(crate::inventory::DISK),
        &a.def.name,
    )?;
    let t_attach = t0.elapsed();
    vm.restore(&state.machine, Box::new(log))?;
    tracing::debug!(
        sync_ms = t_sync.as_secs_f64() * 1e3,
        attach_ms = (t_attach - t_sync).as_secs_f64() * 1e3,
        restore_ms = (t0.elapsed() - t_attach).as_secs_f64() * 1e3,
        "state loaded"
    );
    let mut ready = msg::Ready::default();
    if state.verify {
        // The memory's page sum was kept as pages came: only the last round's pages were
        // hashed with the vCPUs paused.
        let t = Instant::now();
        ready.memory_digest = placed.sum.as_ref().map(|s| s.hex());
        ready.vcpu_digest = Some(vm.read_back()?.vcpu_digest());
        ready.disk_digest = disk.digest();
        ready.verify_ms = (t.elapsed() + placed.hashing_since_round).as_secs_f64() * 1e3;
    }
    link.send(&ready)?;
    Ok(())
}
