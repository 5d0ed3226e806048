//! Cold migration: a stopped VM's folder (definition, NVRAM, disk, logs) moved to another
//! agent over the same authenticated channel as live migration, under an intent journal on
//! both sides ([`crate::inventory::journal`]).
//!
//! The one commit point is the destination's registration: the rename of its synced staging
//! folder into its datastore (or, for a VM of a shared datastore whose files stay, the
//! rewrite of the folder's `.owner`). Before it the source owns the VM; after it the
//! destination does, and the source deletes its copy (or marks it `moved`, `--keep-source`)
//! only once the destination said so. A source that lost the answer asks again
//! ([`recover`]); the question aborts an operation the destination has not registered yet,
//! so the answer holds.
//!
//! - [`source`]: the sender's steps; [`dest`]: the receiver's; [`crash`]: the test-only crash
//!   points of the crash matrix.

pub mod crash;
pub(super) mod dest;
pub mod recover;
pub mod source;

use serde::{Deserialize, Serialize};

/// What `vmig migrate --offline` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdOptions {
    /// Copy the files even when both hosts see the VM's shared datastore.
    pub move_storage: bool,
    /// The destination's datastore (default: its first, or the shared one both see).
    pub target_datastore: Option<String>,
    /// Keep the source's copy, marked `moved`.
    pub keep_source: bool,
}

/// Where a cold migration or storage move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColdPhase {
    /// Connecting, offering.
    Offering,
    /// Files on their way.
    Copying,
    /// The destination syncs and registers.
    Registering,
    /// Done.
    Done,
}

/// Progress of a cold migration or a storage move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdProgress {
    /// Where it is.
    pub phase: ColdPhase,
    /// The file on its way.
    pub file: String,
    /// Files done.
    pub files_done: usize,
    /// Files in all.
    pub files: usize,
    /// Bytes of the files read so far (holes count as read).
    pub bytes: u64,
    /// Bytes of all the files.
    pub total_bytes: u64,
    /// MiB/s so far.
    pub rate_mibs: f64,
    /// Seconds left at that rate.
    pub eta_s: f64,
}

/// One file in a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileReport {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Data bytes that travelled (holes and zero chunks do not).
    pub sent_bytes: u64,
    /// Digest on the source (`storage::BlockDigest`).
    pub source_digest: String,
    /// Digest on the destination.
    pub dest_digest: String,
    /// Whether they are equal.
    pub equal: bool,
}

/// The report of a cold migration or storage move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdReport {
    /// VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host (the same for a storage move).
    pub to: String,
    /// Datastore it left.
    pub source_datastore: String,
    /// Datastore it is on now.
    pub datastore: String,
    /// Whether the files travelled (false: only the registration moved).
    pub copy: bool,
    /// Whether the source kept its copy (marked moved).
    pub keep_source: bool,
    /// Every file.
    pub files: Vec<FileReport>,
    /// Sizes of the files.
    pub total_bytes: u64,
    /// Data bytes that travelled.
    pub sent_bytes: u64,
    /// Wall time, ms.
    pub total_ms: f64,
    /// total_bytes / wall time, MiB/s.
    pub rate_mibs: f64,
    /// Every digest equal.
    pub all_equal: bool,
    /// A running VM's storage move: its disk's live mirror and switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_disk: Option<crate::migrate::local_move::LiveMoveReport>,
}

impl ColdReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} moved {} -> {} (datastore {} -> {}{}{})\n",
            self.vm,
            self.from,
            self.to,
            self.source_datastore,
            self.datastore,
            if self.copy { "" } else { ", registration only" },
            if self.keep_source {
                ", source copy kept, marked moved"
            } else {
                ""
            }
        );
        s += &format!(
            "{} files, {:.1} MiB ({:.1} MiB of data sent) in {:.0} ms: {:.0} MiB/s\n",
            self.files.len(),
            self.total_bytes as f64 / 1048576.0,
            self.sent_bytes as f64 / 1048576.0,
            self.total_ms,
            self.rate_mibs
        );
        for f in &self.files {
            s += &format!(
                "  {:<12} {:>12} bytes  {}  {}\n",
                f.name,
                f.size,
                &f.dest_digest[..16.min(f.dest_digest.len())],
                if f.equal {
                    "digest equal"
                } else {
                    "DIGEST DIFFERS"
                }
            );
        }
        if let Some(d) = &self.live_disk {
            s += &format!(
                "disk moved live: first pass {:.1} MiB at {:.0} MiB/s, {} rounds, {} blocks copied again ({} paused), pause {:.2} ms, digest at the switch equal ({:.0} ms to check)\n",
                d.copied_bytes as f64 / 1048576.0,
                d.copy_mibs,
                d.rounds,
                d.resent_blocks,
                d.blocks_at_pause,
                d.pause_ms,
                d.verify_ms
            );
        }
        s
    }
}

/// Rate and ETA for progress.
pub(crate) fn rate_eta(bytes: u64, total: u64, elapsed: std::time::Duration) -> (f64, f64) {
    let secs = elapsed.as_secs_f64().max(1e-6);
    let rate = bytes as f64 / 1048576.0 / secs;
    let eta = if bytes == 0 {
        0.0
    } else {
        (total.saturating_sub(bytes)) as f64 / (bytes as f64 / secs)
    };
    (rate, eta)
}
