//! Live migration with the disk, between two agent processes: a guest writing its virtio-blk
//! disk migrates with its image mirrored (digests equal at the pause, its own read-back checks
//! passing on the destination), and each failure of the mirror (an image that cannot be read,
//! a destination datastore that fills up, a destination killed mid-copy) is a clear error that
//! leaves the VM running on the source with its image intact and nothing on the destination.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmig::storage::{BlockDigest, DISK_BLOCK};
use vmig_tests::{wait_for, AgentOpts, Cluster};

fn two() -> Cluster {
    Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())])
}

fn image(c: &Cluster, host: &str, vm: &str) -> std::path::PathBuf {
    c.datastore(host).join(vm).join("disk.img")
}

fn digest_of(path: &Path) -> String {
    BlockDigest::of_file(&File::open(path).unwrap(), DISK_BLOCK).unwrap()
}

/// Creates a stopped VM, fills `data_mib` of its image with known non-zero bytes, starts it.
fn vm_with_data(c: &Cluster, vm: &str, args: &[&str], data_mib: u64) {
    let mut a = vec!["--host", "hostA", "vm", "create", vm];
    a.extend_from_slice(args);
    c.ok(&a);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image(c, "hostA", vm))
        .unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for mib in 0..data_mib {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u64 ^ mib.wrapping_mul(0x9e37_79b9)) as u8 | 1;
        }
        // Every other MiB: the image keeps holes between the data.
        f.write_all_at(&chunk, (mib * 2) << 20).unwrap();
    }
    f.sync_all().unwrap();
    c.ok(&["--host", "hostA", "vm", "start", vm]);
}

fn disk_stats(show: &Value) -> (u64, u64) {
    let d = &show["stats"];
    (
        d["disk_blocks_verified"].as_u64().unwrap_or(0),
        d["disk_failures"].as_u64().unwrap_or(u64::MAX),
    )
}

/// The guest's own disk checks on `host` go on (`above` blocks checked) with no failure.
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

fn assert_disk_verified(report: &Value) {
    let v = &report["verification"];
    assert_eq!(
        v["disk_equal"], true,
        "disk digests at the pause: {report:#}"
    );
    let (s, d) = (
        v["source_disk"].as_str().unwrap_or(""),
        v["dest_disk"].as_str().unwrap_or(""),
    );
    assert!(!s.is_empty() && s == d, "{report:#}");
    let disk = &report["disk"];
    assert_eq!(disk["mode"], "copy", "{report:#}");
    assert!(disk["copied_bytes"].as_u64().unwrap() > 0, "{report:#}");
}

fn migrate_a_disk_writer(extra: &[&str]) {
    let c = two();
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
        ],
    );
    assert_disk_checks(&c, "hostA", "vm1", 2000);
    let mut args = vec!["--bandwidth", "100"];
    args.extend_from_slice(extra);
    let report = c.migrate("hostA", "vm1", "hostB", &args);
    c.assert_migrated(&report, "vm1", "hostA", "hostB");
    assert_disk_verified(&report);
    let disk = &report["disk"];
    assert!(
        disk["guest_written_bytes"].as_u64().unwrap() > 0
            && disk["resent_blocks"].as_u64().unwrap() > 0,
        "the guest wrote during the mirror and its blocks went again: {disk:#}"
    );
    // A whole pass (1024 blocks) more checked on the destination, none failed.
    let now = disk_stats(&c.show("hostB", "vm1").unwrap()).0;
    assert_disk_checks(&c, "hostB", "vm1", now + 1024);
    println!(
        "disk: {} written by the guest, {} blocks re-sent ({} paused); downtime {} ms",
        disk["guest_written_bytes"],
        disk["resent_blocks"],
        disk["blocks_at_pause"],
        report["downtime_ms"]
    );
}

#[test]
fn e2e_a_disk_writer_migrates_live_with_its_disk_mirrored() {
    migrate_a_disk_writer(&[]);
}

#[test]
fn e2e_a_disk_writer_migrates_with_postcopy_always() {
    migrate_a_disk_writer(&["--postcopy", "always"]);
}

#[test]
fn e2e_an_image_that_cannot_be_read_fails_the_migration_and_the_vm_stays() {
    let c = two();
    vm_with_data(&c, "vm1", &["--memory-mib", "64", "--disk-mib", "16"], 4);
    let img = image(&c, "hostA", "vm1");
    let before = digest_of(&img);
    // The device keeps its open image; the migration's reader finds a directory there.
    let aside = img.with_extension("aside");
    std::fs::rename(&img, &aside).unwrap();
    std::fs::create_dir(&img).unwrap();
    let o = c.migrate_raw("hostA", "vm1", "hostB", &[]);
    std::fs::remove_dir(&img).unwrap();
    std::fs::rename(&aside, &img).unwrap();
    assert!(!o.success(), "migrated with an unreadable image: {o}");
    println!("unreadable image: {}", o.stderr.trim());
    assert!(
        o.stderr.contains("disk") && o.stderr.contains("directory"),
        "the error names the disk and why: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    assert_eq!(digest_of(&img), before, "the source image changed");
}

/// A tmpfs mounted over a folder, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn e2e_a_full_destination_datastore_fails_the_migration_and_the_vm_stays() {
    let mut c = two();
    // hostB's datastore: a tmpfs of 8 MiB, for a disk with 24 MiB of data.
    c.kill("hostB");
    let ds = c.datastore("hostB");
    let _ = std::fs::remove_dir_all(&ds);
    let Some(_tmpfs) = Tmpfs::mount(&ds, "8m") else {
        panic!(
            "cannot mount a tmpfs on {} (the e2e tests run as root)",
            ds.display()
        );
    };
    c.restart("hostB");
    vm_with_data(&c, "vm1", &["--memory-mib", "32", "--disk-mib", "64"], 24);
    let img = image(&c, "hostA", "vm1");
    let before = digest_of(&img);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &[]);
    assert!(!o.success(), "migrated into a full datastore: {o}");
    println!("full datastore: {}", o.stderr.trim());
    assert!(
        o.stderr.contains("No space left") || o.stderr.contains("space"),
        "the error says the destination is full: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    assert_eq!(digest_of(&img), before, "the source image changed");
}

#[test]
fn e2e_a_destination_killed_during_the_disk_mirror_leaves_the_vm_on_the_source() {
    let mut c = two();
    vm_with_data(&c, "vm1", &["--memory-mib", "64", "--disk-mib", "256"], 96);
    let img = image(&c, "hostA", "vm1");
    let before = digest_of(&img);
    // 96 MiB of data at 16 MiB/s: the mirror's first pass takes about 6 s.
    let m = c.spawn_migrate("hostA", "vm1", "hostB", &["--bandwidth", "16"]);
    c.wait_migrating("hostA", "vm1", Duration::from_secs(20));
    let staged = c
        .datastore("hostB")
        .join(".incoming")
        .join("vm1")
        .join("disk.img");
    let copying = wait_for(Duration::from_secs(20), || {
        let len = std::fs::metadata(&staged).ok()?.len();
        (len > 0).then_some(())
    });
    assert!(copying.is_some(), "the mirror never started\n{}", c.logs());
    std::thread::sleep(Duration::from_millis(1500));
    c.kill("hostB");
    let o = m.wait(Duration::from_secs(60));
    assert!(
        !o.success(),
        "the migration succeeded with its destination dead: {o}"
    );
    println!("destination killed: {}", o.stderr.trim());
    c.assert_stayed("vm1", "hostA", None, true);
    assert_eq!(digest_of(&img), before, "the source image changed");
    // The destination, back, keeps nothing of it.
    c.restart("hostB");
    c.assert_clean("vm1", "hostB");
}
