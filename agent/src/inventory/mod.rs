//! The host's datastores ([`datastore`]): one folder per VM holding its definition
//! (`vm.toml`), NVRAM (`nvram.bin`), log (`vm.log`, rotated as `vm.log.1`...) and disk image
//! (`disk.img`); and the table of the VMs this agent owns, with memory reservations for
//! incoming migrations.

mod cold;
pub mod datastore;
mod def;
pub mod generation;
mod info;
pub mod journal;
mod lifecycle;
mod live_move;
mod migration;
mod recover;
mod storage_move;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

pub use cold::{ColdEnd, ColdSource, Mark};
pub use datastore::Datastore;
pub use def::VmDef;
pub use info::{DatastoreInfo, VmInfo, VmState};
pub use migration::Reservation;

use crate::vm::{Vm, VmError};

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

struct Entry {
    def: VmDef,
    vm: Option<Arc<Vm>>,
    migrating: bool,
    /// Index of its datastore.
    ds: usize,
    /// Why it may not start (a copy left behind, a migration being recovered, fenced).
    mark: Option<Mark>,
    /// The source of an incoming post-copy that has not completed (`.postcopy-in`).
    postcopy_from: Option<String>,
}

impl Entry {
    fn new(def: VmDef, ds: usize) -> Self {
        Entry {
            def,
            vm: None,
            migrating: false,
            ds,
            mark: None,
            postcopy_from: None,
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
                    entry.mark = cold::moved_mark(&e.path()).or_else(|| {
                        generation::fenced_mark(&e.path(), &entry.def.name, entry.def.generation)
                    });
                    entry.postcopy_from = generation::postcopy_from(&e.path());
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

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inventory")
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
}
