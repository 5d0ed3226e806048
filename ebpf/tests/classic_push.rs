//! The classic `kvm:kvm_dirty_ring_push` program, forced with `VMIG_EBPF_CLASSIC_PUSH=1` (its own
//! test binary: the variable is process-wide), counts the same as the BTF one.

mod common;

use common::{getpid, gettid, skip_reason, TinyVm, GUEST_MEM};
use vmig_ebpf::{ProbeSet, PushProgram, VmFilter, VmProbes, CLASSIC_PUSH_ENV};

const PAGES: u16 = 200;
const ROUNDS: u16 = 3;

#[test]
fn classic_push_program_counts_the_same() {
    if skip_reason("classic_push_program_counts_the_same").is_some() {
        return;
    }
    std::env::set_var(CLASSIC_PUSH_ENV, "1");
    let mut vm = TinyVm::new(PAGES, ROUNDS, 1024 * 16);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![gettid()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let probes = VmProbes::attach_set(&filter, false, ProbeSet::DirtyRing).expect("attach");
    assert_eq!(probes.push_program(), PushProgram::Classic);
    let report = vm.run();
    let c = probes.counters().expect("counters");
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert_eq!(c.dirty_pages_distinct, u64::from(PAGES));
}
