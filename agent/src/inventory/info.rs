//! What the CLI sees of the table: [`VmInfo`], [`VmState`] and [`DatastoreInfo`], and the
//! calls that build them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cold::Mark;
use super::{Inventory, InventoryError, VmDef};
use crate::vm::VmStats;

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
    /// A stale copy: another host holds the VM at a higher ownership generation. It cannot
    /// start; `vmig vm destroy` removes it.
    Fenced,
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
            VmState::Fenced => "fenced",
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
    /// Why it is `moved`, `recovering` or `fenced` (for `fenced`: the host holding the newer
    /// copy and both generations).
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

impl Inventory {
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
            (None, _) if matches!(e.mark, Some(Mark::Fenced { .. })) => VmState::Fenced,
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
}
