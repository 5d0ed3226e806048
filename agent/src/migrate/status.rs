//! The live state of a migration, as `vmig migrate --status` shows it: the fields of QEMU's
//! `query-migrate`, with the same meanings, kept up to date from the engine's progress events.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Progress, ProgressPhase, Report};
use crate::guest::layout::PAGE_SIZE;

/// QEMU's `MigrationStatus` values that vmig goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Connecting, reserving on the destination, sending the VM's files.
    Setup,
    /// Pre-copy rounds.
    Active,
    /// Stop-and-copy: the vCPUs are paused.
    Device,
    /// The VM runs on the destination and fetches its missing pages.
    PostcopyActive,
    /// Done: the VM runs on the destination and the source let it go.
    Completed,
    /// Failed or cancelled: the VM stays where the error says.
    Failed,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Setup => "setup",
            State::Active => "active",
            State::Device => "device",
            State::PostcopyActive => "postcopy-active",
            State::Completed => "completed",
            State::Failed => "failed",
        })
    }
}

/// RAM figures, as in `query-migrate`'s `ram` object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Ram {
    /// Bytes sent so far (all rounds, the current one included).
    pub transferred: u64,
    /// Bytes still to send in the current pass (pages left × page size).
    pub remaining: u64,
    /// Guest memory size, bytes.
    pub total: u64,
    /// Zero pages sent as markers (QEMU: `duplicate`).
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    /// Pages dirtied per second in the last finished round.
    pub dirty_pages_rate: f64,
    /// Bandwidth of the last finished round, megabits per second.
    pub mbps: f64,
    /// Dirty-log harvests so far (rounds finished).
    pub dirty_sync_count: u32,
    /// Post-copy page requests (remote faults) so far, estimated from their rate.
    pub postcopy_requests: u64,
}

/// Disk figures, as in `query-migrate`'s `disk` object (block migration).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Disk {
    /// Bytes of the image's first pass read and sent so far (holes and zero chunks count as
    /// passed, not sent).
    pub transferred: u64,
    /// Bytes of the image still to pass.
    pub remaining: u64,
    /// Image size, bytes.
    pub total: u64,
}

/// One migration's status (`vmig migrate --status --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStatus {
    /// VM.
    pub vm: String,
    /// Destination host.
    pub to: String,
    /// Where the migration is.
    pub status: State,
    /// vmig's phase name (connecting, reserved, pre-copy, stop-and-copy, post-copy).
    pub phase: String,
    /// Current round.
    pub round: u32,
    /// Milliseconds since the migration started (final: the whole migration).
    pub total_time: u64,
    /// Milliseconds of set-up before the first round.
    pub setup_time: u64,
    /// Predicted downtime of stopping now, ms (QEMU: `expected-downtime`).
    pub expected_downtime: u64,
    /// The downtime, once known (completed), ms.
    pub downtime: Option<f64>,
    /// Seconds until the current pass is sent at the last round's rate, if known.
    pub eta_s: Option<f64>,
    /// RAM figures.
    pub ram: Ram,
    /// Disk figures of a live disk mirror, as in `query-migrate`'s `disk` object of block
    /// migration (none without a mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Disk>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Follows one migration's progress events.
#[derive(Debug)]
pub struct Tracker {
    t0: Instant,
    setup: Option<u64>,
    /// Bytes of the finished rounds.
    done_bytes: u64,
    done_pages: u64,
    done_zero: u64,
    last_bandwidth: f64,
    faults: f64,
    last_event: Instant,
    status: MigrationStatus,
}

impl Tracker {
    /// A migration of `vm` (`memory` bytes) to `to`, starting now.
    pub fn new(vm: &str, to: &str, memory: u64) -> Self {
        let now = Instant::now();
        Self {
            t0: now,
            setup: None,
            done_bytes: 0,
            done_pages: 0,
            done_zero: 0,
            last_bandwidth: 0.0,
            faults: 0.0,
            last_event: now,
            status: MigrationStatus {
                vm: vm.into(),
                to: to.into(),
                status: State::Setup,
                phase: "connecting".into(),
                round: 0,
                total_time: 0,
                setup_time: 0,
                expected_downtime: 0,
                downtime: None,
                eta_s: None,
                ram: Ram {
                    total: memory,
                    ..Ram::default()
                },
                disk: None,
                error: None,
            },
        }
    }

    /// Takes in a progress event.
    pub fn update(&mut self, p: &Progress) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_event).as_secs_f64();
        self.last_event = now;
        let s = &mut self.status;
        s.phase = p.phase.to_string();
        s.round = p.round;
        if p.phase == ProgressPhase::DiskCopy {
            s.status = State::Active;
            s.disk = Some(Disk {
                transferred: p.sent,
                remaining: p.total.saturating_sub(p.sent),
                total: p.total,
            });
            if self.setup.is_none() {
                self.setup = Some(self.t0.elapsed().as_millis() as u64);
            }
            return;
        }
        if let Some(d) = s.disk.as_mut() {
            d.transferred = d.total;
            d.remaining = 0;
        }
        s.status = match p.phase {
            ProgressPhase::DiskCopy => State::Active,
            ProgressPhase::PreCopy => State::Active,
            ProgressPhase::StopAndCopy => State::Device,
            ProgressPhase::PostCopy => State::PostcopyActive,
            ProgressPhase::Connecting | ProgressPhase::Reserved => s.status,
        };
        if s.status != State::Setup && self.setup.is_none() {
            self.setup = Some(self.t0.elapsed().as_millis() as u64);
        }
        if let Some(l) = &p.last {
            self.done_bytes += l.bytes;
            self.done_pages += l.pages;
            self.done_zero += l.zero_pages;
            self.last_bandwidth = l.bandwidth;
            s.ram.dirty_sync_count = l.round;
            s.ram.dirty_pages_rate = l.dirty_rate;
            s.ram.mbps = l.bandwidth * 8.0 / 1e6;
            s.expected_downtime = l.predicted_downtime_ms.round() as u64;
        }
        let left = p.total.saturating_sub(p.sent);
        let left = if s.status == State::PostcopyActive {
            p.remaining
        } else {
            left
        };
        s.ram.remaining = left * PAGE_SIZE;
        // Pages of the pass in flight count as sent with their data (the zero count of an
        // unfinished round is not known before its end).
        let in_flight = if p.last.is_some() { 0 } else { p.sent };
        s.ram.normal = self.done_pages - self.done_zero + in_flight;
        s.ram.duplicate = self.done_zero;
        s.ram.transferred = self.done_bytes + in_flight * PAGE_SIZE;
        self.faults += p.faults_per_s * dt;
        s.ram.postcopy_requests = self.faults as u64;
        s.eta_s = (self.last_bandwidth > 0.0).then(|| s.ram.remaining as f64 / self.last_bandwidth);
    }

    /// The migration completed with `r`.
    pub fn complete(&mut self, r: &Report) {
        let s = &mut self.status;
        s.status = State::Completed;
        s.phase = "completed".into();
        s.downtime = Some(r.downtime_ms);
        s.ram.transferred = r.bytes_sent;
        s.ram.remaining = 0;
        s.ram.normal = r.pages_sent - r.zero_pages;
        s.ram.duplicate = r.zero_pages;
        s.eta_s = Some(0.0);
        s.total_time = r.total_ms.round() as u64;
    }

    /// The migration failed with `why`.
    pub fn fail(&mut self, why: &str) {
        self.status.total_time = self.t0.elapsed().as_millis() as u64;
        self.status.status = State::Failed;
        self.status.error = Some(why.into());
    }

    /// The status now.
    pub fn snapshot(&self) -> MigrationStatus {
        let mut s = self.status.clone();
        if !matches!(s.status, State::Completed | State::Failed) {
            s.total_time = self.t0.elapsed().as_millis() as u64;
        }
        s.setup_time = self.setup.unwrap_or(s.total_time);
        s
    }
}

impl MigrationStatus {
    /// The status as a few lines for people.
    pub fn render(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = format!(
            "migration of {} to {}: {} ({}{})\n",
            self.vm,
            self.to,
            self.status,
            self.phase,
            if self.round > 0 {
                format!(", round {}", self.round)
            } else {
                String::new()
            }
        );
        s += &format!(
            "  elapsed {:.1} s (set-up {:.1} s)\n",
            self.total_time as f64 / 1e3,
            self.setup_time as f64 / 1e3
        );
        s += &format!(
            "  transferred {:.1} MiB, remaining {:.1} MiB of this pass, memory {:.0} MiB\n",
            mib(self.ram.transferred),
            mib(self.ram.remaining),
            mib(self.ram.total)
        );
        s += &format!(
            "  dirty rate {:.0} pages/s, bandwidth {:.0} MiB/s, expected downtime {} ms, ETA {}\n",
            self.ram.dirty_pages_rate,
            self.ram.mbps * 1e6 / 8.0 / 1048576.0,
            self.expected_downtime,
            self.eta_s
                .map_or("unknown".to_string(), |e| format!("{e:.1} s"))
        );
        if let Some(d) = &self.disk {
            s += &format!(
                "  disk first pass {:.1} of {:.1} MiB, remaining {:.1} MiB\n",
                mib(d.transferred),
                mib(d.total),
                mib(d.remaining)
            );
        }
        if let Some(d) = self.downtime {
            s += &format!("  downtime {d:.2} ms\n");
        }
        if let Some(e) = &self.error {
            s += &format!("  error: {e}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::RoundStats;

    #[test]
    fn the_disk_first_pass_shows_in_its_own_section_not_in_ram() {
        let mut t = Tracker::new("vm1", "hostB", 1 << 30);
        t.update(&Progress::new(ProgressPhase::DiskCopy, 0, 3 << 20, 8 << 20));
        let s = t.snapshot();
        assert_eq!(s.status, State::Active);
        assert_eq!(s.phase, "disk-copy");
        let d = s.disk.expect("a disk section");
        assert_eq!(
            (d.transferred, d.remaining, d.total),
            (3 << 20, 5 << 20, 8 << 20)
        );
        assert_eq!(s.ram.remaining, 0, "image bytes are not pages");
        assert_eq!(s.ram.transferred, 0);
        t.update(&Progress::new(ProgressPhase::PreCopy, 1, 10, 100));
        let d = t.snapshot().disk.expect("kept");
        assert_eq!((d.transferred, d.remaining), (8 << 20, 0));
        assert_eq!(t.snapshot().ram.remaining, 90 * 4096);
    }

    #[test]
    fn the_status_follows_rounds_with_query_migrate_meanings() {
        let mut t = Tracker::new("vm1", "hostB", 1 << 30);
        assert_eq!(t.snapshot().status, State::Setup);
        t.update(&Progress::new(ProgressPhase::PreCopy, 1, 1000, 4000));
        let s = t.snapshot();
        assert_eq!(s.status, State::Active);
        assert_eq!(s.ram.remaining, 3000 * 4096);
        assert_eq!(s.ram.transferred, 1000 * 4096);
        let mut end = Progress::new(ProgressPhase::PreCopy, 1, 4000, 4000);
        end.last = Some(RoundStats {
            round: 1,
            pages: 4000,
            zero_pages: 1000,
            bytes: 3000 * 4104,
            bandwidth: 100.0 * 1048576.0,
            dirty_rate: 500.0,
            predicted_downtime_ms: 12.4,
            ..RoundStats::default()
        });
        t.update(&end);
        let s = t.snapshot();
        assert_eq!(
            (s.ram.normal, s.ram.duplicate, s.ram.transferred),
            (3000, 1000, 3000 * 4104)
        );
        assert_eq!((s.ram.dirty_sync_count, s.expected_downtime), (1, 12));
        assert!((s.ram.mbps - 100.0 * 1048576.0 * 8.0 / 1e6).abs() < 1e-6);
        t.update(&Progress::new(ProgressPhase::StopAndCopy, 2, 0, 100));
        assert_eq!(t.snapshot().status, State::Device);
        t.fail("cancelled by the user");
        let s = t.snapshot();
        assert_eq!(s.status, State::Failed);
        let json = serde_json::to_value(&s).unwrap();
        for k in [
            "status",
            "total-time",
            "setup-time",
            "expected-downtime",
            "ram",
        ] {
            assert!(json.get(k).is_some(), "no {k} in {json}");
        }
        assert_eq!(json["status"], "failed");
        assert!(json["ram"].get("dirty-pages-rate").is_some());
    }
}
