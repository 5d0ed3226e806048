//! Cold migration between two agent processes, and storage moves: a stopped VM with a 256 MiB
//! disk holding known data, its NVRAM and several log files moves (its files copied, or on a
//! shared datastore only its registration), every file's digest equal on arrival; it starts
//! on the destination and its guest's disk self-check passes; the source no longer lists it.
//! Then the crash matrix: each agent aborted at each step, both restarted, the VM registered
//! exactly once with every file intact.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmig::storage::cold::{digest_of, vm_files};
use vmig_tests::{wait_for, AgentOpts, Cluster, Output};

/// A VM whose vCPU0 writes and checks its disk and vCPU1 counts.
const VM: &[&str] = &[
    "--memory-mib",
    "64",
    "--vcpus",
    "2",
    "--workload",
    "disk,counter",
    "--dirty-tracking",
    "bitmap",
];

fn with_args(args: &[String]) -> AgentOpts {
    AgentOpts {
        args: args.to_vec(),
        ..AgentOpts::new()
    }
}

/// Every file of a VM folder and its digest; for the definition, its text without the
/// ownership generation, which a migration moves (the destination's is the source's + 1:
/// see [`generation`]).
fn digests(dir: &Path) -> BTreeMap<String, String> {
    vm_files(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .into_iter()
        .map(|f| {
            let p = dir.join(&f.name);
            let d = if f.name == "vm.toml" {
                let text = fs::read_to_string(&p).unwrap();
                let rest: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.starts_with("generation = "))
                    .collect();
                format!("definition: {}", rest.join("\n"))
            } else {
                digest_of(&p).unwrap()
            };
            (f.name, d)
        })
        .collect()
}

/// The ownership generation in the `vm.toml` of `vm` on `host` (and `vm show` agrees).
fn generation(c: &Cluster, host: &str, vm: &str) -> u64 {
    let text = fs::read_to_string(dir_of(c, host, vm).join("vm.toml")).unwrap();
    let g = text
        .lines()
        .find_map(|l| l.strip_prefix("generation = "))
        .map(|g| g.parse().unwrap())
        .unwrap_or(0);
    let shown = c.show(host, vm).unwrap()["def"]["generation"].as_u64();
    assert_eq!(shown, Some(g), "vm show vs vm.toml on {host}");
    g
}

/// Creates the stopped VM `vm` on `host` (`create` are more `vm create` arguments) with a
/// `disk_mib` disk holding known data (1 MiB in every 4, holes between), NVRAM contents and
/// three log files; returns the digest of each file.
fn stopped_vm(
    c: &Cluster,
    host: &str,
    vm: &str,
    disk_mib: u64,
    create: &[&str],
) -> BTreeMap<String, String> {
    let disk = disk_mib.to_string();
    let mut a = vec!["--host", host, "vm", "create", vm, "--disk-mib", &disk];
    a.extend_from_slice(VM);
    a.extend_from_slice(create);
    c.ok(&a);
    let dir = PathBuf::from(
        c.show(host, vm).expect("the new VM shows")["dir"]
            .as_str()
            .unwrap(),
    );
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("disk.img"))
        .unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for mib in (0..disk_mib).step_by(4) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u64 ^ mib.wrapping_mul(0x9e37_79b9)) as u8 | 1;
        }
        f.write_all_at(&chunk, mib << 20).unwrap();
    }
    f.sync_all().unwrap();
    let nv = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("nvram.bin"))
        .unwrap();
    nv.write_all_at(b"BootOrder=0001,0002", 4096).unwrap();
    fs::write(dir.join("vm.log"), "started\nstopped\n").unwrap();
    fs::write(dir.join("vm.log.1"), "older log\n".repeat(100)).unwrap();
    fs::write(dir.join("vm.log.2"), "oldest log\n".repeat(50)).unwrap();
    let d = digests(&dir);
    assert_eq!(
        d.keys().collect::<Vec<_>>(),
        [
            "disk.img",
            "nvram.bin",
            "vm.log",
            "vm.log.1",
            "vm.log.2",
            "vm.toml"
        ],
        "the VM's files"
    );
    d
}

fn migrate_offline(c: &Cluster, from: &str, vm: &str, to: &str, args: &[&str]) -> Value {
    let mut a = vec!["--host", from, "migrate", vm, to, "--offline", "--json"];
    a.extend_from_slice(args);
    let o = c.cli_timeout(&a, Duration::from_secs(300));
    assert!(o.success(), "cold migration failed: {o}\n{}", c.logs());
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}): {o}"))
}

fn dir_of(c: &Cluster, host: &str, vm: &str) -> PathBuf {
    let s = c
        .show(host, vm)
        .unwrap_or_else(|| panic!("{vm} not on {host}\n{}", c.logs()));
    PathBuf::from(s["dir"].as_str().unwrap())
}

/// The report says every file arrived equal; the files on `to` have the original digests.
fn assert_arrived(
    c: &Cluster,
    report: &Value,
    vm: &str,
    to: &str,
    want: &BTreeMap<String, String>,
) {
    assert_eq!(report["all_equal"], true, "{report:#}");
    for f in report["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        assert_eq!(f["source_digest"], f["dest_digest"], "{name}: {report:#}");
        if name == "vm.toml" {
            // Received as sent, then registered with the next generation (`digests`).
            continue;
        }
        assert_eq!(
            f["dest_digest"].as_str(),
            want.get(name).map(String::as_str),
            "{name}"
        );
    }
    let dir = dir_of(c, to, vm);
    assert_eq!(&digests(&dir), want, "the files on {to}");
    let s = c.show(to, vm).unwrap();
    assert_eq!(s["state"], "stopped", "{s:#}");
}

/// The VM starts on `host` and its guest's disk checks go past `above` with no failure.
fn assert_runs_and_checks_its_disk(c: &Cluster, host: &str, vm: &str, above: u64) {
    c.ok(&["--host", host, "vm", "start", vm]);
    let seen = wait_for(Duration::from_secs(60), || {
        let s = c.show(host, vm)?;
        let st = &s["stats"];
        assert_eq!(
            st["disk_failures"], 0,
            "{vm} on {host}: a disk check failed: {s:#}"
        );
        (st["disk_blocks_verified"].as_u64().unwrap_or(0) > above).then_some(())
    });
    assert!(
        seen.is_some(),
        "{vm} on {host}: the guest's disk checks did not pass {above}: {:?}\n{}",
        c.show(host, vm),
        c.logs()
    );
    c.assert_counting(host, vm, 0);
}

fn assert_gone(c: &Cluster, host: &str, vm: &str) {
    assert!(c.show(host, vm).is_none(), "{vm} still listed on {host}");
    assert!(
        !c.datastore(host).join(vm).exists(),
        "{vm}'s folder still on {host}"
    );
}

#[test]
fn cold_migration_copies_every_file_and_the_vm_runs_on_the_destination() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let want = stopped_vm(&c, "hostA", "vm1", 256, &[]);
    let g0 = generation(&c, "hostA", "vm1");
    let report = migrate_offline(&c, "hostA", "vm1", "hostB", &["--move-storage"]);
    eprintln!("report: {report:#}");
    assert_eq!(report["copy"], true);
    assert_eq!(
        generation(&c, "hostB", "vm1"),
        g0 + 1,
        "the destination's copy: the source's generation + 1"
    );
    assert!(
        report["sent_bytes"].as_u64().unwrap() >= 64 << 20,
        "{report:#}"
    );
    assert!(
        report["sent_bytes"].as_u64().unwrap() < 100 << 20,
        "the holes did not travel: {report:#}"
    );
    assert_arrived(&c, &report, "vm1", "hostB", &want);
    assert_gone(&c, "hostA", "vm1");
    let b = c.datastore("hostB");
    assert!(!b.join(".incoming").join("vm1").exists(), "staging left");
    assert_eq!(
        fs::read_dir(b.join(".vmig-journal"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "journal records left"
    );
    assert_runs_and_checks_its_disk(&c, "hostB", "vm1", 2000);

    // Without --move-storage (the datastores are not shared): the files travel all the same.
    c.ok(&["--host", "hostB", "vm", "stop", "vm1"]);
    let want = digests(&dir_of(&c, "hostB", "vm1"));
    let back = migrate_offline(&c, "hostB", "vm1", "hostA", &[]);
    assert_eq!(back["copy"], true);
    assert_arrived(&c, &back, "vm1", "hostA", &want);
    assert_eq!(generation(&c, "hostA", "vm1"), g0 + 2);
    assert_gone(&c, "hostB", "vm1");
}

#[test]
fn what_a_cold_migration_refuses_it_refuses_before_anything_moves() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let want = stopped_vm(&c, "hostA", "vm1", 16, &[]);
    // A stopped VM without --offline: the error names the flag.
    let o = c.fails(&["--host", "hostA", "migrate", "vm1", "hostB"]);
    assert!(o.text().contains("--offline"), "{o}");
    // The name is taken on the destination (the CLI refuses to create a second vm1 anywhere:
    // hostB finds one in its datastore at its start).
    let taken = c.datastore("hostB").join("vm1");
    fs::create_dir_all(&taken).unwrap();
    fs::copy(
        dir_of(&c, "hostA", "vm1").join("vm.toml"),
        taken.join("vm.toml"),
    )
    .unwrap();
    c.restart("hostB");
    let o = c.fails(&["--host", "hostA", "migrate", "vm1", "hostB", "--offline"]);
    assert!(
        o.text().contains("already exists") || o.text().contains("exists already"),
        "{o}"
    );
    c.kill("hostB");
    fs::remove_dir_all(&taken).unwrap();
    c.restart("hostB");
    // No such datastore there: the valid ones are named.
    let o = c.fails(&[
        "--host",
        "hostA",
        "migrate",
        "vm1",
        "hostB",
        "--offline",
        "--target-datastore",
        "nope",
    ]);
    assert!(o.text().contains("valid: default"), "{o}");
    // Nothing moved: hostA has every file as it was (but the log the run wrote), hostB nothing.
    let now = digests(&dir_of(&c, "hostA", "vm1"));
    assert_eq!(now["disk.img"], want["disk.img"]);
    assert_eq!(now["nvram.bin"], want["nvram.bin"]);
    assert_gone(&c, "hostB", "vm1");
    // A running VM with --offline.
    c.ok(&["--host", "hostA", "vm", "start", "vm1"]);
    let o = c.fails(&["--host", "hostA", "migrate", "vm1", "hostB", "--offline"]);
    assert!(o.text().contains("stop it first"), "{o}");
    let o = c.fails(&["--host", "hostA", "storage", "move", "vm1", "--to", "x"]);
    assert!(o.text().contains("valid: default"), "{o}");
    c.ok(&["--host", "hostA", "vm", "stop", "vm1"]);
}

#[test]
fn keep_source_leaves_a_marked_copy_that_only_comes_back_once_the_destination_lets_go() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let want = stopped_vm(&c, "hostA", "vm1", 256, &[]);
    let report = migrate_offline(&c, "hostA", "vm1", "hostB", &["--keep-source"]);
    assert_eq!(report["keep_source"], true);
    assert_arrived(&c, &report, "vm1", "hostB", &want);
    let a = c.show("hostA", "vm1").expect("the copy stays listed");
    assert_eq!(a["state"], "moved", "{a:#}");
    assert_eq!(
        digests(&dir_of(&c, "hostA", "vm1")),
        want,
        "the copy is intact"
    );
    let o = c.fails(&["--host", "hostA", "vm", "start", "vm1"]);
    assert!(o.text().contains("reclaim"), "{o}");
    let o = c.fails(&["--host", "hostA", "vm", "reclaim", "vm1"]);
    assert!(o.text().contains("still has vm1"), "{o}");
    assert_runs_and_checks_its_disk(&c, "hostB", "vm1", 2000);
    c.ok(&["--host", "hostB", "vm", "stop", "vm1"]);
    c.ok(&["--host", "hostB", "vm", "destroy", "vm1"]);
    c.ok(&["--host", "hostA", "vm", "reclaim", "vm1"]);
    assert_eq!(c.show("hostA", "vm1").unwrap()["state"], "stopped");
}

#[test]
fn onto_a_second_datastore_and_back_by_a_storage_move() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let fast = c.dir().join("hostB-fast");
    let mut b = c.opts("hostB");
    b.args = vec!["--datastore".into(), format!("fast={}", fast.display())];
    let mut c = c;
    c.restart_with("hostB", b);
    let want = stopped_vm(&c, "hostA", "vm1", 256, &[]);
    let report = migrate_offline(
        &c,
        "hostA",
        "vm1",
        "hostB",
        &["--move-storage", "--target-datastore", "fast"],
    );
    assert_eq!(report["datastore"], "fast");
    assert_arrived(&c, &report, "vm1", "hostB", &want);
    assert_eq!(dir_of(&c, "hostB", "vm1"), fast.join("vm1"));
    assert_gone(&c, "hostA", "vm1");
    let list = c.json(&["--host", "hostB", "datastore", "list", "--json"]);
    let fast_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["datastore"]["name"] == "fast")
        .unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!(fast_row["datastore"]["vms"], serde_json::json!(["vm1"]));
    assert!(fast_row["datastore"]["free_bytes"].as_u64().unwrap() > 0);
    // The storage move back to the default datastore, on hostB.
    let o = c.cli_timeout(
        &[
            "--host", "hostB", "storage", "move", "vm1", "--to", "default", "--json",
        ],
        Duration::from_secs(300),
    );
    assert!(o.success(), "{o}\n{}", c.logs());
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(r["datastore"], "default", "{r:#}");
    assert_eq!(dir_of(&c, "hostB", "vm1"), c.datastore("hostB").join("vm1"));
    assert!(!fast.join("vm1").exists(), "the old folder stays");
    assert_eq!(digests(&dir_of(&c, "hostB", "vm1")), want);
    assert_runs_and_checks_its_disk(&c, "hostB", "vm1", 2000);
}

#[test]
fn on_a_shared_datastore_only_the_registration_moves() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let shared = c.dir().join("shared");
    let arg = vec![
        "--datastore".into(),
        format!("san={},shared", shared.display()),
    ];
    let mut c = c;
    c.restart_with("hostA", with_args(&arg));
    c.restart_with("hostB", with_args(&arg));
    let want = stopped_vm(&c, "hostA", "vm1", 64, &["--datastore", "san"]);
    assert_eq!(
        fs::read_to_string(shared.join("vm1/.owner"))
            .unwrap()
            .trim(),
        "hostA"
    );
    let report = migrate_offline(&c, "hostA", "vm1", "hostB", &[]);
    assert_eq!(report["copy"], false, "{report:#}");
    assert_eq!(report["sent_bytes"], 0, "{report:#}");
    assert_arrived(&c, &report, "vm1", "hostB", &want);
    assert_eq!(dir_of(&c, "hostB", "vm1"), shared.join("vm1"));
    assert_eq!(
        fs::read_to_string(shared.join("vm1/.owner"))
            .unwrap()
            .trim(),
        "hostB"
    );
    assert!(c.show("hostA", "vm1").is_none(), "hostA still lists it");
    // hostA restarted does not take it back.
    c.restart("hostA");
    assert!(c.show("hostA", "vm1").is_none(), "hostA took it back");
    // With --move-storage the files go to a datastore of the destination.
    let back = migrate_offline(
        &c,
        "hostB",
        "vm1",
        "hostA",
        &["--move-storage", "--target-datastore", "default"],
    );
    assert_eq!(back["copy"], true);
    assert_arrived(&c, &back, "vm1", "hostA", &want);
    assert!(!shared.join("vm1").exists(), "the shared folder stays");
    assert_runs_and_checks_its_disk(&c, "hostA", "vm1", 2000);
}

/// One cell of the crash matrix.
struct Cell {
    point: &'static str,
    crashes: &'static str,
    outcome: String,
}

fn journal_empty(ds: &Path) -> bool {
    fs::read_dir(ds.join(".vmig-journal"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

/// Where `vm` is registered after the restarts (waiting for recovery to settle), with its
/// folder's digests.
fn settle(c: &Cluster, hosts: &[&str], vm: &str) -> Vec<(String, PathBuf, String)> {
    let mut last = Vec::new();
    let ok = wait_for(Duration::from_secs(60), || {
        last = hosts
            .iter()
            .filter_map(|h| {
                let s = c.show(h, vm)?;
                Some((
                    h.to_string(),
                    PathBuf::from(s["dir"].as_str().unwrap()),
                    s["state"].as_str().unwrap().to_string(),
                ))
            })
            .collect();
        last.iter()
            .all(|(_, _, st)| st != "recovering")
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{vm} still recovering: {last:?}\n{}",
        c.logs()
    );
    last
}

#[test]
fn crash_matrix_every_step_of_a_cold_migration_and_a_storage_move() {
    let mut cells = Vec::new();
    for (point, crashes) in [
        ("source-intent", "hostA"),
        ("source-mid-file", "hostA"),
        ("source-committing", "hostA"),
        ("source-before-delete", "hostA"),
        ("dest-intent", "hostB"),
        ("dest-mid-file", "hostB"),
        ("dest-synced", "hostB"),
        ("dest-before-register", "hostB"),
        ("dest-registered", "hostB"),
    ] {
        let (mut c, want, _) = crashed_cold_migration(point, crashes);
        c.restart_with("hostA", AgentOpts::new());
        c.restart_with("hostB", AgentOpts::new());
        let at = settle(&c, &["hostA", "hostB"], "vm1");
        assert_eq!(
            at.len(),
            1,
            "{point}: vm1 registered on {at:?}\n{}",
            c.logs()
        );
        let (host, dir, state) = &at[0];
        assert_eq!(state, "stopped", "{point}");
        assert_eq!(&digests(dir), &want, "{point}: the files on {host}");
        let other = if host == "hostA" { "hostB" } else { "hostA" };
        assert!(
            !c.datastore(other).join("vm1").exists(),
            "{point}: a folder of vm1 left on {other}"
        );
        for h in ["hostA", "hostB"] {
            let ds = c.datastore(h);
            assert!(
                !ds.join(".incoming").join("vm1").exists(),
                "{point}: staging on {h}"
            );
            assert!(journal_empty(&ds), "{point}: journal records left on {h}");
        }
        let recovered = c.ok(&["vm", "list"]).stdout;
        assert!(recovered.contains("recovered"), "{point}: {recovered}");
        cells.push(Cell {
            point,
            crashes,
            outcome: format!("registered once, on {host}, files intact"),
        });
    }
    for point in ["move-intent", "move-mid-file", "move-switched"] {
        let mut c = Cluster::new(&[("hostA", AgentOpts::new())]);
        let fast = c.dir().join("hostA-fast");
        let args = vec![
            "--datastore".to_string(),
            format!("fast={}", fast.display()),
        ];
        c.restart_with(
            "hostA",
            AgentOpts {
                args: args.clone(),
                crash_at: Some(point.into()),
                ..AgentOpts::new()
            },
        );
        let want = stopped_vm(&c, "hostA", "vm1", 32, &[]);
        let _ = c.cli_timeout(
            &["--host", "hostA", "storage", "move", "vm1", "--to", "fast"],
            Duration::from_secs(120),
        );
        let crashed = wait_for(Duration::from_secs(10), || c.exited("hostA").then_some(()));
        assert!(
            crashed.is_some(),
            "{point}: hostA did not crash\n{}",
            c.logs()
        );
        c.restart_with("hostA", with_args(&args));
        let at = settle(&c, &["hostA"], "vm1");
        assert_eq!(at.len(), 1, "{point}");
        let (_, dir, _) = &at[0];
        assert_eq!(&digests(dir), &want, "{point}");
        let (here, there) = if dir.starts_with(&fast) {
            ("fast", c.datastore("hostA").join("vm1"))
        } else {
            ("default", fast.join("vm1"))
        };
        assert!(!there.exists(), "{point}: {} left", there.display());
        assert!(
            !fast.join(".incoming").join("vm1").exists(),
            "{point}: staging left"
        );
        cells.push(Cell {
            point,
            crashes: "hostA",
            outcome: format!("one copy, on datastore {here}, files intact"),
        });
    }
    eprintln!("\ncrash matrix (the agent aborted at the step, both restarted):");
    eprintln!("{:<22} {:<8} outcome", "step", "crashed");
    for c in &cells {
        eprintln!("{:<22} {:<8} {}", c.point, c.crashes, c.outcome);
    }
    assert_eq!(cells.len(), 12);
}

/// The VM is registered on exactly one of `hosts` (after recovery settles), in `host`, with
/// the files `want`, and nothing of it is left elsewhere.
fn assert_once_on(c: &Cluster, vm: &str, host: &str, want: &BTreeMap<String, String>, case: &str) {
    let at = settle(c, &["hostA", "hostB"], vm);
    assert_eq!(
        at.len(),
        1,
        "{case}: {vm} registered on {at:?}\n{}",
        c.logs()
    );
    let (on, dir, state) = &at[0];
    assert_eq!(on, host, "{case}: {vm} on {on}\n{}", c.logs());
    assert_eq!(state, "stopped", "{case}");
    assert_eq!(&digests(dir), want, "{case}: the files on {on}");
    for h in ["hostA", "hostB"] {
        let ds = c.datastore(h);
        if h != host {
            assert!(
                !ds.join(vm).exists(),
                "{case}: a folder of {vm} left on {h}"
            );
        }
        assert!(
            !ds.join(".incoming").join(vm).exists(),
            "{case}: staging on {h}"
        );
        assert!(journal_empty(&ds), "{case}: journal records left on {h}");
    }
}

/// A cluster whose host `crashes` aborts at `point` during the cold migration of a stopped
/// `vm1` from hostA to hostB; returns it once that agent has exited, with vm1's digests and
/// the CLI's output.
fn crashed_cold_migration(
    point: &str,
    crashes: &str,
) -> (Cluster, BTreeMap<String, String>, Output) {
    let crash = AgentOpts {
        crash_at: Some(point.into()),
        ..AgentOpts::new()
    };
    let (a, b) = if crashes == "hostA" {
        (crash, AgentOpts::new())
    } else {
        (AgentOpts::new(), crash)
    };
    let c = Cluster::new(&[("hostA", a), ("hostB", b)]);
    let want = stopped_vm(&c, "hostA", "vm1", 32, &[]);
    let o = c.cli_timeout(
        &["--host", "hostA", "migrate", "vm1", "hostB", "--offline"],
        Duration::from_secs(120),
    );
    let crashed = wait_for(Duration::from_secs(10), || c.exited(crashes).then_some(()));
    assert!(
        crashed.is_some(),
        "{point}: {crashes} did not crash: {o}\n{}",
        c.logs()
    );
    (c, want, o)
}

#[test]
fn recovery_survives_a_crash_during_its_own_question_and_needs_no_restart_of_the_source() {
    let crash = |p: &str| AgentOpts {
        crash_at: Some(p.into()),
        ..AgentOpts::new()
    };
    let mut cells = Vec::new();

    // 1. The destination dies after registering, before its confirmation: the source, still
    //    running, marks the VM recovering; once the destination is back the source's resolver
    //    asks again by itself, and the VM ends on the destination.
    let (mut c, want, o) = crashed_cold_migration("dest-registered", "hostB");
    assert!(
        !o.success(),
        "the answer was lost, the CLI must say so: {o}"
    );
    assert_eq!(
        c.show("hostA", "vm1").map(|s| s["state"].clone()),
        Some("recovering".into()),
        "{}",
        c.logs()
    );
    c.restart_with("hostB", AgentOpts::new());
    assert!(!c.exited("hostA"), "the source was not restarted");
    assert_once_on(&c, "vm1", "hostB", &want, "lost answer, source running");
    cells.push((
        "dest-registered",
        "hostB",
        "source kept running; its resolver asked again once hostB was back: on hostB",
    ));

    drop(c); // one cluster at a time (the e2e lock)

    // 2. The source dies having journaled its commit; restarted, it asks the destination,
    //    which dies while answering (its answer decided, not sent); restarted, it is asked
    //    again and gives the same answer: the VM stays on the source.
    let (mut c, want, _) = crashed_cold_migration("source-committing", "hostA");
    c.restart_with("hostB", crash("dest-answering"));
    c.restart_with("hostA", AgentOpts::new());
    assert!(
        wait_for(Duration::from_secs(20), || c.exited("hostB").then_some(())).is_some(),
        "hostB was not asked\n{}",
        c.logs()
    );
    c.restart_with("hostB", AgentOpts::new());
    assert_once_on(&c, "vm1", "hostA", &want, "dest died answering");
    cells.push((
        "source-committing, then dest-answering",
        "both",
        "asked again after hostB's restart: on hostA",
    ));

    drop(c);

    // 3. The destination registered, the answer was lost; the source is restarted and dies
    //    just after the destination's answer came, before acting on it; restarted again, it
    //    asks again: the VM ends on the destination.
    let (mut c, want, _) = crashed_cold_migration("dest-registered", "hostB");
    // The source starts while the destination is down (so that it is up before it asks).
    c.restart_with("hostA", crash("source-answered"));
    c.restart_with("hostB", AgentOpts::new());
    assert!(
        wait_for(Duration::from_secs(20), || c.exited("hostA").then_some(())).is_some(),
        "hostA did not get its answer\n{}",
        c.logs()
    );
    c.restart_with("hostA", AgentOpts::new());
    assert_once_on(&c, "vm1", "hostB", &want, "source died on the answer");
    cells.push((
        "dest-registered, then source-answered",
        "both",
        "asked again after hostA's restart: on hostB",
    ));

    eprintln!("\nrecovery's own question, crashed:");
    eprintln!("{:<40} {:<8} outcome", "steps", "crashed");
    for (p, h, o) in &cells {
        eprintln!("{p:<40} {h:<8} {o}");
    }
}

#[test]
fn a_cli_killed_mid_operation_leaves_the_agent_to_finish_it() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    // 1 GiB with 256 MiB of data: long enough to kill the CLI while the disk streams.
    let want = stopped_vm(&c, "hostA", "vm1", 1024, &[]);
    let mut cli = c.spawn_cli(&["--host", "hostA", "migrate", "vm1", "hostB", "--offline"]);
    let staging = c.datastore("hostB").join(".incoming").join("vm1");
    let seen = wait_for(Duration::from_secs(60), || staging.exists().then_some(()));
    assert!(seen.is_some(), "no staging on hostB\n{}", c.logs());
    assert!(
        cli.running(),
        "the migration ended before the CLI could be killed"
    );
    cli.kill();
    let done = wait_for(Duration::from_secs(60), || {
        (c.show("hostA", "vm1").is_none() && journal_empty(&c.datastore("hostA"))).then_some(())
    });
    assert!(
        done.is_some(),
        "the migration did not finish without its CLI
{}",
        c.logs()
    );
    assert_once_on(&c, "vm1", "hostB", &want, "CLI killed mid-migration");
    let listed = c.ok(&["--host", "hostB", "vm", "list"]).stdout;
    assert!(listed.contains("vm1"), "{listed}");

    // The same for a stopped VM's storage move.
    let fast = c.dir().join("hostB-fast");
    let args = vec![
        "--datastore".to_string(),
        format!("fast={}", fast.display()),
    ];
    c.restart_with("hostB", with_args(&args));
    let mut cli = c.spawn_cli(&["--host", "hostB", "storage", "move", "vm1", "--to", "fast"]);
    let staging = fast.join(".incoming").join("vm1");
    let seen = wait_for(Duration::from_secs(60), || staging.exists().then_some(()));
    assert!(seen.is_some(), "no staging on fast\n{}", c.logs());
    assert!(
        cli.running(),
        "the move ended before the CLI could be killed"
    );
    cli.kill();
    let moved = wait_for(Duration::from_secs(60), || {
        let s = c.show("hostB", "vm1")?;
        let dir = PathBuf::from(s["dir"].as_str()?);
        (dir.starts_with(&fast) && journal_empty(&fast) && journal_empty(&c.datastore("hostB")))
            .then_some(dir)
    });
    let dir = moved.unwrap_or_else(|| panic!("the move did not finish\n{}", c.logs()));
    assert_eq!(digests(&dir), want, "the moved files");
    assert!(
        !c.datastore("hostB").join("vm1").exists(),
        "the old folder stays"
    );
}
