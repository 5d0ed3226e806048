//! Live migration: the source and destination state machines and the pre-copy controller.
//!
//! The five stages: pre-migration checks (`Hello`), reservation on the destination
//! (`Reserve`), iterative pre-copy rounds (`Pages`/`RoundEnd`), stop-and-copy (last pages,
//! `State`), commitment (`Ready`, `Go`, `Running`). Until the source sends `Go` it owns the
//! VM: any failure resumes it there and the destination drops everything it staged.

pub mod controller;
pub mod dest;
#[cfg(test)]
mod disk_tests;
pub mod holdback;
pub mod probe;
#[cfg(test)]
mod probe_tests;
pub mod report;
pub mod source;
pub mod status;
#[cfg(test)]
mod tests;
pub mod validate;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, DirtyTracking};
use crate::inventory::InventoryError;
use crate::transport::{IoPath, RecvError};
use crate::vm::VmError;
use crate::wire::WireError;

pub use report::{KernelRound, PostcopyStats, Progress, Report, RoundStats, Verification};

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

/// Faults a test can inject into an outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Flip a byte in the first page frame after its checksum was computed.
    CorruptFrame,
    /// Speak protocol version 99.
    BadVersion,
    /// Shut the connection down once half of the post-copy pages are pushed (once).
    CutPostcopy,
    /// Drop the destination's `PostcopyDone` and the connection with it (once).
    LosePostcopyDone,
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
    /// A fault to inject (tests).
    pub inject: Option<Fault>,
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
    /// Seconds the source keeps reconnecting after the connection drops during post-copy,
    /// before it parks the migration for `vmig migrate --resume` (0: park at once).
    #[serde(default = "default_resume_window")]
    pub resume_window_s: u64,
    /// Hot-page holdback window in rounds: a page dirty again within this many rounds is not
    /// sent again before stop-and-copy (0: off). See [`holdback`].
    #[serde(default)]
    pub holdback_rounds: u32,
}

fn default_resume_window() -> u64 {
    30
}

fn default_threshold() -> f64 {
    0.8
}

fn default_min_rounds() -> u32 {
    3
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_downtime_ms: 50.0,
            max_rounds: 30,
            bandwidth_mibs: None,
            timeout_s: 300,
            dirty_tracking: DirtyTracking::Auto,
            io: IoPath::Auto,
            verify: false,
            inject: None,
            postcopy: PostcopyPolicy::Never,
            on_no_converge: NoConverge::Force,
            converge_threshold: default_threshold(),
            min_rounds: default_min_rounds(),
            resume_window_s: default_resume_window(),
            holdback_rounds: 0,
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
    /// The destination did not confirm after Go: the outcome is unknown.
    #[error("commit outcome unknown (no confirmation after Go: {0}); the VM stays paused on the source: check the destination")]
    CommitUnknown(String),
    /// Post-copy lost its connection and reconnecting failed within the resume window: the VM
    /// runs on the destination, which waits for the pages this source still holds.
    #[error("post-copy to {dest} interrupted ({reason}); the VM runs on {dest} and waits for pages held here ({missing} missing at the last contact): run `vmig migrate --resume {vm}` once {dest} is reachable (or `vmig migrate --rollback {vm}` if {dest} is lost)")]
    PostcopyInterrupted {
        /// VM.
        vm: String,
        /// Destination agent.
        dest: String,
        /// Pages the destination did not have at the last contact.
        missing: u64,
        /// What failed.
        reason: String,
        /// What the source keeps to finish it.
        parked: Box<source::Parked>,
    },
    /// Post-copy completed but `--verify` found the destination's memory differs: the VM is
    /// not released; the destination paused its copy; the source keeps its own.
    #[error("post-copy to {dest} failed verification ({reason}): the VM was not released; {dest} paused its copy; {vm} is paused here with its memory as of the switch: `vmig migrate --rollback {vm}` runs it here again (what it did on {dest} is lost), then `vmig vm stop {vm}` on {dest} removes the bad copy")]
    PostcopyVerifyFailed {
        /// VM.
        vm: String,
        /// Destination agent.
        dest: String,
        /// The mismatch.
        reason: String,
        /// What the source keeps.
        parked: Box<source::Parked>,
    },
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

    /// The parked post-copy this error carries (the VM paused here with its memory), if any.
    pub fn take_parked(self) -> Result<(String, Box<source::Parked>), MigrateError> {
        match self {
            e @ (MigrateError::PostcopyInterrupted { .. }
            | MigrateError::PostcopyVerifyFailed { .. }) => {
                let why = e.to_string();
                match e {
                    MigrateError::PostcopyInterrupted { parked, .. }
                    | MigrateError::PostcopyVerifyFailed { parked, .. } => Ok((why, parked)),
                    _ => unreachable!("matched above"),
                }
            }
            e => Err(e),
        }
    }
}

/// Cancels a migration from another thread: sets a flag and shuts the socket down so a
/// blocked send or receive returns at once.
#[derive(Debug, Default)]
pub struct Cancel {
    flag: AtomicBool,
    committed: AtomicBool,
    sock: Mutex<Option<TcpStream>>,
}

impl Cancel {
    /// Requests cancellation; false (and nothing happens) once the migration has reached
    /// commitment, where a cancel could only leave two copies or none.
    pub fn cancel(&self) -> bool {
        let sock = self.sock.lock().expect("cancel socket");
        if self.committed.load(Ordering::SeqCst) {
            return false;
        }
        self.flag.store(true, Ordering::SeqCst);
        if let Some(s) = sock.as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        true
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The migration reaches commitment (`Go`): cancelling is no longer allowed. False if a
    /// cancel came first (the caller must not send `Go` then).
    pub fn commit(&self) -> bool {
        let mut sock = self.sock.lock().expect("cancel socket");
        if self.flag.load(Ordering::SeqCst) {
            return false;
        }
        self.committed.store(true, Ordering::SeqCst);
        *sock = None;
        true
    }

    /// Whether the migration reached commitment.
    pub fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// Registers the socket to shut down (None once cancelling is no longer allowed).
    pub fn set_socket(&self, s: Option<TcpStream>) {
        *self.sock.lock().expect("cancel socket") = s;
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::Cancel;

    #[test]
    fn a_cancel_after_commit_is_refused_and_a_commit_after_cancel_too() {
        let c = Cancel::default();
        assert!(c.commit());
        assert!(!c.cancel(), "cancel after Go must be refused");
        assert!(!c.is_cancelled());
        let c = Cancel::default();
        assert!(c.cancel());
        assert!(!c.commit(), "Go after a cancel must not be sent");
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

/// An order-independent digest of guest memory as (index, content) pairs: the sum, modulo
/// 2^256, of BLAKE3(index ‖ page) over every non-zero page.
///
/// Post-copy places pages in whatever order faults and the push produce, and the destination
/// runs while they arrive, so it cannot hash its memory at one instant. Each side adds one
/// term per page instead: the source over its paused memory, the destination over the pages it
/// kept at the switch (before running) plus every page as it is placed. The index inside each
/// term catches a page at the wrong place; a sum (unlike XOR) does not cancel equal terms; and
/// the state is 32 bytes whatever the guest size (a per-page table would be 32 bytes a page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSum([u64; 4]);

impl PageSum {
    /// Adds the page `index` with `data` (all-zero pages add nothing).
    pub fn add(&mut self, index: u64, data: &[u8]) {
        if data.iter().all(|b| *b == 0) {
            return;
        }
        let mut h = blake3::Hasher::new();
        h.update(&index.to_le_bytes());
        h.update(data);
        self.add_hash(h.finalize().as_bytes());
    }

    fn add_hash(&mut self, h: &[u8; 32]) {
        let mut carry = 0u128;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let v = u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let sum = *limb as u128 + v as u128 + carry;
            *limb = sum as u64;
            carry = sum >> 64;
        }
    }

    /// Combines two partial sums.
    pub fn merge(&mut self, other: &PageSum) {
        let mut b = [0u8; 32];
        for (i, limb) in other.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        self.add_hash(&b);
    }

    /// Hex, most significant limb first.
    pub fn hex(&self) -> String {
        self.0.iter().rev().map(|l| format!("{l:016x}")).collect()
    }

    /// The sum over every non-zero page of `ram` for which `include(index)` holds. Reads
    /// only pages populated in the host, so it never touches a missing page.
    pub fn of_ram(
        ram: &crate::vm::memory::GuestRam,
        include: impl Fn(u64) -> bool,
    ) -> Result<PageSum, crate::vm::memory::MemoryError> {
        let populated = ram.populated()?;
        let mut sum = PageSum::default();
        let mut page = vec![0u8; crate::guest::layout::PAGE_SIZE as usize];
        for (i, &p) in populated.iter().enumerate() {
            let i = i as u64;
            if !p || !include(i) || ram.is_zero_page(i) {
                continue;
            }
            ram.read_page(i, &mut page)?;
            sum.add(i, &page);
        }
        Ok(sum)
    }
}
