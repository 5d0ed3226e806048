//! Post-copy between two agents (two processes) of real KVM VMs, through the CLI: the
//! controller's switch, and a connection cut in the middle of post-copy, resumed with
//! `vmig migrate --resume` or rolled back with `--rollback` once the destination is lost.

use std::time::Duration;

use serde_json::Value;
use vmig_tests::{AgentOpts, Cluster};

fn two_hosts() -> Cluster {
    Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())])
}

/// Two agents; hostA's outgoing migrations shut their connection down half-way through the
/// post-copy push (once each).
fn two_hosts_cutting_postcopy() -> Cluster {
    Cluster::new(&[
        ("hostA", AgentOpts::injecting("cut-postcopy")),
        ("hostB", AgentOpts::new()),
    ])
}

/// 2 vCPUs: one rewrites a 16 MiB working set flat out, one runs the self-checking counter.
/// The bitmap: a flat-out dirtier can jam the dirty ring on this platform (see the notes).
const HOT: &[&str] = &[
    "--memory-mib",
    "256",
    "--vcpus",
    "2",
    "--workload",
    "dirty,counter",
    "--dirty-mib",
    "16",
    "--dirty-tracking",
    "bitmap",
];

fn postcopy(r: &Value) -> &Value {
    let pc = &r["postcopy"];
    assert!(pc.is_object(), "no post-copy figures: {r:#}");
    pc
}

/// Every page missing at the switch was placed once, on demand or by the push.
fn assert_all_pages_placed(pc: &Value) {
    let n = |k: &str| {
        pc[k]
            .as_u64()
            .unwrap_or_else(|| panic!("postcopy.{k}: {pc:#}"))
    };
    assert!(n("pages_missing") > 0, "{pc:#}");
    assert_eq!(
        n("pages_demand") + n("pages_pushed"),
        n("pages_missing"),
        "{pc:#}"
    );
}

/// Migrates vm1 from hostA (of [`two_hosts_cutting_postcopy`]) to hostB in post-copy; the
/// connection is shut down half-way through the push, with no reconnect window: the
/// migration parks.
fn cut_postcopy(c: &Cluster) -> vmig_tests::Output {
    c.migrate_raw(
        "hostA",
        "vm1",
        "hostB",
        &[
            "--bandwidth",
            "20",
            "--postcopy",
            "always",
            "--resume-window",
            "0",
        ],
    )
}

/// A guest dirtying faster than a 10 MiB/s link: `--postcopy auto` switches after the
/// minimum rounds, the destination ends with the source's final memory, the counter goes on.
#[test]
fn e2e_postcopy_auto_switches_when_the_guest_outruns_the_link() {
    let c = two_hosts();
    c.create_vm("hostA", "vm1", HOT);
    c.assert_counting("hostA", "vm1", 0);
    let r = c.migrate(
        "hostA",
        "vm1",
        "hostB",
        &["--bandwidth", "10", "--postcopy", "auto"],
    );
    assert_eq!(r["mode"], "post-copy", "{r:#}");
    let decisions = r["decisions"].as_array().expect("decisions");
    assert!(
        decisions
            .iter()
            .any(|d| d["kind"] == "post-copy" && d["round"].as_u64().is_some()),
        "{r:#}"
    );
    assert!(r["rounds"].as_array().expect("rounds").len() >= 3, "{r:#}");
    assert_all_pages_placed(postcopy(&r));
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}

/// Cut the connection half-way through post-copy with no reconnect window: the migration is
/// parked (paused on hostA with its memory, running and waiting on hostB), and
/// `vmig migrate vm1 --resume` finishes it with no page lost.
#[test]
fn e2e_postcopy_link_cut_then_migrate_resume_finishes_it() {
    let c = two_hosts_cutting_postcopy();
    c.create_vm("hostA", "vm1", HOT);
    c.assert_counting("hostA", "vm1", 0);
    let o = cut_postcopy(&c);
    eprintln!("{o}");
    assert!(!o.success(), "the cut migration reported success: {o}");
    assert!(o.text().contains("--resume vm1"), "{o}");
    let a = c.show("hostA", "vm1").expect("vm1 stays on hostA");
    assert_eq!(
        a["state"], "migrating",
        "paused and held for the resume: {a:#}"
    );
    let b = c.show("hostB", "vm1").expect("vm1 runs on hostB");
    assert_eq!(b["state"], "running", "{b:#}");

    let o = c.cli_timeout(
        &["--host", "hostA", "migrate", "vm1", "--resume", "--json"],
        Duration::from_secs(120),
    );
    assert!(o.success(), "resume failed: {o}\n{}", c.logs());
    let r: Value = serde_json::from_str(&o.stdout).expect("JSON report");
    let pc = postcopy(&r);
    assert_eq!(pc["interruptions"], 1, "{r:#}");
    assert_all_pages_placed(pc);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    // Nothing left to resume.
    let again = c.fails(&["--host", "hostA", "migrate", "vm1", "--resume"]);
    assert!(again.text().contains("nothing to resume"), "{again}");
}

/// The destination is lost while the cut post-copy is parked (its VM powered off, then the
/// agent killed): `--resume` fails and says why, and `--rollback` runs the VM on the source
/// again from the switch point (its paused memory); its counter goes on.
#[test]
fn e2e_postcopy_destination_lost_then_rollback_runs_it_on_the_source() {
    let mut c = two_hosts_cutting_postcopy();
    c.create_vm("hostA", "vm1", HOT);
    c.assert_counting("hostA", "vm1", 0);
    let o = cut_postcopy(&c);
    assert!(!o.success(), "{o}");
    let at_switch = vmig_tests::counter_of(&c.show("hostA", "vm1").expect("vm1 on hostA")).0;
    // hostB's operator powers the half-arrived VM off (its faults wait on pages hostB will
    // never get): the stop gives the missing pages up and completes.
    c.ok(&["--host", "hostB", "vm", "stop", "vm1"]);
    let b = c.show("hostB", "vm1").expect("vm1 registered on hostB");
    assert_eq!(b["state"], "stopped", "{b:#}");
    let o = c.fails(&[
        "--host",
        "hostA",
        "migrate",
        "vm1",
        "--resume",
        "--resume-window",
        "0",
    ]);
    assert!(o.text().contains("no post-copy of"), "{o}");
    c.kill("hostB");
    // With hostB gone a resume cannot work, and says so; the VM is still held.
    let o = c.fails(&[
        "--host",
        "hostA",
        "migrate",
        "vm1",
        "--resume",
        "--resume-window",
        "0",
    ]);
    assert!(o.text().contains("interrupted"), "{o}");
    let o = c.ok(&["--host", "hostA", "migrate", "vm1", "--rollback"]);
    assert!(o.text().contains("runs here again"), "{o}");
    let s = c.show("hostA", "vm1").expect("vm1 on hostA");
    assert_eq!(s["state"], "running", "{s:#}");
    c.assert_counting("hostA", "vm1", at_switch);
}
