//! `vmig trace VM`: attaches the vmig-ebpf probes to one VM (its VMM process, vCPU threads and
//! guest memory) and shows what the kernel sees, live: per-second rates of dirty-ring pushes,
//! distinct dirty pages, ring-full exits, KVM faults and exits, VMM faults on guest memory and
//! their userfaultfd resolution; the busiest 2 MiB guest regions; and post-copy fault latency.
//!
//! `--events` prints the individual events instead (`--json`: one JSON object per line).
//!
//! Everything that can be computed without a kernel (deltas, rates, region grouping,
//! percentiles, rendering) is a pure function below, unit-tested at the end of the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;
use vmig_ebpf::{exit_reason_name, Counters, Event, EventStream, VmFilter, VmProbes};

use vmig::inventory::{VmInfo, VmState};

/// Guest-physical region size used to group faults and dirty pushes.
const REGION_SHIFT: u32 = 21; // 2 MiB
const PAGE_SHIFT: u32 = 12;
/// Events handled per wake-up before looking at the timers again.
const EVENT_BATCH: usize = 4096;

/// Options of `vmig trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// VM to trace (must be running on a local agent).
    name: String,
    /// Refresh period of the table, ms.
    #[arg(long, default_value_t = 1000)]
    interval: u64,
    /// Print individual events, one line each, instead of the table.
    #[arg(long)]
    events: bool,
    /// JSON lines: one object per event with --events, else one object per interval.
    #[arg(long)]
    json: bool,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Rows of the exit-reason and guest-region tables.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Counters only: attach without the event ring (cheapest; no regions or latencies).
    #[arg(long, conflicts_with = "events")]
    counters_only: bool,
    /// Wait for the VM to be running (e.g. while it is arriving by migration).
    #[arg(long)]
    wait: bool,
}

/// The part of `VmInfo` the probes are filtered on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    pid: u32,
    /// Index = vCPU; 0 = thread not started yet.
    tids: Vec<u32>,
    mem_start: u64,
    mem_len: u64,
}

impl Target {
    fn of(info: &VmInfo) -> Option<Target> {
        let pid = info.pid?;
        let (mem_start, mem_len) = info.memory_range?;
        if info.vcpu_tids.is_empty() {
            return None;
        }
        Some(Target {
            pid,
            tids: info
                .vcpu_tids
                .iter()
                .map(|&t| u32::try_from(t).unwrap_or(0))
                .collect(),
            mem_start,
            mem_len,
        })
    }
}

/// How the VM's identity moved between two looks at it.
#[derive(Debug, PartialEq, Eq)]
enum TidChange {
    Same,
    /// Threads that started since (vCPU index, tid): add them to the filter.
    Started(Vec<(u32, u32)>),
    /// A running thread was replaced or the process/memory changed: this is another VM instance.
    Replaced(String),
}

fn compare_targets(old: &Target, new: &Target) -> TidChange {
    if old.pid != new.pid {
        return TidChange::Replaced(format!("VMM pid {} -> {}", old.pid, new.pid));
    }
    if (old.mem_start, old.mem_len) != (new.mem_start, new.mem_len) {
        return TidChange::Replaced("guest memory mapping changed".into());
    }
    if old.tids.len() != new.tids.len() {
        return TidChange::Replaced(format!(
            "vCPU count {} -> {}",
            old.tids.len(),
            new.tids.len()
        ));
    }
    let mut started = Vec::new();
    for (i, (&o, &n)) in old.tids.iter().zip(&new.tids).enumerate() {
        if o == n {
            continue;
        }
        if o == 0 {
            started.push((i as u32, n));
        } else {
            return TidChange::Replaced(format!("vCPU {i} thread {o} -> {n}"));
        }
    }
    if started.is_empty() {
        TidChange::Same
    } else {
        TidChange::Started(started)
    }
}

// ---------------------------------------------------------------------------------------------
// Pure computations.

/// Per-second rate of `delta` over `elapsed` (0 for an empty interval).
fn rate(delta: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        delta as f64 / s
    }
}

/// `cur - prev` of every counter (saturating: a counter never goes back, but be safe).
fn counter_delta(prev: &Counters, cur: &Counters) -> Counters {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let map_delta = |p: &BTreeMap<u32, u64>, c: &BTreeMap<u32, u64>| {
        c.iter()
            .map(|(k, &v)| (*k, d(p.get(k).copied().unwrap_or(0), v)))
            .filter(|&(_, v)| v > 0)
            .collect::<BTreeMap<u32, u64>>()
    };
    Counters {
        kvm_page_faults: d(prev.kvm_page_faults, cur.kvm_page_faults),
        dirty_ring_pushes: d(prev.dirty_ring_pushes, cur.dirty_ring_pushes),
        dirty_pages_distinct: d(prev.dirty_pages_distinct, cur.dirty_pages_distinct),
        dirty_ring_full: d(prev.dirty_ring_full, cur.dirty_ring_full),
        dirty_ring_resets: d(prev.dirty_ring_resets, cur.dirty_ring_resets),
        user_faults: d(prev.user_faults, cur.user_faults),
        kernel_mode_faults: d(prev.kernel_mode_faults, cur.kernel_mode_faults),
        user_faults_resolved: d(prev.user_faults_resolved, cur.user_faults_resolved),
        user_fault_wait_ns: d(prev.user_fault_wait_ns, cur.user_fault_wait_ns),
        uffd_ioctls: d(prev.uffd_ioctls, cur.uffd_ioctls),
        kvm_exits: d(prev.kvm_exits, cur.kvm_exits),
        emulated_insns: d(prev.emulated_insns, cur.emulated_insns),
        exits_by_reason: map_delta(&prev.exits_by_reason, &cur.exits_by_reason),
        exits_by_vcpu: cur
            .exits_by_vcpu
            .iter()
            .map(|(k, &v)| (*k, d(prev.exits_by_vcpu.get(k).copied().unwrap_or(0), v)))
            .filter(|&(_, v)| v > 0)
            .collect(),
        events_dropped: d(prev.events_dropped, cur.events_dropped),
    }
}

/// The `n` largest entries, largest first (ties: smaller key first).
fn top_n<K: Copy + Ord>(counts: impl IntoIterator<Item = (K, u64)>, n: usize) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = counts.into_iter().filter(|&(_, c)| c > 0).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// 2 MiB guest-physical region index of a guest-physical address.
fn region_of_gpa(gpa: u64) -> u64 {
    gpa >> REGION_SHIFT
}

/// Guest-physical address of a host-virtual address inside guest memory (the VM has one memory
/// slot, at GPA 0, backed by `[mem_start, mem_start + mem_len)`).
fn host_to_gpa(addr: u64, mem_start: u64, mem_len: u64) -> Option<u64> {
    let off = addr.checked_sub(mem_start)?;
    (off < mem_len).then_some(off)
}

/// What touched a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionHit {
    DirtyPush,
    KvmFault,
    UserFault,
}

/// The 2 MiB region an event is about, if any. Dirty pushes carry a page offset in their slot:
/// with one slot at GPA 0 that offset is the gfn.
fn event_region(e: &Event, mem_start: u64, mem_len: u64) -> Option<(u64, RegionHit)> {
    match *e {
        Event::DirtyRingPush { offset, .. } => {
            Some((region_of_gpa(offset << PAGE_SHIFT), RegionHit::DirtyPush))
        }
        Event::KvmPageFault { gpa, .. } => Some((region_of_gpa(gpa), RegionHit::KvmFault)),
        Event::UserFault { addr, .. } => host_to_gpa(addr, mem_start, mem_len)
            .map(|gpa| (region_of_gpa(gpa), RegionHit::UserFault)),
        _ => None,
    }
}

/// Events seen in one 2 MiB region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RegionCounts {
    dirty_pushes: u64,
    kvm_faults: u64,
    user_faults: u64,
}

impl RegionCounts {
    fn total(&self) -> u64 {
        self.dirty_pushes + self.kvm_faults + self.user_faults
    }
}

/// Groups events by 2 MiB guest region.
#[cfg(test)]
fn group_regions<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    mem_start: u64,
    mem_len: u64,
) -> HashMap<u64, RegionCounts> {
    let mut m: HashMap<u64, RegionCounts> = HashMap::new();
    for e in events {
        add_region(&mut m, e, mem_start, mem_len);
    }
    m
}

fn add_region(m: &mut HashMap<u64, RegionCounts>, e: &Event, mem_start: u64, mem_len: u64) {
    if let Some((region, hit)) = event_region(e, mem_start, mem_len) {
        let c = m.entry(region).or_default();
        match hit {
            RegionHit::DirtyPush => c.dirty_pushes += 1,
            RegionHit::KvmFault => c.kvm_faults += 1,
            RegionHit::UserFault => c.user_faults += 1,
        }
    }
}

/// The `n` busiest regions (by events of any kind), busiest first.
fn top_regions(m: &HashMap<u64, RegionCounts>, n: usize) -> Vec<(u64, RegionCounts)> {
    top_n(m.iter().map(|(&r, c)| (r, c.total())), n)
        .into_iter()
        .map(|(r, _)| (r, m[&r]))
        .collect()
}

/// Latency summary (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Percentiles {
    n: usize,
    p50: u64,
    p99: u64,
    max: u64,
}

/// Nearest-rank percentile `p` (0-100] of sorted `v` (non-empty).
fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 / p99 / max of `samples` (sorted in place); `None` when empty.
fn percentiles(samples: &mut [u64]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some(Percentiles {
        n: samples.len(),
        p50: nearest_rank(samples, 50.0),
        p99: nearest_rank(samples, 99.0),
        max: *samples.last().expect("non-empty"),
    })
}

// ---------------------------------------------------------------------------------------------
// Formatting.

/// `1234567` -> `1,234,567`.
fn group_digits(n: u64) -> String {
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

fn fmt_rate(r: f64) -> String {
    group_digits(r.round() as u64)
}

fn fmt_ns(ns: u64) -> String {
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

fn region_range(region: u64) -> String {
    let start = region << REGION_SHIFT;
    format!(
        "0x{:09x}-0x{:09x}",
        start,
        start + (1u64 << REGION_SHIFT) - 1
    )
}

/// One interval's worth of everything the table shows.
#[derive(Debug)]
struct Snapshot {
    vm: String,
    host: String,
    state: VmState,
    dirty_mode: String,
    target: Target,
    /// Since attach.
    since_attach: Duration,
    elapsed: Duration,
    delta: Counters,
    total: Counters,
    /// Growth of the guest's own `dirty_pages_written` report over the interval.
    guest_written: Option<u64>,
    regions: Vec<(u64, RegionCounts)>,
    latency: Option<Percentiles>,
    events_read: Option<u64>,
    top: usize,
}

fn render_table(s: &Snapshot) -> String {
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

fn snapshot_json(s: &Snapshot) -> serde_json::Value {
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

fn vcpu_str(v: Option<u32>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("vcpu{v}"))
}

/// One event as a text line; `base_ns` is the first event's timestamp.
fn event_line(e: &Event, base_ns: u64, mem_start: u64, mem_len: u64) -> String {
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
fn event_json(e: &Event, mem_start: u64, mem_len: u64) -> serde_json::Value {
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

fn summary_line(vm: &str, since: Duration, t: &Counters) -> String {
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

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing if no tracefs is mounted (the library never mounts it).
fn ensure_tracefs() {
    let mounted = [TRACEFS, "/sys/kernel/debug/tracing"]
        .iter()
        .any(|p| Path::new(p).join("events").is_dir());
    if mounted {
        return;
    }
    match std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
    {
        Ok(s) if s.success() => eprintln!("mounted tracefs at {TRACEFS}"),
        // available() then reports NoTracefs with the command to run.
        _ => {}
    }
}

/// BPF program fds this process holds (`anon_inode:bpf-prog`): counts what dropping releases.
fn bpf_prog_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().contains("bpf-prog"))
                .count()
        })
        .unwrap_or(0)
}

fn host_name(sock: &Path) -> String {
    sock.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| sock.display().to_string())
}

/// Output sink: stdout, ending quietly when the reader goes away (`| head`).
struct Out {
    w: std::io::BufWriter<std::io::Stdout>,
    closed: bool,
}

impl Out {
    fn new() -> Self {
        Out {
            w: std::io::BufWriter::with_capacity(1 << 16, std::io::stdout()),
            closed: false,
        }
    }
    fn line(&mut self, s: &str) {
        if !self.closed && writeln!(self.w, "{s}").is_err() {
            self.closed = true;
        }
    }
    fn raw(&mut self, s: &str) {
        if !self.closed && self.w.write_all(s.as_bytes()).is_err() {
            self.closed = true;
        }
    }
    fn flush(&mut self) {
        if !self.closed && self.w.flush().is_err() {
            self.closed = true;
        }
    }
}

/// Why tracing stopped.
enum Stop {
    Duration,
    CtrlC,
    Gone(String),
    OutputClosed,
}

/// Runs `vmig trace`.
pub async fn run(agent: Option<PathBuf>, host: Option<String>, a: TraceArgs) -> Result<()> {
    if a.interval == 0 {
        bail!("--interval must be > 0 ms");
    }
    let sock = super::pick_agent(agent, host, Some(&a.name)).await?;
    let host = host_name(&sock);
    // With --wait, a VM that is not there yet (arriving by migration) or not running is
    // polled for until it runs.
    let (info, target) = loop {
        match super::show(&sock, &a.name).await {
            Ok(i) => match Target::of(&i) {
                Some(t) => break (i, t),
                None if !a.wait => bail!(
                    "{} is {} on {host}: no VMM process or vCPU threads to trace (--wait waits for it)",
                    a.name,
                    i.state
                ),
                None => {}
            },
            Err(e) if !a.wait => return Err(e),
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::signal::ctrl_c() => bail!("interrupted while waiting for {} to run on {host}", a.name),
        }
    };

    ensure_tracefs();
    vmig_ebpf::available()
        .map_err(|e| anyhow!(e))
        .context("kernel-assisted tracing unavailable")?;
    let fds_before = bpf_prog_fds();
    let filter = VmFilter {
        pid: target.pid,
        vcpu_tids: target.tids.clone(),
        mem_start: target.mem_start,
        mem_len: target.mem_len,
    };
    let mut probes = VmProbes::attach(&filter, !a.counters_only)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("attaching the BPF probes to {}", a.name))?;
    // A tid of 0 is a vCPU thread not started yet: attach registered it harmlessly; it is
    // replaced below when it appears. Forget it so that tid 0 (idle) never matches.
    for &t in &target.tids {
        if t == 0 {
            probes.remove_vcpu_tid(0).map_err(|e| anyhow!(e))?;
        }
    }
    let programs = bpf_prog_fds().saturating_sub(fds_before);
    let stream = if a.counters_only {
        None
    } else {
        Some(probes.event_stream().map_err(|e| anyhow!(e))?)
    };
    let json_mode = a.json;
    if !a.events && !json_mode {
        eprintln!(
            "attached {programs} BPF programs to {} on {host} (pid {}, vCPU tids {:?}); Ctrl-C detaches",
            a.name, target.pid, target.tids
        );
    }

    let mut tracer = Tracer {
        args: &a,
        sock: &sock,
        host,
        target,
        state: info.state,
        dirty_mode: info
            .stats
            .as_ref()
            .map(|s| s.dirty_mode.clone())
            .unwrap_or_default(),
        guest_written: info.stats.as_ref().map(|s| s.dirty_pages_written),
        probes,
        stream,
        out: Out::new(),
        tty: std::io::stdout().is_terminal(),
    };
    let started = Instant::now();
    let result = tracer.run_loop(started).await;
    let traced = started.elapsed();
    let total = tracer.probes.counters().ok();
    let Tracer {
        probes,
        stream,
        mut out,
        ..
    } = tracer;
    let fds_attached = bpf_prog_fds();
    drop(stream);
    drop(probes);
    // What dropping the probes released, counted from this process's fds.
    let released = fds_attached.saturating_sub(bpf_prog_fds());
    let stop = result?;
    if let Stop::Gone(why) = &stop {
        out.line(&format!("{}: {why}; detaching", a.name));
    }
    let mut lines = Vec::new();
    if let Some(t) = &total {
        lines.push(summary_line(&a.name, traced, t));
    }
    lines.push(format!("detached: {released} programs released"));
    for l in lines {
        if json_mode || matches!(stop, Stop::OutputClosed) {
            eprintln!("{l}");
        } else {
            out.line(&l);
        }
    }
    out.flush();
    Ok(())
}

struct Tracer<'a> {
    args: &'a TraceArgs,
    sock: &'a Path,
    host: String,
    target: Target,
    state: VmState,
    dirty_mode: String,
    guest_written: Option<u64>,
    probes: VmProbes,
    stream: Option<EventStream>,
    out: Out,
    tty: bool,
}

/// Per-interval accumulation of events.
#[derive(Default)]
struct Window {
    regions: HashMap<u64, RegionCounts>,
    latencies: Vec<u64>,
    events: u64,
}

impl Tracer<'_> {
    async fn run_loop(&mut self, started: Instant) -> Result<Stop> {
        let interval = Duration::from_millis(self.args.interval);
        let deadline = self
            .args
            .duration
            .map(|s| tokio::time::Instant::from_std(started) + Duration::from_secs_f64(s.max(0.0)));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // In --events mode the VM is re-checked every second, independently of --interval.
        let mut check = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut prev = self.probes.counters().map_err(|e| anyhow!(e))?;
        self.probes.start_dirty_window().map_err(|e| anyhow!(e))?;
        let mut last = Instant::now();
        let mut win = Window::default();
        let mut base_ns: Option<u64> = None;
        let mut stream = self.stream.take();
        // Baseline of the guest's own report, taken now rather than before attaching.
        if let Err(stop) = self.recheck().await {
            return Ok(stop);
        }

        let stop = loop {
            let sleep_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let next_event = async {
                match stream.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut ctrl_c => break Stop::CtrlC,
                _ = sleep_deadline => {
                    if !self.args.events && last.elapsed() >= interval / 4 {
                        if let Err(stop) = self.tick(&mut prev, &mut last, &mut win, started, stream.as_mut()).await {
                            break stop;
                        }
                    }
                    break Stop::Duration;
                }
                _ = ticker.tick(), if !self.args.events => {
                    if let Err(stop) = self.tick(&mut prev, &mut last, &mut win, started, stream.as_mut()).await {
                        break stop;
                    }
                }
                _ = check.tick(), if self.args.events => {
                    if let Err(stop) = self.recheck().await {
                        break stop;
                    }
                    self.out.flush();
                }
                ev = next_event => {
                    let Some(first) = ev else {
                        break Stop::Gone("the BPF event ring failed".into());
                    };
                    let s = stream.as_mut().expect("stream");
                    let mut batch = vec![first];
                    while batch.len() < EVENT_BATCH {
                        match s.try_next() {
                            Some(e) => batch.push(e),
                            None => break,
                        }
                    }
                    for e in &batch {
                        self.handle_event(e, &mut win, &mut base_ns);
                    }
                    if self.args.events {
                        self.out.flush();
                    }
                }
            }
            if self.out.closed {
                break Stop::OutputClosed;
            }
        };
        self.stream = stream;
        Ok(stop)
    }

    fn handle_event(&mut self, e: &Event, win: &mut Window, base_ns: &mut Option<u64>) {
        let (start, len) = (self.target.mem_start, self.target.mem_len);
        if self.args.events {
            if self.args.json {
                self.out.line(&event_json(e, start, len).to_string());
            } else {
                let ts = event_ts(e);
                let base = *base_ns.get_or_insert(ts);
                self.out.line(&event_line(e, base, start, len));
            }
            return;
        }
        win.events += 1;
        add_region(&mut win.regions, e, start, len);
        if let Event::UserFaultResolved { latency_ns, .. } = *e {
            win.latencies.push(latency_ns);
        }
    }

    /// Looks at the VM again: `Err` when it is gone or is another instance now.
    async fn recheck(&mut self) -> std::result::Result<Option<u64>, Stop> {
        let info = match super::show(self.sock, &self.args.name).await {
            Ok(i) => i,
            Err(e) => {
                return Err(Stop::Gone(format!(
                    "no longer on {} ({:#}): migrated away or destroyed",
                    self.host, e
                )))
            }
        };
        let Some(new) = Target::of(&info) else {
            return Err(Stop::Gone(format!(
                "now {} on {}: its vCPU threads are gone",
                info.state, self.host
            )));
        };
        match compare_targets(&self.target, &new) {
            TidChange::Same => {}
            TidChange::Started(v) => {
                for (vcpu, tid) in v {
                    self.probes
                        .add_vcpu_tid(tid, vcpu)
                        .map_err(|e| Stop::Gone(format!("cannot add vCPU {vcpu} thread: {e}")))?;
                }
                self.target = new;
            }
            TidChange::Replaced(why) => {
                return Err(Stop::Gone(format!(
                    "vCPU threads changed ({why}): the VM was restarted or migrated"
                )))
            }
        }
        if info.state != self.state {
            self.state = info.state;
        }
        let written = info.stats.as_ref().map(|s| s.dirty_pages_written);
        let grew = match (self.guest_written, written) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        self.guest_written = written;
        Ok(grew)
    }

    async fn tick(
        &mut self,
        prev: &mut Counters,
        last: &mut Instant,
        win: &mut Window,
        started: Instant,
        stream: Option<&mut EventStream>,
    ) -> std::result::Result<(), Stop> {
        // Events already queued belong to this interval.
        if let Some(s) = stream {
            let mut base = None;
            while let Some(e) = s.try_next() {
                self.handle_event(&e, win, &mut base);
            }
        }
        let cur = self
            .probes
            .counters()
            .map_err(|e| Stop::Gone(format!("reading the BPF counters failed: {e}")))?;
        let now = Instant::now();
        // New window for distinct dirty pages right after reading the counter.
        let _ = self.probes.start_dirty_window();
        let elapsed = now - *last;
        *last = now;
        let delta = counter_delta(prev, &cur);
        *prev = cur.clone();
        // A VM that is gone still gets its last interval shown, then the reason.
        let check = self.recheck().await;
        let guest_written = check.as_ref().ok().copied().flatten();
        let w = std::mem::take(win);
        let mut lat = w.latencies;
        let snap = Snapshot {
            vm: self.args.name.clone(),
            host: self.host.clone(),
            state: self.state,
            dirty_mode: self.dirty_mode.clone(),
            target: self.target.clone(),
            since_attach: now - started,
            elapsed,
            delta,
            total: cur,
            guest_written,
            regions: top_regions(&w.regions, self.args.top),
            latency: percentiles(&mut lat),
            events_read: self.stream_present().then_some(w.events),
            top: self.args.top,
        };
        if self.args.json {
            self.out.line(&snapshot_json(&snap).to_string());
        } else if self.tty {
            self.out.raw("\x1b[2J\x1b[H");
            self.out.raw(&render_table(&snap));
        } else {
            self.out.raw(&render_table(&snap));
            self.out.line("");
        }
        self.out.flush();
        check.map(|_| ())
    }

    fn stream_present(&self) -> bool {
        !self.args.counters_only
    }
}

fn event_ts(e: &Event) -> u64 {
    match *e {
        Event::KvmPageFault { ts_ns, .. }
        | Event::DirtyRingPush { ts_ns, .. }
        | Event::DirtyRingFull { ts_ns, .. }
        | Event::DirtyRingReset { ts_ns, .. }
        | Event::UserFault { ts_ns, .. }
        | Event::UserFaultResolved { ts_ns, .. } => ts_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_per_second_and_zero_for_empty_interval() {
        assert_eq!(rate(500, Duration::from_millis(500)), 1000.0);
        assert_eq!(rate(3, Duration::from_secs(2)), 1.5);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
    }

    #[test]
    fn counter_delta_subtracts_every_field_and_maps() {
        let mut a = Counters {
            dirty_ring_pushes: 100,
            dirty_pages_distinct: 10,
            emulated_insns: 7,
            ..Counters::default()
        };
        a.exits_by_reason.insert(30, 5);
        a.exits_by_reason.insert(12, 2);
        let mut b = Counters {
            dirty_ring_pushes: 350,
            dirty_pages_distinct: 60,
            emulated_insns: 7,
            user_faults: 4,
            ..Counters::default()
        };
        b.exits_by_reason.insert(30, 9);
        b.exits_by_reason.insert(12, 2);
        b.exits_by_reason.insert(48, 1);
        b.exits_by_vcpu.insert((1, 48), 1);
        let d = counter_delta(&a, &b);
        assert_eq!(d.dirty_ring_pushes, 250);
        assert_eq!(d.dirty_pages_distinct, 50);
        assert_eq!(d.emulated_insns, 0);
        assert_eq!(d.user_faults, 4);
        assert_eq!(
            d.exits_by_reason.into_iter().collect::<Vec<_>>(),
            vec![(30, 4), (48, 1)]
        );
        assert_eq!(d.exits_by_vcpu.get(&(1, 48)), Some(&1));
        // Never negative.
        assert_eq!(counter_delta(&b, &a).dirty_ring_pushes, 0);
    }

    #[test]
    fn top_n_orders_by_count_then_key_and_drops_zeros() {
        let v = top_n([(3u32, 5u64), (1, 9), (2, 5), (4, 0), (5, 1)], 3);
        assert_eq!(v, vec![(1, 9), (2, 5), (3, 5)]);
        assert!(top_n::<u32>([], 5).is_empty());
    }

    #[test]
    fn regions_are_2mib_of_guest_physical_space() {
        assert_eq!(region_of_gpa(0), 0);
        assert_eq!(region_of_gpa(0x1f_ffff), 0);
        assert_eq!(region_of_gpa(0x20_0000), 1);
        assert_eq!(region_range(1), "0x000200000-0x0003fffff");
        let start = 0x7f00_0000_0000;
        let len = 256 << 20;
        assert_eq!(host_to_gpa(start + 0x30_1000, start, len), Some(0x30_1000));
        assert_eq!(host_to_gpa(start - 1, start, len), None);
        assert_eq!(host_to_gpa(start + len, start, len), None);
    }

    #[test]
    fn events_are_grouped_by_region_and_kind() {
        let start = 0x7f00_0000_0000u64;
        let len = 64u64 << 20;
        let push = |gfn: u64| Event::DirtyRingPush {
            vcpu: 0,
            slot: 0,
            offset: gfn,
            ring_used: 1,
            ts_ns: 0,
        };
        let evs = vec![
            push(0x200), // gpa 0x200000: region 1
            push(0x3ff), // gpa 0x3ff000: region 1
            push(0x400), // region 2
            Event::KvmPageFault {
                vcpu: 1,
                gpa: 0x20_0000,
                error_code: 0,
                ts_ns: 0,
            },
            Event::UserFault {
                tid: 1,
                vcpu: None,
                addr: start + 0x40_0123, // region 2
                error_code: 6,
                kernel_mode: false,
                ts_ns: 0,
            },
            Event::UserFault {
                tid: 1,
                vcpu: None,
                addr: start + len, // outside guest memory: ignored
                error_code: 6,
                kernel_mode: false,
                ts_ns: 0,
            },
            Event::DirtyRingFull { vcpu: 0, ts_ns: 0 },
        ];
        let m = group_regions(&evs, start, len);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[&1],
            RegionCounts {
                dirty_pushes: 2,
                kvm_faults: 1,
                user_faults: 0
            }
        );
        assert_eq!(
            m[&2],
            RegionCounts {
                dirty_pushes: 1,
                kvm_faults: 0,
                user_faults: 1
            }
        );
        let top = top_regions(&m, 1);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, 1);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        assert_eq!(percentiles(&mut []), None);
        let mut one = [42];
        assert_eq!(
            percentiles(&mut one),
            Some(Percentiles {
                n: 1,
                p50: 42,
                p99: 42,
                max: 42
            })
        );
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.n, p.p50, p.p99, p.max), (100, 50, 99, 100));
        let mut v: Vec<u64> = (1..=1000).collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (500, 990, 1000));
        let mut v = vec![5, 1, 1000];
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (5, 1000, 1000));
    }

    #[test]
    fn vcpu_thread_changes_are_classified() {
        let t = |tids: Vec<u32>| Target {
            pid: 10,
            tids,
            mem_start: 0x1000,
            mem_len: 0x1000,
        };
        assert_eq!(
            compare_targets(&t(vec![11, 12]), &t(vec![11, 12])),
            TidChange::Same
        );
        assert_eq!(
            compare_targets(&t(vec![11, 0]), &t(vec![11, 13])),
            TidChange::Started(vec![(1, 13)])
        );
        assert!(matches!(
            compare_targets(&t(vec![11, 12]), &t(vec![11, 14])),
            TidChange::Replaced(_)
        ));
        assert!(matches!(
            compare_targets(&t(vec![11, 12]), &t(vec![11])),
            TidChange::Replaced(_)
        ));
        let mut other = t(vec![11, 12]);
        other.pid = 99;
        assert!(matches!(
            compare_targets(&t(vec![11, 12]), &other),
            TidChange::Replaced(_)
        ));
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(fmt_ns(999), "999 ns");
        assert_eq!(fmt_ns(70_000), "70.0 us");
        assert_eq!(fmt_ns(5_200_000), "5.20 ms");
        let e = Event::DirtyRingPush {
            vcpu: 1,
            slot: 0,
            offset: 0x1234,
            ring_used: 7,
            ts_ns: 2_000_500_000,
        };
        assert_eq!(
            event_line(&e, 1_000_000_000, 0, 0),
            "+1.000500 vcpu1 dirty-push      slot 0 gfn 0x1234 gpa 0x1234000 ring_used 7"
        );
        let j = event_json(&e, 0, 0);
        assert_eq!(j["kind"], "dirty_ring_push");
        assert_eq!(j["gpa"], 0x1234000);
    }

    #[test]
    fn table_renders_rates_regions_and_latency() {
        let mut delta = Counters {
            dirty_ring_pushes: 2000,
            dirty_pages_distinct: 256,
            ..Counters::default()
        };
        delta.exits_by_reason.insert(30, 10);
        let s = Snapshot {
            vm: "vm1".into(),
            host: "hostA".into(),
            state: VmState::Running,
            dirty_mode: "ring".into(),
            target: Target {
                pid: 1,
                tids: vec![2, 3],
                mem_start: 0x1000,
                mem_len: 256 << 20,
            },
            since_attach: Duration::from_secs(2),
            elapsed: Duration::from_secs(2),
            total: delta.clone(),
            delta,
            guest_written: Some(400),
            regions: vec![(
                1,
                RegionCounts {
                    dirty_pushes: 2000,
                    kvm_faults: 0,
                    user_faults: 0,
                },
            )],
            latency: Some(Percentiles {
                n: 3,
                p50: 70_000,
                p99: 5_000_000,
                max: 5_000_000,
            }),
            events_read: Some(2000),
            top: 5,
        };
        let t = render_table(&s);
        assert!(t.contains("dirty-ring pushes"), "{t}");
        assert!(t.contains("1,000"), "{t}");
        assert!(t.contains("IO_INSTRUCTION (30)"), "{t}");
        assert!(t.contains("0x000200000-0x0003fffff"), "{t}");
        assert!(t.contains("p50 70.0 us  p99 5.00 ms"), "{t}");
        assert!(t.contains("1.0 MiB"), "{t}");
        let j = snapshot_json(&s);
        assert_eq!(j["per_s"]["dirty_ring_pushes"], 1000.0);
        assert_eq!(j["dirty_pages_distinct_window"], 256);
    }
}
