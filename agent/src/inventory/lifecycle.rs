//! A VM's life on this host: created on a datastore, started, stopped, destroyed.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::cold::Mark;
use super::{
    datastore, io_err, Entry, Inventory, InventoryError, VmDef, VmInfo, DEFINITION, DISK, LOG,
    NVRAM, NVRAM_BYTES,
};
use crate::vm::Vm;

impl Inventory {
    /// Creates a VM folder on the default datastore: definition, NVRAM, empty log, sparse
    /// disk.
    pub fn create(&self, def: VmDef) -> Result<VmInfo, InventoryError> {
        self.create_on(def, None)
    }

    /// Creates a VM folder on the datastore named `datastore` (None: the default).
    pub fn create_on(&self, def: VmDef, datastore: Option<&str>) -> Result<VmInfo, InventoryError> {
        def.validate()?;
        let ds = self.datastore_index(datastore)?;
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name));
        }
        let dir = self.datastores[ds].path.join(&def.name);
        if dir.exists() {
            return Err(InventoryError::Invalid(format!(
                "{} exists already (another agent's VM on a shared datastore?)",
                dir.display()
            )));
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if self.datastores[ds].shared {
            datastore::set_owner(&dir, &self.agent).map_err(io_err(&dir))?;
        }
        let write = |name: &str, data: &[u8]| {
            let p = dir.join(name);
            fs::write(&p, data).map_err(io_err(&p))
        };
        write(DEFINITION, def.to_toml().as_bytes())?;
        let mut nvram = vec![0u8; NVRAM_BYTES];
        let head = format!("VMIG-NVRAM v1\nvm={}\n", def.name);
        nvram[..head.len()].copy_from_slice(head.as_bytes());
        write(NVRAM, &nvram)?;
        write(LOG, b"")?;
        let disk = dir.join(DISK);
        let f = fs::File::create(&disk).map_err(io_err(&disk))?;
        f.set_len(def.disk_mib << 20).map_err(io_err(&disk))?;
        inner
            .vms
            .insert(def.name.clone(), Entry::new(def.clone(), ds));
        drop(inner);
        self.info(&def.name)
    }

    /// Boots a stopped VM.
    pub fn start(&self, name: &str) -> Result<VmInfo, InventoryError> {
        let mut inner = self.inner();
        let def = {
            let e = inner
                .vms
                .get(name)
                .ok_or_else(|| InventoryError::NotFound(name.into()))?;
            if e.vm.is_some() {
                return Err(InventoryError::State {
                    name: name.into(),
                    state: "running",
                    op: "start it",
                });
            }
            if let Some(m) = &e.mark {
                return Err(InventoryError::Marked {
                    name: name.into(),
                    why: m.to_string(),
                });
            }
            if e.migrating {
                return Err(InventoryError::State {
                    name: name.into(),
                    state: "migrating",
                    op: "start it",
                });
            }
            (e.def.clone(), self.datastores[e.ds].path.join(name))
        };
        let (def, dir) = def;
        self.check_memory(&inner, def.memory_bytes())?;
        let log = self.open_log(&dir)?;
        let vm = Vm::create(&def.spec(), name, Box::new(log))?;
        vm.attach_disk(&dir.join(DISK), name)?;
        vm.boot(name)?;
        vm.devices().log_line("started");
        vm.resume();
        inner.vms.get_mut(name).expect("checked").vm = Some(Arc::new(vm));
        drop(inner);
        self.info(name)
    }

    /// Opens a VM's log for appending.
    pub fn open_log(&self, dir: &Path) -> Result<fs::File, InventoryError> {
        let p = dir.join(LOG);
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    /// Powers a VM off.
    pub fn stop(&self, name: &str) -> Result<VmInfo, InventoryError> {
        let vm = {
            let mut inner = self.inner();
            Self::idle_entry(&mut inner, name, "migrating", "stop it")?
                .vm
                .take()
        };
        if let Some(vm) = vm {
            vm.devices().log_line("stopped");
            drop(vm);
        }
        self.info(name)
    }

    /// Deletes a stopped VM and its folder.
    pub fn destroy(&self, name: &str) -> Result<(), InventoryError> {
        let mut inner = self.inner();
        let e = inner
            .vms
            .get(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        if e.vm.is_some() {
            return Err(InventoryError::State {
                name: name.into(),
                state: "running",
                op: "destroy it (stop it first)",
            });
        }
        if e.migrating || matches!(e.mark, Some(Mark::InDoubt { .. })) {
            return Err(InventoryError::State {
                name: name.into(),
                state: "migrating",
                op: "destroy it now",
            });
        }
        let dir = self.datastores[e.ds].path.join(name);
        inner.vms.remove(name);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// The running VM `name`.
    pub fn running(&self, name: &str) -> Result<(VmDef, Arc<Vm>), InventoryError> {
        let inner = self.inner();
        let e = inner
            .vms
            .get(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        let vm = e.vm.clone().ok_or(InventoryError::State {
            name: name.into(),
            state: "stopped",
            op: "migrate it live",
        })?;
        Ok((e.def.clone(), vm))
    }
}
