//! The lock files that keep a second agent with the same name or datastore from starting.

use std::path::{Path, PathBuf};

use super::{AgentConfig, AgentError};

/// Files an agent holds locked while it runs, so that a second agent with the same name or
/// the same datastore refuses to start instead of taking the first one's VMs over.
pub(super) struct AgentLocks {
    _files: Vec<std::fs::File>,
}

impl AgentLocks {
    pub(super) fn take(cfg: &AgentConfig) -> Result<Self, AgentError> {
        let mut control_lock = cfg.control.clone().into_os_string();
        control_lock.push(".lock");
        // A shared datastore is seen by other agents on purpose: its VM folders' `.owner`
        // files say whose each is, and it takes no lock.
        let files = std::iter::once((
            PathBuf::from(control_lock),
            "the agent name (control socket)",
        ))
        .chain(
            cfg.datastores
                .iter()
                .filter(|d| !d.shared)
                .map(|d| (d.path.join(".agent.lock"), "the datastore")),
        )
        .map(|(path, what)| lock_file(&path, what))
        .collect::<Result<_, _>>()?;
        Ok(Self { _files: files })
    }
}

fn lock_file(path: &Path, what: &'static str) -> Result<std::fs::File, AgentError> {
    use std::io::{Read, Seek, Write};
    let fail = |cause: String| AgentError::Locked {
        what,
        path: path.into(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(fail(format!("held by another agent ({})", holder.trim())));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(fail(e.to_string())),
    }
    let me = format!("pid {}", std::process::id());
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| f.write_all(me.as_bytes()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let _held = lock_file(&p, "the datastore").unwrap();
        let e = lock_file(&p, "the datastore").unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "holder not named: {e}"
        );
        drop(_held);
        lock_file(&p, "the datastore").unwrap();
    }
}
