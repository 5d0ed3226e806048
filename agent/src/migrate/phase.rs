//! The phases of a migration, named alike on both sides, and the refusal of an event that a
//! phase does not allow (as a vCPU state machine refuses a save while it runs).
//!
//! ```text
//!   Handshake ──► Reservation ──► Precopy ──► StopAndCopy ──► Commit ──► Done
//!                                                 │                ▲
//!                                   (post-copy)   └──► Commit ──► Postcopy ──► Done
//!   Handshake ──► Postcopy (a resume)
//! ```
//! Until `Commit` the source owns the VM: a cancel is allowed, and any failure resumes the VM
//! there. From `Commit` on (the source sent `Go`) the destination may run it: a cancel is
//! refused by name.

use crate::wire::Kind;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Hello and Welcome: version, page size, CPU.
    Handshake,
    /// The destination reserves memory and the name; the VM's files travel.
    Reservation,
    /// Iterative pre-copy rounds while the VM runs.
    Precopy,
    /// The vCPUs are paused: the last pages (or the post-copy switch) and the state.
    StopAndCopy,
    /// `Go` is sent: the destination registers and runs the VM.
    Commit,
    /// The VM runs on the destination, which fetches its missing pages from the source.
    Postcopy,
    /// Over: the VM runs on the destination and the source released it.
    Done,
}

impl Phase {
    /// The phase's name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Reservation => "reservation",
            Phase::Precopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Commit => "commitment",
            Phase::Postcopy => "post-copy",
            Phase::Done => "done",
        }
    }

    /// Whether the source still owns the VM (so a cancel can still put it back).
    pub fn source_owns(self) -> bool {
        self < Phase::Commit
    }

    /// Whether the protocol goes from `self` to `next`.
    pub fn leads_to(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Handshake, Reservation | Postcopy)
                | (Reservation, Precopy)
                | (Precopy, StopAndCopy)
                | (StopAndCopy, Commit)
                | (Commit, Postcopy | Done)
                | (Postcopy, Done)
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Something that happened to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A frame from the peer.
    Frame(Kind),
    /// The user asked to cancel.
    Cancel,
    /// A move to another phase.
    Enter(Phase),
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Frame(k) => write!(f, "a {k} frame"),
            Event::Cancel => f.write_str("a cancel"),
            Event::Enter(p) => write!(f, "a move to {p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_owns_the_vm_until_commit() {
        assert!(Phase::StopAndCopy.source_owns());
        assert!(!Phase::Commit.source_owns());
        assert!(!Phase::Postcopy.source_owns());
    }

    #[test]
    fn phases_follow_the_protocol() {
        assert!(Phase::Precopy.leads_to(Phase::StopAndCopy));
        assert!(Phase::Commit.leads_to(Phase::Postcopy));
        assert!(
            !Phase::Precopy.leads_to(Phase::Commit),
            "no Go before the pause"
        );
        assert!(!Phase::Commit.leads_to(Phase::Precopy));
        assert_eq!(Event::Frame(Kind::Go).to_string(), "a Go frame");
    }
}
