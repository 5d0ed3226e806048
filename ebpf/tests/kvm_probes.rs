//! The probes against a real KVM VM on the real kernel: a real-mode guest writes one byte into
//! each of N known pages of a slot with a dirty ring, and the counters and events must match what
//! the VMM itself harvests from the ring.

mod common;

use std::collections::BTreeSet;

use common::{getpid, gettid, skip_reason, TinyVm, FIRST_DATA_GPA, GUEST_MEM};
use vmig_ebpf::{exit_reason_name, Event, VmFilter, VmProbes};

/// Pages the guest writes.
const PAGES: u16 = 200;
/// Times the guest writes each page. The guest is emulated on this platform and each emulated
/// write pushes one ring entry, so pushes = PAGES * ROUNDS while distinct pages = PAGES.
const ROUNDS: u16 = 3;
/// A ring that holds every push (1024 entries, soft limit 960 > PAGES * ROUNDS). A smaller ring
/// used to exercise the ring-full path here, but on this platform an emulated guest can push
/// past the ring's size inside one KVM_RUN, and then the ring jams (ring-full exits forever
/// with nothing to harvest): the test hung under load. The ring-full counter is still checked
/// against the VMM's own count (zero here); ring wraps are covered by the agent's
/// `vm::ring_wrap` test with its background harvester.
const RING_BYTES: u32 = 1024 * 16;

/// One VM at a time in this binary: run side by side, the dirty-ring test's own harvest came up
/// short of the pushes the probes counted on KVM's tracepoint (600 counted, 459 harvested, once
/// in a CI run; never alone). Until that is understood, the counts are compared one VM at a
/// time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn dirty_ring_pushes_and_distinct_pages_match_guest_writes() {
    let _serial = serial();
    if skip_reason("dirty_ring_pushes_and_distinct_pages_match_guest_writes").is_some() {
        return;
    }
    let rt = runtime();
    let _enter = rt.enter();
    let mut vm = TinyVm::new(PAGES, ROUNDS, RING_BYTES);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![gettid()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let mut probes = VmProbes::attach(&filter, true).expect("attach");
    let mut events = probes.event_stream().expect("event stream");

    let report = vm.run();
    let c = probes.counters().expect("counters");
    let evs = events.drain();

    let expected: BTreeSet<(u32, u64)> = (0..u64::from(PAGES))
        .map(|i| (0, (FIRST_DATA_GPA >> 12) + i))
        .collect();
    let pushed: Vec<(u32, u64)> = evs
        .iter()
        .filter_map(|e| match *e {
            Event::DirtyRingPush {
                slot, offset, vcpu, ..
            } => {
                assert_eq!(vcpu, 0);
                Some((slot, offset))
            }
            _ => None,
        })
        .collect();
    let full_events = evs
        .iter()
        .filter(|e| matches!(e, Event::DirtyRingFull { .. }))
        .count();
    eprintln!(
        "guest wrote {PAGES} pages; ring {} entries; VMM harvested {} entries ({} distinct), \
         {} ring-full exits, {} resets; probes: {} pushes, {} distinct, {} ring full, {} resets, \
         {} kvm page faults, {} exits {:?}, {} emulated insns; {} events ({} pushes), {} dropped",
        vm.ring_entries(),
        report.harvested.len(),
        report.distinct().len(),
        report.ring_full_exits,
        report.resets,
        c.dirty_ring_pushes,
        c.dirty_pages_distinct,
        c.dirty_ring_full,
        c.dirty_ring_resets,
        c.kvm_page_faults,
        c.kvm_exits,
        c.exits_by_reason
            .iter()
            .map(|(r, n)| (exit_reason_name(*r), *r, *n))
            .collect::<Vec<_>>(),
        c.emulated_insns,
        evs.len(),
        pushed.len(),
        c.events_dropped,
    );

    // The VMM's harvest is the ground truth: it must be exactly the guest's pages.
    assert_eq!(
        report.distinct(),
        expected,
        "the VMM harvested other pages than the guest wrote"
    );
    // Every entry KVM pushed is one the VMM harvested, and vice versa. On this platform the
    // guest is emulated and each emulated write pushes one entry: each page appears ROUNDS
    // times (natively, a page already dirty in the current log would not be pushed again).
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert!(
        c.dirty_ring_pushes >= u64::from(PAGES),
        "at least one push per page"
    );
    assert_eq!(c.dirty_pages_distinct, u64::from(PAGES));
    assert_eq!(
        pushed, report.harvested,
        "push events must list the harvested entries in order"
    );
    assert_eq!(c.dirty_ring_full, report.ring_full_exits);
    assert_eq!(full_events as u64, report.ring_full_exits);
    // Resets are counted per process (KVM_RESET_DIRTY_RINGS runs on any VMM thread), and the
    // other tests of this binary run VMs in this process concurrently.
    assert!(c.dirty_ring_resets >= report.resets);
    assert_eq!(c.events_dropped, 0);

    // A new window counts every page again once it is re-dirtied; an idle window adds nothing.
    probes.start_dirty_window().expect("new window");
    assert_eq!(
        probes.counters().expect("counters").dirty_pages_distinct,
        u64::from(PAGES)
    );
}

#[test]
fn vm_of_another_process_produces_nothing() {
    let _serial = serial();
    if skip_reason("vm_of_another_process_produces_nothing").is_some() {
        return;
    }
    let rt = runtime();
    let _enter = rt.enter();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let mut vm = TinyVm::new(PAGES, 1, 1 << 20);
    // The filter names another process (and its thread) with the same address range: our VM's
    // vCPU thread, our faults and our ring pushes must all be ignored.
    let filter = VmFilter {
        pid: child.id(),
        vcpu_tids: vec![child.id()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let mut probes = VmProbes::attach(&filter, true).expect("attach");
    let mut events = probes.event_stream().expect("event stream");
    let report = vm.run();
    let c = probes.counters().expect("counters");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(report.distinct().len(), usize::from(PAGES));
    assert_eq!(
        c,
        vmig_ebpf::Counters::default(),
        "counters of an unfiltered VM: {c:?}"
    );
    assert_eq!(events.drain(), vec![]);
}

#[test]
fn unregistered_vcpu_thread_is_ignored_until_added() {
    let _serial = serial();
    if skip_reason("unregistered_vcpu_thread_is_ignored_until_added").is_some() {
        return;
    }
    let mut vm = TinyVm::new(PAGES, 1, 1 << 20);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let mut probes = VmProbes::attach(&filter, false).expect("attach");
    assert!(probes.event_stream().is_err(), "no events were asked for");
    probes.add_vcpu_tid(gettid(), 3).expect("add vcpu");
    probes.remove_vcpu_tid(gettid()).expect("remove vcpu");
    let report = vm.run();
    assert_eq!(report.distinct().len(), usize::from(PAGES));
    let c = probes.counters().expect("counters");
    assert_eq!((c.dirty_ring_pushes, c.kvm_exits), (0, 0));

    drop(vm); // TinyVms run one at a time (common::ONE_VM_AT_A_TIME).
    let mut vm = TinyVm::new(PAGES, 1, 1 << 20);
    probes.add_vcpu_tid(gettid(), 3).expect("add vcpu");
    let report = vm.run();
    let c = probes.counters().expect("counters");
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert!(
        c.exits_by_vcpu.keys().all(|&(vcpu, _)| vcpu == 3),
        "{:?}",
        c.exits_by_vcpu
    );
}

#[test]
fn long_mode_guest_exits_and_pushes_are_counted() {
    let _serial = serial();
    if skip_reason("long_mode_guest_exits_and_pushes_are_counted").is_some() {
        return;
    }
    let mut vm = TinyVm::new_long_mode(PAGES, 1 << 20);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![gettid()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let probes = VmProbes::attach(&filter, false).expect("attach");
    let report = vm.run();
    let c = probes.counters().expect("counters");
    eprintln!(
        "long mode: guest wrote {PAGES} pages; VMM harvested {} entries ({} distinct); probes: \
         {} pushes, {} distinct, {} kvm page faults, {} exits {:?}, {} emulated insns",
        report.harvested.len(),
        report.distinct().len(),
        c.dirty_ring_pushes,
        c.dirty_pages_distinct,
        c.kvm_page_faults,
        c.kvm_exits,
        c.exits_by_reason
            .iter()
            .map(|(r, n)| (exit_reason_name(*r), *r, *n))
            .collect::<Vec<_>>(),
        c.emulated_insns,
    );
    // Besides the data pages, the guest's page walks set accessed/dirty bits in its page tables
    // (PML4, PDPT, PD: three more pages, the PD pushed twice), so KVM logs those pages too.
    let data: BTreeSet<(u32, u64)> = (0..u64::from(PAGES))
        .map(|i| (0, (FIRST_DATA_GPA >> 12) + i))
        .collect();
    assert!(report.distinct().is_superset(&data));
    assert!(report.distinct().len() <= usize::from(PAGES) + 3);
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert_eq!(c.dirty_pages_distinct, report.distinct().len() as u64);
    // On this platform (kvm_pvm) the guest runs in KVM's emulator and no kvm_exit fires; where
    // it does, the per-reason table must add up.
    assert_eq!(c.kvm_exits, c.exits_by_reason.values().sum::<u64>());
}

#[test]
fn dirty_ring_set_counts_the_same_pushes_and_nothing_else() {
    let _serial = serial();
    if skip_reason("dirty_ring_set_counts_the_same_pushes_and_nothing_else").is_some() {
        return;
    }
    // A 4 KiB ring jammed here too, in two CI runs out of two on fresh clones (and came up
    // short once: 600 pushes, 459 harvested): the ring of the other tests (see RING_BYTES).
    let mut vm = TinyVm::new(PAGES, ROUNDS, RING_BYTES);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![gettid()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let probes =
        VmProbes::attach_set(&filter, false, vmig_ebpf::ProbeSet::DirtyRing).expect("attach");
    // The BTF tracepoint where it loads (this platform), else the classic one (logged).
    assert_ne!(probes.push_program(), vmig_ebpf::PushProgram::None);
    let report = vm.run();
    let c = probes.counters().expect("counters");
    eprintln!(
        "dirty-ring set ({:?} push program): {} pushes, {} distinct, {} ring full; VMM harvested {}, {} ring-full exits",
        probes.push_program(),
        c.dirty_ring_pushes,
        c.dirty_pages_distinct,
        c.dirty_ring_full,
        report.harvested.len(),
        report.ring_full_exits
    );
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert_eq!(c.dirty_pages_distinct, u64::from(PAGES));
    assert_eq!(c.dirty_ring_full, report.ring_full_exits);
    // The other programs are not attached: their counters stay 0 although the guest ran
    // emulated instructions, reset its rings and touched its memory.
    assert_eq!(
        (
            c.emulated_insns,
            c.dirty_ring_resets,
            c.user_faults,
            c.uffd_ioctls
        ),
        (0, 0, 0, 0)
    );
    assert!(report.resets > 0);
}

/// The push program's vCPU-thread cache holds one tid per slot (tid mod 4096): a vCPU thread
/// whose slot another registered tid took first is still counted (through `vcpu_tids`), and a
/// new window counts every page again.
#[test]
fn colliding_vcpu_tid_and_windows_count_the_same() {
    let _serial = serial();
    if skip_reason("colliding_vcpu_tid_and_windows_count_the_same").is_some() {
        return;
    }
    let mut vm = TinyVm::new(PAGES, ROUNDS, RING_BYTES);
    let filter = VmFilter {
        pid: getpid(),
        // Same cache slot as this thread, registered first: this thread is only in the hash.
        vcpu_tids: vec![gettid() + 4096, gettid()],
        mem_start: vm.host_mem,
        mem_len: GUEST_MEM as u64,
    };
    let mut probes =
        VmProbes::attach_set(&filter, false, vmig_ebpf::ProbeSet::DirtyRing).expect("attach");
    let report = vm.run();
    let c = probes.counters().expect("counters");
    assert_eq!(c.dirty_ring_pushes, report.harvested.len() as u64);
    assert_eq!(c.dirty_pages_distinct, u64::from(PAGES));

    drop(vm); // TinyVms run one at a time (common::ONE_VM_AT_A_TIME).
    let mut vm = TinyVm::new(PAGES, ROUNDS, RING_BYTES);
    probes
        .set_memory_range(vm.host_mem, GUEST_MEM as u64)
        .expect("range");
    // Same pages, same window: nothing new; a new window: every page once more.
    let report = vm.run();
    let c2 = probes.counters().expect("counters");
    assert_eq!(
        c2.dirty_ring_pushes - c.dirty_ring_pushes,
        report.harvested.len() as u64
    );
    assert_eq!(c2.dirty_pages_distinct, c.dirty_pages_distinct);
    drop(vm);
    let mut vm = TinyVm::new(PAGES, ROUNDS, RING_BYTES);
    probes.start_dirty_window().expect("window");
    vm.run();
    let c3 = probes.counters().expect("counters");
    assert_eq!(c3.dirty_pages_distinct, 2 * u64::from(PAGES));
}
