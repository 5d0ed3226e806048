//! The trace's rendering: the live table, its JSON, one line (or JSON object) per event.

use super::*;

/// `1234567` -> `1,234,567`.
pub(super) fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    // Digits before the first comma: s.len() % 3 (a comma goes before digit i when the digits
    // left, s.len() - i, are a multiple of 3).
    let lead = s.len() % 3;
    for (i, c) in s.chars().enumerate() {
        if i > 0 && i % 3 == lead {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn fmt_rate(r: f64) -> String {
    group_digits(r.round() as u64)
}

pub(super) fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

pub(super) fn region_range(region: u64) -> String {
    let start = region << REGION_SHIFT;
    format!(
        "0x{:09x}-0x{:09x}",
        start,
        start + (1u64 << REGION_SHIFT) - 1
    )
}

/// One interval's worth of everything the table shows.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) vm: String,
    pub(super) host: String,
    pub(super) state: VmState,
    pub(super) dirty_mode: String,
    pub(super) target: Target,
    /// Since attach.
    pub(super) since_attach: Duration,
    pub(super) elapsed: Duration,
    pub(super) delta: Counters,
    pub(super) total: Counters,
    /// Growth of the guest's own `dirty_pages_written` report over the interval.
    pub(super) guest_written: Option<u64>,
    pub(super) regions: Vec<(u64, RegionCounts)>,
    pub(super) latency: Option<Percentiles>,
    pub(super) events_read: Option<u64>,
    pub(super) top: usize,
}

pub(super) fn render_table(s: &Snapshot) -> String {
    let mut o = String::new();
    let el = s.elapsed;
    let d = &s.delta;
    let t = &s.total;
    let tids: Vec<String> = s.target.tids.iter().map(u32::to_string).collect();
    let _ = writeln!(
        o,
        "vmig trace {} on {}: {} (dirty tracking: {}), pid {}, vCPU tids [{}], guest memory {} MiB at 0x{:x}",
        s.vm,
        s.host,
        s.state,
        s.dirty_mode,
        s.target.pid,
        tids.join(" "),
        s.target.mem_len >> 20,
        s.target.mem_start
    );
    let _ = writeln!(
        o,
        "t = {:.1} s, last {:.2} s",
        s.since_attach.as_secs_f64(),
        el.as_secs_f64()
    );
    let _ = writeln!(o, "{:<42} {:>14} {:>16}", "", "per second", "since attach");
    let mut row = |name: &str, dv: u64, total: u64| {
        let _ = writeln!(
            o,
            "  {:<40} {:>14} {:>16}",
            name,
            fmt_rate(rate(dv, el)),
            group_digits(total)
        );
    };
    row(
        "dirty-ring pushes",
        d.dirty_ring_pushes,
        t.dirty_ring_pushes,
    );
    row(
        "dirty-ring full exits",
        d.dirty_ring_full,
        t.dirty_ring_full,
    );
    row(
        "dirty-ring resets (whole VMM process)",
        d.dirty_ring_resets,
        t.dirty_ring_resets,
    );
    row("KVM page faults", d.kvm_page_faults, t.kvm_page_faults);
    row(
        "user faults (VMM on guest memory)",
        d.user_faults,
        t.user_faults,
    );
    row(
        "  of which kernel-mode",
        d.kernel_mode_faults,
        t.kernel_mode_faults,
    );
    row(
        "user faults resolved (UFFDIO_COPY/ZERO)",
        d.user_faults_resolved,
        t.user_faults_resolved,
    );
    row("uffd copy/zeropage ioctls", d.uffd_ioctls, t.uffd_ioctls);
    row("KVM exits", d.kvm_exits, t.kvm_exits);
    row("emulated instructions", d.emulated_insns, t.emulated_insns);
    let _ = writeln!(
        o,
        "  {:<40} {:>14} {:>16}",
        "distinct dirty pages in this window",
        group_digits(d.dirty_pages_distinct),
        format!(
            "{:.1} MiB",
            (d.dirty_pages_distinct << PAGE_SHIFT) as f64 / 1048576.0
        )
    );
    if let Some(w) = s.guest_written {
        let _ = writeln!(
            o,
            "  {:<40} {:>14}",
            "guest-reported pages written (workload)",
            fmt_rate(rate(w, el))
        );
    }

    if d.dirty_ring_pushes == 0 && s.guest_written.is_some_and(|w| w > 0) {
        let _ = writeln!(
            o,
            "  (the guest writes but KVM pushes nothing: dirty logging is off, no migration is copying yet)"
        );
    }

    let exits = top_n(d.exits_by_reason.iter().map(|(&k, &v)| (k, v)), s.top);
    let _ = writeln!(o, "KVM exits by reason (top {}):", s.top);
    if exits.is_empty() {
        let _ = writeln!(o, "  (none in this interval)");
    }
    for (reason, n) in exits {
        let _ = writeln!(
            o,
            "  {:<40} {:>14}",
            format!("{} ({reason})", exit_reason_name(reason)),
            fmt_rate(rate(n, el))
        );
    }

    match s.events_read {
        None => {
            let _ = writeln!(
                o,
                "guest regions / fault latency: not collected (--counters-only)"
            );
        }
        Some(read) => {
            let _ = writeln!(
                o,
                "top guest regions (2 MiB, GPA), events per second:{:>9} {:>12} {:>12}",
                "dirty", "KVM faults", "user faults"
            );
            if s.regions.is_empty() {
                let _ = writeln!(o, "  (no events in this interval)");
            }
            for (r, c) in &s.regions {
                let _ = writeln!(
                    o,
                    "  {:<48} {:>9} {:>12} {:>12}",
                    region_range(*r),
                    fmt_rate(rate(c.dirty_pushes, el)),
                    fmt_rate(rate(c.kvm_faults, el)),
                    fmt_rate(rate(c.user_faults, el))
                );
            }
            match s.latency {
                Some(p) => {
                    let _ = writeln!(
                        o,
                        "user-fault latency (fault -> resolving ioctl return): n {}  p50 {}  p99 {}  max {}",
                        p.n,
                        fmt_ns(p.p50),
                        fmt_ns(p.p99),
                        fmt_ns(p.max)
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "user-fault latency (fault -> resolving ioctl return): no resolved faults"
                    );
                }
            }
            let _ = writeln!(
                o,
                "events: {} read, {} dropped (ring full; counters above are exact)",
                group_digits(read),
                group_digits(d.events_dropped)
            );
        }
    }
    o
}

pub(super) fn snapshot_json(s: &Snapshot) -> serde_json::Value {
    let el = s.elapsed;
    // Rates rounded to 0.1/s, times to 1 ms: JSON for people and scripts, not float noise.
    let rt = |n: u64| (rate(n, el) * 10.0).round() / 10.0;
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    let d = &s.delta;
    let exits: Vec<_> = top_n(d.exits_by_reason.iter().map(|(&k, &v)| (k, v)), s.top)
        .into_iter()
        .map(|(r, n)| json!({"reason": r, "name": exit_reason_name(r), "per_s": rt(n)}))
        .collect();
    let regions: Vec<_> = s
        .regions
        .iter()
        .map(|(r, c)| {
            json!({
                "gpa_start": r << REGION_SHIFT,
                "dirty_pushes": c.dirty_pushes,
                "kvm_faults": c.kvm_faults,
                "user_faults": c.user_faults,
            })
        })
        .collect();
    json!({
        "vm": s.vm,
        "host": s.host,
        "state": s.state,
        "t_s": ms(s.since_attach),
        "interval_s": ms(el),
        "per_s": {
            "dirty_ring_pushes": rt(d.dirty_ring_pushes),
            "dirty_ring_full": rt(d.dirty_ring_full),
            "dirty_ring_resets": rt(d.dirty_ring_resets),
            "kvm_page_faults": rt(d.kvm_page_faults),
            "user_faults": rt(d.user_faults),
            "user_faults_resolved": rt(d.user_faults_resolved),
            "uffd_ioctls": rt(d.uffd_ioctls),
            "kvm_exits": rt(d.kvm_exits),
            "emulated_insns": rt(d.emulated_insns),
            "guest_pages_written": s.guest_written.map(rt),
        },
        "dirty_pages_distinct_window": d.dirty_pages_distinct,
        "exits_top": exits,
        "regions_top": regions,
        "user_fault_latency_ns": s.latency.map(|p| json!({"n": p.n, "p50": p.p50, "p99": p.p99, "max": p.max})),
        "events_read": s.events_read,
        "events_dropped": d.events_dropped,
    })
}

pub(super) fn vcpu_str(v: Option<u32>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("vcpu{v}"))
}

/// One event as a text line; `base_ns` is the first event's timestamp.
pub(super) fn event_line(e: &Event, base_ns: u64, mem_start: u64, mem_len: u64) -> String {
    let rel = |ts: u64| {
        let d = ts.saturating_sub(base_ns);
        format!("+{}.{:06}", d / 1_000_000_000, (d % 1_000_000_000) / 1000)
    };
    match *e {
        Event::DirtyRingPush {
            vcpu,
            slot,
            offset,
            ring_used,
            ts_ns,
        } => format!(
            "{} vcpu{vcpu} dirty-push      slot {slot} gfn 0x{offset:x} gpa 0x{:x} ring_used {ring_used}",
            rel(ts_ns),
            offset << PAGE_SHIFT
        ),
        Event::DirtyRingFull { vcpu, ts_ns } => {
            format!("{} vcpu{vcpu} dirty-ring-full", rel(ts_ns))
        }
        Event::DirtyRingReset {
            ring,
            entries,
            ts_ns,
        } => format!(
            "{} ring{ring} dirty-ring-reset entries {entries}",
            rel(ts_ns)
        ),
        Event::KvmPageFault {
            vcpu,
            gpa,
            error_code,
            ts_ns,
        } => format!(
            "{} vcpu{vcpu} kvm-page-fault  gpa 0x{gpa:x} error 0x{error_code:x}",
            rel(ts_ns)
        ),
        Event::UserFault {
            tid,
            vcpu,
            addr,
            error_code,
            kernel_mode,
            ts_ns,
        } => format!(
            "{} {} user-fault      tid {tid} hva 0x{addr:x} gpa {} error 0x{error_code:x}{}",
            rel(ts_ns),
            vcpu_str(vcpu),
            host_to_gpa(addr, mem_start, mem_len)
                .map_or_else(|| "-".into(), |g| format!("0x{g:x}")),
            if kernel_mode { " kernel-mode" } else { "" }
        ),
        Event::UserFaultResolved {
            tid,
            vcpu,
            addr,
            latency_ns,
            ts_ns,
        } => format!(
            "{} {} fault-resolved  tid {tid} hva 0x{addr:x} gpa {} latency {}",
            rel(ts_ns),
            vcpu_str(vcpu),
            host_to_gpa(addr, mem_start, mem_len)
                .map_or_else(|| "-".into(), |g| format!("0x{g:x}")),
            fmt_ns(latency_ns)
        ),
    }
}

/// One event as a JSON object (timestamps are raw CLOCK_MONOTONIC ns).
pub(super) fn event_json(e: &Event, mem_start: u64, mem_len: u64) -> serde_json::Value {
    let gpa = |a: u64| host_to_gpa(a, mem_start, mem_len);
    match *e {
        Event::DirtyRingPush {
            vcpu,
            slot,
            offset,
            ring_used,
            ts_ns,
        } => json!({"kind": "dirty_ring_push", "ts_ns": ts_ns, "vcpu": vcpu, "slot": slot,
                    "gfn": offset, "gpa": offset << PAGE_SHIFT, "ring_used": ring_used}),
        Event::DirtyRingFull { vcpu, ts_ns } => {
            json!({"kind": "dirty_ring_full", "ts_ns": ts_ns, "vcpu": vcpu})
        }
        Event::DirtyRingReset {
            ring,
            entries,
            ts_ns,
        } => json!({"kind": "dirty_ring_reset", "ts_ns": ts_ns, "ring": ring, "entries": entries}),
        Event::KvmPageFault {
            vcpu,
            gpa,
            error_code,
            ts_ns,
        } => json!({"kind": "kvm_page_fault", "ts_ns": ts_ns, "vcpu": vcpu, "gpa": gpa,
                    "error_code": error_code}),
        Event::UserFault {
            tid,
            vcpu,
            addr,
            error_code,
            kernel_mode,
            ts_ns,
        } => json!({"kind": "user_fault", "ts_ns": ts_ns, "tid": tid, "vcpu": vcpu, "hva": addr,
                    "gpa": gpa(addr), "error_code": error_code, "kernel_mode": kernel_mode}),
        Event::UserFaultResolved {
            tid,
            vcpu,
            addr,
            latency_ns,
            ts_ns,
        } => json!({"kind": "user_fault_resolved", "ts_ns": ts_ns, "tid": tid, "vcpu": vcpu,
                    "hva": addr, "gpa": gpa(addr), "latency_ns": latency_ns}),
    }
}

pub(super) fn summary_line(vm: &str, since: Duration, t: &Counters) -> String {
    format!(
        "{vm}: {:.1} s traced: {} dirty-ring pushes, {} ring-full exits, {} KVM page faults, {} user faults ({} resolved), {} KVM exits, {} emulated instructions, {} events dropped",
        since.as_secs_f64(),
        group_digits(t.dirty_ring_pushes),
        group_digits(t.dirty_ring_full),
        group_digits(t.kvm_page_faults),
        group_digits(t.user_faults),
        group_digits(t.user_faults_resolved),
        group_digits(t.kvm_exits),
        group_digits(t.emulated_insns),
        group_digits(t.events_dropped),
    )
}

// ---------------------------------------------------------------------------------------------
// Running it.
