//! The operator's contract: every knob is range-checked with the valid range in the error (and
//! a bad one never wedges the VM), agents refuse to share a name or a datastore, the hosts
//! file is checked at start, listings say which agents did not answer, VM names are unique
//! across hosts, `--json` failures are JSON, a migration can be watched with
//! `migrate --status`, and a post-copy cannot be "cancelled" into two copies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;
use vmig_tests::{wait_for, AgentOpts, Cluster, BUSY_VM};

const COUNTER_VM: &[&str] = &["--memory-mib", "64", "--workload", "counter"];

fn two() -> Cluster {
    Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())])
}

/// One raw control-socket request, as any client could send it (no CLI checks on the way).
fn raw_request(c: &Cluster, host: &str, req: &Value) -> Value {
    let mut s = UnixStream::connect(c.dir().join("run").join(format!("{host}.sock"))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn e2e_bad_knobs_are_refused_with_their_range_and_the_vm_keeps_migrating() {
    let c = two();
    c.create_vm("hostA", "vm1", COUNTER_VM);
    c.assert_counting("hostA", "vm1", 0);
    for (flag, value) in [
        ("--bandwidth", "0"),
        ("--bandwidth", "-5"),
        ("--bandwidth", "NaN"),
        ("--converge-threshold", "NaN"),
        ("--converge-threshold", "-1"),
        ("--max-rounds", "0"),
        ("--max-downtime", "0"),
        ("--timeout", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let o = c.migrate_raw("hostA", "vm1", "hostB", &[&arg]);
        assert!(!o.success(), "{arg} accepted: {o}");
        assert!(
            o.stderr.contains(flag.trim_start_matches("--"))
                && (o.stderr.contains(" from ") || o.stderr.contains("..=")),
            "{arg}: the error does not give the valid range: {o}"
        );
    }
    // The agent checks the same ranges whoever asks: a raw request with a zero bandwidth (it
    // used to panic the migration thread and leave the VM 'migrating' for good).
    let mut opts = serde_json::to_value(vmig::migrate::MigrateOptions::default()).unwrap();
    opts["bandwidth_mibs"] = 0.0.into();
    let reply = raw_request(
        &c,
        "hostA",
        &serde_json::json!({"op": "migrate", "name": "vm1", "dest": "hostB", "opts": opts}),
    );
    let err = reply["error"].as_str().unwrap_or_default();
    assert!(err.contains("bandwidth") && err.contains("from"), "{reply}");
    // Nothing is wedged: the VM still runs here, and migrates.
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    let r = c.migrate("hostA", "vm1", "hostB", &["--bandwidth", "200"]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}

#[test]
fn e2e_bad_definitions_name_the_valid_range() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    for (args, why) in [
        (vec!["vm1", "--vcpus", "0"], "vCPUs: use 1 to"),
        (vec!["vm1", "--disk-mib", "0"], "use 1 to 1048576 MiB"),
        (vec!["--", "-vm"], "starting with a letter or digit"),
    ] {
        let mut a = vec!["--host", "hostA", "vm", "create"];
        a.extend(args.iter());
        let o = c.fails(&a);
        assert!(o.stderr.contains(why), "{args:?}: {o}");
    }
}

#[test]
fn e2e_a_second_agent_with_the_same_name_or_datastore_is_refused() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    c.create_vm("hostA", "vm1", COUNTER_VM);
    let port = vmig::api::local::free_port().unwrap();
    let other = c.dir().join("other");
    let ds = c.datastore("hostA");
    let listen = format!("127.0.0.1:{port}");
    for (name, store, what) in [
        ("hostA", other.to_str().unwrap(), "agent name"),
        ("hostZ", ds.to_str().unwrap(), "datastore"),
    ] {
        let o = c.cli_timeout(
            &[
                "agent",
                "--name",
                name,
                "--datastore",
                store,
                "--listen",
                &listen,
            ],
            Duration::from_secs(20),
        );
        assert!(
            o.status.is_some() && !o.success(),
            "a second agent ran: {o}"
        );
        assert!(
            o.stderr.contains(what) && o.stderr.contains("pid"),
            "the refusal does not say what is held and by whom: {o}"
        );
    }
    // The first agent still owns its VM and answers.
    c.assert_counting("hostA", "vm1", 0);
}

#[test]
fn e2e_a_hosts_file_entry_without_a_port_is_refused_at_start() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    let hosts = c.dir().join("bad-hosts.toml");
    std::fs::write(&hosts, "hostA = \"127.0.0.1:7401\"\nhostB = \"10.0.0.2\"\n").unwrap();
    let port = vmig::api::local::free_port().unwrap();
    let o = c.cli_timeout(
        &[
            "agent",
            "--name",
            "hostQ",
            "--datastore",
            c.dir().join("q").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--hosts",
            hosts.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(o.status.is_some() && !o.success(), "{o}");
    assert!(
        o.stderr.contains("hostB") && o.stderr.contains("no port"),
        "{o}"
    );
}

#[test]
fn e2e_vm_list_lists_what_answers_and_names_what_does_not() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    c.create_vm("hostA", "vm1", COUNTER_VM);
    // A socket left by an agent that died: nobody listens on it.
    let stale = c.dir().join("run").join("ghost.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = c.ok(&["vm", "list"]);
    assert!(o.stdout.contains("vm1"), "{o}");
    assert!(
        o.stderr.contains("ghost"),
        "the silent agent is not named: {o}"
    );
    // No agent at all is an error, not an empty table.
    let empty = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(vmig_tests::vmig_bin())
        .args(["vm", "list"])
        .env("VMIG_RUN_DIR", empty.path())
        .output()
        .unwrap();
    assert!(!o.status.success(), "vm list with no agent exited 0");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no agent"));
}

#[test]
fn e2e_vm_names_are_unique_across_hosts() {
    let c = two();
    c.create_vm("hostA", "vm1", COUNTER_VM);
    let o = c.fails(&[
        "--host",
        "hostB",
        "vm",
        "create",
        "vm1",
        "--memory-mib",
        "64",
    ]);
    assert!(
        o.stderr.contains("already exists on hostA"),
        "the duplicate name is not refused with its host: {o}"
    );
}

#[test]
fn e2e_json_failures_are_json_and_status_follows_a_migration() {
    let c = two();
    c.create_vm("hostA", "vm1", BUSY_VM);
    c.assert_counting("hostA", "vm1", 0);
    let o = c.migrate_raw("hostA", "vm1", "hostZ", &[]);
    let v: Value = serde_json::from_str(&o.stdout).expect("a JSON error object on stdout");
    assert!(v["error"].as_str().unwrap_or("").contains("hostZ"), "{v}");
    let no = c.fails(&["--host", "hostA", "migrate", "vm1", "--status"]);
    assert!(no.stderr.contains("no migration"), "{no}");

    let bg = c.spawn_migrate("hostA", "vm1", "hostB", &["--bandwidth", "16"]);
    let active = wait_for(Duration::from_secs(60), || {
        let o = c.cli(&["--host", "hostA", "migrate", "vm1", "--status", "--json"]);
        let s: Value = serde_json::from_str(&o.stdout).ok()?;
        (s["status"] == "active" && s["ram"]["transferred"].as_u64()? > 0).then_some(s)
    })
    .expect("an active status with bytes transferred");
    assert_eq!(active["ram"]["total"], 256u64 << 20, "{active:#}");
    for k in ["total-time", "setup-time", "expected-downtime"] {
        assert!(active[k].is_u64(), "{k} missing: {active:#}");
    }
    for k in [
        "remaining",
        "duplicate",
        "normal",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
    ] {
        assert!(!active["ram"][k].is_null(), "ram.{k} missing: {active:#}");
    }
    let text = c.ok(&["--host", "hostA", "migrate", "vm1", "--status"]);
    assert!(
        text.stdout.contains("ETA") && text.stdout.contains("elapsed"),
        "{text}"
    );
    let o = bg.wait(Duration::from_secs(180));
    assert!(o.success(), "{o}\n{}", c.logs());
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    let done = c.json(&["--host", "hostA", "migrate", "vm1", "--status", "--json"]);
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["downtime"], r["downtime_ms"], "{done:#}");
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}

#[test]
fn e2e_post_copy_cannot_be_cancelled_into_two_copies() {
    let c = two();
    c.create_vm("hostA", "vm1", BUSY_VM);
    c.assert_counting("hostA", "vm1", 0);
    let bg = c.spawn_migrate(
        "hostA",
        "vm1",
        "hostB",
        &["--bandwidth", "16", "--postcopy", "always"],
    );
    let running = wait_for(Duration::from_secs(90), || {
        (c.show("hostB", "vm1")?["state"] == "running").then_some(())
    });
    assert!(running.is_some(), "post-copy never started\n{}", c.logs());
    let o = c.fails(&["--host", "hostA", "migrate", "--cancel", "vm1"]);
    assert!(o.stderr.contains("cannot be cancelled"), "{o}");
    let o = bg.wait(Duration::from_secs(180));
    assert!(
        o.success(),
        "the post-copy did not complete after the refused cancel: {o}\n{}",
        c.logs()
    );
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(r["mode"], "post-copy", "{r:#}");
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}
