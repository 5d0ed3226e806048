//! The one owner of an agent's migrations: for each VM, what is happening to it.
//!
//! The agent holds one [`Registry`]; the control API starts, cancels, resumes and rolls back
//! outgoing migrations through it, and the destination side keeps its post-copy sessions in
//! it (a session outlives its connection: the source's `Resume` finds it here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::dest::PostcopyIn;
use super::source::Parked;
use super::{Cancel, MigrateError};

/// A VM's migration.
#[derive(Debug)]
pub enum Migration {
    /// Going out; the cancel also knows its phase.
    Outgoing(Arc<Cancel>),
    /// A post-copy out that lost its connection: the VM is paused here with its memory until
    /// `migrate --resume` (or `--rollback`).
    Parked(Box<Parked>),
    /// Coming in, before `Go` (the reservation holds its memory and name).
    Incoming,
    /// Came in by post-copy: the VM runs here and fetches its missing pages.
    IncomingPostcopy(PostcopyIn),
}

impl Migration {
    fn describe(&self) -> &'static str {
        match self {
            Migration::Outgoing(_) => "a migration out is in progress",
            Migration::Parked(_) => "an interrupted post-copy out waits for --resume or --rollback",
            Migration::Incoming => "a migration in is in progress",
            Migration::IncomingPostcopy(PostcopyIn::Completed(..)) => "its post-copy in completed",
            Migration::IncomingPostcopy(_) => "its post-copy in still fetches pages",
        }
    }

    /// Whether another migration of the VM may replace this one: only a completed post-copy
    /// in (kept to answer a late `Resume`) may be.
    fn replaceable(&self) -> bool {
        matches!(self, Migration::IncomingPostcopy(PostcopyIn::Completed(..)))
    }
}

/// Refusals of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The VM already has a migration.
    #[error("{name}: {what}")]
    Busy {
        /// VM.
        name: String,
        /// What it is.
        what: &'static str,
    },
    /// No parked post-copy to resume.
    #[error("no interrupted post-copy of {0:?} here: nothing to resume")]
    NothingToResume(String),
    /// No parked post-copy to roll back.
    #[error("no interrupted post-copy of {0:?} here: nothing to roll back")]
    NothingToRollBack(String),
    /// No migration to cancel.
    #[error("no migration of {0:?} in progress")]
    NothingToCancel(String),
    /// The migration refused the cancel.
    #[error(transparent)]
    Cancel(#[from] MigrateError),
}

/// Every migration of an agent, by VM name.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Migration>>,
}

impl Registry {
    /// The map, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<String, Migration>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, name: &str, m: Migration) -> Result<(), RegistryError> {
        let mut map = self.lock();
        if let Some(old) = map.get(name).filter(|old| !old.replaceable()) {
            return Err(RegistryError::Busy {
                name: name.into(),
                what: old.describe(),
            });
        }
        map.insert(name.into(), m);
        Ok(())
    }

    /// Starts an outgoing migration of `name`; its cancel.
    pub fn begin_outgoing(&self, name: &str) -> Result<Arc<Cancel>, RegistryError> {
        let cancel = Arc::new(Cancel::default());
        self.claim(name, Migration::Outgoing(cancel.clone()))?;
        Ok(cancel)
    }

    /// Takes the parked post-copy of `name` to resume it: the VM's migration is outgoing again.
    pub fn resume_parked(&self, name: &str) -> Result<(Box<Parked>, Arc<Cancel>), RegistryError> {
        let mut map = self.lock();
        match map.remove(name) {
            // A copy refused by `--verify` has nothing to resume: only `--rollback` is left.
            Some(Migration::Parked(p)) if p.why() == super::source::ParkedWhy::Interrupted => {
                let cancel = Arc::new(Cancel::default());
                map.insert(name.into(), Migration::Outgoing(cancel.clone()));
                Ok((p, cancel))
            }
            other => {
                if let Some(m) = other {
                    map.insert(name.into(), m);
                }
                Err(RegistryError::NothingToResume(name.into()))
            }
        }
    }

    /// Takes the parked post-copy of `name` for good (a rollback).
    pub fn take_parked(&self, name: &str) -> Result<Box<Parked>, RegistryError> {
        let mut map = self.lock();
        match map.remove(name) {
            Some(Migration::Parked(p)) => Ok(p),
            other => {
                if let Some(m) = other {
                    map.insert(name.into(), m);
                }
                Err(RegistryError::NothingToRollBack(name.into()))
            }
        }
    }

    /// Parks the post-copy out of `name` (after its connection was lost, or a rollback that
    /// could not run).
    pub fn park(&self, name: &str, p: Box<Parked>) {
        self.lock().insert(name.into(), Migration::Parked(p));
    }

    /// The outgoing migration of `name` ended (committed or failed).
    pub fn end_outgoing(&self, name: &str) {
        let mut map = self.lock();
        if matches!(map.get(name), Some(Migration::Outgoing(_))) {
            map.remove(name);
        }
    }

    /// Cancels the outgoing migration of `name`.
    pub fn cancel(&self, name: &str) -> Result<(), RegistryError> {
        match self.lock().get(name) {
            Some(Migration::Outgoing(c)) => Ok(c.cancel()?),
            _ => Err(RegistryError::NothingToCancel(name.into())),
        }
    }

    /// Starts an incoming migration of `name`; it ends when the guard drops (unless it became
    /// a post-copy meanwhile).
    pub fn begin_incoming(&self, name: &str) -> Result<IncomingGuard<'_>, RegistryError> {
        self.claim(name, Migration::Incoming)?;
        Ok(IncomingGuard {
            registry: self,
            name: name.into(),
        })
    }

    /// Gives up the interrupted post-copy in of `name` (see [`super::dest::discard_waiting`]).
    pub fn discard_postcopy_in(&self, name: &str) -> bool {
        super::dest::discard_waiting(self, name)
    }
}

/// An incoming migration before `Go`; removes its entry when dropped.
#[derive(Debug)]
pub struct IncomingGuard<'r> {
    registry: &'r Registry,
    name: String,
}

impl Drop for IncomingGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if matches!(map.get(&self.name), Some(Migration::Incoming)) {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_migration_per_vm() {
        let r = Registry::default();
        let c = r.begin_outgoing("vm1").unwrap();
        assert!(matches!(
            r.begin_outgoing("vm1"),
            Err(RegistryError::Busy { .. })
        ));
        assert!(matches!(
            r.begin_incoming("vm1"),
            Err(RegistryError::Busy { .. })
        ));
        r.cancel("vm1").unwrap();
        assert!(c.is_cancelled());
        r.end_outgoing("vm1");
        assert!(matches!(
            r.cancel("vm1"),
            Err(RegistryError::NothingToCancel(_))
        ));
        {
            let _g = r.begin_incoming("vm1").unwrap();
            assert!(r.begin_outgoing("vm1").is_err());
        }
        assert!(
            r.begin_outgoing("vm1").is_ok(),
            "the guard ended the incoming one"
        );
    }

    #[test]
    fn nothing_parked_nothing_to_resume() {
        let r = Registry::default();
        assert!(matches!(
            r.resume_parked("vm1"),
            Err(RegistryError::NothingToResume(_))
        ));
        assert!(matches!(
            r.take_parked("vm1"),
            Err(RegistryError::NothingToRollBack(_))
        ));
    }
}
