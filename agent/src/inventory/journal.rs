//! The intent journal of a datastore: one record per operation that moves a VM's files or its
//! registration (a cold migration out or in, a storage move), in `.vmig-journal/OP.json`.
//!
//! A record is written before the operation changes anything and rewritten as each step
//! completes (write-temp, `fsync`, rename, `fsync` of the folder); it is removed once the
//! operation is over. An agent that starts and finds a record finishes or undoes that
//! operation (see `Inventory::recover` and `migrate::cold::recover`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::datastore::{sync_dir, write_atomic};

/// The journal folder inside a datastore.
pub const DIR: &str = ".vmig-journal";
/// The marker a registered VM folder holds: the operation that put it there.
pub const OP_MARKER: &str = ".vmig-op";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// A cold migration out of this agent.
    ColdOut,
    /// A cold migration into this agent.
    ColdIn,
    /// A storage move between two datastores of this agent.
    Move,
}

/// The last step of an operation known done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Recorded; nothing changed yet.
    Intent,
    /// (Out) `ColdCommit` is about to go: the destination may register the VM from now on.
    Committing,
    /// (Out) the destination confirmed the registration: the source's copy goes.
    Confirmed,
    /// (In, move) the files are complete and synced in the staging folder.
    Synced,
    /// (In, move) the staging folder was renamed into the datastore: registered.
    Registered,
}

/// One operation's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Operation id (also the file name).
    pub op: String,
    /// Which operation.
    pub kind: OpKind,
    /// The VM.
    pub vm: String,
    /// The last step done.
    pub step: Step,
    /// The other agent (cold migrations).
    pub peer: Option<String>,
    /// The datastore the VM leaves (out, move) or arrives on (in).
    pub datastore: String,
    /// The datastore it goes to (move).
    pub target: Option<String>,
    /// (Out) keep the source's copy, marked moved.
    pub keep_source: bool,
    /// Whether files travel (false: only the registration of a shared datastore's VM).
    pub copy: bool,
}

/// A new operation id: unique enough across hosts and restarts.
pub fn new_op(vm: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(vm.as_bytes());
    h.update(&t.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    format!("{}-{}", vm, &h.finalize().to_hex()[..12])
}

/// The journal of one datastore.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal of the datastore at `datastore` (its folder is made on the first write).
    pub fn of(datastore: &Path) -> Self {
        Self {
            dir: datastore.join(DIR),
        }
    }

    /// Writes (or rewrites) a record, durably.
    pub fn write(&self, r: &Record) -> std::io::Result<()> {
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir)?;
            if let Some(p) = self.dir.parent() {
                sync_dir(p)?;
            }
        }
        let json = serde_json::to_vec_pretty(r).expect("records serialize");
        write_atomic(&self.dir, &format!("{}.json", r.op), &json)
    }

    /// Records that `r` reached `step`.
    pub fn step(&self, r: &mut Record, step: Step) -> std::io::Result<()> {
        r.step = step;
        self.write(r)
    }

    /// Removes the record of `op` (the operation is over), durably.
    pub fn remove(&self, op: &str) -> std::io::Result<()> {
        match fs::remove_file(self.dir.join(format!("{op}.json"))) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every record (a record that does not parse is reported and skipped).
    pub fn list(&self) -> Vec<Record> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<Record> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let text = fs::read(e.path()).ok()?;
                match serde_json::from_slice(&text) {
                    Ok(r) => Some(r),
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), cause = %err, "skipping an unreadable journal record");
                        None
                    }
                }
            })
            .collect();
        v.sort_by(|a, b| a.op.cmp(&b.op));
        v
    }
}

/// The operation recorded in a VM folder's marker, if any.
pub fn op_of(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(OP_MARKER))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Writes a VM folder's operation marker, durably.
pub fn mark_op(dir: &Path, op: &str) -> std::io::Result<()> {
    write_atomic(dir, OP_MARKER, format!("{op}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_stepped_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::of(dir.path());
        assert!(j.list().is_empty());
        let mut r = Record {
            op: new_op("vm1"),
            kind: OpKind::ColdOut,
            vm: "vm1".into(),
            step: Step::Intent,
            peer: Some("hostB".into()),
            datastore: "default".into(),
            target: None,
            keep_source: false,
            copy: true,
        };
        j.write(&r).unwrap();
        j.step(&mut r, Step::Committing).unwrap();
        assert_eq!(j.list(), [r.clone()]);
        fs::write(dir.path().join(DIR).join("junk.json"), b"{").unwrap();
        assert_eq!(j.list().len(), 1, "a torn record is skipped");
        j.remove(&r.op).unwrap();
        j.remove(&r.op).unwrap();
        assert_eq!(j.list().len(), 0);
        assert_ne!(new_op("vm1"), new_op("vm1"));
        mark_op(dir.path(), "x").unwrap();
        assert_eq!(op_of(dir.path()).as_deref(), Some("x"));
    }
}
