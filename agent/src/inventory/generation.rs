//! Ownership generations: each VM's definition carries one (`generation` in `vm.toml`). It
//! moves with the VM: the destination of a migration (live or cold) registers its copy with
//! the source's generation + 1 ([`next`]); a rollback of an interrupted post-copy on the source
//! gives generation + 1 away to the destination's copy and takes + 2 ([`after_rollback`]),
//! persisted before the VM runs again. A copy whose generation is lower than another host's
//! is stale ([`is_stale`]): it is **fenced** (marked `.fenced` in its folder, listed
//! `fenced`, refused at start) until an operator destroys it.
//!
//! A destination also marks the copy of an incoming post-copy (`.postcopy-in`, naming the
//! source) until every page arrived: a copy left by an agent that died mid-post-copy is
//! suspect, its source asked at the agent's next start.

use std::fs;
use std::path::Path;

use super::cold::Mark;
use super::datastore::{self, sync_dir};
use super::{io_err, Inventory, InventoryError, DEFINITION};

/// The marker of a fenced copy: `HOST GENERATION` of the copy that fenced it.
pub const FENCED: &str = ".fenced";
/// The marker of a copy whose incoming post-copy has not completed: the source's name.
pub const POSTCOPY_IN: &str = ".postcopy-in";

/// The generation a destination registers a copy with, from the source's.
pub fn next(source: u64) -> u64 {
    source.saturating_add(1)
}

/// The source's generation after it rolled back a post-copy that started at `migrated`:
/// `migrated + 1` was given away to the destination's copy, so the source takes the one
/// above it.
pub fn after_rollback(migrated: u64) -> u64 {
    next(next(migrated))
}

/// Whether a copy at generation `ours` is stale beside another host's at `theirs`.
pub fn is_stale(ours: u64, theirs: u64) -> bool {
    theirs > ours
}

/// A VM of this host as the fencing check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCopy {
    /// VM.
    pub name: String,
    /// Its generation.
    pub generation: u64,
    /// It may be fenced now: stopped and not otherwise marked (a `moved` copy or one in
    /// doubt is handled by its own mark; a fenced one may be fenced again, higher).
    pub fenceable: bool,
    /// The source of an incoming post-copy that never completed here.
    pub postcopy_from: Option<String>,
}

/// The `fenced` mark of a VM folder, if it has one.
pub(super) fn fenced_mark(dir: &Path, vm: &str, ours: u64) -> Option<Mark> {
    let text = fs::read_to_string(dir.join(FENCED)).ok()?;
    let mut it = text.split_whitespace();
    let by = it.next().unwrap_or("another host").to_string();
    let generation = it.next().and_then(|g| g.parse().ok()).unwrap_or(0);
    Some(Mark::Fenced {
        vm: vm.into(),
        by,
        generation,
        ours,
    })
}

/// The source named by a folder's `.postcopy-in` marker, if it has one.
pub(super) fn postcopy_from(dir: &Path) -> Option<String> {
    let s = fs::read_to_string(dir.join(POSTCOPY_IN)).ok()?;
    Some(s.trim().to_string())
}

impl Inventory {
    /// The generation of each of `names` this host holds (registered, whatever its state).
    pub fn generations(&self, names: &[String]) -> Vec<(String, u64)> {
        let inner = self.inner();
        names
            .iter()
            .filter_map(|n| inner.vms.get(n).map(|e| (n.clone(), e.def.generation)))
            .collect()
    }

    /// This host's VMs (all, or only `only`), for the fencing check.
    pub fn local_copies(&self, only: Option<&str>) -> Vec<LocalCopy> {
        let inner = self.inner();
        inner
            .vms
            .iter()
            .filter(|(n, _)| only.is_none_or(|o| o == n.as_str()))
            .map(|(n, e)| LocalCopy {
                name: n.clone(),
                generation: e.def.generation,
                fenceable: e.vm.is_none()
                    && !e.migrating
                    && matches!(e.mark, None | Some(Mark::Fenced { .. })),
                postcopy_from: e.postcopy_from.clone(),
            })
            .collect()
    }

    /// Gives up an interrupted post-copy of `name` on the source: its generation becomes
    /// [`after_rollback`] of the one it migrated with, written to its `vm.toml` (durably)
    /// before the VM may run again. Returns the new generation.
    pub fn take_back(&self, name: &str) -> Result<u64, InventoryError> {
        let mut inner = self.inner();
        let e = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| InventoryError::NotFound(name.into()))?;
        let mut def = e.def.clone();
        def.generation = after_rollback(def.generation);
        let dir = self.datastores[e.ds].path.join(name);
        datastore::write_atomic(&dir, DEFINITION, def.to_toml().as_bytes())
            .map_err(io_err(&dir))?;
        let g = def.generation;
        e.def = def;
        tracing::info!(vm = %name, generation = g, "ownership taken back by a rollback");
        Ok(g)
    }

    /// Fences the stopped copy of `name`: `by` holds it at `generation`, above this copy's
    /// (or, `by` being the source of a post-copy that never completed here, at any
    /// generation). Durable (`.fenced` in its folder). Returns false, changing nothing, for a
    /// copy that runs, migrates, carries another mark, or is not older.
    pub fn fence(
        &self,
        name: &str,
        by: &str,
        generation: u64,
        source_holds: bool,
    ) -> Result<bool, InventoryError> {
        let mut inner = self.inner();
        let Some(e) = inner.vms.get_mut(name) else {
            return Ok(false);
        };
        let ours = e.def.generation;
        let markable =
            e.vm.is_none() && !e.migrating && matches!(e.mark, None | Some(Mark::Fenced { .. }));
        if !markable || !(is_stale(ours, generation) || source_holds) {
            return Ok(false);
        }
        if let Some(Mark::Fenced {
            by: b,
            generation: g,
            ..
        }) = &e.mark
        {
            if b == by && *g >= generation {
                return Ok(true);
            }
        }
        let dir = self.datastores[e.ds].path.join(name);
        datastore::write_atomic(&dir, FENCED, format!("{by} {generation}\n").as_bytes())
            .map_err(io_err(&dir))?;
        tracing::warn!(vm = %name, holder = %by, theirs = generation, ours, "fenced: another host holds this VM; this copy may not start");
        e.mark = Some(Mark::Fenced {
            vm: name.into(),
            by: by.into(),
            generation,
            ours,
        });
        Ok(true)
    }

    /// Marks the copy of `name` that just registered in post-copy from `source` (until
    /// [`Self::postcopy_in_done`]).
    pub fn postcopy_in_started(&self, name: &str, source: &str) -> Result<(), InventoryError> {
        let mut inner = self.inner();
        let Some(e) = inner.vms.get_mut(name) else {
            return Ok(());
        };
        let dir = self.datastores[e.ds].path.join(name);
        datastore::write_atomic(&dir, POSTCOPY_IN, format!("{source}\n").as_bytes())
            .map_err(io_err(&dir))?;
        e.postcopy_from = Some(source.into());
        Ok(())
    }

    /// Every page of `name`'s incoming post-copy arrived (or its source no longer holds it):
    /// the copy is no longer suspect.
    pub fn postcopy_in_done(&self, name: &str) {
        let mut inner = self.inner();
        let Some(e) = inner.vms.get_mut(name) else {
            return;
        };
        if e.postcopy_from.take().is_some() {
            let dir = self.datastores[e.ds].path.join(name);
            let _ = fs::remove_file(dir.join(POSTCOPY_IN));
            let _ = sync_dir(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::VmDef;

    #[test]
    fn generation_arithmetic() {
        assert_eq!(next(0), 1);
        assert_eq!(next(41), 42);
        // The rollback's is above anything the destination could hold.
        for g in [0, 1, 7, u64::MAX - 5] {
            let dest = next(g);
            let back = after_rollback(g);
            assert!(is_stale(dest, back), "g={g}: {dest} vs {back}");
            assert!(!is_stale(back, dest));
            assert_eq!(back, g + 2);
        }
        assert!(!is_stale(3, 3), "equal generations do not fence");
        assert_eq!(next(u64::MAX), u64::MAX, "saturates, never wraps to 0");
    }

    #[test]
    fn take_back_persists_and_fence_refuses_newer_copies() {
        let d = tempfile::tempdir().unwrap();
        let inv = Inventory::open(d.path(), 1 << 30).unwrap();
        let def = VmDef::parse(
            "name = 'vm1'\nmemory_mib = 16\nvcpus = 1\nworkload = ['idle']\ndisk_mib = 1\n",
        )
        .unwrap();
        assert_eq!(def.generation, 0, "an old definition loads at generation 0");
        inv.create(def).unwrap();
        assert_eq!(inv.take_back("vm1").unwrap(), 2);
        let text = fs::read_to_string(d.path().join("vm1").join(DEFINITION)).unwrap();
        assert_eq!(VmDef::parse(&text).unwrap().generation, 2, "{text}");
        // Not older than hostB's: not fenced.
        assert!(!inv.fence("vm1", "hostB", 2, false).unwrap());
        assert!(inv.fence("vm1", "hostB", 3, false).unwrap());
        let e = inv.start("vm1").unwrap_err().to_string();
        assert!(e.contains("hostB") && e.contains("vm destroy vm1"), "{e}");
        assert_eq!(
            inv.info("vm1").unwrap().state,
            crate::inventory::VmState::Fenced
        );
        drop(inv);
        // Persisted: fenced again when the agent starts again.
        let inv = Inventory::open(d.path(), 1 << 30).unwrap();
        let i = inv.info("vm1").unwrap();
        assert_eq!(i.state, crate::inventory::VmState::Fenced);
        assert_eq!(i.def.generation, 2);
        assert!(i.note.unwrap().contains("hostB"));
        inv.destroy("vm1").unwrap();
    }
}
