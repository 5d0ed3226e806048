//! What a migration reports: per-round progress and the final report (its human-readable
//! rendering, `Report::render`, is in `render.rs`).

use serde::{Deserialize, Serialize};

mod render;

/// Writes `Display` from a table of names (the same names serde uses).
macro_rules! named {
    ($t:ty { $($v:ident => $n:literal),* $(,)? }) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(match self { $(<$t>::$v => $n),* })
            }
        }
    };
}

mod decision;
pub use decision::{Decided, Decision, EstimateFrom, ProgressNote};

/// How the migration moved the VM's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Mode {
    /// Pre-copy rounds, then stop-and-copy.
    #[default]
    #[serde(rename = "pre-copy")]
    PreCopy,
    /// Pre-copy, then the switch to post-copy.
    #[serde(rename = "post-copy")]
    PostCopy,
}
named!(Mode { PreCopy => "pre-copy", PostCopy => "post-copy" });

/// The I/O path that carried the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum IoUsed {
    /// Mutual TLS: each frame encrypted (one copy of each page) and written to the socket.
    #[serde(rename = "tls")]
    Tls,
    /// io_uring `SENDMSG` from guest memory.
    #[serde(rename = "io_uring")]
    IoUring,
    /// `writev`.
    #[default]
    #[serde(rename = "plain")]
    Plain,
}
named!(IoUsed { Tls => "tls", IoUring => "io_uring", Plain => "plain" });

/// The dirty-tracking mechanism the VM used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackingUsed {
    /// The KVM dirty ring.
    #[default]
    Ring,
    /// The KVM dirty bitmap.
    Bitmap,
}
named!(TrackingUsed { Ring => "ring", Bitmap => "bitmap" });

impl From<crate::dirty::DirtyMode> for TrackingUsed {
    fn from(m: crate::dirty::DirtyMode) -> Self {
        match m {
            crate::dirty::DirtyMode::Ring(_) => TrackingUsed::Ring,
            crate::dirty::DirtyMode::Bitmap => TrackingUsed::Bitmap,
        }
    }
}

/// Why pre-copy ended (or the controller stepped in), by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The predicted downtime is within `--max-downtime`.
    #[default]
    Converged,
    /// `--max-rounds` rounds ran.
    MaxRounds,
    /// `--timeout` passed.
    Timeout,
    /// `--postcopy always`: post-copy after the first round.
    PolicyAlways,
    /// The dirty ratio stayed at or above `--converge-threshold`.
    DirtyRatio,
    /// The dirty set stopped shrinking.
    NoShrink,
    /// After round 1, the kernel-measured dirty rate (BPF probes) eats at least
    /// `--converge-threshold` of the link.
    KernelRate,
    /// The hot-page holdback holds every pending page: nothing left to send.
    NothingLeft,
    /// Auto-converge reached its last throttle step.
    ThrottleExhausted,
}
named!(Cause {
    Converged => "converged",
    MaxRounds => "max-rounds",
    Timeout => "timeout",
    PolicyAlways => "policy-always",
    DirtyRatio => "dirty-ratio",
    NoShrink => "no-shrink",
    KernelRate => "kernel-rate",
    NothingLeft => "nothing-left",
    ThrottleExhausted => "throttle-exhausted",
});

/// Why pre-copy ended: its cause, and the figures behind it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopReason {
    /// What kind of reason.
    pub cause: Cause,
    /// The controller's words, with its figures.
    pub detail: String,
}

impl StopReason {
    /// A reason of `cause`.
    pub fn new(cause: Cause, detail: String) -> Self {
        Self { cause, detail }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Where a migration is, as its progress events say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgressPhase {
    /// Connecting to the destination.
    Connecting,
    /// The destination reserved room for the VM.
    Reserved,
    /// The disk mirror's first pass: `sent` and `total` are bytes of the image.
    DiskCopy,
    /// A pre-copy round.
    PreCopy,
    /// The vCPUs are paused: the last pages and the state.
    StopAndCopy,
    /// Post-copy: the destination runs the VM and fetches its pages.
    PostCopy,
}
named!(ProgressPhase {
    Connecting => "connecting",
    Reserved => "reserved",
    DiskCopy => "disk-copy",
    PreCopy => "pre-copy",
    StopAndCopy => "stop-and-copy",
    PostCopy => "post-copy",
});

/// How the disk moved with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageUsed {
    /// A live mirror: the image copied, then the blocks written meanwhile (`--storage copy`).
    #[default]
    Copy,
    /// Shared storage: nothing copied; the destination opened the same image.
    Shared,
}
named!(StorageUsed { Copy => "copy", Shared => "shared" });

/// The disk's figures of a migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskReport {
    /// How the disk moved.
    pub mode: StorageUsed,
    /// Size of the image, bytes.
    pub image_bytes: u64,
    /// Bytes of the image read by the first pass (holes skipped).
    pub read_bytes: u64,
    /// Bytes of the first pass sent (all-zero chunks skipped).
    pub copied_bytes: u64,
    /// How long the first pass took, ms.
    pub copy_ms: f64,
    /// Its rate, MiB/s.
    pub copy_mibs: f64,
    /// Blocks written by the guest during the migration and sent again (rounds and pause).
    pub resent_blocks: u64,
    /// Their bytes.
    pub resent_bytes: u64,
    /// Of which sent with the VM paused.
    pub blocks_at_pause: u64,
    /// Bytes the guest wrote to its disk from the mirror's start to the pause.
    pub guest_written_bytes: u64,
}

/// One pre-copy round (or the stop-and-copy pass).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number from 1; the stop-and-copy pass is the last.
    pub round: u32,
    /// Pages sent (zero pages included).
    pub pages: u64,
    /// Of which zero pages (sent as markers).
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Seconds the round took.
    pub secs: f64,
    /// Pages found dirty at the end of the round.
    pub dirty_pages: u64,
    /// Dirty rate during the round, pages/s.
    pub dirty_rate: f64,
    /// Achieved bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Predicted downtime of stopping now, ms.
    pub predicted_downtime_ms: f64,
    /// dirty rate × page bytes / bandwidth: pre-copy cannot converge near or above 1.
    #[serde(default)]
    pub dirty_ratio: f64,
    /// Auto-converge throttle in force during the round, percent.
    #[serde(default)]
    pub throttle_pct: u32,
    /// The controller's decision after the round, with its figures; none for the last pass
    /// (stop-and-copy, or the switch to post-copy, whose `dirty_pages` are the pages left to
    /// the destination's faults and the push). JSON: a [`Decision`] object, `{"kind":
    /// "continue"}`, `{"kind": "stop-and-copy", "cause": "converged", "detail": "…"}`…, or
    /// null.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// What the kernel measured during the round (BPF probes on the dirty ring), when the
    /// probes are on; see [`super::probe`].
    #[serde(default)]
    pub kernel: Option<KernelRound>,
    /// Which dirty count the prediction used: the dirty log's or the kernel's (the probes'
    /// distinct pages, when larger); none for the last pass, which predicts nothing. See
    /// [`super::controller::Controller::assess`]. JSON: `"log"`, `"kernel"` or null.
    #[serde(default)]
    pub estimate_from: Option<EstimateFrom>,
    /// Pages held back until stop-and-copy after this round (hot-page holdback).
    #[serde(default)]
    pub held_pages: u64,
    /// Disk blocks sent again in this round (written by the guest since the last).
    #[serde(default)]
    pub disk_blocks: u64,
    /// Their bytes (inside `bytes`).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Disk blocks written during the round and not sent yet (the disk's "dirty" count).
    #[serde(default)]
    pub disk_dirty_blocks: u64,
}

/// One round as the kernel saw it: counters of the `vmig-ebpf` probes over the round's window
/// (from the previous round's harvest to this round's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelRound {
    /// Entries KVM pushed onto the VM's dirty rings (`kvm:kvm_dirty_ring_push`), duplicates
    /// included: a page written many times in a round can be pushed many times.
    pub pushes: u64,
    /// Seconds the kernel counted for this round: since the previous round's harvest, or since
    /// the probes were attached when that was during this round (they attach beside round 1).
    #[serde(default)]
    pub window_s: f64,
    /// `pushes` per second of `window_s`.
    pub pushes_per_s: f64,
    /// Distinct pages among those pushes (counted once per window in BPF). In round 1, whose
    /// window is cut into rate samples, the largest sample's: a lower bound.
    pub distinct_pages: u64,
    /// vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` during the round.
    pub ring_full_exits: u64,
    /// Round 1 only: the guest's dirtying rate at the end of the round, distinct pages per
    /// second, the lower of the last two rate samples (each 50 ms long); 0 with fewer than two.
    #[serde(default)]
    pub rate_pages_per_s: f64,
    /// Round 1 only: rate samples taken (see [`super::probe`]).
    #[serde(default)]
    pub rate_samples: u32,
}

/// Post-copy figures: the destination's fault statistics and the source's serving counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Pages the destination had to fetch (stale or never sent) at the switch.
    pub pages_missing: u64,
    /// Missing-page faults read by the destination's fault handler.
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
    /// Fault latency (first fault to placement), µs: faulted pages counted.
    pub latency_count: u64,
    /// Median fault latency, µs.
    pub latency_p50_us: u64,
    /// 99th percentile, µs.
    pub latency_p99_us: u64,
    /// Largest, µs.
    pub latency_max_us: u64,
    /// From the destination's vCPUs running to the last page placed, ms.
    pub duration_ms: f64,
    /// Source: page requests received (pages).
    pub source_requested: u64,
    /// Source: pages sent as answers to requests.
    pub source_demand_sent: u64,
    /// Source: pages sent by the background push.
    pub source_pushed: u64,
    /// Connections lost during post-copy and resumed.
    #[serde(default)]
    pub interruptions: u32,
}

/// A progress event sent to the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Where the migration is.
    pub phase: ProgressPhase,
    /// Current round.
    pub round: u32,
    /// Pages sent so far in this round.
    pub sent: u64,
    /// Pages to send in this round.
    pub total: u64,
    /// Stats of the last finished round.
    pub last: Option<RoundStats>,
    /// Post-copy: pages the destination still misses.
    #[serde(default)]
    pub remaining: u64,
    /// Post-copy: page requests per second (remote faults) over the last interval.
    #[serde(default)]
    pub faults_per_s: f64,
    /// The controller's last decision, when it changed something (throttle, switch), or a
    /// post-copy milestone (complete, resumed).
    #[serde(default)]
    pub decision: Option<ProgressNote>,
}

impl Progress {
    /// An event of `phase` in `round`, `sent` of `total` pages.
    pub fn new(phase: ProgressPhase, round: u32, sent: u64, total: u64) -> Self {
        Self {
            phase,
            round,
            sent,
            total,
            last: None,
            remaining: 0,
            faults_per_s: 0.0,
            decision: None,
        }
    }
}

/// Memory and vCPU digests on both sides, compared before commitment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verification {
    /// Source memory at the pause.
    pub source_memory: String,
    /// Destination memory before its vCPUs ran.
    pub dest_memory: String,
    /// Source vCPU state at the pause (TSC excluded).
    pub source_vcpus: String,
    /// Destination vCPU state read back from KVM after the restore.
    pub dest_vcpus: String,
    /// Digests equal.
    pub memory_equal: bool,
    /// Digests equal.
    pub vcpus_equal: bool,
    /// ms the destination spent on its digests with the VM paused (inside the downtime):
    /// hashing the last round's pages (its memory's page sum is kept as pages come), the vCPU
    /// and disk digests.
    pub dest_verify_ms: f64,
    /// ms the source spent hashing its paused memory: after the destination resumed (outside
    /// the downtime) when `memory_checked` is `after-resume`, inside it at `pause`.
    #[serde(default)]
    pub source_verify_ms: f64,
    /// When the memories were compared.
    #[serde(default)]
    pub memory_checked: MemoryCheck,
    /// The disk image at the pause, as the source sent it (per-block BLAKE3, see
    /// [`crate::storage::BlockDigest`]); none without a copied disk.
    #[serde(default)]
    pub source_disk: Option<String>,
    /// The destination's image before its vCPUs ran.
    #[serde(default)]
    pub dest_disk: Option<String>,
    /// Disk digests equal (none when no disk was compared).
    #[serde(default)]
    pub disk_equal: Option<bool>,
}

/// When `--verify` compares the two memories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryCheck {
    /// With the VM paused, before `Go` (the disk on shared storage: a copy that ran on it
    /// could not be undone).
    #[default]
    Pause,
    /// After the destination's `Running`, before the source lets go: the source's paused
    /// memory hashed while the guest runs there; a mismatch removes that copy and the VM runs
    /// here again.
    AfterResume,
    /// During post-copy, when every page arrived.
    Postcopy,
}

impl std::fmt::Display for MemoryCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryCheck::Pause => "at the pause",
            MemoryCheck::AfterResume => "after the resume",
            MemoryCheck::Postcopy => "when post-copy completed",
        })
    }
}

/// The final report of a successful migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// VM.
    pub vm: String,
    /// Source agent.
    pub from: String,
    /// Destination agent.
    pub to: String,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// From vCPU pause on the source to vCPU run on the destination, ms: the source's pause
    /// to Go (its clock), Go's transit (half of the Go/Running exchange less the
    /// destination's own time), Go to run (the destination's clock). Never negative.
    pub downtime_ms: f64,
    /// Of the downtime, the time spent verifying digests at the pause (`--verify`), ms.
    #[serde(default)]
    pub verify_at_pause_ms: f64,
    /// The downtime without that verification, ms (what a migration without `--verify`
    /// would have paused for).
    #[serde(default)]
    pub downtime_without_verify_ms: f64,
    /// Time to pause the source vCPUs, ms.
    pub pause_ms: f64,
    /// Round trip measured at the start, µs.
    pub rtt_us: f64,
    /// Rounds, the stop-and-copy pass last.
    pub rounds: Vec<RoundStats>,
    /// Why pre-copy stopped.
    pub stop_reason: StopReason,
    /// Bytes on the wire in all.
    pub bytes_sent: u64,
    /// Pages sent (zero pages included).
    pub pages_sent: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Pages that held data at the start (populated in the host).
    pub memory_touched_bytes: u64,
    /// Average bandwidth over the whole migration, MiB/s.
    pub achieved_mibs: f64,
    /// The I/O path of the stream: `tls` (encrypted, mutual TLS), or under `--insecure`
    /// `io_uring` or `plain`.
    pub io_path: IoUsed,
    /// The dirty-tracking mechanism.
    pub dirty_tracking: TrackingUsed,
    /// Dirty-ring entries read (duplicates included) and ring-full exits during the migration.
    pub ring_entries: u64,
    /// Ring-full exits during the migration.
    pub ring_full_exits: u64,
    /// Guest counter at the pause (for the proof it continues on the destination).
    pub counter_at_pause: u64,
    /// Digests, when `--verify`.
    pub verification: Option<Verification>,
    /// Pre-copy (stop-and-copy at the end) or post-copy.
    #[serde(default)]
    pub mode: Mode,
    /// The post-copy policy in force: never, auto, always.
    #[serde(default)]
    pub postcopy_policy: String,
    /// Every controller decision that changed something, in order, with the round after
    /// which it came and the figures behind it. JSON: [`Decided`] objects, `{"round": 3,
    /// "kind": "post-copy", "cause": "dirty-ratio", "detail": "…"}`.
    #[serde(default)]
    pub decisions: Vec<Decided>,
    /// Post-copy statistics, when the migration switched to post-copy.
    #[serde(default)]
    pub postcopy: Option<PostcopyStats>,
    /// Why kernel-measured dirty rates are off (`None` when the probes ran every round).
    #[serde(default)]
    pub kernel_rates_off: Option<String>,
    /// The disk, when the VM has one.
    #[serde(default)]
    pub disk: Option<DiskReport>,
    /// Page-frame compression (`--compress`), if on: bytes before and after, frames.
    #[serde(default)]
    pub compression: Option<crate::wire::pages::CompressionStats>,
}
