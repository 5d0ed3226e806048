//! The trace's pure functions, without a kernel.

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
