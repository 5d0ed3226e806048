//! The host's datastores ([`datastore`]): one folder per VM holding its definition
//! (`vm.toml`), NVRAM (`nvram.bin`), log (`vm.log`, rotated as `vm.log.1`...) and disk image
//! (`disk.img`); and the table of the VMs this agent owns, with memory reservations for
//! incoming migrations.

mod cold;
pub mod datastore;
mod def;
pub mod journal;
mod live_move;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

pub use cold::{ColdEnd, ColdSource, Mark};
pub use datastore::Datastore;
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
/// The file a source writes into a VM folder on a shared datastore for the destination to
/// read back: proof that both see the same folder.
pub const PROBE: &str = ".vmig-probe";
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
    /// No such datastore, or not one the operation can use.
    #[error("{0}")]
    Datastore(String),
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
    /// A copy left behind or a VM being recovered.
    #[error("VM {name:?} {why}")]
    Marked {
        /// VM.
        name: String,
        /// Why it may not start.
        why: String,
    },
    /// Not enough room on a datastore.
    #[error(
        "not enough space on datastore {datastore:?}: {need_mib} MiB needed, {free_mib} MiB free"
    )]
    NoSpace {
        /// Datastore.
        datastore: String,
        /// Needed.
        need_mib: u64,
        /// Free.
        free_mib: u64,
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

/// A datastore as `vmig datastore list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatastoreInfo {
    /// Name.
    pub name: String,
    /// Folder.
    pub path: PathBuf,
    /// Seen by other hosts too.
    pub shared: bool,
    /// Free bytes of its file system (None: `statvfs` failed).
    pub free_bytes: Option<u64>,
    /// Size of its file system.
    pub total_bytes: Option<u64>,
    /// The VMs this agent keeps on it.
    pub vms: Vec<String>,
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
    /// A copy left behind by `migrate --offline --keep-source`: the VM is owned by the host it
    /// moved to; this copy cannot start until `vmig vm reclaim`.
    Moved,
    /// An interrupted cold migration out is being resolved with its destination.
    Recovering,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Migrating => "migrating",
            VmState::Paused => "paused",
            VmState::Moved => "moved",
            VmState::Recovering => "recovering",
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
    /// Name of its datastore.
    #[serde(default)]
    pub datastore: String,
    /// Why it is `moved` or `recovering`.
    #[serde(default)]
    pub note: Option<String>,
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
    /// Index of its datastore.
    ds: usize,
    /// Why it may not start (a copy left behind, a migration being recovered).
    mark: Option<Mark>,
}

impl Entry {
    fn new(def: VmDef, ds: usize) -> Self {
        Entry {
            def,
            vm: None,
            migrating: false,
            ds,
            mark: None,
        }
    }
}

/// The VMs of this host.
pub struct Inventory {
    /// This agent's name (the owner recorded in VM folders of shared datastores).
    agent: String,
    /// Its datastores; the first is the default.
    datastores: Vec<Datastore>,
    capacity: u64,
    inner: Mutex<Inner>,
    /// Bumped each time a cold migration out falls in doubt while the agent runs, so that the
    /// resolver wakes (see `migrate::cold::recover`).
    doubt: (Mutex<u64>, Condvar),
}

#[derive(Default)]
struct Inner {
    vms: BTreeMap<String, Entry>,
    /// Incoming VMs: name → bytes reserved.
    reserved: BTreeMap<String, u64>,
    /// What the agent's start recovered (interrupted operations finished or undone).
    recovered: Vec<String>,
    /// Cold migrations coming in: operation → registered yet. A recovering source's question
    /// about an unregistered one aborts it (`None`).
    cold_in: BTreeMap<String, Option<bool>>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("datastores", &self.datastores)
            .finish()
    }
}

/// Memory and name held for an incoming VM; released on drop unless committed.
#[derive(Debug)]
pub struct Reservation {
    inv: Arc<Inventory>,
    name: String,
    /// Where the incoming VM's files are: its staging folder, written until commitment; or,
    /// on a shared datastore, the VM's own folder there (never removed by the reservation).
    pub staging: PathBuf,
    /// The datastore the VM joins, by index.
    ds: usize,
    /// Its files stay in place on that (shared) datastore.
    shared: bool,
    committed: bool,
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
    /// Opens (or creates) one datastore, named `default` and not shared, and loads the VM
    /// definitions in it. `capacity` is the guest memory this host may run, in bytes.
    pub fn open(datastore: &Path, capacity: u64) -> Result<Arc<Self>, InventoryError> {
        let ds = Datastore {
            name: "default".into(),
            path: datastore.to_path_buf(),
            shared: false,
        };
        Self::open_many("", vec![ds], capacity)
    }

    /// Opens (or creates) the datastores of agent `agent` (the first is the default) and loads
    /// the VM definitions in them: every VM folder of a private datastore, and the folders of a
    /// shared one whose `.owner` names this agent.
    pub fn open_many(
        agent: &str,
        datastores: Vec<Datastore>,
        capacity: u64,
    ) -> Result<Arc<Self>, InventoryError> {
        Datastore::check_all(&datastores).map_err(|e| InventoryError::Invalid(e.to_string()))?;
        let inv = Self {
            agent: agent.into(),
            datastores,
            capacity,
            inner: Mutex::new(Inner::default()),
            doubt: (Mutex::new(0), Condvar::new()),
        };
        for (i, ds) in inv.datastores.iter().enumerate() {
            fs::create_dir_all(&ds.path).map_err(io_err(&ds.path))?;
            // Anything staged by an agent that died mid-migration is not registered: drop it.
            let _ = fs::remove_dir_all(inv.staging_root(i));
        }
        // Interrupted operations finished or undone before the folders are read.
        inv.recover_local();
        for i in 0..inv.datastores.len() {
            inv.load(i)?;
        }
        inv.mark_in_doubt();
        Ok(Arc::new(inv))
    }

    /// Loads the VM folders of datastore `i` that belong to this agent.
    fn load(&self, i: usize) -> Result<(), InventoryError> {
        let ds = &self.datastores[i];
        let mut inner = self.inner();
        for e in fs::read_dir(&ds.path).map_err(io_err(&ds.path))? {
            let e = e.map_err(io_err(&ds.path))?;
            let path = e.path().join(DEFINITION);
            if !path.is_file() {
                continue;
            }
            if ds.shared && datastore::owner_of(&e.path()).as_deref() != Some(&self.agent) {
                tracing::debug!(dir = %e.path().display(), "another agent's VM on a shared datastore");
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            match VmDef::parse(&text) {
                Ok(def) if inner.vms.contains_key(&def.name) => {
                    tracing::warn!(path = %path.display(), vm = %def.name, "skipping a second VM of the same name")
                }
                Ok(def) => {
                    let mut entry = Entry::new(def, i);
                    entry.mark = cold::moved_mark(&e.path());
                    inner.vms.insert(entry.def.name.clone(), entry);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "skipping bad definition")
                }
            }
        }
        Ok(())
    }

    /// The default datastore's folder.
    pub fn datastore(&self) -> &Path {
        &self.datastores[0].path
    }

    /// This agent's datastores; the first is the default.
    pub fn datastores(&self) -> &[Datastore] {
        &self.datastores
    }

    /// This agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The index of the datastore named `name` (None: the default), or an error naming the
    /// valid ones.
    pub fn datastore_index(&self, name: Option<&str>) -> Result<usize, InventoryError> {
        let Some(name) = name else { return Ok(0) };
        self.datastores
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| {
                let valid: Vec<&str> = self.datastores.iter().map(|d| d.name.as_str()).collect();
                InventoryError::Datastore(format!(
                    "no datastore named {name:?} on this host (valid: {})",
                    valid.join(", ")
                ))
            })
    }

    /// Where this agent stages incoming VM folders on datastore `i` (per agent on a shared
    /// one, so that agents never clean each other's).
    pub fn staging_root(&self, i: usize) -> PathBuf {
        let ds = &self.datastores[i];
        if ds.shared {
            ds.path.join(format!(".incoming-{}", self.agent))
        } else {
            ds.path.join(".incoming")
        }
    }

    /// The datastore index of VM `name` (None: not here).
    pub fn datastore_of(&self, name: &str) -> Option<usize> {
        self.inner().vms.get(name).map(|e| e.ds)
    }

    /// The name of VM `name`'s datastore, if that datastore is shared with other hosts.
    pub fn shared_datastore_of(&self, name: &str) -> Option<String> {
        self.datastore_of(name)
            .map(|i| &self.datastores[i])
            .filter(|d| d.shared)
            .map(|d| d.name.clone())
    }

    /// Folder of VM `name`: in its datastore, or the default one for a VM not here.
    pub fn dir(&self, name: &str) -> PathBuf {
        let ds = self.datastore_of(name).unwrap_or(0);
        self.datastores[ds].path.join(name)
    }

    /// What `vmig datastore list` shows of each datastore.
    pub fn datastore_infos(&self) -> Vec<DatastoreInfo> {
        let inner = self.inner();
        self.datastores
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let space = d.space().ok();
                DatastoreInfo {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    shared: d.shared,
                    free_bytes: space.map(|s| s.free),
                    total_bytes: space.map(|s| s.total),
                    vms: inner
                        .vms
                        .iter()
                        .filter(|(_, e)| e.ds == i)
                        .map(|(n, _)| n.clone())
                        .collect(),
                }
            })
            .collect()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inventory")
    }

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
            (None, _) if matches!(e.mark, Some(Mark::Moved { .. })) => VmState::Moved,
            (None, _) if e.mark.is_some() => VmState::Recovering,
            (None, _) => VmState::Stopped,
            (Some(_), true) => VmState::Migrating,
            (Some(vm), false) if vm.is_running() => VmState::Running,
            (Some(_), false) => VmState::Paused,
        };
        Ok(VmInfo {
            def: e.def.clone(),
            state,
            dir: self.datastores[e.ds].path.join(name),
            datastore: self.datastores[e.ds].name.clone(),
            note: e.mark.as_ref().map(Mark::to_string),
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
    pub fn commit(
        &self,
        mut r: Reservation,
        def: VmDef,
        vm: Arc<Vm>,
    ) -> Result<(), InventoryError> {
        let ds = &self.datastores[r.ds];
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
