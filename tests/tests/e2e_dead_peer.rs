//! A peer that goes silent (the link between two hosts cut, packets lost without a reset) is
//! reported within seconds in every phase, by name, and the VM stays where it is safe: a
//! pre-copy migration leaves it running on the source; a post-copy one parks, and resumes
//! once the link is back.
//!
//! The two agents run in two network namespaces joined by a veth pair; the cut sets both
//! ends down, so nothing is refused or reset: only silence.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmig_tests::{Cluster, NetnsPair};

/// The most a silent peer may take to be reported (the agent's peer timeout is 5 s).
const REPORT_WITHIN: Duration = Duration::from_secs(15);

const VM: &[&str] = vmig_tests::BUSY_VM;

fn hosts(pair: &NetnsPair) -> Cluster {
    Cluster::new(&[("hostA", pair.agent(0)), ("hostB", pair.agent(1))])
}

fn pair() -> NetnsPair {
    NetnsPair::new().unwrap_or_else(|e| {
        panic!("this test needs network namespaces (root, iproute2, veth): {e}")
    })
}

/// Starts a migration limited to 8 MiB/s, waits until it is under way (in post-copy: until
/// the VM runs on hostB), cuts the link and returns the CLI's output and how long after the
/// cut it ended.
fn cut_during(c: &Cluster, pair: &NetnsPair, extra: &[&str]) -> (vmig_tests::Output, Duration) {
    let mut args = vec!["--bandwidth", "8"];
    args.extend_from_slice(extra);
    let bg = c.spawn_migrate("hostA", "vm1", "hostB", &args);
    c.wait_migrating("hostA", "vm1", Duration::from_secs(30));
    if extra.contains(&"--postcopy") {
        let running = vmig_tests::wait_for(Duration::from_secs(60), || {
            (c.show("hostB", "vm1")?["state"] == "running").then_some(())
        });
        assert!(running.is_some(), "post-copy never started\n{}", c.logs());
    }
    std::thread::sleep(Duration::from_millis(1500));
    pair.cut();
    let t = Instant::now();
    let o = bg.wait(Duration::from_secs(120));
    (o, t.elapsed())
}

#[test]
fn e2e_dead_peer_in_precopy_is_named_within_seconds_and_the_vm_stays() {
    let pair = pair();
    let c = hosts(&pair);
    c.create_vm("hostA", "vm1", VM);
    c.assert_counting("hostA", "vm1", 0);
    let (o, after) = cut_during(&c, &pair, &[]);
    eprintln!("reported {:.1} s after the cut: {o}", after.as_secs_f64());
    assert!(!o.success(), "a migration over a cut link succeeded: {o}");
    assert!(
        o.text().contains("hostB stopped answering"),
        "the error does not name the silent peer: {o}"
    );
    assert!(
        after < REPORT_WITHIN,
        "the silent peer was reported after {after:?}"
    );
    // The VM runs on the source, and the destination (which also lost its peer) dropped
    // what it had staged.
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
}

#[test]
fn e2e_dead_peer_in_postcopy_parks_within_seconds_then_resumes_when_the_link_is_back() {
    let pair = pair();
    let c = hosts(&pair);
    c.create_vm("hostA", "vm1", VM);
    c.assert_counting("hostA", "vm1", 0);
    let (o, after) = cut_during(&c, &pair, &["--postcopy", "always", "--resume-window", "0"]);
    eprintln!("reported {:.1} s after the cut: {o}", after.as_secs_f64());
    assert!(!o.success(), "{o}");
    assert!(o.text().contains("hostB stopped answering"), "{o}");
    assert!(o.text().contains("--resume vm1"), "{o}");
    assert!(after < REPORT_WITHIN, "reported after {after:?}");
    // The link comes back: the resume finishes the migration with every page placed.
    for (ns, dev, _) in &pair.ends {
        let ok = std::process::Command::new("ip")
            .args(["-n", ns, "link", "set", dev, "up"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot bring {dev} up again");
    }
    let o = c.cli_timeout(
        &["--host", "hostA", "migrate", "vm1", "--resume", "--json"],
        Duration::from_secs(180),
    );
    assert!(o.success(), "resume failed: {o}\n{}", c.logs());
    let r: Value = serde_json::from_str(&o.stdout).expect("a JSON report");
    assert_eq!(r["postcopy"]["interruptions"], 1, "{r:#}");
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}
