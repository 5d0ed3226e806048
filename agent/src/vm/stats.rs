//! The counters of a running VM: [`VmStats`], read from its devices and vCPUs.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::vcpu::Phase;
use super::Vm;

/// Counters of a running VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// Latest counter value reported by a `counter` vCPU.
    pub counter: u64,
    /// Counter reports received.
    pub counter_reports: u64,
    /// Failed counter self-checks (must stay 0).
    pub counter_failures: u64,
    /// Pages written by `dirty` vCPUs (from their reports).
    pub dirty_pages_written: u64,
    /// Blocks the `disk` vCPU wrote and read back correctly.
    #[serde(default)]
    pub disk_blocks_verified: u64,
    /// The `disk` vCPU's generation (passes over its region).
    #[serde(default)]
    pub disk_generation: u64,
    /// Failed `disk` self-checks (must stay 0).
    #[serde(default)]
    pub disk_failures: u64,
    /// Requests the virtio-blk device completed.
    #[serde(default)]
    pub disk_requests: u64,
    /// Bytes the guest wrote to its disk.
    #[serde(default)]
    pub disk_bytes_written: u64,
    /// vCPU exits handled.
    pub exits: u64,
    /// Per vCPU: "running", "paused" or "exited: why".
    pub vcpus: Vec<String>,
    /// Dirty-tracking mechanism.
    pub dirty_mode: String,
}

impl Vm {
    /// Counters.
    pub fn stats(&self) -> VmStats {
        let r = &self.devices.reports;
        VmStats {
            counter: r.counter.load(Ordering::Relaxed),
            counter_reports: r.counter_reports.load(Ordering::Relaxed),
            counter_failures: r.counter_failures.load(Ordering::Relaxed),
            dirty_pages_written: r.dirty_pages.load(Ordering::Relaxed),
            disk_blocks_verified: r.disk_blocks.load(Ordering::Relaxed),
            disk_generation: r.disk_generation.load(Ordering::Relaxed),
            disk_failures: r.disk_failures.load(Ordering::Relaxed),
            disk_requests: self
                .devices
                .blk()
                .map_or(0, |b| b.counters().requests.load(Ordering::Relaxed)),
            disk_bytes_written: self
                .devices
                .blk()
                .map_or(0, |b| b.counters().bytes_written.load(Ordering::Relaxed)),
            exits: self
                .vcpus
                .iter()
                .map(|v| v.shared.exits.load(Ordering::Relaxed))
                .sum(),
            vcpus: self
                .vcpus
                .iter()
                .map(|v| match v.phase() {
                    Phase::Running => "running".to_string(),
                    Phase::Paused => "paused".to_string(),
                    Phase::Exited(why) => format!("exited: {}", why.unwrap_or_default()),
                })
                .collect(),
            dirty_mode: self.dirty.mode().to_string(),
        }
    }
}
