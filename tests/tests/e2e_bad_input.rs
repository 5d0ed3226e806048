//! Bad input gets a clear error and changes nothing.

use vmig_tests::{AgentOpts, Cluster};

/// `vm create` refuses bad names and sizes, saying why.
#[test]
fn e2e_vm_create_rejects_bad_definitions() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    for (args, why) in [
        (vec!["bad name!"], "name"),
        (vec!["../escape"], "name"),
        (vec![".hidden"], "name"),
        (vec!["vm1", "--memory-mib", "8"], "memory"),
        (vec!["vm1", "--memory-mib", "513"], "memory"),
        (vec!["vm1", "--vcpus", "9"], "vCPU"),
        (vec!["vm1", "--workload", "mine-bitcoin"], "workload"),
    ] {
        let mut a = vec!["--host", "hostA", "vm", "create"];
        a.extend(args.iter());
        let o = c.fails(&a);
        assert!(
            o.stderr.to_lowercase().contains(&why.to_lowercase()),
            "the error does not say what is wrong ({why}): {o}"
        );
    }
    let list = c.json(&["--host", "hostA", "vm", "list", "--json"]);
    assert_eq!(list, serde_json::json!([]), "a bad definition left a VM");
    let leftovers: Vec<_> = std::fs::read_dir(c.datastore("hostA"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                // The running agent's lock on its datastore is not a VM's leftover.
                .filter(|n| n != ".agent.lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left in the datastore: {leftovers:?}");
    // A duplicate name is refused too.
    c.create_vm(
        "hostA",
        "vm1",
        &["--memory-mib", "64", "--workload", "idle"],
    );
    let dup = c.fails(&["--host", "hostA", "vm", "create", "vm1"]);
    assert!(dup.stderr.contains("already exists"), "{dup}");
}

/// Migrating to a host nobody knows, or a VM that does not exist, fails with a clear error
/// and the VM keeps running.
#[test]
fn e2e_migrate_to_unknown_host_is_refused() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "64",
            "--vcpus",
            "1",
            "--workload",
            "counter",
        ],
    );
    c.assert_counting("hostA", "vm1", 0);
    let o = c.migrate_raw("hostA", "vm1", "hostZ", &[]);
    assert!(!o.success(), "{o}");
    assert!(o.stderr.contains("unknown destination"), "{o}");
    assert!(o.stderr.contains("hostZ"), "{o}");
    let o = c.migrate_raw("hostA", "nope", "hostB", &[]);
    assert!(!o.success(), "{o}");
    assert!(o.stderr.contains("no VM named"), "{o}");
    // An address with nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let o = c.migrate_raw("hostA", "vm1", &format!("127.0.0.1:{port}"), &[]);
    assert!(!o.success(), "{o}");
    assert!(o.stderr.contains("cannot reach"), "{o}");
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
}
