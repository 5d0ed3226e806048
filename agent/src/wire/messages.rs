//! The messages of control frames (bincode-encoded in the frame's metadata).

use serde::{Deserialize, Serialize};

use crate::vm::VmSpec;

/// Source → destination: who and what speaks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version (also in every header).
    pub version: u16,
    /// Source agent name.
    pub agent: String,
    /// Guest page size.
    pub page_size: u32,
    /// Digest of the CPU features KVM offers the guest on the source.
    pub cpu: String,
}

/// Destination → source: accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// Destination agent name.
    pub agent: String,
}

/// Source → destination: reserve room for this VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reserve {
    /// VM name.
    pub name: String,
    /// What to build.
    pub spec: VmSpec,
    /// The VM's definition file, verbatim.
    pub definition: String,
}

/// Destination → source: reserved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reserved {
    /// Memory reserved, bytes.
    pub memory: u64,
}

/// Destination → source: refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    /// Why.
    pub reason: String,
}

/// Source → destination: a piece of a file of the VM's folder (data in the frame's data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileChunk {
    /// File name inside the VM folder (a plain name: no separators).
    pub name: String,
    /// Total file size.
    pub size: u64,
    /// Offset of this piece.
    pub offset: u64,
}

/// Source → destination: end of a pre-copy round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundEnd {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent in the round.
    pub pages: u64,
}

/// Source → destination: vCPU and device state (bincode of `MachineState`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The state.
    pub machine: crate::vm::state::MachineState,
    /// Whether the destination should compute verification digests before running.
    pub verify: bool,
}

/// Destination → source: state loaded; digests when asked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ready {
    /// Memory digest of the destination before it runs.
    pub memory_digest: Option<String>,
    /// vCPU state read back from KVM after the restore.
    pub vcpu_digest: Option<String>,
    /// Milliseconds the destination spent on the digests.
    pub verify_ms: f64,
}

/// Source → destination: commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Go {}

/// Destination → source: the VM runs here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    /// Microseconds from receiving Go to the vCPUs running.
    pub resume_us: u64,
}

/// Either side: give up, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Abort {
    /// Why.
    pub reason: String,
}

/// Source → destination: released.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Released {}

/// Source → destination: switch to post-copy. The vCPUs are paused on the source; `State`
/// follows. Pages whose bit is set in `dirty` changed since they were sent (or were never
/// sent): the destination must drop its copy and fetch them on demand or wait for the push.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Postcopy {
    /// Bitmap of stale pages, one bit per guest page (LSB first), `ceil(pages / 64)` words.
    pub dirty: Vec<u64>,
    /// Pages the bitmap marks.
    pub count: u64,
    /// Why the source switched (for the destination's log).
    pub reason: String,
    /// Names this post-copy session, so a resume finds the right one.
    pub session: u64,
}

/// Source → destination: finish the interrupted post-copy `session` of VM `name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resume {
    /// VM.
    pub name: String,
    /// The session from `Postcopy`.
    pub session: u64,
}

/// Destination → source: the session waits here; these pages are still missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resumed {
    /// Bitmap of missing pages, one bit per guest page (LSB first), `ceil(pages / 64)` words.
    pub missing: Vec<u64>,
    /// Pages the bitmap marks.
    pub count: u64,
    /// Faults waiting since the connection dropped (their requests follow).
    pub waiting: u64,
}

/// Destination → source: pages a vCPU is waiting for (highest priority).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageRequest {
    /// Page indices.
    pub pages: Vec<u64>,
}

/// Destination → source, during post-copy: bytes of page frames (`Pages` and `DemandPages`,
/// headers included) received and placed since `Running`. The source sends push data only while
/// less than a window of it is beyond this count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PagesPlaced {
    /// Page-frame bytes placed so far.
    pub bytes: u64,
}

/// Destination → source: every page is present; post-copy is over.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyDone {
    /// Fault and placement statistics of the destination.
    pub stats: crate::migrate::report::PostcopyStats,
    /// Post-copy memory digest (see `migrate::digest`), when the source asked to verify.
    pub memory_digest: Option<String>,
}
