//! `storage move` of a stopped VM: its folder copied to another datastore of this host,
//! crash-safely (the journal of [`super::journal`], kind `Move`), and the recovery of a move
//! the agent's death interrupted.

use std::fs;
use std::path::PathBuf;

use super::cold::{check_room, remove_durably, ColdSource};
use super::datastore::{self, sync_dir, Datastore};
use super::journal::{self, Journal, OpKind, Record, Step};
use super::{io_err, Inventory, InventoryError};
use crate::storage::cold as files;

impl Inventory {
    /// Moves the stopped VM `name` to datastore `to` on this host, crash-safely: the files
    /// copied (holes kept) into the target's staging folder and synced, digests compared, the
    /// folder renamed into place and synced, then the old folder deleted; the journal of the
    /// target datastore records each step. Returns (files, bytes copied).
    pub fn move_storage(
        &self,
        name: &str,
        to: &str,
        progress: &dyn Fn(&str, u64),
    ) -> Result<Vec<(String, String, u64)>, InventoryError> {
        let target = self.datastore_index(Some(to))?;
        let src = self.begin_cold(name)?;
        let result = self.move_storage_inner(&src, target, progress);
        let mut inner = self.inner();
        if let Some(e) = inner.vms.get_mut(name) {
            e.migrating = false;
            if result.is_ok() {
                e.ds = target;
            }
        }
        result
    }

    fn move_storage_inner(
        &self,
        src: &ColdSource,
        target: usize,
        progress: &dyn Fn(&str, u64),
    ) -> Result<Vec<(String, String, u64)>, InventoryError> {
        use crate::migrate::cold::crash::{point, Crash};
        let name = &src.def.name;
        let to = &self.datastores[target];
        if to.name == src.datastore.name {
            return Err(InventoryError::Invalid(format!(
                "{name} is on datastore {:?} already",
                to.name
            )));
        }
        let (list, final_dir) = move_target(&src.dir, to, name)?;
        let j = Journal::of(&src.datastore.path);
        let mut r = Record {
            op: journal::new_op(name),
            kind: OpKind::Move,
            vm: name.clone(),
            step: Step::Intent,
            peer: None,
            datastore: src.datastore.name.clone(),
            target: Some(to.name.clone()),
            keep_source: false,
            copy: true,
        };
        j.write(&r).map_err(io_err(&src.datastore.path))?;
        point(Crash::MoveIntent);
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
        let mut out = Vec::new();
        for f in &list {
            let mut chunks = 0u32;
            let (a, b, n) = files::copy_file(&src.dir, &staging, &f.name, |n| {
                chunks += 1;
                if f.name == super::DISK && chunks == 2 {
                    point(Crash::MoveMidFile);
                }
                progress(&f.name, n)
            })
            .map_err(|e| undo(InventoryError::Invalid(e.to_string())))?;
            if a != b {
                return Err(undo(InventoryError::Invalid(format!(
                    "{}: the copy's digest {b} differs from the original's {a}",
                    f.name
                ))));
            }
            out.push((f.name.clone(), a, n));
        }
        if to.shared {
            datastore::set_owner(&staging, &self.agent)
                .map_err(io_err(&staging))
                .map_err(undo)?;
        }
        journal::mark_op(&staging, &r.op)
            .map_err(io_err(&staging))
            .map_err(undo)?;
        j.step(&mut r, Step::Synced)
            .map_err(io_err(&src.datastore.path))
            .map_err(undo)?;
        // The switch: from the rename on, the VM lives on the target datastore.
        fs::rename(&staging, &final_dir)
            .map_err(io_err(&final_dir))
            .map_err(undo)?;
        sync_dir(&to.path).map_err(io_err(&to.path))?;
        point(Crash::MoveSwitched);
        j.step(&mut r, Step::Registered)
            .map_err(io_err(&src.datastore.path))?;
        remove_durably(&src.dir)?;
        j.remove(&r.op).map_err(io_err(&src.datastore.path))?;
        Ok(out)
    }

    pub(super) fn recover_move(&self, r: &Record) -> Result<Option<String>, InventoryError> {
        let by_name = |n: &str| self.datastores.iter().find(|d| d.name == n);
        let (Some(from), Some(to)) = (by_name(&r.datastore), r.target.as_deref().and_then(by_name))
        else {
            return Ok(Some(format!(
                "{}: a storage move between unknown datastores was dropped",
                r.vm
            )));
        };
        let new = to.path.join(&r.vm);
        if journal::op_of(&new).as_deref() == Some(r.op.as_str()) {
            remove_durably(&from.path.join(&r.vm))?;
            Ok(Some(format!(
                "{}: storage move to {} finished (the copy was in place)",
                r.vm, to.name
            )))
        } else {
            Ok(Some(format!(
                "{}: storage move to {} rolled back (the VM stays on {})",
                r.vm, to.name, from.name
            )))
        }
    }
}

/// The checks of a storage move of VM `name` from `src_dir` onto datastore `to`: room for its
/// files, and no folder of that name there. Returns the files and the folder they go to.
pub(super) fn move_target(
    src_dir: &std::path::Path,
    to: &Datastore,
    name: &str,
) -> Result<(Vec<files::VmFile>, PathBuf), InventoryError> {
    let list = files::vm_files(src_dir).map_err(io_err(src_dir))?;
    check_room(to, list.iter().map(|f| f.size).sum())?;
    let final_dir = to.path.join(name);
    if final_dir.exists() {
        return Err(InventoryError::Datastore(format!(
            "{} exists already",
            final_dir.display()
        )));
    }
    Ok((list, final_dir))
}
