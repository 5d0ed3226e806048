//! Live migration: the source and destination state machines and the pre-copy controller.
//!
//! The five stages: pre-migration checks (`Hello`), reservation on the destination
//! (`Reserve`), iterative pre-copy rounds (`Pages`/`RoundEnd`), stop-and-copy (last pages,
//! `State`), commitment (`Ready`, `Go`, `Running`). Until the source sends `Go` it owns the
//! VM: any failure resumes it there and the destination drops everything it staged.

pub mod cold;
#[cfg(test)]
mod compress_tests;
pub mod controller;
mod convert;
pub mod dest;
#[cfg(test)]
mod disk_tests;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
pub mod fence;
pub mod holdback;
mod link;
pub mod local_move;
mod owner;
mod page_sum;
pub mod phase;
pub mod probe;
#[cfg(test)]
mod probe_tests;
pub mod registry;
pub mod report;
pub mod source;
pub mod status;
#[cfg(test)]
mod tests;
pub mod validate;

pub use page_sum::PageSum;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, DirtyTracking};
use crate::inventory::InventoryError;
use crate::transport::{IoPath, RecvError};
use crate::vm::VmError;
use crate::wire::WireError;

pub use phase::{Event, Phase};
pub use report::{
    Decided, Decision, EstimateFrom, IoUsed, KernelRound, Mode, PostcopyStats, Progress,
    ProgressNote, ProgressPhase, Report, RoundStats, TrackingUsed, Verification,
};

/// When to switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PostcopyPolicy {
    /// Pre-copy only; `--on-no-converge` says what to do when it cannot converge.
    #[default]
    Never,
    /// Pre-copy, switching to post-copy when the controller judges it hopeless.
    Auto,
    /// One pre-copy round, then post-copy.
    Always,
}

impl std::fmt::Display for PostcopyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PostcopyPolicy::Never => "never",
            PostcopyPolicy::Auto => "auto",
            PostcopyPolicy::Always => "always",
        })
    }
}

/// What pre-copy without post-copy does when it cannot converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoConverge {
    /// Stop and copy anyway (downtime above `--max-downtime`).
    #[default]
    Force,
    /// Auto-converge: throttle the vCPUs harder each round until it converges.
    Throttle,
    /// Give up; the VM keeps running on the source.
    Abort,
}

/// How the disk goes with a live migration (libvirt's `--copy-storage-all` or shared storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// Shared when the VM's datastore is shared and the destination sees the same folder;
    /// otherwise a copy.
    #[default]
    Auto,
    /// A live mirror of the image into the destination's datastore
    /// (`virsh migrate --copy-storage-all`, `qm migrate --with-local-disks`).
    Copy,
    /// The image stays on the shared datastore; the destination opens it in place once the
    /// source has flushed and closed it at the pause. Refused when the datastore is not shared
    /// with the destination.
    Shared,
}

impl std::fmt::Display for StorageMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageMode::Auto => "auto",
            StorageMode::Copy => "copy",
            StorageMode::Shared => "shared",
        })
    }
}

/// Compression of page frames (`--compress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Pages go as they are.
    #[default]
    Off,
    /// Each page frame's contents as one zstd frame at this level, when it saves an eighth
    /// (a frame that does not shrink goes raw).
    Zstd {
        /// zstd level ([`crate::wire::pages::ZSTD_LEVELS`]).
        level: i32,
    },
}

/// The zstd level `--compress zstd` means.
pub const ZSTD_DEFAULT_LEVEL: i32 = 1;

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lo, hi) = (
            *crate::wire::pages::ZSTD_LEVELS.start(),
            *crate::wire::pages::ZSTD_LEVELS.end(),
        );
        let words = format!("must be off, zstd or zstd:LEVEL with LEVEL from {lo} to {hi}");
        match s.trim() {
            "off" | "none" => Ok(Compression::Off),
            "zstd" => Ok(Compression::Zstd {
                level: ZSTD_DEFAULT_LEVEL,
            }),
            other => match other.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (lo..=hi).contains(&level) => Ok(Compression::Zstd { level }),
                _ => Err(format!("{other:?}: {words}")),
            },
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The user's knobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Largest acceptable downtime, ms: stop and copy once the predicted downtime is below it.
    pub max_downtime_ms: f64,
    /// Most pre-copy rounds before stop-and-copy is forced.
    pub max_rounds: u32,
    /// Bandwidth cap, MiB/s.
    pub bandwidth_mibs: Option<f64>,
    /// Whole-migration timeout, seconds: past it the migration aborts.
    pub timeout_s: u64,
    /// Dirty-tracking mechanism the migration requires.
    pub dirty_tracking: DirtyTracking,
    /// io_uring or plain sockets.
    pub io: IoPath,
    /// Compute and compare memory and vCPU digests on both sides before committing.
    pub verify: bool,
    /// When to switch to post-copy.
    #[serde(default)]
    pub postcopy: PostcopyPolicy,
    /// What to do when pre-copy cannot converge and post-copy is not allowed.
    #[serde(default)]
    pub on_no_converge: NoConverge,
    /// dirty rate × page size / bandwidth at or above which (for 2 rounds) pre-copy is
    /// judged hopeless.
    #[serde(default = "default_threshold")]
    pub converge_threshold: f64,
    /// Rounds before the convergence judgement starts.
    #[serde(default = "default_min_rounds")]
    pub min_rounds: u32,
    /// Judge non-convergence after round 1 from the kernel-measured dirty rate (BPF probes,
    /// ring mode) instead of waiting for `min_rounds` rounds of the dirty log.
    #[serde(default = "default_kernel_judge")]
    pub kernel_judge: bool,
    /// Seconds the source keeps reconnecting after the connection drops during post-copy,
    /// before it parks the migration for `vmig migrate --resume` (0: park at once).
    #[serde(default = "default_resume_window")]
    pub resume_window_s: u64,
    /// Hot-page holdback window in rounds: a page dirty again within this many rounds is not
    /// sent again before stop-and-copy (0: off). See [`holdback`].
    #[serde(default)]
    pub holdback_rounds: u32,
    /// How the disk goes.
    #[serde(default)]
    pub storage: StorageMode,
    /// The destination's datastore a copied VM goes onto (its default one if none).
    #[serde(default)]
    pub target_datastore: Option<String>,
    /// Compression of page frames.
    #[serde(default)]
    pub compress: Compression,
}

/// The one place of each migration default: [`MigrateOptions::default`], the serde defaults of
/// a request that leaves a field out, and the CLI's `--help` all read these.
pub mod defaults {
    use super::{NoConverge, PostcopyPolicy, StorageMode};
    use crate::dirty::DirtyTracking;
    use crate::transport::IoPath;

    /// `--max-downtime`, ms.
    pub const MAX_DOWNTIME_MS: f64 = 50.0;
    /// `--max-rounds`.
    pub const MAX_ROUNDS: u32 = 30;
    /// `--timeout`, s.
    pub const TIMEOUT_S: u64 = 300;
    /// `--dirty-tracking`.
    pub const DIRTY_TRACKING: DirtyTracking = DirtyTracking::Auto;
    /// `--io`.
    pub const IO: IoPath = IoPath::Auto;
    /// `--postcopy`.
    pub const POSTCOPY: PostcopyPolicy = PostcopyPolicy::Never;
    /// `--on-no-converge`.
    pub const ON_NO_CONVERGE: NoConverge = NoConverge::Force;
    /// `--converge-threshold`.
    pub const CONVERGE_THRESHOLD: f64 = 0.8;
    /// `--min-rounds`.
    pub const MIN_ROUNDS: u32 = 3;
    /// Round-1 judgement from the kernel's rate (`--no-kernel-judge` turns it off).
    pub const KERNEL_JUDGE: bool = true;
    /// `--resume-window`, s.
    pub const RESUME_WINDOW_S: u64 = 30;
    /// `--holdback-rounds`.
    pub const HOLDBACK_ROUNDS: u32 = 0;
    /// `--storage`.
    pub const STORAGE: StorageMode = StorageMode::Auto;
    /// `--compress`.
    pub const COMPRESS: super::Compression = super::Compression::Off;
}

fn default_resume_window() -> u64 {
    defaults::RESUME_WINDOW_S
}

fn default_threshold() -> f64 {
    defaults::CONVERGE_THRESHOLD
}

fn default_kernel_judge() -> bool {
    defaults::KERNEL_JUDGE
}

fn default_min_rounds() -> u32 {
    defaults::MIN_ROUNDS
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_downtime_ms: defaults::MAX_DOWNTIME_MS,
            max_rounds: defaults::MAX_ROUNDS,
            bandwidth_mibs: None,
            timeout_s: defaults::TIMEOUT_S,
            dirty_tracking: defaults::DIRTY_TRACKING,
            io: defaults::IO,
            verify: false,
            postcopy: defaults::POSTCOPY,
            on_no_converge: defaults::ON_NO_CONVERGE,
            converge_threshold: defaults::CONVERGE_THRESHOLD,
            min_rounds: defaults::MIN_ROUNDS,
            kernel_judge: defaults::KERNEL_JUDGE,
            resume_window_s: defaults::RESUME_WINDOW_S,
            holdback_rounds: defaults::HOLDBACK_ROUNDS,
            storage: defaults::STORAGE,
            target_datastore: None,
            compress: defaults::COMPRESS,
        }
    }
}

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Could not reach the destination.
    #[error("cannot reach the destination {addr}: {cause}")]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// The secure channel to the peer could not be set up (mutual TLS refused or failed).
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    /// Socket failure.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// Receive failure.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// Malformed stream.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The destination refused the reservation.
    #[error("the destination refused the reservation: {0}")]
    Refused(String),
    /// The peer reported an error.
    #[error("the peer reported: {0}")]
    Peer(String),
    /// Cancelled by the user.
    #[error("cancelled by the user")]
    Cancelled,
    /// Past `--timeout`.
    #[error("timed out after {0} s")]
    Timeout(u64),
    /// Pre-copy cannot converge and `--on-no-converge abort` was asked.
    #[error("pre-copy does not converge: {0}")]
    NoConvergence(String),
    /// Post-copy machinery (userfaultfd).
    #[error("post-copy: {0}")]
    Postcopy(String),
    /// VMM failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::vm::memory::MemoryError),
    /// Dirty tracking.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Inventory.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// A knob outside its range.
    #[error(transparent)]
    Invalid(#[from] validate::InvalidOption),
    /// The peer stopped answering: the kernel gave up on the connection (a cut link, a dead
    /// host) or no frame came within the read timeout (a hung agent).
    #[error("{peer} stopped answering {cause}")]
    PeerSilent {
        /// The peer agent.
        peer: String,
        /// What was seen.
        cause: String,
    },
    /// A bug: the migration thread panicked. Before commitment the VM runs on the source.
    #[error("internal error (please report it): {0}; the VM keeps running on the source")]
    Internal(String),
    /// Verification failed before commitment.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The VM's disk image could not be read (source) or written (destination).
    #[error("disk: {0}")]
    Disk(String),
    /// An event the migration's phase does not allow.
    #[error("{event} is not allowed during {phase}")]
    NotAllowed {
        /// The phase.
        phase: Phase,
        /// What happened.
        event: Event,
    },
    /// The destination did not confirm after Go: the outcome is unknown.
    #[error("commit outcome unknown (no confirmation after Go: {0}); the VM stays paused on the source: check the destination")]
    CommitUnknown(String),
}

impl MigrateError {
    /// Names the peer when this error says it went silent (see [`MigrateError::PeerSilent`]).
    pub fn name_silent_peer(self, peer: &str) -> MigrateError {
        let io = match &self {
            MigrateError::Io(e) | MigrateError::Recv(RecvError::Io(e)) => e,
            _ => return self,
        };
        let cause = if matches!(
            io.raw_os_error(),
            Some(libc::EPIPE) | Some(libc::ECONNRESET)
        ) {
            // The kernel's verdict (a timeout, or a reset) went to another call on the socket;
            // this one only sees that the connection is gone.
            format!("or closed the connection: {io}")
        } else if matches!(
            io.raw_os_error(),
            Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)
        ) {
            // The link or the route to it went away (a cut cable, a host gone from the
            // network): the kernel reports it as unreachable rather than as a timeout.
            format!("(the network to it is gone: {io})")
        } else if crate::transport::is_peer_silent(io) {
            format!(
                "(no acknowledgement within {} s: {io})",
                crate::transport::PEER_TIMEOUT.as_secs()
            )
        } else if matches!(
            io.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            "(no message within the read timeout)".to_string()
        } else {
            return self;
        };
        MigrateError::PeerSilent {
            peer: peer.to_string(),
            cause,
        }
    }
}

#[cfg(test)]
mod silent_peer_tests {
    use super::*;

    #[test]
    fn a_lost_route_names_the_peer_like_a_timeout_does() {
        for errno in [libc::ENETUNREACH, libc::EHOSTUNREACH, libc::EPIPE] {
            let e = MigrateError::Io(std::io::Error::from_raw_os_error(errno));
            let named = e.name_silent_peer("hostB").to_string();
            assert!(named.starts_with("hostB stopped answering"), "{named}");
        }
        let other = MigrateError::Io(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(
            other.name_silent_peer("hostB"),
            MigrateError::Io(_)
        ));
    }
}

/// Cancels a migration from another thread, and knows which phase the migration is in: until
/// `Go` a cancel sets a flag and shuts the socket down so a blocked send or receive returns
/// at once; from `Go` on it is refused by name ([`MigrateError::NotAllowed`]).
#[derive(Debug)]
pub struct Cancel {
    flag: AtomicBool,
    gate: Mutex<Gate>,
}

#[derive(Debug)]
struct Gate {
    sock: Option<TcpStream>,
    phase: Phase,
}

impl Default for Cancel {
    fn default() -> Self {
        Self {
            flag: AtomicBool::new(false),
            gate: Mutex::new(Gate {
                sock: None,
                phase: Phase::Handshake,
            }),
        }
    }
}

impl Cancel {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests cancellation; refused once the source sent `Go`.
    pub fn cancel(&self) -> Result<(), MigrateError> {
        let gate = self.gate();
        if !gate.phase.source_owns() {
            return Err(MigrateError::NotAllowed {
                phase: gate.phase,
                event: Event::Cancel,
            });
        }
        self.flag.store(true, Ordering::SeqCst);
        if let Some(s) = gate.sock.as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The phase the migration is in.
    pub fn phase(&self) -> Phase {
        self.gate().phase
    }

    /// Moves the migration to phase `next`. Refused if the protocol does not lead there, or,
    /// for the move past `Go`, if a cancel came first (then the source still owns the VM).
    pub fn enter(&self, next: Phase) -> Result<(), MigrateError> {
        let mut gate = self.gate();
        if !gate.phase.leads_to(next) {
            return Err(MigrateError::NotAllowed {
                phase: gate.phase,
                event: Event::Enter(next),
            });
        }
        if !next.source_owns() {
            if self.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            gate.sock = None;
        }
        gate.phase = next;
        Ok(())
    }

    /// Whether the migration reached commitment (a cancel is refused from then on).
    pub fn is_committed(&self) -> bool {
        !self.phase().source_owns()
    }

    /// Registers the socket to shut down on a cancel.
    pub fn set_socket(&self, s: Option<TcpStream>) {
        self.gate().sock = s;
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::Cancel;

    #[test]
    fn a_cancel_after_commit_is_refused_and_a_commit_after_cancel_too() {
        use super::Phase;
        let to_go = [Phase::Reservation, Phase::Precopy, Phase::StopAndCopy];
        let c = Cancel::default();
        for p in to_go {
            c.enter(p).unwrap();
        }
        c.enter(Phase::Commit).unwrap();
        assert!(c.is_committed());
        assert!(c.cancel().is_err(), "cancel after Go must be refused");
        assert!(!c.is_cancelled());
        let c = Cancel::default();
        for p in to_go {
            c.enter(p).unwrap();
        }
        assert!(c.cancel().is_ok());
        assert!(
            c.enter(Phase::Commit).is_err(),
            "Go after a cancel must not be sent"
        );
        assert!(!c.is_committed());
    }
}

/// A digest of the CPU features KVM offers guests here (source and destination must agree).
///
/// Computed once per process (it opens `/dev/kvm` and reads CPUID): the `Hello` exchange that
/// answers with it also measures the round trip the controller predicts with.
pub fn cpu_digest() -> String {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(compute_cpu_digest).clone()
}

fn compute_cpu_digest() -> String {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        return "no-kvm".into();
    };
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return "no-cpuid".into();
    };
    let mut h = blake3::Hasher::new();
    for e in cpuid.as_slice() {
        // Topology leaves and leaf 1's EBX carry the APIC id of the host CPU the caller runs
        // on, which differs from call to call: they are not features.
        if matches!(e.function, 0x4 | 0xb | 0x1f) {
            continue;
        }
        let ebx = if e.function == 1 { 0 } else { e.ebx };
        for v in [e.function, e.index, e.flags, e.eax, ebx, e.ecx, e.edx] {
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize().to_hex()[..16].to_string()
}
