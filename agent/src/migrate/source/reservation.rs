//! Stage 2, reservation: `Reserve` → `Reserved` (or `Refused`); then the VM's files travel
//! (definition, NVRAM, disk). Nothing has changed on the source yet.

use super::{stream, Run};
use crate::inventory;
use crate::migrate::report::ProgressPhase;
use crate::migrate::{MigrateError, Progress};
use crate::wire::messages as msg;

/// Asks the destination to reserve room for the VM, then sends its files.
pub(super) fn reserve(run: &mut Run<'_>) -> Result<(), MigrateError> {
    let out = run.out;
    run.link.send(&msg::Reserve {
        name: out.def.name.clone(),
        spec: out.vm.spec().into(),
        definition: out.def.to_toml(),
    })?;
    let _: msg::Reserved = run.link.recv()?;
    (run.progress)(Progress::new(ProgressPhase::Reserved, 0, 0, 0));
    // Every write to the disk from now on is logged, and re-sent at the pause (send_state).
    if let Some(blk) = out.vm.devices().blk() {
        blk.start_block_log(stream::DISK_BLOCK);
    }
    for name in [inventory::DEFINITION, inventory::NVRAM, inventory::DISK] {
        stream::send_file(&mut run.link, out.dir, name)?;
    }
    Ok(())
}
