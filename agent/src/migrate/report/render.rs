//! The report's human-readable rendering (`vmig migrate` without `--json`).

use super::{Report, StorageUsed};

impl Report {
    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(s, "migrated {} from {} to {}", self.vm, self.from, self.to);
        let _ = writeln!(s, "  total time      {:>10.1} ms", self.total_ms);
        let _ = writeln!(
            s,
            "  downtime        {:>10.2} ms (pause {:.2} ms, rtt {:.0} µs)",
            self.downtime_ms, self.pause_ms, self.rtt_us
        );
        if self.verify_at_pause_ms > 0.0 {
            let _ = writeln!(
                s,
                "  without verify  {:>10.2} ms ({:.2} ms of the downtime verified digests)",
                self.downtime_without_verify_ms, self.verify_at_pause_ms
            );
        }
        let _ = writeln!(
            s,
            "  rounds          {:>10} ({})",
            self.rounds.len(),
            self.stop_reason
        );
        let _ = writeln!(
            s,
            "  mode            {:>10}   post-copy policy {}",
            self.mode, self.postcopy_policy
        );
        let _ = writeln!(
            s,
            "  bytes sent      {:>10.1} MiB",
            self.bytes_sent as f64 / 1048576.0
        );
        let _ = writeln!(
            s,
            "  pages sent      {:>10} ({} zero pages as markers)",
            self.pages_sent, self.zero_pages
        );
        let _ = writeln!(
            s,
            "  memory          {:>10.1} MiB ({:.1} MiB touched)",
            self.memory_bytes as f64 / 1048576.0,
            self.memory_touched_bytes as f64 / 1048576.0
        );
        let _ = writeln!(s, "  bandwidth       {:>10.1} MiB/s", self.achieved_mibs);
        let _ = writeln!(
            s,
            "  io path         {:>10}   dirty tracking {}",
            self.io_path, self.dirty_tracking
        );
        if let Some(c) = &self.compression {
            let _ = writeln!(
                s,
                "  compression     zstd:{}   {:.1} MiB of pages in {:.1} MiB ({:.2}), {} frames compressed, {} raw, {:.0} ms compressing",
                c.level,
                c.raw_bytes as f64 / 1048576.0,
                c.wire_bytes as f64 / 1048576.0,
                c.ratio(),
                c.frames_compressed,
                c.frames_raw,
                c.secs * 1e3
            );
        }
        if let Some(why) = &self.kernel_rates_off {
            let _ = writeln!(s, "  kernel rates           off: {why}");
        }
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "    round {:>2}: {:>8} pages ({:>8} zero) {:>8.1} MiB in {:>7.1} ms, {:>7} dirty, {:>8.0} pages/s dirtied, {:>7.1} MiB/s, predicted downtime {:>7.2} ms",
                r.round, r.pages, r.zero_pages, r.bytes as f64 / 1048576.0, r.secs * 1e3, r.dirty_pages, r.dirty_rate, r.bandwidth / 1048576.0, r.predicted_downtime_ms
            );
            if let Some(k) = &r.kernel {
                let _ = writeln!(
                    s,
                    "              kernel: {} distinct pages (log {}), {:.0} ring pushes/s, {} ring-full exits; prediction from the {}",
                    k.distinct_pages, r.dirty_pages, k.pushes_per_s, k.ring_full_exits, r.estimate_from.map_or(String::new(), |e| e.to_string())
                );
            }
            if r.disk_blocks > 0 || r.disk_dirty_blocks > 0 {
                let _ = writeln!(
                    s,
                    "              disk: {} blocks ({:.1} MiB) sent again, {} written meanwhile",
                    r.disk_blocks,
                    r.disk_bytes as f64 / 1048576.0,
                    r.disk_dirty_blocks
                );
            }
            if r.held_pages > 0 {
                let _ = writeln!(
                    s,
                    "              {} hot pages held back until stop-and-copy",
                    r.held_pages
                );
            }
            if r.throttle_pct > 0 || r.dirty_ratio > 0.0 {
                let _ = writeln!(
                    s,
                    "              dirty ratio {:.2}, throttle {} %",
                    r.dirty_ratio, r.throttle_pct
                );
            }
        }
        if let Some(p) = &self.postcopy {
            let _ = writeln!(
                s,
                "  post-copy       {:>10} pages missing at the switch, done in {:.1} ms",
                p.pages_missing, p.duration_ms
            );
            if p.interruptions > 0 {
                let _ = writeln!(
                    s,
                    "    resumed       {:>10} times after losing the connection",
                    p.interruptions
                );
            }
            let _ = writeln!(
                s,
                "    on demand     {:>10} pages ({:.1} MiB), {} faults ({} zero local, {} duplicates)",
                p.pages_demand,
                p.bytes_demand as f64 / 1048576.0,
                p.faults,
                p.zero_local,
                p.duplicate_faults
            );
            let _ = writeln!(
                s,
                "    pushed        {:>10} pages ({:.1} MiB)",
                p.pages_pushed,
                p.bytes_pushed as f64 / 1048576.0
            );
            let _ = writeln!(
                s,
                "    fault latency p50 {} µs, p99 {} µs, max {} µs over {} faulted pages",
                p.latency_p50_us, p.latency_p99_us, p.latency_max_us, p.latency_count
            );
        }
        if let Some(d) = &self.disk {
            let _ = writeln!(
                s,
                "  disk            {:>10}   image {:.1} MiB, {:.1} MiB of data copied in {:.1} ms ({:.1} MiB/s)",
                d.mode,
                d.image_bytes as f64 / 1048576.0,
                d.copied_bytes as f64 / 1048576.0,
                d.copy_ms,
                d.copy_mibs
            );
            if d.mode == StorageUsed::Copy {
                let _ = writeln!(
                    s,
                    "    written       {:>10.1} MiB by the guest meanwhile; {} blocks ({:.1} MiB) sent again, {} of them paused",
                    d.guest_written_bytes as f64 / 1048576.0,
                    d.resent_blocks,
                    d.resent_bytes as f64 / 1048576.0,
                    d.blocks_at_pause
                );
            }
        }
        for d in &self.decisions {
            let _ = writeln!(s, "  decision: {d}");
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(
                s,
                "  memory digest   source {} / destination {}: {}",
                v.source_memory.get(..16).unwrap_or(&v.source_memory),
                v.dest_memory.get(..16).unwrap_or(&v.dest_memory),
                if v.memory_equal { "EQUAL" } else { "DIFFERENT" }
            );
            let _ = writeln!(
                s,
                "  vCPU digest     source {} / destination {}: {}",
                v.source_vcpus.get(..16).unwrap_or(&v.source_vcpus),
                v.dest_vcpus.get(..16).unwrap_or(&v.dest_vcpus),
                if v.vcpus_equal { "EQUAL" } else { "DIFFERENT" }
            );
            if let (Some(sd), Some(dd)) = (&v.source_disk, &v.dest_disk) {
                let _ = writeln!(
                    s,
                    "  disk digest     source {} / destination {}: {}",
                    sd.get(..16).unwrap_or(sd),
                    dd.get(..16).unwrap_or(dd),
                    if v.disk_equal == Some(true) {
                        "EQUAL"
                    } else {
                        "DIFFERENT"
                    }
                );
            }
        }
        s
    }
}
