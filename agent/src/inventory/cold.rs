//! The inventory's side of moving a stopped VM: taking it out for a cold migration, a name
//! reserved for one coming in, its registration, the copy a `--keep-source` migration leaves
//! behind (marked `moved`), a storage move between datastores, and the recovery of the
//! operations an agent's death interrupted (the datastores' journals, [`super::journal`]).

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use super::datastore::{self, sync_dir, Datastore};
use super::journal::{self, Journal, OpKind, Record, Step};
use super::{io_err, Entry, Inventory, InventoryError, Reservation, VmDef};
use crate::storage::cold as files;

/// The marker of a copy left behind by `--keep-source`: who owns the VM now.
pub const MOVED: &str = ".moved";

/// Why a stopped VM may not start here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// `--keep-source`: the VM moved to `to`; this is a copy.
    Moved {
        /// The host that owns the VM now.
        to: String,
    },
    /// A cold migration out to `peer` was interrupted after the destination could have
    /// registered the VM: the question is being put to it.
    InDoubt {
        /// The operation.
        op: String,
        /// The destination.
        peer: String,
    },
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mark::Moved { to } => write!(
                f,
                "was moved to {to} (this is the copy --keep-source left): `vmig vm reclaim` takes it back once {to} no longer has it"
            ),
            Mark::InDoubt { peer, .. } => write!(
                f,
                "is being recovered: an interrupted cold migration to {peer} is being resolved with it"
            ),
        }
    }
}

/// The `moved` mark of a VM folder, if it has one.
pub(super) fn moved_mark(dir: &std::path::Path) -> Option<Mark> {
    let to = fs::read_to_string(dir.join(MOVED)).ok()?;
    Some(Mark::Moved {
        to: to.trim().to_string(),
    })
}

/// A stopped VM taken out for a cold migration.
#[derive(Debug, Clone)]
pub struct ColdSource {
    /// Its definition.
    pub def: VmDef,
    /// Its folder.
    pub dir: PathBuf,
    /// Its datastore.
    pub datastore: Datastore,
}

/// How a cold migration out ended, for the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdEnd {
    /// It failed before the destination registered the VM: the VM stays here as before.
    Failed,
    /// The destination registered it and this copy is gone (or, on a shared datastore,
    /// belongs to the destination now).
    Released,
    /// The destination registered it and this copy stays, marked moved.
    Kept,
}

impl Inventory {
    /// Takes the stopped VM `name` out for a cold migration (one operation at a time).
    pub fn begin_cold(&self, name: &str) -> Result<ColdSource, InventoryError> {
        let mut inner = self.inner();
        let e = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        if e.migrating {
            return Err(InventoryError::State {
                name: name.into(),
                state: "migrating",
                op: "move it again",
            });
        }
        if e.vm.is_some() {
            return Err(InventoryError::State {
                name: name.into(),
                state: "running",
                op: "move it offline (stop it first, or migrate it live without --offline)",
            });
        }
        if let Some(m) = &e.mark {
            return Err(InventoryError::Marked {
                name: name.into(),
                why: m.to_string(),
            });
        }
        e.migrating = true;
        let ds = self.datastores[e.ds].clone();
        Ok(ColdSource {
            def: e.def.clone(),
            dir: ds.path.join(name),
            datastore: ds,
        })
    }

    /// Ends a cold migration out of `name` (see [`ColdEnd`]); `to` is the destination.
    pub fn end_cold(&self, name: &str, end: ColdEnd, to: &str) -> Result<(), InventoryError> {
        let mut inner = self.inner();
        match end {
            ColdEnd::Failed => {
                if let Some(e) = inner.vms.get_mut(name) {
                    e.migrating = false;
                }
                Ok(())
            }
            ColdEnd::Released => {
                let Some(e) = inner.vms.remove(name) else {
                    return Ok(());
                };
                drop(inner);
                let ds = &self.datastores[e.ds];
                let dir = ds.path.join(name);
                // On a shared datastore the folder may now be the destination's own.
                let theirs = ds.shared && datastore::owner_of(&dir).as_deref() != Some(&self.agent);
                if !theirs {
                    remove_durably(&dir)?;
                }
                Ok(())
            }
            ColdEnd::Kept => {
                let Some(e) = inner.vms.get_mut(name) else {
                    return Ok(());
                };
                let dir = self.datastores[e.ds].path.join(name);
                datastore::write_atomic(&dir, MOVED, format!("{to}\n").as_bytes())
                    .map_err(io_err(&dir))?;
                e.migrating = false;
                e.mark = Some(Mark::Moved { to: to.into() });
                Ok(())
            }
        }
    }

    /// Takes back the copy `--keep-source` left of `name` (the caller made sure the host it
    /// moved to no longer has it).
    pub fn reclaim(&self, name: &str) -> Result<String, InventoryError> {
        let mut inner = self.inner();
        let e = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        let Some(Mark::Moved { to }) = e.mark.clone() else {
            return Err(InventoryError::Invalid(format!(
                "{name} is not a copy left by a cold migration: nothing to reclaim"
            )));
        };
        let dir = self.datastores[e.ds].path.join(name);
        let p = dir.join(MOVED);
        fs::remove_file(&p).map_err(io_err(&p))?;
        sync_dir(&dir).map_err(io_err(&dir))?;
        e.mark = None;
        Ok(to)
    }

    /// The host a `moved` copy of `name` went to, if it is one.
    pub fn moved_to(&self, name: &str) -> Option<String> {
        match self.inner().vms.get(name)?.mark.as_ref()? {
            Mark::Moved { to } => Some(to.clone()),
            Mark::InDoubt { .. } => None,
        }
    }

    /// Reserves the name of a stopped VM coming in on datastore `ds` (no memory: it does not
    /// run), with a staging folder there; refused if the name is taken or the datastore lacks
    /// `bytes` of room.
    pub fn reserve_cold(
        self: &Arc<Self>,
        def: &VmDef,
        ds: usize,
        bytes: u64,
        op: &str,
    ) -> Result<Reservation, InventoryError> {
        def.validate()?;
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name.clone()));
        }
        let store = &self.datastores[ds];
        if bytes > 0 {
            check_room(store, bytes)?;
        }
        let staging = self.staging_root(ds).join(&def.name);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        inner.reserved.insert(def.name.clone(), 0);
        inner.cold_in.insert(op.into(), Some(false));
        Ok(Reservation {
            inv: self.clone(),
            name: def.name.clone(),
            staging,
            ds,
            shared: false,
            committed: false,
        })
    }

    /// Whether cold operation `op` coming in may still register (false: a recovering
    /// source's question aborted it).
    pub fn cold_in_alive(&self, op: &str) -> bool {
        matches!(self.inner().cold_in.get(op), Some(Some(_)))
    }

    /// Registers a stopped VM that came in: its staged folder (complete, synced) is renamed
    /// into datastore `ds`, the datastore's folder synced, and the VM joins the table, all
    /// under the inventory's lock so that a recovering source's question ([`Self::cold_query`])
    /// sees either before or after. Refused if such a question aborted `op` first. With
    /// `copy` false (a shared datastore's VM, only the registration moves) the folder is in
    /// place already: the operation marker and then the `.owner` file are rewritten instead.
    pub fn register_cold(
        &self,
        mut r: Reservation,
        def: VmDef,
        ds: usize,
        op: &str,
        copy: bool,
    ) -> Result<PathBuf, InventoryError> {
        let mut inner = self.inner();
        if inner.cold_in.get(op) != Some(&Some(false)) {
            return Err(InventoryError::Invalid(format!(
                "the cold migration {op} was aborted by its source's recovery"
            )));
        }
        let store = &self.datastores[ds];
        let dir = store.path.join(&def.name);
        if copy {
            if dir.exists() {
                return Err(InventoryError::Exists(def.name.clone()));
            }
            fs::rename(&r.staging, &dir).map_err(io_err(&dir))?;
            sync_dir(&store.path).map_err(io_err(&store.path))?;
        } else {
            let _ = fs::remove_dir(&r.staging);
            journal::mark_op(&dir, op).map_err(io_err(&dir))?;
            datastore::set_owner(&dir, &self.agent).map_err(io_err(&dir))?;
        }
        inner.reserved.remove(&def.name);
        inner.cold_in.insert(op.into(), Some(true));
        inner.vms.insert(def.name.clone(), Entry::new(def, ds));
        r.committed = true;
        Ok(dir)
    }

    /// Ends the bookkeeping of cold operation `op` coming in.
    pub fn forget_cold_in(&self, op: &str) {
        self.inner().cold_in.remove(op);
    }

    /// A recovering source asks whether cold operation `op` (VM `name`) is registered here.
    /// An operation still under way and not registered is aborted by the question, so that
    /// the answer stays true.
    pub fn cold_query(&self, op: &str, name: &str) -> bool {
        let mut inner = self.inner();
        if op.is_empty() {
            // Any VM of that name (`vm reclaim`'s question).
            return inner.vms.contains_key(name) || inner.reserved.contains_key(name);
        }
        match inner.cold_in.get(op).cloned() {
            Some(Some(true)) => return true,
            Some(Some(false)) | Some(None) => {
                inner.cold_in.insert(op.into(), None);
                return false;
            }
            None => {}
        }
        let Some(e) = inner.vms.get(name) else {
            return false;
        };
        let dir = self.datastores[e.ds].path.join(name);
        journal::op_of(&dir).as_deref() == Some(op)
    }

    /// Records what an agent's start recovered (`vmig vm list` shows it).
    pub fn note_recovered(&self, what: String) {
        tracing::info!(%what, "recovered");
        self.inner().recovered.push(what);
    }

    /// What the agent's start recovered.
    pub fn recovered(&self) -> Vec<String> {
        self.inner().recovered.clone()
    }

    /// Finishes or undoes, from the datastores' journals, every interrupted operation that
    /// needs no other agent: incoming cold migrations (registered if their folder is in
    /// place, else gone with their staging folder), storage moves (finished once the copy is
    /// in place, else undone), and migrations out whose destination confirmed (the copy
    /// deleted or marked). Runs before the VM folders are read.
    pub(super) fn recover_local(&self) {
        for (i, ds) in self.datastores.iter().enumerate() {
            let j = Journal::of(&ds.path);
            for r in j.list() {
                let done = match r.kind {
                    OpKind::ColdIn => self.recover_in(i, &r),
                    OpKind::Move => self.recover_move(&r),
                    OpKind::ColdOut => self.recover_out_local(i, &r),
                };
                match done {
                    Ok(Some(what)) => {
                        let _ = j.remove(&r.op);
                        self.note_recovered(what);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(op = %r.op, cause = %e, "cannot recover"),
                }
            }
        }
    }

    fn recover_in(&self, ds: usize, r: &Record) -> Result<Option<String>, InventoryError> {
        let dir = self.datastores[ds].path.join(&r.vm);
        let from = r.peer.as_deref().unwrap_or("?");
        let registered = journal::op_of(&dir).as_deref() == Some(r.op.as_str())
            && (!self.datastores[ds].shared
                || datastore::owner_of(&dir).as_deref() == Some(&self.agent));
        Ok(Some(if registered {
            format!(
                "{}: cold migration from {from} finished (registered here)",
                r.vm
            )
        } else {
            // The staging folder went with the datastore's staging root at the start.
            format!(
                "{}: cold migration from {from} rolled back here (never registered)",
                r.vm
            )
        }))
    }

    fn recover_out_local(&self, ds: usize, r: &Record) -> Result<Option<String>, InventoryError> {
        let to = r.peer.as_deref().unwrap_or("?");
        let dir = self.datastores[ds].path.join(&r.vm);
        match r.step {
            Step::Intent | Step::Synced | Step::Registered => Ok(Some(format!(
                "{}: cold migration to {to} rolled back (interrupted before the commit): the VM stays here",
                r.vm
            ))),
            // The destination may have registered it: ask it (after the folders are read).
            Step::Committing => Ok(None),
            Step::Confirmed => {
                self.release_copy(ds, r, &dir)?;
                Ok(Some(format!(
                    "{}: cold migration to {to} finished (the destination had confirmed): {}",
                    r.vm,
                    if r.keep_source { "this copy is marked moved" } else { "this copy is deleted" }
                )))
            }
        }
    }

    /// The source's copy after the destination registered the VM: deleted, marked moved, or
    /// left to the destination (a shared datastore's folder it owns now).
    pub(crate) fn release_copy(
        &self,
        ds: usize,
        r: &Record,
        dir: &std::path::Path,
    ) -> Result<(), InventoryError> {
        let to = r.peer.as_deref().unwrap_or("?");
        if !dir.exists() {
            return Ok(());
        }
        if r.keep_source {
            return datastore::write_atomic(dir, MOVED, format!("{to}\n").as_bytes())
                .map_err(io_err(dir));
        }
        let theirs =
            self.datastores[ds].shared && datastore::owner_of(dir).as_deref() != Some(&self.agent);
        if theirs {
            return Ok(());
        }
        remove_durably(dir)
    }

    /// After the folders are read: VMs whose migration out is in doubt may not start until
    /// their destination answers (see `migrate::cold::recover`).
    pub(super) fn mark_in_doubt(&self) {
        let mut inner = self.inner();
        for ds in &self.datastores {
            for r in Journal::of(&ds.path).list() {
                if r.kind == OpKind::ColdOut && r.step == Step::Committing {
                    if let Some(e) = inner.vms.get_mut(&r.vm) {
                        e.mark = Some(Mark::InDoubt {
                            op: r.op.clone(),
                            peer: r.peer.clone().unwrap_or_default(),
                        });
                    }
                }
            }
        }
    }

    /// Marks `name` as recovering the in-doubt migration out `r` (its destination did not
    /// answer yet).
    pub fn mark_recovering(&self, name: &str, r: &Record) {
        if let Some(e) = self.inner().vms.get_mut(name) {
            e.mark = Some(Mark::InDoubt {
                op: r.op.clone(),
                peer: r.peer.clone().unwrap_or_default(),
            });
        }
        let (count, cv) = &self.doubt;
        *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        cv.notify_all();
    }

    /// How many times a migration out fell in doubt while the agent ran (for
    /// [`Self::wait_for_doubt`]).
    pub fn doubt_count(&self) -> u64 {
        *self.doubt.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until [`Self::doubt_count`] differs from `seen`.
    pub fn wait_for_doubt(&self, seen: u64) {
        let (count, cv) = &self.doubt;
        let g = count.lock().unwrap_or_else(PoisonError::into_inner);
        let _g = cv
            .wait_while(g, |c| *c == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// The cold migrations out whose outcome is in doubt: (datastore index, record).
    pub fn in_doubt(&self) -> Vec<(usize, Record)> {
        let mut v = Vec::new();
        for (i, ds) in self.datastores.iter().enumerate() {
            for r in Journal::of(&ds.path).list() {
                if r.kind == OpKind::ColdOut && r.step == Step::Committing {
                    v.push((i, r));
                }
            }
        }
        v
    }

    /// Resolves an in-doubt migration out with the destination's answer.
    pub fn resolve_in_doubt(
        &self,
        ds: usize,
        r: &Record,
        registered: bool,
    ) -> Result<(), InventoryError> {
        let dir = self.datastores[ds].path.join(&r.vm);
        let to = r.peer.as_deref().unwrap_or("?");
        let what = if registered {
            self.release_copy(ds, r, &dir)?;
            let mut inner = self.inner();
            if r.keep_source {
                if let Some(e) = inner.vms.get_mut(&r.vm) {
                    e.mark = Some(Mark::Moved { to: to.into() });
                }
            } else {
                inner.vms.remove(&r.vm);
            }
            format!(
                "{}: cold migration to {to} finished ({to} had registered it): {}",
                r.vm,
                if r.keep_source {
                    "this copy is marked moved"
                } else {
                    "this copy is deleted"
                }
            )
        } else {
            if let Some(e) = self.inner().vms.get_mut(&r.vm) {
                e.mark = None;
            }
            format!("{}: cold migration to {to} rolled back ({to} never registered it): the VM stays here", r.vm)
        };
        Journal::of(&self.datastores[ds].path)
            .remove(&r.op)
            .map_err(io_err(&self.datastores[ds].path))?;
        self.note_recovered(what);
        Ok(())
    }

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

    fn recover_move(&self, r: &Record) -> Result<Option<String>, InventoryError> {
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

/// Refuses a copy of `bytes` onto datastore `ds` that would leave it less than 1 % of its
/// file system (and 64 MiB) for everything else.
pub(super) fn check_room(ds: &Datastore, bytes: u64) -> Result<(), InventoryError> {
    let free = ds.space().map_err(io_err(&ds.path))?.free;
    if bytes.saturating_add((free / 100).max(64 << 20)) > free {
        return Err(InventoryError::NoSpace {
            datastore: ds.name.clone(),
            need_mib: bytes.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    Ok(())
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

/// Removes a folder and syncs its parent (a no-op when it is gone already).
fn remove_durably(dir: &std::path::Path) -> Result<(), InventoryError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    }
    if let Some(p) = dir.parent() {
        sync_dir(p).map_err(io_err(p))?;
    }
    Ok(())
}
