//! Successful live migrations between two agents (two processes) of real KVM VMs.
//!
//! Every migration runs with `--verify`, and [`Cluster::assert_migrated`] checks the whole
//! proof: equal memory and vCPU digests, the VM gone from the source (agent and datastore),
//! running on the destination with its folder, and its counter going on past the pause with
//! no failed self-check.

use vmig_tests::{AgentOpts, Cluster};

fn two_hosts() -> Cluster {
    Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())])
}

fn rounds(r: &serde_json::Value) -> &Vec<serde_json::Value> {
    r["rounds"].as_array().expect("report.rounds")
}

/// An idle 512 MiB VM moves; most of its memory goes over as zero-page markers.
#[test]
fn e2e_idle_512mib_vm_migrates() {
    let c = two_hosts();
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "512",
            "--vcpus",
            "2",
            "--workload",
            "idle,counter",
        ],
    );
    c.assert_counting("hostA", "vm1", 0);
    let r = c.migrate("hostA", "vm1", "hostB", &[]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    let pages = 512u64 * 1024 * 1024 / 4096;
    let zero = r["zero_pages"].as_u64().expect("zero_pages");
    assert!(
        zero >= pages * 9 / 10,
        "only {zero} of {pages} pages went as zero markers: {r:#}"
    );
    assert_eq!(r["memory_bytes"].as_u64(), Some(512 << 20), "{r:#}");
}

/// A vCPU rewriting a 64 MiB working set flat out: pre-copy takes several rounds, the
/// stop-and-copy pass sends what the last round left dirty, and the memory still matches.
#[test]
fn e2e_vm_dirtying_64mib_flat_out_migrates() {
    let c = two_hosts();
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "512",
            "--vcpus",
            "2",
            "--workload",
            "dirty,counter",
            "--dirty-mib",
            "64",
        ],
    );
    // Let the guest fill its working set and keep rewriting it.
    let s = vmig_tests::wait_for(std::time::Duration::from_secs(20), || {
        let s = c.show("hostA", "vm1")?;
        (s["stats"]["dirty_pages_written"].as_u64()? > 64 * 256).then_some(s)
    })
    .expect("the dirty vCPU writes its working set");
    c.assert_counting("hostA", "vm1", vmig_tests::counter_of(&s).0);
    let r = c.migrate(
        "hostA",
        "vm1",
        "hostB",
        &["--max-downtime", "500", "--max-rounds", "5"],
    );
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    let rs = rounds(&r);
    assert!(
        rs.len() >= 2,
        "expected pre-copy rounds then stop-and-copy: {r:#}"
    );
    let last = rs.last().expect("a round");
    assert!(
        last["pages"].as_u64().unwrap_or(0) > 0,
        "the stop-and-copy pass sent no page although the guest dirties flat out: {r:#}"
    );
    let first_pages = rs[0]["pages"].as_u64().unwrap_or(0);
    assert!(first_pages >= 131072, "round 1 sends every page: {r:#}");
    // The working set holds data: far more than the idle VM's few pages went as data.
    let data_pages = r["pages_sent"].as_u64().unwrap_or(0) - r["zero_pages"].as_u64().unwrap_or(0);
    assert!(
        data_pages >= 64 * 256,
        "only {data_pages} data pages: {r:#}"
    );
}

fn migrates_with_tracker(tracker: &str) {
    let c = two_hosts();
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "256",
            "--vcpus",
            "2",
            "--workload",
            "dirty,counter",
            "--dirty-mib",
            "16",
            "--dirty-tracking",
            tracker,
        ],
    );
    c.assert_counting("hostA", "vm1", 0);
    let r = c.migrate(
        "hostA",
        "vm1",
        "hostB",
        &[
            "--max-downtime",
            "500",
            "--max-rounds",
            "5",
            "--dirty-tracking",
            tracker,
        ],
    );
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    assert_eq!(r["dirty_tracking"], tracker, "{r:#}");
    let s = c.show("hostB", "vm1").expect("vm1 on hostB");
    let vcpus = &s["stats"]["vcpus"];
    assert_eq!(s["def"]["vcpus"], 2, "{s:#}");
    assert!(
        vcpus.as_array().is_none_or(|v| v.len() == 2),
        "two vCPUs on the destination: {s:#}"
    );
}

/// Two vCPUs (one dirtying, one counting), dirty pages found through the KVM dirty ring.
#[test]
fn e2e_two_vcpu_vm_migrates_with_dirty_ring() {
    migrates_with_tracker("ring");
}

/// The same VM with the classic dirty-log bitmap.
#[test]
fn e2e_two_vcpu_vm_migrates_with_dirty_bitmap() {
    migrates_with_tracker("bitmap");
}

/// The ownership generation `vm show --json` reports, and the one in the VM's `vm.toml`.
fn generation(c: &Cluster, host: &str, vm: &str) -> u64 {
    let s = c.show(host, vm).expect("the VM shows");
    let shown = s["def"]["generation"].as_u64().expect("def.generation");
    let dir = std::path::PathBuf::from(s["dir"].as_str().expect("dir"));
    let toml = std::fs::read_to_string(dir.join("vm.toml")).expect("vm.toml");
    assert!(
        toml.contains(&format!("generation = {shown}")),
        "{host}'s vm.toml does not hold generation {shown}: {toml}"
    );
    shown
}

/// A VM goes A → B → A, over both I/O paths; the proof holds each way, and each commit
/// moves its ownership generation: the destination's copy is the source's + 1.
#[test]
fn e2e_vm_migrates_back_and_forth() {
    let c = two_hosts();
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "128",
            "--vcpus",
            "1",
            "--workload",
            "counter",
        ],
    );
    c.assert_counting("hostA", "vm1", 0);
    let g0 = generation(&c, "hostA", "vm1");
    assert_eq!(g0, 0, "a new VM starts at generation 0");
    let r = c.migrate("hostA", "vm1", "hostB", &["--io", "plain"]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    assert_eq!(generation(&c, "hostB", "vm1"), g0 + 1);
    // Between agents with mutual TLS (the default) the stream goes through TLS either way.
    assert_eq!(r["io_path"], "tls", "{r:#}");
    let back = c.migrate("hostB", "vm1", "hostA", &[]);
    c.assert_migrated(&back, "vm1", "hostB", "hostA");
    assert_eq!(generation(&c, "hostA", "vm1"), g0 + 2);
    assert!(
        back["counter_at_pause"].as_u64() > r["counter_at_pause"].as_u64(),
        "the counter went on between the two migrations"
    );
}
