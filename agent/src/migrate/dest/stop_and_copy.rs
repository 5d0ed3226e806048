//! Stage 4 on the destination: the state loaded into the VM's vCPUs and devices (not running),
//! digests computed when the source asked, `Ready`.

use std::time::Instant;

use super::disk::DiskSink;
use super::precopy::Loaded;
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
) -> Result<(), MigrateError> {
    let vm = &a.vm;
    // The image is durable before the VM may run from it.
    disk.sync()?;
    let log = to.inv.open_log(&a.reservation.staging)?;
    vm.attach_disk(
        &a.reservation.staging.join(crate::inventory::DISK),
        &a.def.name,
    )?;
    vm.restore(&state.machine, Box::new(log))?;
    let mut ready = msg::Ready::default();
    if state.verify {
        let t = Instant::now();
        ready.memory_digest = Some(vm.ram().digest()?);
        ready.vcpu_digest = Some(vm.read_back()?.vcpu_digest());
        ready.disk_digest = disk.digest();
        ready.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    link.send(&ready)?;
    Ok(())
}
