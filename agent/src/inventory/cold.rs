//! The inventory's side of moving a stopped VM to another host: taking it out for a cold
//! migration, a name reserved for one coming in, its registration, and the copy a
//! `--keep-source` migration leaves behind (marked `moved`). Storage moves between this
//! host's datastores are in [`super::storage_move`], the recovery of interrupted operations
//! in [`super::recover`].

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use super::datastore::{self, sync_dir, Datastore};
use super::journal;
use super::{io_err, Entry, Inventory, InventoryError, Reservation, VmDef, DEFINITION};

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
    /// Another host holds a newer copy of the VM (or, for the copy of a post-copy that never
    /// completed here, its source holds it still): this one is stale.
    Fenced {
        /// VM.
        vm: String,
        /// The host that holds it.
        by: String,
        /// Its generation there.
        generation: u64,
        /// This copy's.
        ours: u64,
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
            Mark::Fenced {
                vm,
                by,
                generation,
                ours,
            } => {
                if generation > ours {
                    write!(f, "is fenced: {by} holds a newer copy (generation {generation}; this one is {ours})")?;
                } else {
                    write!(f, "is fenced: {by} still holds it (generation {generation}; this copy, {ours}, arrived in a post-copy from it that never completed)")?;
                }
                write!(f, "; this copy is stale and may not start: `vmig vm destroy {vm}` on this host removes it (the VM runs on {by})")
            }
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
            Mark::InDoubt { .. } | Mark::Fenced { .. } => None,
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
        let mut def = def;
        def.generation = super::generation::next(def.generation);
        let written = if copy { &r.staging } else { &dir };
        datastore::write_atomic(written, DEFINITION, def.to_toml().as_bytes())
            .map_err(io_err(written))?;
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

/// Removes a folder and syncs its parent (a no-op when it is gone already).
pub(super) fn remove_durably(dir: &std::path::Path) -> Result<(), InventoryError> {
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
