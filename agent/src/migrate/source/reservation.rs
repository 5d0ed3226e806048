//! Stage 2, reservation: `Reserve` → `Reserved` (or `Refused`); then the VM's files travel
//! (definition, NVRAM), and the disk's first pass ([`super::disk`]). Nothing has changed on the source yet.

use super::disk::DiskMirror;
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
        verify: run.opts.verify,
    })?;
    let _: msg::Reserved = run.link.recv()?;
    (run.progress)(Progress::new(ProgressPhase::Reserved, 0, 0, 0));
    for name in [inventory::DEFINITION, inventory::NVRAM] {
        stream::send_file(&mut run.link, out.dir, name)?;
    }
    // The disk: its written-block log starts before the first chunk is read.
    let mut disk = DiskMirror::open(out, run.opts.verify)?;
    let sent = disk.send_image(&mut run.link, run.cancel);
    run.disk = Some(disk);
    sent
}
