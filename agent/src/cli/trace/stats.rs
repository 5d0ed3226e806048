//! The trace's figures: deltas, rates, 2 MiB regions, percentiles.

use super::*;

pub(super) fn rate(delta: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        delta as f64 / s
    }
}

/// `cur - prev` of every counter (saturating: a counter never goes back, but be safe).
pub(super) fn counter_delta(prev: &Counters, cur: &Counters) -> Counters {
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
pub(super) fn top_n<K: Copy + Ord>(
    counts: impl IntoIterator<Item = (K, u64)>,
    n: usize,
) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = counts.into_iter().filter(|&(_, c)| c > 0).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// 2 MiB guest-physical region index of a guest-physical address.
pub(super) fn region_of_gpa(gpa: u64) -> u64 {
    gpa >> REGION_SHIFT
}

/// Guest-physical address of a host-virtual address inside guest memory (the VM has one memory
/// slot, at GPA 0, backed by `[mem_start, mem_start + mem_len)`).
pub(super) fn host_to_gpa(addr: u64, mem_start: u64, mem_len: u64) -> Option<u64> {
    let off = addr.checked_sub(mem_start)?;
    (off < mem_len).then_some(off)
}

/// What touched a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RegionHit {
    DirtyPush,
    KvmFault,
    UserFault,
}

/// The 2 MiB region an event is about, if any. Dirty pushes carry a page offset in their slot:
/// with one slot at GPA 0 that offset is the gfn.
pub(super) fn event_region(e: &Event, mem_start: u64, mem_len: u64) -> Option<(u64, RegionHit)> {
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
pub(super) struct RegionCounts {
    pub(super) dirty_pushes: u64,
    pub(super) kvm_faults: u64,
    pub(super) user_faults: u64,
}

impl RegionCounts {
    fn total(&self) -> u64 {
        self.dirty_pushes + self.kvm_faults + self.user_faults
    }
}

/// Groups events by 2 MiB guest region.
#[cfg(test)]
pub(super) fn group_regions<'a>(
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

pub(super) fn add_region(
    m: &mut HashMap<u64, RegionCounts>,
    e: &Event,
    mem_start: u64,
    mem_len: u64,
) {
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
pub(super) fn top_regions(m: &HashMap<u64, RegionCounts>, n: usize) -> Vec<(u64, RegionCounts)> {
    top_n(m.iter().map(|(&r, c)| (r, c.total())), n)
        .into_iter()
        .map(|(r, _)| (r, m[&r]))
        .collect()
}

/// Latency summary (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Percentiles {
    pub(super) n: usize,
    pub(super) p50: u64,
    pub(super) p99: u64,
    pub(super) max: u64,
}

/// Nearest-rank percentile `p` (0-100] of sorted `v` (non-empty).
pub(super) fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 / p99 / max of `samples` (sorted in place); `None` when empty.
pub(super) fn percentiles(samples: &mut [u64]) -> Option<Percentiles> {
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
