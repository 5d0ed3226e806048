//! Live migration over shared storage (`--storage shared`), between two agent processes that
//! both serve one datastore folder marked shared: nothing of the disk travels, the source
//! flushes and closes the image at the pause and the destination opens the same file; the
//! VM's folder stays and its `.owner` names the destination. A guest writing its disk flat out
//! keeps passing its read-back checks on the destination (every block it wrote is read back
//! against the generation it stamped), in pre-copy and with `--postcopy always`; a failure
//! after the release gives the image back to the source with the folder intact.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vmig_tests::{wait_for, AgentOpts, Cluster};

const SHARED: &str = "shared";

fn shared_pair(a: AgentOpts, b: AgentOpts) -> Cluster {
    Cluster::new(&[
        ("hostA", a.with_shared(SHARED)),
        ("hostB", b.with_shared(SHARED)),
    ])
}

fn folder(c: &Cluster, vm: &str) -> PathBuf {
    c.dir().join(SHARED).join(vm)
}

fn owner(c: &Cluster, vm: &str) -> String {
    std::fs::read_to_string(folder(c, vm).join(".owner"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn disk_stats(show: &Value) -> (u64, u64) {
    let d = &show["stats"];
    (
        d["disk_blocks_verified"].as_u64().unwrap_or(0),
        d["disk_failures"].as_u64().unwrap_or(u64::MAX),
    )
}

/// The guest's own disk checks on `host` go past `above` blocks with no failure.
fn assert_disk_checks(c: &Cluster, host: &str, vm: &str, above: u64) {
    let seen = wait_for(Duration::from_secs(60), || {
        let s = c.show(host, vm)?;
        let (checked, failed) = disk_stats(&s);
        assert_eq!(failed, 0, "{vm} on {host}: a disk check failed: {s:#}");
        (checked > above).then_some(checked)
    });
    assert!(
        seen.is_some(),
        "{vm} on {host}: the guest's disk checks did not pass {above}: {:?}\n{}",
        c.show(host, vm),
        c.logs()
    );
}

/// A VM on the shared datastore of hostA: vCPU0 writes and reads back its 4 MiB disk (1024
/// blocks), vCPU1 counts.
fn disk_writer_on_shared(c: &Cluster) {
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "64",
            "--vcpus",
            "2",
            "--workload",
            "disk,counter",
            "--disk-mib",
            "4",
            "--dirty-tracking",
            "bitmap",
            "--datastore",
            SHARED,
        ],
    );
    assert_eq!(owner(c, "vm1"), "hostA");
    assert_disk_checks(c, "hostA", "vm1", 2000);
}

fn migrate_on_shared_storage(extra: &[&str]) {
    let mut c = shared_pair(AgentOpts::new(), AgentOpts::new());
    disk_writer_on_shared(&c);
    let mut args = vec!["--storage", "shared"];
    args.extend_from_slice(extra);
    let report = c.migrate("hostA", "vm1", "hostB", &args);
    c.assert_migrated(&report, "vm1", "hostA", "hostB");
    let disk = &report["disk"];
    assert_eq!(disk["mode"], "shared", "{report:#}");
    assert_eq!(disk["copied_bytes"], 0, "{report:#}");
    assert_eq!(disk["image_bytes"], 4 << 20, "{report:#}");
    assert_eq!(owner(&c, "vm1"), "hostB");
    let shown = c.show("hostB", "vm1").unwrap();
    assert_eq!(
        PathBuf::from(shown["dir"].as_str().unwrap()),
        folder(&c, "vm1")
    );
    assert_eq!(shown["datastore"], SHARED, "{shown:#}");
    // Every block read back on the destination (a whole pass and more), none failed.
    let now = disk_stats(&shown).0;
    assert_disk_checks(&c, "hostB", "vm1", now + 1024);
    // hostA, restarted, does not take the folder back: it is hostB's.
    c.restart("hostA");
    assert!(c.show("hostA", "vm1").is_none(), "hostA loaded hostB's VM");
    assert!(c.show("hostB", "vm1").is_some());
    println!(
        "shared storage: downtime {} ms, {} bytes sent (a 4 MiB disk and 64 MiB of memory), mode {}",
        report["downtime_ms"], report["bytes_sent"], report["mode"]
    );
}

#[test]
fn e2e_a_disk_writer_migrates_live_on_shared_storage() {
    migrate_on_shared_storage(&[]);
}

#[test]
fn e2e_a_disk_writer_migrates_on_shared_storage_with_postcopy_always() {
    migrate_on_shared_storage(&["--postcopy", "always"]);
}

#[test]
fn e2e_a_failure_after_the_release_gives_the_image_back_to_the_source() {
    let c = shared_pair(AgentOpts::injecting("lose-ready"), AgentOpts::new());
    disk_writer_on_shared(&c);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--storage", "shared"]);
    assert!(!o.success(), "migrated through a lost Ready: {o}");
    println!("lost Ready: {}", o.stderr.trim());
    // The VM runs on hostA, its disk writable again (its checks go on, none failed), its
    // folder whole and still hostA's; hostB holds nothing.
    let before = disk_stats(&c.show("hostA", "vm1").unwrap()).0;
    assert_disk_checks(&c, "hostA", "vm1", before + 1024);
    c.assert_stayed("vm1", "hostA", None, true);
    assert_eq!(owner(&c, "vm1"), "hostA");
    for f in ["vm.toml", "nvram.bin", "disk.img", "vm.log"] {
        assert!(folder(&c, "vm1").join(f).is_file(), "{f} gone");
    }
    assert!(!folder(&c, "vm1").join(".vmig-probe").exists());
    assert!(c.show("hostB", "vm1").is_none());
}

#[test]
fn e2e_shared_storage_needs_the_same_folder_on_the_destination() {
    // hostB does not serve the shared datastore.
    let c = Cluster::new(&[
        ("hostA", AgentOpts::new().with_shared(SHARED)),
        ("hostB", AgentOpts::new()),
    ]);
    disk_writer_on_shared(&c);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--storage", "shared"]);
    assert!(!o.success(), "--storage shared to a host without it: {o}");
    println!("--storage shared refused: {}", o.stderr.trim());
    assert!(
        o.stderr.contains("no datastore named \"shared\""),
        "the refusal says why: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    assert_eq!(owner(&c, "vm1"), "hostA");
    // `auto` copies instead: the disk is mirrored into hostB's own datastore.
    let report = c.migrate("hostA", "vm1", "hostB", &["--storage", "auto"]);
    assert_eq!(report["disk"]["mode"], "copy", "{report:#}");
    c.assert_migrated(&report, "vm1", "hostA", "hostB");
    assert!(
        !folder(&c, "vm1").exists(),
        "the source's folder on its shared datastore is gone after a copy"
    );
    let now = disk_stats(&c.show("hostB", "vm1").unwrap()).0;
    assert_disk_checks(&c, "hostB", "vm1", now + 1024);
}

#[test]
fn e2e_storage_shared_on_a_private_datastore_is_refused_before_anything_moves() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    c.create_vm(
        "hostA",
        "vm1",
        &["--memory-mib", "32", "--workload", "counter"],
    );
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--storage", "shared"]);
    assert!(!o.success(), "{o}");
    assert!(
        o.stderr.contains("not on a shared datastore") && o.stderr.contains("--storage copy"),
        "the error names the way out: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
}

#[test]
fn e2e_a_live_migration_copies_onto_the_target_datastore_named() {
    let mut b = AgentOpts::new();
    b.datastores.push("fast={dir}/fastB".into());
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", b)]);
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "32",
            "--vcpus",
            "2",
            "--workload",
            "disk,counter",
            "--disk-mib",
            "4",
        ],
    );
    assert_disk_checks(&c, "hostA", "vm1", 1000);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--target-datastore", "slow"]);
    assert!(!o.success(), "{o}");
    assert!(
        o.stderr.contains("no datastore named \"slow\"")
            && o.stderr.contains("valid: default, fast"),
        "the refusal names the valid datastores: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    let report = c.migrate("hostA", "vm1", "hostB", &["--target-datastore", "fast"]);
    c.assert_migrated(&report, "vm1", "hostA", "hostB");
    assert_eq!(report["disk"]["mode"], "copy");
    let shown = c.show("hostB", "vm1").unwrap();
    assert_eq!(shown["datastore"], "fast", "{shown:#}");
    assert_eq!(
        PathBuf::from(shown["dir"].as_str().unwrap()),
        c.dir().join("fastB").join("vm1")
    );
    assert!(!c.datastore("hostB").join("vm1").exists());
    let now = disk_stats(&shown).0;
    assert_disk_checks(&c, "hostB", "vm1", now + 1024);
}
