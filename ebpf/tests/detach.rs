//! Dropping `VmProbes` leaves nothing attached: no program, link or perf event of ours remains.
//! Alone in its own test binary, so no other test's probes share the process's fds.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{getpid, skip_reason};
use vmig_ebpf::{VmFilter, VmProbes};

/// Kernel ids of the BPF programs this process holds fds for, and the count of its BPF and perf
/// event fds.
fn bpf_fds() -> (BTreeSet<u32>, usize) {
    let mut ids = BTreeSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if !(target.starts_with("anon_inode:bpf") || target == "anon_inode:[perf_event]") {
            continue;
        }
        count += 1;
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().parse().expect("prog_id"));
        }
    }
    (ids, count)
}

fn loaded_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .map(|p| p.id())
        .collect()
}

#[test]
fn dropping_probes_detaches_every_program() {
    if skip_reason("dropping_probes_detaches_every_program").is_some() {
        return;
    }
    let (ids_before, fds_before) = bpf_fds();
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![],
        mem_start: 0x1000,
        mem_len: 0x1000,
    };
    let probes = VmProbes::attach(&filter, true).expect("attach");
    let (ids, fds) = bpf_fds();
    let ours: BTreeSet<u32> = ids.difference(&ids_before).copied().collect();
    eprintln!(
        "attached: {} programs, {} bpf/perf fds (before: {fds_before})",
        ours.len(),
        fds
    );
    assert_eq!(ours.len(), 10, "one program per tracepoint");
    assert!(ours.is_subset(&loaded_program_ids()));

    drop(probes);
    assert_eq!(
        bpf_fds().1,
        fds_before,
        "every BPF and perf-event fd closed"
    );
    // The kernel frees programs after an RCU grace period: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let still: Vec<u32> = ours.intersection(&loaded_program_ids()).copied().collect();
        if still.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs still loaded after drop: {still:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
