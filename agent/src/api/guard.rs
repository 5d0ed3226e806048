//! Who may drive the agent, and how much any peer may hold: the control socket admits root
//! (and the agent's own user, and a configured group), checked by file mode and by the
//! peer's credentials (`SO_PEERCRED`) on every connection; incoming migration connections
//! are capped, and a control request line is bounded in size and time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;

/// Incoming migration connections served at once (handshakes included); more are closed.
pub const MAX_INCOMING: usize = 8;
/// The longest control request line, bytes.
pub const MAX_CONTROL_LINE: u64 = 1 << 20;
/// How long a control client may take to send its request line.
pub const CONTROL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors protecting the control socket.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// No such group.
    #[error("--control-group {0:?}: no such group in /etc/group")]
    NoGroup(String),
    /// The socket file's owner or mode could not be set.
    #[error("cannot restrict the control socket {path}: {cause}")]
    Socket {
        /// Socket file.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
}

/// The gid of group `name` (a number is taken as a gid), from `/etc/group`.
pub fn group_id(name: &str) -> Result<u32, GuardError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(name))
                    .then(|| f.nth(1).and_then(|g| g.parse().ok()))
                    .flatten()
            })
        })
        .ok_or_else(|| GuardError::NoGroup(name.into()))
}

/// Sets the control socket's file mode: 0600 (root, or the agent's user), or 0660 with group
/// `gid`. The credentials check on each connection ([`admit`]) holds regardless (it also
/// covers the moment between `bind` and this call).
pub fn protect_socket(path: &Path, gid: Option<u32>) -> Result<(), GuardError> {
    let err = |cause| GuardError::Socket {
        path: path.into(),
        cause,
    };
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(err)?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// The supplementary groups of process `pid` (`Groups:` of its `/proc` status).
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether the process at the other end of `s` may drive the agent: root, the agent's own
/// user, or (with `gid`) a member of that group (primary group from `SO_PEERCRED`,
/// supplementary groups from `/proc`). The refusal's message otherwise.
pub fn admit(s: &UnixStream, gid: Option<u32>) -> Result<(), String> {
    let cred = s
        .peer_cred()
        .map_err(|e| format!("permission denied: cannot read the client's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let uid = cred.uid();
    if uid == 0 || uid == me {
        return Ok(());
    }
    if let Some(g) = gid {
        let member = cred.gid() == g || cred.pid().is_some_and(|pid| groups_of(pid).contains(&g));
        if member {
            return Ok(());
        }
    }
    let who = match gid {
        Some(g) => format!("root and members of group {g}"),
        None => "root".to_string(),
    };
    Err(format!(
        "permission denied: this agent's control socket admits only {who}; uid {uid} (gid {}) is refused",
        cred.gid()
    ))
}

/// A capped count of things in use (incoming connections).
#[derive(Debug)]
pub struct Slots {
    used: Arc<AtomicUsize>,
    max: usize,
}

/// One slot of [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slots {
    /// `max` slots.
    pub fn new(max: usize) -> Self {
        Self {
            used: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A slot, if one is free.
    pub fn take(&self) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.used.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back() {
        let s = Slots::new(2);
        let a = s.take().unwrap();
        let _b = s.take().unwrap();
        assert!(s.take().is_none());
        drop(a);
        assert!(s.take().is_some());
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(matches!(
            group_id("no-such-group-vmig"),
            Err(GuardError::NoGroup(_))
        ));
    }
}
