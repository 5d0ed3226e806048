//! The host's datastore: one folder per VM holding its definition (`vm.toml`), NVRAM
//! (`nvram.bin`), log (`vm.log`) and disk image (`disk.img`); and the table of the VMs this
//! agent owns, with memory reservations for incoming migrations.

mod def;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use def::VmDef;

use crate::vm::{Vm, VmError, VmStats};

/// File names inside a VM folder.
pub const DEFINITION: &str = "vm.toml";
/// NVRAM file.
pub const NVRAM: &str = "nvram.bin";
/// Log file.
pub const LOG: &str = "vm.log";
/// Disk image.
pub const DISK: &str = "disk.img";
/// Every file of a VM folder, in the order a migration sends them.
pub const FILES: [&str; 4] = [DEFINITION, NVRAM, DISK, LOG];
/// Size of a new NVRAM file.
const NVRAM_BYTES: usize = 64 << 10;

/// Errors of the inventory.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// No such VM.
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    /// The name is taken.
    #[error("a VM named {0:?} already exists on this host")]
    Exists(String),
    /// Bad name or definition.
    #[error("invalid VM definition: {0}")]
    Invalid(String),
    /// Wrong state for the operation.
    #[error("VM {name:?} is {state}: cannot {op}")]
    State {
        /// VM.
        name: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        op: &'static str,
    },
    /// Not enough memory left on this host.
    #[error("not enough memory on this host: {need_mib} MiB needed, {free_mib} MiB free of {capacity_mib} MiB")]
    NoMemory {
        /// Needed.
        need_mib: u64,
        /// Free.
        free_mib: u64,
        /// Host capacity.
        capacity_mib: u64,
    },
    /// File system.
    #[error("{path}: {cause}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// VMM.
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> InventoryError + '_ {
    move |cause| InventoryError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// What a VM is doing on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, not running.
    Stopped,
    /// Its vCPUs run.
    Running,
    /// Migrating out (running or paused meanwhile).
    Migrating,
    /// Its vCPUs are paused.
    Paused,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Migrating => "migrating",
            VmState::Paused => "paused",
        })
    }
}

/// A VM as the CLI sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Definition.
    pub def: VmDef,
    /// What it is doing.
    pub state: VmState,
    /// Folder on the datastore.
    pub dir: PathBuf,
    /// Counters, when running.
    pub stats: Option<VmStats>,
    /// Process id of the VMM (this agent), when running.
    pub pid: Option<u32>,
    /// vCPU thread ids, when running.
    pub vcpu_tids: Vec<i32>,
    /// Host virtual address and size of guest memory, when running.
    pub memory_range: Option<(u64, u64)>,
}

struct Entry {
    def: VmDef,
    vm: Option<Arc<Vm>>,
    migrating: bool,
}

/// The VMs of this host.
pub struct Inventory {
    datastore: PathBuf,
    capacity: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    vms: BTreeMap<String, Entry>,
    /// Incoming VMs: name → bytes reserved.
    reserved: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("datastore", &self.datastore)
            .finish()
    }
}

/// Memory and name held for an incoming VM; released on drop unless committed.
#[derive(Debug)]
pub struct Reservation {
    inv: Arc<Inventory>,
    name: String,
    /// Where the incoming VM's files are written until commitment.
    pub staging: PathBuf,
    committed: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
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
    /// Opens (or creates) a datastore and loads the VM definitions in it. `capacity` is the
    /// guest memory this host may run, in bytes.
    pub fn open(datastore: &Path, capacity: u64) -> Result<Arc<Self>, InventoryError> {
        fs::create_dir_all(datastore).map_err(io_err(datastore))?;
        let staging = datastore.join(".incoming");
        // Anything staged by an agent that died mid-migration is not registered: drop it.
        let _ = fs::remove_dir_all(&staging);
        let mut inner = Inner::default();
        for e in fs::read_dir(datastore).map_err(io_err(datastore))? {
            let e = e.map_err(io_err(datastore))?;
            let path = e.path().join(DEFINITION);
            if !path.is_file() {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            match VmDef::parse(&text) {
                Ok(def) => {
                    inner.vms.insert(
                        def.name.clone(),
                        Entry {
                            def,
                            vm: None,
                            migrating: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "skipping bad definition")
                }
            }
        }
        Ok(Arc::new(Self {
            datastore: datastore.to_path_buf(),
            capacity,
            inner: Mutex::new(inner),
        }))
    }

    /// The datastore folder.
    pub fn datastore(&self) -> &Path {
        &self.datastore
    }

    /// Folder of VM `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.datastore.join(name)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inventory")
    }

    /// Creates a VM folder: definition, NVRAM, empty log, sparse disk.
    pub fn create(&self, def: VmDef) -> Result<VmInfo, InventoryError> {
        def.validate()?;
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name));
        }
        let dir = self.dir(&def.name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
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
        inner.vms.insert(
            def.name.clone(),
            Entry {
                def: def.clone(),
                vm: None,
                migrating: false,
            },
        );
        drop(inner);
        self.info(&def.name)
    }

    fn used_memory(inner: &Inner) -> u64 {
        let running: u64 = inner
            .vms
            .values()
            .filter(|e| e.vm.is_some())
            .map(|e| e.def.memory_bytes())
            .sum();
        running + inner.reserved.values().sum::<u64>()
    }

    fn check_memory(&self, inner: &Inner, need: u64) -> Result<(), InventoryError> {
        let used = Self::used_memory(inner);
        let free = self.capacity.saturating_sub(used);
        if need > free {
            return Err(InventoryError::NoMemory {
                need_mib: need >> 20,
                free_mib: free >> 20,
                capacity_mib: self.capacity >> 20,
            });
        }
        Ok(())
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
            e.def.clone()
        };
        self.check_memory(&inner, def.memory_bytes())?;
        let log = self.open_log(&self.dir(name))?;
        let vm = Vm::create(&def.spec(), name, Box::new(log))?;
        vm.attach_disk(&self.dir(name).join(DISK), name)?;
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
        inner.vms.remove(name);
        let dir = self.dir(name);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Every VM.
    pub fn list(&self) -> Vec<VmInfo> {
        let names: Vec<String> = self.inner().vms.keys().cloned().collect();
        names.iter().filter_map(|n| self.info(n).ok()).collect()
    }

    /// One VM.
    pub fn info(&self, name: &str) -> Result<VmInfo, InventoryError> {
        let inner = self.inner();
        let e = inner
            .vms
            .get(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        let state = match (&e.vm, e.migrating) {
            (None, _) => VmState::Stopped,
            (Some(_), true) => VmState::Migrating,
            (Some(vm), false) if vm.is_running() => VmState::Running,
            (Some(_), false) => VmState::Paused,
        };
        Ok(VmInfo {
            def: e.def.clone(),
            state,
            dir: self.dir(name),
            stats: e.vm.as_ref().map(|v| v.stats()),
            pid: e.vm.as_ref().map(|_| std::process::id()),
            vcpu_tids: e.vm.as_ref().map(|v| v.vcpu_tids()).unwrap_or_default(),
            memory_range: e
                .vm
                .as_ref()
                .map(|v| (v.ram().host_base() as u64, v.ram().size())),
        })
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

    /// The entry of `name`, refusing (with `state`, `op` in the error) while it migrates.
    fn idle_entry<'a>(
        inner: &'a mut Inner,
        name: &str,
        state: &'static str,
        op: &'static str,
    ) -> Result<&'a mut Entry, InventoryError> {
        let e = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        if e.migrating {
            return Err(InventoryError::State {
                name: name.into(),
                state,
                op,
            });
        }
        Ok(e)
    }

    /// Marks a VM as migrating out (one migration at a time).
    pub fn begin_migration(&self, name: &str) -> Result<(VmDef, Arc<Vm>), InventoryError> {
        let mut inner = self.inner();
        let e = Self::idle_entry(&mut inner, name, "already migrating", "migrate it again")?;
        let vm = e.vm.clone().ok_or(InventoryError::State {
            name: name.into(),
            state: "stopped",
            op: "migrate it live",
        })?;
        e.migrating = true;
        Ok((e.def.clone(), vm))
    }

    /// Ends an outgoing migration: on success the VM is released and its folder removed;
    /// otherwise it stays, running, as before.
    pub fn end_migration(&self, name: &str, moved: bool) {
        let mut inner = self.inner();
        if moved {
            if let Some(e) = inner.vms.remove(name) {
                drop(inner);
                drop(e.vm);
                let _ = fs::remove_dir_all(self.dir(name));
            }
        } else if let Some(e) = inner.vms.get_mut(name) {
            e.migrating = false;
            // The VM stays: a disk mirror the migration started has nobody to feed.
            if let Some(blk) = e.vm.as_ref().and_then(|vm| vm.devices().blk()) {
                blk.stop_block_log();
            }
        }
    }

    /// Reserves the name and memory for an incoming VM, or refuses with the reason.
    pub fn reserve(self: &Arc<Self>, def: &VmDef) -> Result<Reservation, InventoryError> {
        def.validate()?;
        let mut inner = self.inner();
        if inner.vms.contains_key(&def.name) || inner.reserved.contains_key(&def.name) {
            return Err(InventoryError::Exists(def.name.clone()));
        }
        self.check_memory(&inner, def.memory_bytes())?;
        let staging = self.datastore.join(".incoming").join(&def.name);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        inner.reserved.insert(def.name.clone(), def.memory_bytes());
        Ok(Reservation {
            inv: self.clone(),
            name: def.name.clone(),
            staging,
            committed: false,
        })
    }

    /// Registers an incoming VM: its staged folder moves into the datastore and the running
    /// VM joins the table.
    pub fn commit(
        &self,
        mut r: Reservation,
        def: VmDef,
        vm: Arc<Vm>,
    ) -> Result<(), InventoryError> {
        let dir = self.dir(&def.name);
        fs::rename(&r.staging, &dir).map_err(io_err(&dir))?;
        if let Some(blk) = vm.devices().blk() {
            blk.moved_to(&dir.join(DISK));
        }
        let mut inner = self.inner();
        inner.reserved.remove(&def.name);
        inner.vms.insert(
            def.name.clone(),
            Entry {
                def,
                vm: Some(vm),
                migrating: false,
            },
        );
        r.committed = true;
        Ok(())
    }

    /// Names being received.
    pub fn incoming(&self) -> Vec<String> {
        self.inner().reserved.keys().cloned().collect()
    }
}
