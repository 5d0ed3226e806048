//! Stage 2, reservation: `Reserve` → `Reserved` (or `Refused`); then the VM's files travel
//! (definition, NVRAM), and the disk's first pass ([`super::disk`]); or, on shared storage,
//! nothing travels: the destination opens the VM's folder in place. Nothing has changed on
//! the source yet.

use std::path::{Path, PathBuf};

use super::disk::DiskMirror;
use super::{stream, Outgoing, Run};
use crate::inventory;
use crate::migrate::report::{DiskReport, ProgressPhase, StorageUsed};
use crate::migrate::{MigrateError, Progress, StorageMode};
use crate::wire::messages as msg;

/// Asks the destination to reserve room for the VM, then sends its files.
pub(super) fn reserve(run: &mut Run<'_>) -> Result<(), MigrateError> {
    let out = run.out;
    let (storage, _probe) = storage_request(out, run.opts.storage)?;
    run.link.send(&msg::Reserve {
        name: out.def.name.clone(),
        spec: out.vm.spec().into(),
        definition: out.def.to_toml(),
        verify: run.opts.verify,
        storage: storage.clone(),
        target_datastore: run.opts.target_datastore.clone(),
    })?;
    let reserved: msg::Reserved = run.link.recv()?;
    (run.progress)(Progress::new(ProgressPhase::Reserved, 0, 0, 0));
    match (&storage, reserved.shared) {
        (msg::StorageRequest::Shared { .. }, true) => {
            // Nothing travels: the destination opens the VM's folder where it is, once this
            // side has flushed and closed the image at the pause.
            let image_bytes = std::fs::metadata(out.dir.join(inventory::DISK))
                .map(|m| m.len())
                .unwrap_or(0);
            run.shared = Some(DiskReport {
                mode: StorageUsed::Shared,
                image_bytes,
                ..Default::default()
            });
            return Ok(());
        }
        (msg::StorageRequest::Copy, true) => {
            return Err(MigrateError::Peer(
                "the destination answered shared storage to a copy".into(),
            ))
        }
        (msg::StorageRequest::Shared { or_copy: false, .. }, false) => {
            return Err(MigrateError::Peer(
                "the destination answered a copy to --storage shared".into(),
            ))
        }
        _ => {}
    }
    for name in [inventory::DEFINITION, inventory::NVRAM] {
        stream::send_file(&mut run.link, out.dir, name)?;
    }
    // The disk: its written-block log starts before the first chunk is read.
    let mut disk = DiskMirror::open(out, run.opts.verify)?;
    let sent = disk.send_image(&mut run.link, run.cancel, run.progress);
    run.disk = Some(disk);
    sent
}

/// The storage the source asks for, and the probe file it wrote for a shared datastore
/// (removed when the guard drops, after the destination's answer).
fn storage_request(
    out: &Outgoing<'_>,
    mode: StorageMode,
) -> Result<(msg::StorageRequest, Option<Probe>), MigrateError> {
    let copy = || Ok((msg::StorageRequest::Copy, None));
    let datastore = match (mode, out.shared_datastore) {
        (StorageMode::Copy, _) | (StorageMode::Auto, None) => return copy(),
        (StorageMode::Shared, None) => {
            return Err(MigrateError::Disk(format!(
                "--storage shared: {:?} is not on a shared datastore (an agent's --datastore NAME=PATH,shared); use --storage copy",
                out.def.name
            )))
        }
        (_, Some(d)) => d,
    };
    let probe = Probe::write(out.dir, out.agent)?;
    let request = msg::StorageRequest::Shared {
        datastore: datastore.into(),
        probe: probe.contents.clone(),
        or_copy: mode == StorageMode::Auto,
    };
    Ok((request, Some(probe)))
}

/// The probe file in a VM folder on a shared datastore: a value only this migration knows,
/// which the destination must read back from its own view of the datastore.
struct Probe {
    path: PathBuf,
    contents: String,
}

impl Probe {
    fn write(dir: &Path, agent: &str) -> Result<Probe, MigrateError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let contents = format!("{agent} {} {nanos}", std::process::id());
        let path = dir.join(inventory::PROBE);
        inventory::datastore::write_atomic(dir, inventory::PROBE, contents.as_bytes())
            .map_err(|e| MigrateError::Disk(format!("cannot write {}: {e}", path.display())))?;
        Ok(Probe { path, contents })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
