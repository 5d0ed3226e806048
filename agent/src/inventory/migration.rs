//! The table's side of a live migration: a VM marked migrating out and released once it
//! moved, and the name and memory reserved for one coming in ([`Reservation`]), then its
//! registration.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use super::{datastore, io_err, Entry, Inventory, InventoryError, VmDef, DEFINITION, DISK, PROBE};
use crate::vm::Vm;

/// Memory and name held for an incoming VM; released on drop unless committed.
#[derive(Debug)]
pub struct Reservation {
    pub(super) inv: Arc<Inventory>,
    pub(super) name: String,
    /// Where the incoming VM's files are: its staging folder, written until commitment; or,
    /// on a shared datastore, the VM's own folder there (never removed by the reservation).
    pub staging: PathBuf,
    /// The datastore the VM joins, by index.
    pub(super) ds: usize,
    /// Its files stay in place on that (shared) datastore.
    pub(super) shared: bool,
    pub(super) committed: bool,
}

impl Reservation {
    /// Whether the VM's files stay in place on a shared datastore (nothing is copied).
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.committed {
            if !self.shared {
                let _ = fs::remove_dir_all(&self.staging);
            }
            self.inv
                .inner
                .lock()
                .expect("inventory")
                .reserved
                .remove(&self.name);
            tracing::info!(vm = %self.name, "reservation released");
        }
    }
}

impl Inventory {
    /// Marks a VM as migrating out (one migration at a time).
    pub fn begin_migration(&self, name: &str) -> Result<(VmDef, Arc<Vm>), InventoryError> {
        let mut inner = self.inner();
        let e = Self::idle_entry(&mut inner, name, "already migrating", "migrate it again")?;
        let vm = e.vm.clone().ok_or(InventoryError::State {
            name: name.into(),
            state: "stopped",
            op: "migrate it live (a cold migration of a stopped VM: add --offline)",
        })?;
        e.migrating = true;
        Ok((e.def.clone(), vm))
    }

    /// Ends an outgoing migration: on success the VM is released and its folder removed (but
    /// a folder on a shared datastore that the destination now owns, which stays for it);
    /// otherwise it stays, running, as before.
    pub fn end_migration(&self, name: &str, moved: bool) {
        let mut inner = self.inner();
        if moved {
            if let Some(e) = inner.vms.remove(name) {
                drop(inner);
                drop(e.vm);
                let ds = &self.datastores[e.ds];
                let dir = ds.path.join(name);
                let handed_over =
                    ds.shared && datastore::owner_of(&dir).is_some_and(|o| o != self.agent);
                if handed_over {
                    tracing::info!(vm = %name, dir = %dir.display(), "released; its folder stays on the shared datastore for its new owner");
                } else {
                    let _ = fs::remove_dir_all(dir);
                }
            }
        } else if let Some(e) = inner.vms.get_mut(name) {
            e.migrating = false;
            // The VM stays: a disk mirror the migration started has nobody to feed.
            if let Some(blk) = e.vm.as_ref().and_then(|vm| vm.devices().blk()) {
                blk.stop_block_log();
            }
        }
    }

    /// Reserves the name and memory for an incoming VM whose files are copied onto datastore
    /// `datastore` (the default one if none), or refuses with the reason.
    pub fn reserve(
        self: &Arc<Self>,
        def: &VmDef,
        datastore: Option<&str>,
    ) -> Result<Reservation, InventoryError> {
        def.validate()?;
        let ds = self.datastore_index(datastore)?;
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name.clone()));
        }
        self.check_memory(&inner, def.memory_bytes())?;
        let target = self.datastores[ds].path.join(&def.name);
        if target.exists() {
            return Err(InventoryError::Datastore(format!(
                "{} exists already on datastore {:?}{}",
                target.display(),
                self.datastores[ds].name,
                if self.datastores[ds].shared {
                    " (a shared datastore: --storage shared leaves the disk where it is)"
                } else {
                    ""
                }
            )));
        }
        let staging = self.staging_root(ds).join(&def.name);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        inner.reserved.insert(def.name.clone(), def.memory_bytes());
        Ok(Reservation {
            inv: self.clone(),
            name: def.name.clone(),
            staging,
            ds,
            shared: false,
            committed: false,
        })
    }

    /// Reserves the name and memory for an incoming VM whose folder stays where it is, on the
    /// shared datastore `datastore`: refused unless this agent has a datastore of that name,
    /// marked shared, whose folder holds the VM's folder with the source's probe file in it
    /// (proof that both agents see the same storage, not two folders of one name).
    pub fn reserve_in_place(
        self: &Arc<Self>,
        def: &VmDef,
        datastore: &str,
        probe: &str,
    ) -> Result<Reservation, InventoryError> {
        def.validate()?;
        let i = self.datastore_index(Some(datastore))?;
        let ds = &self.datastores[i];
        if !ds.shared {
            return Err(InventoryError::Datastore(format!(
                "datastore {datastore:?} ({}) is not marked shared on this host",
                ds.path.display()
            )));
        }
        let dir = ds.path.join(&def.name);
        match fs::read_to_string(dir.join(PROBE)) {
            Ok(p) if p == probe => {}
            _ => {
                return Err(InventoryError::Datastore(format!(
                    "datastore {datastore:?} here ({}) does not show the source's folder of {:?}: not the same storage",
                    ds.path.display(),
                    def.name
                )))
            }
        }
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name.clone()));
        }
        self.check_memory(&inner, def.memory_bytes())?;
        inner.reserved.insert(def.name.clone(), def.memory_bytes());
        Ok(Reservation {
            inv: self.clone(),
            name: def.name.clone(),
            staging: dir,
            ds: i,
            shared: true,
            committed: false,
        })
    }

    /// Registers an incoming VM: its staged folder moves into the datastore and the running
    /// VM joins the table.
    /// The copy registers with the source's generation + 1, written to its `vm.toml`.
    pub fn commit(
        &self,
        mut r: Reservation,
        mut def: VmDef,
        vm: Arc<Vm>,
    ) -> Result<(), InventoryError> {
        let ds = &self.datastores[r.ds];
        def.generation = super::generation::next(def.generation);
        datastore::write_atomic(&r.staging, DEFINITION, def.to_toml().as_bytes())
            .map_err(io_err(&r.staging))?;
        if r.shared {
            // The VM's folder stays on the shared datastore: it becomes this agent's.
            datastore::set_owner(&r.staging, &self.agent).map_err(io_err(&r.staging))?;
        } else {
            let dir = ds.path.join(&def.name);
            if ds.shared {
                // Owned from the moment it appears there: no other agent loads it.
                datastore::set_owner(&r.staging, &self.agent).map_err(io_err(&r.staging))?;
            }
            fs::rename(&r.staging, &dir).map_err(io_err(&dir))?;
            if let Some(blk) = vm.devices().blk() {
                blk.moved_to(&dir.join(DISK));
            }
        }
        let ds = r.ds;
        let mut inner = self.inner();
        inner.reserved.remove(&def.name);
        let mut e = Entry::new(def, ds);
        e.vm = Some(vm);
        inner.vms.insert(e.def.name.clone(), e);
        r.committed = true;
        Ok(())
    }

    /// Names being received.
    pub fn incoming(&self) -> Vec<String> {
        self.inner().reserved.keys().cloned().collect()
    }
}
