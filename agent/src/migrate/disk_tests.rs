//! Live migration of a VM whose guest writes its virtio-blk disk: the blocks written during
//! the migration reach the destination's image at the pause, and the guest's own checks (each
//! block read back, and still holding the previous pass's stamp before it is overwritten) keep
//! passing there.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::tests::{busy_opts, migrate, pair_with, print, runs_on_destination, serial};
use super::{MigrateOptions, PostcopyPolicy};
use crate::dirty::DirtyTracking;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn a_disk_writer_migrates_without_losing_a_write(name: &str, opts: MigrateOptions) {
    let _serial = serial();
    // 1 MiB of disk: 256 blocks, a pass in a fraction of a second.
    let p = pair_with(name, 64, &["disk", "counter"], 1, DirtyTracking::Bitmap);
    {
        let (_, vm) = p.src.running(name).unwrap();
        wait_for("two passes on the source", || {
            vm.stats().disk_generation >= 3
        });
    }
    let (r, _) = migrate(&p, name, &opts);
    let report = r.unwrap();
    let v = report.verification.as_ref().expect("the tests verify");
    assert!(v.memory_equal, "memory digests differ at the pause");
    assert_eq!(
        v.disk_equal,
        Some(true),
        "disk digests at the pause: {:?} / {:?}",
        v.source_disk,
        v.dest_disk
    );
    let disk = report.disk.as_ref().expect("a disk report");
    assert_eq!(disk.image_bytes, 1 << 20);
    assert!(
        disk.copied_bytes > 0 && disk.guest_written_bytes > 0,
        "{disk:?}"
    );
    // Blocks written during the migration went again, in the rounds or at the pause.
    let resent: u64 = report.rounds.iter().map(|r| r.disk_blocks).sum();
    assert_eq!(resent, disk.resent_blocks, "{:?}", report.rounds);
    assert!(disk.resent_blocks > 0, "{disk:?}");
    print(&report);
    runs_on_destination(&p, name, &report);
    let (_, vm) = p.dst.running(name).unwrap();
    wait_for("a whole pass checked on the destination", || {
        let s = vm.stats();
        assert_eq!(s.disk_failures, 0, "a disk write was lost: {s:?}");
        s.disk_blocks_verified >= 256 + 8
    });
    vm.pause();
    let image = std::fs::File::open(p.dst.dir(name).join(crate::inventory::DISK)).unwrap();
    let mut stamp = [0u8; 8];
    for b in 0..256u64 {
        image.read_exact_at(&mut stamp, b * 4096).unwrap();
        assert_eq!(
            u64::from_le_bytes(stamp),
            b,
            "block {b} of the destination's image"
        );
    }
    vm.resume();
}

#[test]
fn a_disk_writer_migrates_live_with_precopy() {
    a_disk_writer_migrates_without_losing_a_write(
        "diskpre",
        MigrateOptions {
            verify: true,
            // Slow enough that the guest writes during the migration (at 200 MiB/s, under
            // load, a migration once ended before the guest's next write).
            ..busy_opts(20.0)
        },
    );
}

#[test]
fn a_disk_writer_migrates_live_with_postcopy() {
    a_disk_writer_migrates_without_losing_a_write(
        "diskpost",
        MigrateOptions {
            postcopy: PostcopyPolicy::Always,
            verify: true,
            // As for pre-copy: slow enough that the guest writes during the migration.
            ..busy_opts(20.0)
        },
    );
}
