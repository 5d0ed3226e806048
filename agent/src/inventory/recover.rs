//! The recovery of the operations an agent's death interrupted, from the datastores'
//! journals ([`super::journal`]): those finished or undone at the agent's start, and the cold
//! migrations out in doubt until their destination answers.

use std::sync::PoisonError;

use super::cold::{remove_durably, Mark, MOVED};
use super::datastore;
use super::journal::{self, Journal, OpKind, Record, Step};
use super::{io_err, Inventory, InventoryError};

impl Inventory {
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
}
