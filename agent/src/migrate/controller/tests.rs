use super::super::KernelRound;
use super::*;

fn round(round: u32, predicted: f64) -> RoundStats {
    RoundStats {
        round,
        predicted_downtime_ms: predicted,
        ..Default::default()
    }
}

#[test]
fn decisions_follow_the_limits() {
    let opts = MigrateOptions {
        max_downtime_ms: 50.0,
        max_rounds: 5,
        timeout_s: 10,
        ..Default::default()
    };
    let mut c = Controller::new(&opts, 10_000, Duration::from_micros(100));
    let d = Duration::from_secs(1);
    assert_eq!(c.decide(&round(1, 80.0), d), Decision::Continue);
    assert!(
        matches!(c.decide(&round(2, 20.0), d), Decision::StopAndCopy(r) if r.cause == Cause::Converged)
    );
    assert!(
        matches!(c.decide(&round(5, 80.0), d), Decision::StopAndCopy(r) if r.cause == Cause::MaxRounds)
    );
    assert!(matches!(
        c.decide(&round(2, 80.0), Duration::from_secs(10)),
        Decision::Abort(_)
    ));
}

#[test]
fn prediction_is_bytes_over_bandwidth_plus_round_trips() {
    let c = Controller::new(&MigrateOptions::default(), 0, Duration::from_millis(1));
    // 256 pages of 4104 wire bytes at 1 MiB/s: ~1002 ms, plus 2 ms of round trips.
    let p = c.predict_ms(256, 1048576.0);
    assert!((p - (256.0 * 4104.0 / 1048576.0 * 1e3 + 2.0)).abs() < 1e-6);
}

#[test]
fn a_round_that_sent_nothing_keeps_the_measured_link_rate() {
    let opts = MigrateOptions {
        bandwidth_mibs: Some(10.0),
        ..Default::default()
    };
    let mut c = Controller::new(&opts, 16_384, Duration::ZERO);
    // Before any measurement: the cap (10 MiB/s), never 1 byte/s.
    let mut idle = RoundStats {
        secs: 0.001,
        ..Default::default()
    };
    c.assess(&mut idle, 0, 0);
    let want = c.predict_ms(0, 10.0 * 1048576.0);
    assert_eq!(idle.predicted_downtime_ms, want);
    assert!(want < 5.0, "{want} ms for 16 KiB of state");
    // A real round measures 100 MiB/s; an empty one after it keeps that rate.
    let mut busy = RoundStats {
        secs: 0.1,
        bytes: 10 << 20,
        bandwidth: 100.0 * 1048576.0,
        dirty_pages: 1000,
        ..Default::default()
    };
    c.assess(&mut busy, 1000, 1000);
    c.assess(&mut idle, 0, 0);
    assert_eq!(
        idle.predicted_downtime_ms,
        c.predict_ms(0, 100.0 * 1048576.0)
    );
}

#[test]
fn the_larger_of_log_and_kernel_counts_wins() {
    let mut c = Controller::new(&MigrateOptions::default(), 0, Duration::ZERO);
    let mut r = RoundStats {
        secs: 0.5,
        bytes: 1 << 20,
        bandwidth: 1048576.0,
        dirty_pages: 100,
        ..Default::default()
    };
    c.assess(&mut r, 100, 100);
    assert_eq!(
        (r.estimate_from, r.dirty_rate),
        (Some(EstimateFrom::Log), 200.0)
    );
    let log_only = r.predicted_downtime_ms;
    assert_eq!(log_only, c.predict_ms(100, 1048576.0));

    r.kernel = Some(KernelRound {
        distinct_pages: 90,
        ..Default::default()
    });
    c.assess(&mut r, 100, 100);
    assert_eq!(r.estimate_from, Some(EstimateFrom::Log));
    assert_eq!(r.predicted_downtime_ms, log_only);

    r.kernel = Some(KernelRound {
        distinct_pages: 150,
        ..Default::default()
    });
    c.assess(&mut r, 110, 110);
    assert_eq!(
        (r.estimate_from, r.dirty_rate),
        (Some(EstimateFrom::Kernel), 300.0)
    );
    assert_eq!(r.predicted_downtime_ms, c.predict_ms(160, 1048576.0));
    assert!((r.dirty_ratio - 300.0 * PAGE_WIRE_BYTES / 1048576.0).abs() < 1e-9);
}

#[test]
fn nothing_left_to_send_ends_pre_copy_per_policy() {
    let opts = MigrateOptions::default();
    let mut c = Controller::new(&opts, 0, Duration::ZERO);
    let mut r = RoundStats {
        round: 2,
        secs: 0.5,
        bandwidth: 1048576.0,
        dirty_pages: 4096,
        held_pages: 4096,
        ..Default::default()
    };
    c.assess(&mut r, 4096, 10);
    assert_eq!(c.decide(&r, Duration::from_secs(1)), Decision::Continue);
    c.assess(&mut r, 4096, 0);
    assert!(matches!(
        c.decide(&r, Duration::from_secs(1)),
        Decision::StopAndCopy(w) if w.cause == Cause::NothingLeft
    ));
}

fn hot(round: u32, dirty: u64, ratio: f64) -> RoundStats {
    RoundStats {
        round,
        dirty_pages: dirty,
        dirty_ratio: ratio,
        predicted_downtime_ms: 500.0,
        ..Default::default()
    }
}

fn run_policy(postcopy: PostcopyPolicy, on: NoConverge) -> Vec<Decision> {
    let opts = MigrateOptions {
        postcopy,
        on_no_converge: on,
        max_rounds: 30,
        ..Default::default()
    };
    let mut c = Controller::new(&opts, 0, Duration::ZERO);
    (1..=9)
        .map(|i| c.decide(&hot(i, 4096, 1.0), Duration::from_secs(1)))
        .collect()
}

#[test]
fn non_convergence_follows_the_policy() {
    let auto = run_policy(PostcopyPolicy::Auto, NoConverge::Force);
    assert_eq!(auto[0], Decision::Continue);
    assert_eq!(auto[1], Decision::Continue);
    assert!(matches!(&auto[2], Decision::Postcopy(w) if w.cause == Cause::DirtyRatio));
    let always = run_policy(PostcopyPolicy::Always, NoConverge::Force);
    assert!(matches!(&always[0], Decision::Postcopy(w) if w.cause == Cause::PolicyAlways));
    let force = run_policy(PostcopyPolicy::Never, NoConverge::Force);
    assert!(matches!(&force[2], Decision::StopAndCopy(_)));
    let abort = run_policy(PostcopyPolicy::Never, NoConverge::Abort);
    assert!(matches!(&abort[2], Decision::Abort(_)));
    let throttle = run_policy(PostcopyPolicy::Never, NoConverge::Throttle);
    // Round 3 throttles to 20 %, then every 2 rounds one step more, then force.
    assert!(matches!(throttle[2], Decision::Throttle { pct: 20, .. }));
    assert_eq!(throttle[3], Decision::Continue);
    assert!(matches!(throttle[4], Decision::Throttle { pct: 40, .. }));
    assert!(matches!(throttle[6], Decision::Throttle { pct: 60, .. }));
    assert!(matches!(throttle[8], Decision::Throttle { pct: 80, .. }));
}

#[test]
fn a_shrinking_dirty_set_is_not_hopeless() {
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        ..Default::default()
    };
    let mut c = Controller::new(&opts, 0, Duration::ZERO);
    let d = Duration::from_secs(1);
    for (i, dirty) in [(1, 10_000), (2, 5000), (3, 2500), (4, 1200)] {
        assert_eq!(c.decide(&hot(i, dirty, 0.5), d), Decision::Continue);
    }
    // Stalls: 1200 -> 1150 -> 1100 is less than 10 % over 2 rounds.
    assert_eq!(c.decide(&hot(5, 1150, 0.5), d), Decision::Continue);
    assert!(
        matches!(c.decide(&hot(6, 1100, 0.5), d), Decision::Postcopy(w) if w.cause == Cause::NoShrink)
    );
}

/// Round `round` of the guest of these tests (8192 pages in the log), `secs` long at `mibs`
/// MiB/s, with the kernel's figures `kernel`: assessed and decided.
fn judged(
    c: &mut Controller,
    round: u32,
    secs: f64,
    mibs: f64,
    kernel: Option<KernelRound>,
) -> Decision {
    let mut r = RoundStats {
        round,
        secs,
        bytes: (mibs * 1048576.0 * secs) as u64,
        bandwidth: mibs * 1048576.0,
        dirty_pages: 8192,
        kernel,
        ..Default::default()
    };
    c.assess(&mut r, 8192, 8192);
    c.decide(&r, Duration::from_secs(u64::from(round) + 1))
}

/// Round 1 of a guest whose kernel-measured rate at the round's end is `rate` pages/s, on
/// a 64 MiB/s link, with 8192 pages in the log.
fn round1(c: &mut Controller, rate: f64, samples: u32) -> Decision {
    let kernel = KernelRound {
        rate_pages_per_s: rate,
        rate_samples: samples,
        distinct_pages: (rate * 0.05) as u64,
        ..Default::default()
    };
    judged(c, 1, 2.0, 64.0, Some(kernel))
}

#[test]
fn the_kernels_rate_judges_after_round_1() {
    // Round 1 ran at the cap: its rate is the link's.
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        bandwidth_mibs: Some(64.0),
        ..Default::default()
    };
    // 64 MiB/s carries ~16,350 pages/s; at 0.8 the threshold is ~13,080 pages/s.
    let mut hot = Controller::new(&opts, 0, Duration::ZERO);
    assert!(matches!(
        round1(&mut hot, 20_000.0, 40),
        Decision::Postcopy(w) if w.cause == Cause::KernelRate
    ));
    // A guest dirtying at 10,000 pages/s converges (slowly): round 1 says nothing.
    let mut warm = Controller::new(&opts, 0, Duration::ZERO);
    assert_eq!(round1(&mut warm, 10_000.0, 40), Decision::Continue);
    // Fewer than two samples: no sustained rate, no judgement.
    let mut short = Controller::new(&opts, 0, Duration::ZERO);
    assert_eq!(round1(&mut short, 20_000.0, 1), Decision::Continue);
    // Turned off.
    let off = MigrateOptions {
        kernel_judge: false,
        ..opts.clone()
    };
    let mut c = Controller::new(&off, 0, Duration::ZERO);
    assert_eq!(round1(&mut c, 20_000.0, 40), Decision::Continue);
    // Throttle instead of post-copy: the first step after round 1.
    let throttle = MigrateOptions {
        on_no_converge: NoConverge::Throttle,
        bandwidth_mibs: Some(64.0),
        ..Default::default()
    };
    let mut c = Controller::new(&throttle, 0, Duration::ZERO);
    assert!(matches!(
        round1(&mut c, 20_000.0, 40),
        Decision::Throttle { pct: 20, .. }
    ));
}

#[test]
fn a_kernel_rate_the_log_contradicts_is_not_trusted() {
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        ..Default::default()
    };
    let mut c = Controller::new(&opts, 0, Duration::ZERO);
    // 400,000 pages/s would be 20,000 pages in one 50 ms sample; the log saw 8192 in the
    // whole round: the two disagree, round 1 is not judged.
    assert_eq!(round1(&mut c, 400_000.0, 40), Decision::Continue);
}

/// Round 2 of the guest of [`round1`], its link rate `mibs` MiB/s.
fn round2(c: &mut Controller, mibs: f64) -> Decision {
    judged(c, 2, 0.5, mibs, None)
}

#[test]
fn without_a_cap_round_1s_link_rate_is_not_the_links_and_round_2_judges() {
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        ..Default::default()
    };
    // 20,000 pages/s against round 1's 64 MiB/s would be hopeless; nothing capped round 1,
    // so its rate says only that the link carries at least that much.
    let mut fast = Controller::new(&opts, 0, Duration::ZERO);
    assert_eq!(round1(&mut fast, 20_000.0, 40), Decision::Continue);
    // Round 2 ran at 1,000 MiB/s: 20,000 pages/s is 0.08 of it, and the 8,192 pages left go
    // in 32 ms: pre-copy converged.
    assert!(matches!(
        round2(&mut fast, 1000.0),
        Decision::StopAndCopy(w) if w.cause == Cause::Converged
    ));
    // Round 2 ran at 64 MiB/s again: the link is that slow, and the kernel's rate judges.
    let mut slow = Controller::new(&opts, 0, Duration::ZERO);
    assert_eq!(round1(&mut slow, 20_000.0, 40), Decision::Continue);
    assert!(matches!(
        round2(&mut slow, 64.0),
        Decision::Postcopy(w) if w.cause == Cause::KernelRate && w.detail.contains("round 2")
    ));
    // A cap round 1 did not reach is not the bound either.
    let capped = MigrateOptions {
        bandwidth_mibs: Some(500.0),
        ..opts.clone()
    };
    let mut c = Controller::new(&capped, 0, Duration::ZERO);
    assert_eq!(round1(&mut c, 20_000.0, 40), Decision::Continue);
}
