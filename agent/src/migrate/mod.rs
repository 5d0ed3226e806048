//! Live migration: the source and destination state machines and the pre-copy controller.
//!
//! The five stages: pre-migration checks (`Hello`), reservation on the destination
//! (`Reserve`), iterative pre-copy rounds (`Pages`/`RoundEnd`), stop-and-copy (last pages,
//! `State`), commitment (`Ready`, `Go`, `Running`). Until the source sends `Go` it owns the
//! VM: any failure resumes it there and the destination drops everything it staged.

pub mod controller;
pub mod dest;
pub mod report;
pub mod source;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, DirtyTracking};
use crate::inventory::InventoryError;
use crate::transport::{IoPath, RecvError};
use crate::vm::VmError;
use crate::wire::WireError;

pub use report::{Progress, Report, RoundStats, Verification};

/// Faults a test can inject into an outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Flip a byte in the first page frame after its checksum was computed.
    CorruptFrame,
    /// Speak protocol version 99.
    BadVersion,
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
    /// Verification failed before commitment.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The destination did not confirm after Go: the outcome is unknown.
    #[error("commit outcome unknown (no confirmation after Go: {0}); the VM stays paused on the source: check the destination")]
    CommitUnknown(String),
}

/// Cancels a migration from another thread: sets a flag and shuts the socket down so a
/// blocked send or receive returns at once.
#[derive(Debug, Default)]
pub struct Cancel {
    flag: AtomicBool,
    sock: Mutex<Option<TcpStream>>,
}

impl Cancel {
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(s) = self.sock.lock().expect("cancel socket").as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Registers the socket to shut down (None once cancelling is no longer allowed).
    pub fn set_socket(&self, s: Option<TcpStream>) {
        *self.sock.lock().expect("cancel socket") = s;
    }
}

/// A digest of the CPU features KVM offers guests here (source and destination must agree).
pub fn cpu_digest() -> String {
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
