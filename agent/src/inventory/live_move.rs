//! `storage move` of a running VM: its folder moves to another datastore of this host while
//! the guest runs. The small files (definition, NVRAM, logs) are copied first; the disk is
//! mirrored live and the device switches to the copy at a pause of a few milliseconds
//! ([`crate::migrate::local_move`]); then the staged folder is renamed into the target
//! datastore and the old one deleted.
//!
//! The journal is the stopped move's ([`super::journal`], kind `Move`): an agent that dies
//! before the rename comes back with the VM on its old datastore (its old image, as it was at
//! the switch at the latest: crash-consistent, as after a power cut); after the rename, with
//! the VM on the new one and the old folder deleted.

use std::fs;
use std::sync::atomic::AtomicBool;

use super::datastore::{self, sync_dir};
use super::journal::{self, Journal, OpKind, Record, Step};
use super::{io_err, Inventory, InventoryError, DISK};
use crate::migrate::local_move::{self, LiveMoveReport};
use crate::storage::cold as files;

/// The small files copied (name, digest, bytes) and the disk's report.
pub type LiveMoved = (Vec<(String, String, u64)>, LiveMoveReport);

impl Inventory {
    /// Moves the running VM `name` onto datastore `to`; `progress(file, bytes)` as the small
    /// files are copied. Returns the small files copied (name, digest, bytes) and the disk's
    /// report.
    pub fn move_storage_live(
        &self,
        name: &str,
        to: &str,
        progress: &dyn Fn(&str, u64),
    ) -> Result<LiveMoved, InventoryError> {
        let target = self.datastore_index(Some(to))?;
        let (vm, from) = {
            let mut inner = self.inner();
            let e = inner
                .vms
                .get_mut(name)
                .ok_or_else(|| InventoryError::NotFound(name.into()))?;
            let Some(vm) = e.vm.clone() else {
                return Err(InventoryError::State {
                    name: name.into(),
                    state: "stopped",
                    op: "move it live",
                });
            };
            if e.migrating {
                return Err(InventoryError::State {
                    name: name.into(),
                    state: "migrating",
                    op: "move it",
                });
            }
            e.migrating = true;
            (vm, e.ds)
        };
        let result = self.live_move_inner(name, &vm, from, target, progress);
        let mut inner = self.inner();
        if let Some(e) = inner.vms.get_mut(name) {
            e.migrating = false;
            if result.is_ok() {
                e.ds = target;
            }
        }
        result
    }

    fn live_move_inner(
        &self,
        name: &str,
        vm: &crate::vm::Vm,
        from: usize,
        target: usize,
        progress: &dyn Fn(&str, u64),
    ) -> Result<LiveMoved, InventoryError> {
        let (src, to) = (&self.datastores[from], &self.datastores[target]);
        if from == target {
            return Err(InventoryError::Datastore(format!(
                "{name} is on datastore {:?} already",
                to.name
            )));
        }
        let src_dir = src.path.join(name);
        let (list, final_dir) = super::storage_move::move_target(&src_dir, to, name)?;
        let j = Journal::of(&src.path);
        let mut r = Record {
            op: journal::new_op(name),
            kind: OpKind::Move,
            vm: name.into(),
            step: Step::Intent,
            peer: None,
            datastore: src.name.clone(),
            target: Some(to.name.clone()),
            keep_source: false,
            copy: true,
        };
        j.write(&r).map_err(io_err(&src.path))?;
        let staging = self.staging_root(target).join(name);
        let op = r.op.clone();
        let undo = |e: InventoryError| {
            let _ = fs::remove_dir_all(&staging);
            let _ = j.remove(&op);
            e
        };
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)
            .map_err(io_err(&staging))
            .map_err(undo)?;
        // The small files first (the log as it is now: lines written until the switch are
        // appended to the new one by the VM itself).
        let mut out = Vec::new();
        for f in list.iter().filter(|f| f.name != DISK) {
            let (a, b, n) = files::copy_file(&src_dir, &staging, &f.name, |n| progress(&f.name, n))
                .map_err(|e| undo(InventoryError::Invalid(e.to_string())))?;
            if a != b {
                return Err(undo(InventoryError::Invalid(format!(
                    "{}: the copy's digest {b} differs from the original's {a}",
                    f.name
                ))));
            }
            out.push((f.name.clone(), a, n));
        }
        // The disk, live; the device switches to the copy at a short pause.
        let disk = local_move::move_disk(
            vm,
            &src_dir.join(DISK),
            &staging.join(DISK),
            &AtomicBool::new(false),
            &|n| progress(DISK, n),
        );
        let disk = match disk {
            Ok(d) => d,
            Err(e @ local_move::MoveError::Mismatch { .. }) => {
                // The VM runs on the copy: keep both folders for the operator.
                let _ = j.remove(&op);
                return Err(InventoryError::Invalid(format!(
                    "{e} (the copy is in {})",
                    staging.display()
                )));
            }
            Err(e) => return Err(undo(InventoryError::Invalid(e.to_string()))),
        };
        out.push((DISK.into(), disk.digest.clone(), disk.copied_bytes));
        if to.shared {
            datastore::set_owner(&staging, &self.agent).map_err(io_err(&staging))?;
        }
        journal::mark_op(&staging, &r.op).map_err(io_err(&staging))?;
        j.step(&mut r, Step::Synced).map_err(io_err(&src.path))?;
        fs::rename(&staging, &final_dir).map_err(io_err(&final_dir))?;
        if let Some(blk) = vm.devices().blk() {
            blk.moved_to(&final_dir.join(DISK));
        }
        let log = self.open_log(&final_dir)?;
        vm.devices().reopen_log(Box::new(log));
        sync_dir(&to.path).map_err(io_err(&to.path))?;
        j.step(&mut r, Step::Registered)
            .map_err(io_err(&src.path))?;
        let _ = fs::remove_dir_all(&src_dir);
        let _ = sync_dir(&src.path);
        j.remove(&r.op).map_err(io_err(&src.path))?;
        vm.devices().log_line(&format!(
            "storage moved live from datastore {} to {} (pause {:.1} ms)",
            src.name, to.name, disk.pause_ms
        ));
        Ok((out, disk))
    }
}
