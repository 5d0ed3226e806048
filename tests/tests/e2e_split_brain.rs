//! Split brain after a rollback: every VM carries an ownership generation, moved at commit
//! (the destination's copy is the source's + 1) and bumped by `migrate --rollback` above
//! anything the destination could hold, so that the copy a destination kept of an
//! interrupted post-copy is fenced once the source took the VM back: listed `fenced` (with
//! the host holding the newer copy), refused by `vm start`, until `vm destroy` removes it.

use std::time::Duration;

use serde_json::Value;
use vmig_tests::{wait_for, AgentOpts, Cluster};

/// 2 vCPUs: one rewrites a 16 MiB working set flat out, one runs the self-checking counter.
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

/// The ownership generation `vm show --json` reports (0 when the field is absent).
fn generation(show: &Value) -> u64 {
    show["def"]["generation"].as_u64().unwrap_or(0)
}

/// hostB's `vm list --json` entry of `vm`.
fn listed(c: &Cluster, host: &str, vm: &str) -> Value {
    let l = c.json(&["--host", host, "vm", "list", "--json"]);
    l.as_array()
        .expect("a list")
        .iter()
        .find(|e| e["vm"]["def"]["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not listed on {host}: {l:#}"))["vm"]
        .clone()
}

/// What a fenced copy on `host` must show: `fenced` in `vm list` and `vm show`, naming
/// `holder`; `vm start` refused, naming `holder` and the way out.
fn assert_fenced(c: &Cluster, host: &str, vm: &str, holder: &str) {
    let l = listed(c, host, vm);
    assert_eq!(l["state"], "fenced", "{vm} on {host}: {l:#}\n{}", c.logs());
    let note = l["note"].as_str().unwrap_or("");
    assert!(note.contains(holder), "the note names {holder}: {l:#}");
    let s = c.show(host, vm).expect("the fenced copy shows");
    assert_eq!(s["state"], "fenced", "{s:#}");
    let o = c.fails(&["--host", host, "vm", "start", vm]);
    let t = o.text();
    assert!(
        t.contains(holder) && t.contains("vm destroy"),
        "the refusal names {holder} and `vm destroy`: {o}"
    );
    let s = c.show(host, vm).expect("still there");
    assert_eq!(s["state"], "fenced", "the refused start ran it: {s:#}");
}

/// The scenario of the split-brain issue: `--postcopy always`, the destination agent killed
/// during post-copy, `--rollback` on the source, the destination restarted: its stale copy
/// is fenced (listed as such, refused at start) while the VM runs on, on hostA.
#[test]
fn e2e_rollback_after_destination_killed_in_postcopy_fences_its_copy() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    c.create_vm("hostA", "vm1", HOT);
    c.assert_counting("hostA", "vm1", 0);
    let g0 = generation(&c.show("hostA", "vm1").expect("vm1 on hostA"));
    // 5 MiB/s: the push of the ~16 MiB dirtied since round 1 takes seconds.
    let bg = c.spawn_migrate(
        "hostA",
        "vm1",
        "hostB",
        &[
            "--bandwidth",
            "5",
            "--postcopy",
            "always",
            "--resume-window",
            "0",
        ],
    );
    // hostB registers and runs vm1 at the post-copy commit: kill it then.
    let running = wait_for(Duration::from_secs(90), || {
        c.show("hostB", "vm1").filter(|s| s["state"] == "running")
    });
    assert!(running.is_some(), "vm1 never ran on hostB\n{}", c.logs());
    c.kill("hostB");
    let o = bg.wait(Duration::from_secs(60));
    eprintln!("{o}");
    assert!(
        o.status.is_some() && !o.success(),
        "post-copy ended before the kill: {o}\n{}",
        c.logs()
    );
    assert!(o.text().contains("--rollback vm1"), "{o}");

    let o = c.ok(&["--host", "hostA", "migrate", "vm1", "--rollback"]);
    assert!(o.text().contains("runs here again"), "{o}");
    let a = c.show("hostA", "vm1").expect("vm1 on hostA");
    assert_eq!(a["state"], "running", "{a:#}");
    assert_eq!(
        generation(&a),
        g0 + 2,
        "the rollback bumps the generation above hostB's g+1: {a:#}"
    );
    let at_rollback = vmig_tests::counter_of(&a).0;
    c.assert_counting("hostA", "vm1", at_rollback);

    // hostB comes back with the copy it registered at the commit: fenced, not startable.
    c.restart("hostB");
    let b = c.show("hostB", "vm1").expect("hostB kept its copy");
    assert_eq!(generation(&b), g0 + 1, "hostB's copy: {b:#}");
    assert_fenced(&c, "hostB", "vm1", "hostA");
    let after = c.assert_counting("hostA", "vm1", at_rollback);

    // Still fenced after another restart of hostB (the fence is persisted).
    c.restart("hostB");
    assert_fenced(&c, "hostB", "vm1", "hostA");

    // The way out the refusal names: destroy the stale copy; then vm1 migrates to hostB
    // again, with the next generation.
    c.ok(&["--host", "hostB", "vm", "destroy", "vm1"]);
    c.assert_clean("vm1", "hostB");
    let r = c.migrate("hostA", "vm1", "hostB", &[]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    let b = c.show("hostB", "vm1").expect("vm1 on hostB");
    assert_eq!(generation(&b), g0 + 3, "{b:#}");
    c.assert_counting("hostB", "vm1", after);
}

/// The destination still runs when the source gives the post-copy up (its connection was
/// cut, not its agent killed): the rollback tells it, and its copy is stopped and fenced at
/// once, so that two copies never run.
#[test]
fn e2e_rollback_fences_a_reachable_destinations_copy_at_once() {
    let c = Cluster::new(&[
        ("hostA", AgentOpts::injecting("cut-postcopy")),
        ("hostB", AgentOpts::new()),
    ]);
    c.create_vm("hostA", "vm1", HOT);
    c.assert_counting("hostA", "vm1", 0);
    let o = c.migrate_raw(
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
    );
    assert!(!o.success(), "the cut migration reported success: {o}");
    let b = c.show("hostB", "vm1").expect("vm1 runs on hostB");
    assert_eq!(b["state"], "running", "{b:#}");
    let o = c.ok(&["--host", "hostA", "migrate", "vm1", "--rollback"]);
    assert!(
        o.text().contains("fenced"),
        "the rollback says hostB was told: {o}"
    );
    let a = c.show("hostA", "vm1").expect("vm1 on hostA");
    assert_eq!(a["state"], "running", "{a:#}");
    assert_fenced(&c, "hostB", "vm1", "hostA");
    let b = c.show("hostB", "vm1").expect("vm1 on hostB");
    assert!(b["stats"].is_null(), "the fenced copy still runs: {b:#}");
    c.assert_counting("hostA", "vm1", vmig_tests::counter_of(&a).0);
}
