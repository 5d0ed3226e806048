//! Faults of the VMM process on guest memory, and their resolution by userfaultfd (post-copy).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{getpid, gettid, skip_reason, Mapping};
use vmig_ebpf::{Event, VmFilter, VmProbes};

const PAGE: usize = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Writes one byte into each of `pages` pages of `base` from a new thread; returns its tid.
fn touch_from_thread(base: u64, pages: usize) -> u32 {
    std::thread::spawn(move || {
        for i in 0..pages {
            let p = (base as usize + i * PAGE) as *mut u8;
            // SAFETY: the caller's mapping covers `pages` pages from `base` and outlives the thread
            // (it is joined below); volatile so every page is really touched.
            unsafe { p.write_volatile(0xA5) };
        }
        gettid()
    })
    .join()
    .expect("toucher thread")
}

#[test]
fn first_touch_of_guest_memory_is_seen_with_its_address() {
    if skip_reason("first_touch_of_guest_memory_is_seen_with_its_address").is_some() {
        return;
    }
    let rt = runtime();
    let _enter = rt.enter();
    const PAGES: usize = 16;
    let guest = Mapping::new(64 * PAGE);
    let outside = Mapping::new(64 * PAGE);
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![],
        mem_start: guest.addr(),
        mem_len: guest.len as u64,
    };
    let mut probes = VmProbes::attach(&filter, true).expect("attach");
    let mut events = probes.event_stream().expect("event stream");

    let tid = touch_from_thread(guest.addr(), PAGES);
    touch_from_thread(outside.addr(), PAGES);

    let c = probes.counters().expect("counters");
    let faults: Vec<(u32, u64, Option<u32>)> = events
        .drain()
        .into_iter()
        .filter_map(|e| match e {
            Event::UserFault {
                tid,
                addr,
                vcpu,
                kernel_mode: false,
                ..
            } => Some((tid, addr, vcpu)),
            _ => None,
        })
        .collect();
    eprintln!(
        "touched {PAGES} pages: {} user faults counted, {} fault events",
        c.user_faults,
        faults.len()
    );
    let expected: BTreeSet<u64> = (0..PAGES)
        .map(|i| guest.addr() + (i * PAGE) as u64)
        .collect();
    let seen: BTreeSet<u64> = faults.iter().map(|&(_, addr, _)| addr).collect();
    assert_eq!(
        seen, expected,
        "one fault per touched page, none outside the range"
    );
    assert!(faults
        .iter()
        .all(|&(t, _, vcpu)| t == tid && vcpu.is_none()));
    assert_eq!(c.user_faults, faults.len() as u64);
    assert_eq!((c.user_faults_resolved, c.uffd_ioctls), (0, 0));
}

#[test]
fn userfaultfd_copy_resolves_faults_with_their_wait_time() {
    if skip_reason("userfaultfd_copy_resolves_faults_with_their_wait_time").is_some() {
        return;
    }
    let rt = runtime();
    const PAGES: usize = 8;
    const SERVE_DELAY: Duration = Duration::from_millis(5);
    let guest = Mapping::new(PAGES * PAGE);
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(true)
        .create()
        .expect("userfaultfd");
    uffd.register(guest.ptr.as_ptr().cast(), guest.len)
        .expect("UFFDIO_REGISTER");
    let filter = VmFilter {
        pid: getpid(),
        vcpu_tids: vec![],
        mem_start: guest.addr(),
        mem_len: guest.len as u64,
    };
    let mut probes = {
        let _enter = rt.enter();
        VmProbes::attach(&filter, true).expect("attach")
    };
    let mut events = {
        let _enter = rt.enter();
        probes.event_stream().expect("event stream")
    };

    // The "vCPU" thread faults on every page; this thread serves each fault after a delay, the
    // first with UFFDIO_ZEROPAGE and the rest with UFFDIO_COPY.
    let base = guest.addr();
    let toucher = std::thread::spawn(move || touch_from_thread(base, PAGES));
    let source = vec![0x5Au8; PAGE];
    for i in 0..PAGES {
        let addr = match uffd.read_event().expect("read uffd event") {
            Some(userfaultfd::Event::Pagefault { addr, .. }) => addr as usize & !(PAGE - 1),
            other => panic!("unexpected uffd event {other:?}"),
        };
        std::thread::sleep(SERVE_DELAY);
        if i == 0 {
            // SAFETY: addr is one page inside the registered range, which is mapped.
            unsafe { uffd.zeropage(addr as *mut _, PAGE, true) }.expect("UFFDIO_ZEROPAGE");
        } else {
            // SAFETY: source is a live PAGE-byte buffer; addr is one page inside the registered
            // range, which is mapped.
            unsafe { uffd.copy(source.as_ptr().cast(), addr as *mut _, PAGE, true) }
                .expect("UFFDIO_COPY");
        }
    }
    let tid = toucher.join().expect("toucher");

    // The async reader sees the same events.
    let mut resolved = Vec::new();
    rt.block_on(async {
        while resolved.len() < PAGES {
            let e = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("events within 5 s")
                .expect("event");
            if let Event::UserFaultResolved {
                tid: t,
                addr,
                latency_ns,
                ..
            } = e
            {
                assert_eq!(t, tid, "resolution names the faulting thread");
                resolved.push((addr, latency_ns));
            }
        }
    });
    let c = probes.counters().expect("counters");
    eprintln!(
        "{PAGES} faults served after {SERVE_DELAY:?}: faults {}, resolved {}, uffd ioctls {}, \
         mean wait {} us, latencies (us) {:?}",
        c.user_faults,
        c.user_faults_resolved,
        c.uffd_ioctls,
        c.user_fault_wait_ns / c.user_faults_resolved.max(1) / 1000,
        resolved.iter().map(|&(_, l)| l / 1000).collect::<Vec<_>>()
    );
    let pages: BTreeSet<u64> = resolved.iter().map(|&(a, _)| a).collect();
    let expected: BTreeSet<u64> = (0..PAGES)
        .map(|i| guest.addr() + (i * PAGE) as u64)
        .collect();
    assert_eq!(pages, expected);
    assert!(resolved
        .iter()
        .all(|&(_, l)| l >= SERVE_DELAY.as_nanos() as u64));
    assert!(resolved
        .iter()
        .all(|&(_, l)| l < Duration::from_secs(5).as_nanos() as u64));
    assert_eq!(
        (c.user_faults, c.user_faults_resolved, c.uffd_ioctls),
        (PAGES as u64, PAGES as u64, PAGES as u64)
    );
}
