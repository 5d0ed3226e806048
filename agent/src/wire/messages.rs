//! The messages of control frames (bincode-encoded, fixed-width integers, in the frame's
//! metadata).
//!
//! These structs are the protocol: bincode encodes them by position, so adding, removing or
//! reordering a field changes the bytes on the wire. Each is this module's own type; the
//! engine converts its types (the VM spec, the machine state, post-copy figures) to and from
//! them, so editing an engine type cannot change the protocol by accident. The golden-bytes
//! tests (`golden.rs`) pin the encoding of every message.

use serde::{Deserialize, Serialize};

use super::bitmap::Bitmap;
use super::{Kind, Message};

macro_rules! message {
    ($($t:ident => $k:ident),* $(,)?) => {
        $(impl Message for $t { const KIND: Kind = Kind::$k; })*
    };
}

message! {
    Hello => Hello,
    Welcome => Welcome,
    Reserve => Reserve,
    Reserved => Reserved,
    Refused => Refused,
    FileChunk => FileChunk,
    RoundEnd => RoundEnd,
    State => State,
    Ready => Ready,
    Go => Go,
    Running => Running,
    Abort => Abort,
    Error => Error,
    Released => Released,
    Discarded => Discarded,
    Postcopy => Postcopy,
    Resume => Resume,
    Resumed => Resumed,
    PageRequest => PageRequest,
    PagesPlaced => PagesPlaced,
    RoundPlaced => RoundPlaced,
    PostcopyDone => PostcopyDone,
    ColdOffer => ColdOffer,
    ColdAccepted => ColdAccepted,
    ColdFileDone => ColdFileDone,
    ColdCommit => ColdCommit,
    ColdRegistered => ColdRegistered,
    ColdReleased => ColdReleased,
    ColdQuery => ColdQuery,
    ColdAnswer => ColdAnswer,
    OwnerQuery => OwnerQuery,
    OwnerAnswer => OwnerAnswer,
    Fence => Fence,
    FenceAnswer => FenceAnswer,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: who and what speaks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the source speaks.
    pub min_version: u16,
    /// Newest protocol version the source speaks.
    pub max_version: u16,
    /// Source agent name.
    pub agent: String,
    /// Guest page size.
    pub page_size: u32,
    /// Digest of the CPU features KVM offers the guest on the source.
    pub cpu: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: accepted, in this version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both speak (the highest common one).
    pub version: u16,
    /// Destination agent name.
    pub agent: String,
}

// NOTICE: a change here requires a protocol version bump.
/// What one vCPU runs (the wire's copy of the guest programs' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// A `hlt` loop.
    Idle,
    /// Writes every page of a working set, pass after pass.
    Dirty,
    /// A self-checking counter.
    Counter,
    /// Writes its working set once, then idles.
    Fill,
    /// Writes and reads back stamped blocks of its virtio-blk disk.
    Disk,
    /// `Dirty` over a working set filled with random bytes at boot.
    Noise,
}

// NOTICE: a change here requires a protocol version bump.
/// Dirty-tracking mechanism a VM asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tracking {
    /// The ring where KVM has it, else the bitmap.
    Auto,
    /// The KVM dirty ring.
    Ring,
    /// The KVM dirty bitmap.
    Bitmap,
}

// NOTICE: a change here requires a protocol version bump.
/// The VM to build on the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Guest memory in bytes.
    pub memory: u64,
    /// The program of each vCPU.
    pub programs: Vec<Program>,
    /// Working set of each `dirty` vCPU, bytes.
    pub dirty_bytes: u64,
    /// Pages per second each `dirty` vCPU writes (0: flat out).
    pub dirty_rate: u64,
    /// Dirty-tracking mechanism.
    pub dirty_tracking: Tracking,
    /// Blocks per second each `disk` vCPU writes (0: flat out).
    pub disk_rate: u64,
    /// First block of the `disk` programs' region.
    pub disk_first_block: u64,
    /// Blocks in that region (0: to the end of the disk).
    pub disk_blocks: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: reserve room for this VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reserve {
    /// VM name.
    pub name: String,
    /// What to build.
    pub spec: VmSpec,
    /// The VM's definition file, verbatim.
    pub definition: String,
    /// Whether the source will ask for digests (the destination then hashes the disk image as
    /// it arrives).
    pub verify: bool,
    /// How the disk travels.
    pub storage: StorageRequest,
    /// The destination's datastore to copy the VM onto (its default one if none).
    pub target_datastore: Option<String>,
}

// NOTICE: a change here requires a protocol version bump.
/// How the source means the disk to travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageRequest {
    /// A live mirror of the image into the destination's datastore.
    Copy,
    /// The image stays where it is: on datastore `datastore`, which the source shares with
    /// the destination; the VM's folder there holds the file `.vmig-probe` with `probe` in it,
    /// the proof that the destination sees the same folder.
    Shared {
        /// The shared datastore's name.
        datastore: String,
        /// The contents of the VM folder's probe file.
        probe: String,
        /// Whether a copy is fine when the destination does not see the folder.
        or_copy: bool,
    },
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reserved {
    /// Memory reserved, bytes.
    pub memory: u64,
    /// The destination opens the image in place on the shared datastore (nothing of the disk
    /// is copied); otherwise it expects the mirror.
    pub shared: bool,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    /// Why.
    pub reason: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: a piece of a file of the VM's folder (data in the frame's data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileChunk {
    /// File name inside the VM folder (a plain name: no separators).
    pub name: String,
    /// Total file size.
    pub size: u64,
    /// Offset of this piece.
    pub offset: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: end of a pre-copy round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundEnd {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent in the round.
    pub pages: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: every page frame of pre-copy round `round` is placed (checked and in
/// guest memory). The source ends a round on it, so that a round's time and the link rate it
/// gives count the destination's work too: frames still queued there would otherwise land in
/// the pause (under `--compress` a socket buffer holds many times its size in pages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlaced {
    /// The round, from 1.
    pub round: u32,
}

// NOTICE: a change here requires a protocol version bump.
/// The VMM's saved vCPU and device state, as a section the VMM encodes and decodes itself
/// (the wire carries it whole, checksummed with its frame, within the payload limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineSection {
    /// The VMM's encoding of its state.
    pub bytes: Vec<u8>,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: vCPU and device state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The state.
    pub machine: MachineSection,
    /// Whether the destination should compute verification digests before running.
    pub verify: bool,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: state loaded; digests when asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Memory digest of the destination before it runs: the page sum (`migrate::PageSum`)
    /// of its pages, kept up to date as pages were placed.
    pub memory_digest: Option<String>,
    /// vCPU state read back from KVM after the restore.
    pub vcpu_digest: Option<String>,
    /// Milliseconds the destination spent on the digests with the VM paused (hashing the
    /// pages placed since the last round's end, the vCPU and disk digests).
    pub verify_ms: f64,
    /// Digest of the disk image as received (per-block BLAKE3), when one was copied.
    pub disk_digest: Option<String>,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Go {}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: the VM runs here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// Microseconds from receiving Go to the vCPUs running.
    pub resume_us: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Either side: give up, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Abort {
    /// Why.
    pub reason: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Either side: an error ended the migration, and which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Error {
    /// What failed.
    pub reason: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source, after the source's `Abort` following `Running` (its memory check
/// after the resume found the copies differ): this copy is stopped and gone, nothing of it
/// stays registered here; the source runs the VM again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discarded {}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: switch to post-copy. The vCPUs are paused on the source; `State`
/// follows. Pages marked in `dirty` changed since they were sent (or were never sent): the
/// destination must drop its copy and fetch them on demand or wait for the push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Postcopy {
    /// The stale pages.
    pub dirty: Bitmap,
    /// Pages the bitmap marks.
    pub count: u64,
    /// Why the source switched (for the destination's log).
    pub reason: String,
    /// Names this post-copy session, so a resume finds the right one.
    pub session: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: finish the interrupted post-copy `session` of VM `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// VM.
    pub name: String,
    /// The session from `Postcopy`.
    pub session: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: the session waits here; these pages are still missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    /// The missing pages (an empty bitmap: none, the session completed).
    pub missing: Bitmap,
    /// Pages the bitmap marks.
    pub count: u64,
    /// Faults waiting since the connection dropped (their requests follow).
    pub waiting: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: pages a vCPU is waiting for (highest priority).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageRequest {
    /// Page indices.
    pub pages: Vec<u64>,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source, during post-copy: bytes of page frames (`Pages` and `DemandPages`,
/// headers included) received and placed since `Running`. The source sends push data only while
/// less than a window of it is beyond this count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagesPlaced {
    /// Page-frame bytes placed so far.
    pub bytes: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// The destination's post-copy figures: its fault handler's statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyFigures {
    /// Pages missing at the switch.
    pub pages_missing: u64,
    /// Missing-page faults read by the fault handler.
    pub faults: u64,
    /// Faults on a page already requested.
    pub duplicate_faults: u64,
    /// Faults on known zero pages resolved locally.
    pub zero_local: u64,
    /// Page requests sent to the source.
    pub requests: u64,
    /// Pages placed as answers to requests.
    pub pages_demand: u64,
    /// Pages placed from the background push.
    pub pages_pushed: u64,
    /// Bytes placed on demand.
    pub bytes_demand: u64,
    /// Bytes placed from the push.
    pub bytes_pushed: u64,
    /// Faulted pages whose latency was measured.
    pub latency_count: u64,
    /// Median fault latency, µs.
    pub latency_p50_us: u64,
    /// 99th percentile, µs.
    pub latency_p99_us: u64,
    /// Largest, µs.
    pub latency_max_us: u64,
    /// From the vCPUs running to the last page placed, ms.
    pub duration_ms: f64,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: every page is present; post-copy is over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyDone {
    /// Fault and placement statistics of the destination.
    pub stats: PostcopyFigures,
    /// Post-copy memory digest (see `migrate::digest`), when the source asked to verify.
    pub memory_digest: Option<String>,
}

// NOTICE: a change here requires a protocol version bump.
/// One file of a VM folder in a cold migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdFile {
    /// Name inside the VM folder (a plain name: no separators).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: take this stopped VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdOffer {
    /// Names the operation in both sides' journals (and in a later `ColdQuery`).
    pub op: String,
    /// VM name.
    pub name: String,
    /// The VM's definition file, verbatim.
    pub definition: String,
    /// The source's datastore of the VM.
    pub source_datastore: String,
    /// Whether that datastore is shared.
    pub source_shared: bool,
    /// The datastore to put the VM on (None: the destination's default, or on a shared
    /// datastore both see, that one).
    pub target_datastore: Option<String>,
    /// Copy the files even when both sides see the VM's shared datastore.
    pub move_storage: bool,
    /// The files of the VM folder, in the order they come.
    pub files: Vec<ColdFile>,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdAccepted {
    /// The destination's datastore the VM goes to.
    pub datastore: String,
    /// Whether the files travel (false: a shared datastore, only the registration moves).
    pub copy: bool,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: every piece of file `name` was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdFileDone {
    /// File name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its digest on the source (`storage::BlockDigest`, BLAKE3).
    pub digest: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: every file is there; make them durable and register the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdCommit {}

// NOTICE: a change here requires a protocol version bump.
/// A file's digest as one side computed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdDigest {
    /// File name.
    pub name: String,
    /// Digest.
    pub digest: String,
}

// NOTICE: a change here requires a protocol version bump.
/// Destination → source: the VM is registered here, its files and folder synced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdRegistered {
    /// Each file's digest as written on the destination.
    pub digests: Vec<ColdDigest>,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination: the source's copy is gone (or marked moved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdReleased {}

// NOTICE: a change here requires a protocol version bump.
/// Either side, recovering: is operation `op` (VM `name`) registered on the destination?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdQuery {
    /// The operation.
    pub op: String,
    /// Its VM.
    pub name: String,
}

// NOTICE: a change here requires a protocol version bump.
/// The answer to a `ColdQuery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdAnswer {
    /// The VM of the operation is registered on the destination (false: it never will be:
    /// the question aborted an operation still under way).
    pub registered: bool,
}

// NOTICE: a change here requires a protocol version bump.
/// Either agent (starting, or before `vm start`): which ownership generation do you hold of
/// each of these VMs?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerQuery {
    /// VM names.
    pub names: Vec<String>,
}

// NOTICE: a change here requires a protocol version bump.
/// One VM of an `OwnerAnswer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerEntry {
    /// VM.
    pub name: String,
    /// Its ownership generation on the answering host.
    pub generation: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// The answer to an `OwnerQuery`: the VMs asked about that the host holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerAnswer {
    /// Each one held.
    pub vms: Vec<OwnerEntry>,
}

// NOTICE: a change here requires a protocol version bump.
/// Source → destination, after `migrate --rollback`: the source holds the VM again, at
/// `generation`; the destination's older copy is fenced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fence {
    /// VM.
    pub name: String,
    /// The source's generation now.
    pub generation: u64,
}

// NOTICE: a change here requires a protocol version bump.
/// The answer to a `Fence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FenceAnswer {
    /// The copy here is fenced (stopped first if it ran).
    pub fenced: bool,
    /// Why not, otherwise.
    pub reason: String,
}
