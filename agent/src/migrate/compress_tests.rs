//! `--compress zstd`: migrations of real guests with compressed page frames, verified by
//! digest, in pre-copy and post-copy, on a compressible working set and on an incompressible
//! one (where frames go raw).

use super::tests::{busy_opts, migrate, pair, postcopy_landed, print, runs_on_destination, serial};
use super::{Compression, MigrateOptions, PostcopyPolicy};

fn zstd(opts: MigrateOptions) -> MigrateOptions {
    MigrateOptions {
        compress: Compression::Zstd { level: 1 },
        ..opts
    }
}

fn verified(report: &super::Report) {
    let v = report.verification.clone().expect("--verify");
    assert!(v.memory_equal, "{} vs {}", v.source_memory, v.dest_memory);
    assert!(v.vcpus_equal, "{} vs {}", v.source_vcpus, v.dest_vcpus);
}

#[test]
fn compressed_pre_copy_lands_verified_in_a_fraction_of_the_bytes() {
    let _serial = serial();
    // `dirty` writes its pass number into each page: 8 bytes of 4096 change.
    let p = pair("zpre", 64, &["counter", "dirty"], 16);
    let (r, _) = migrate(&p, "zpre", &zstd(busy_opts(64.0)));
    let report = r.unwrap();
    print(&report);
    verified(&report);
    let c = report.compression.expect("compression figures");
    assert_eq!(c.level, 1);
    assert!(c.frames_compressed > 0, "{c:?}");
    assert!(c.ratio() < 0.1, "near-empty pages compress: {c:?}");
    let page_bytes = (report.pages_sent - report.zero_pages) * 4096;
    assert_eq!(
        c.raw_bytes, page_bytes,
        "every data page went through the compressor"
    );
    assert!(
        report.bytes_sent < page_bytes / 5,
        "{} bytes on the wire for {page_bytes} bytes of pages",
        report.bytes_sent
    );
    runs_on_destination(&p, "zpre", &report);
}

#[test]
fn incompressible_pages_go_raw_and_land_verified() {
    let _serial = serial();
    // `noise`: `dirty` over a working set of random bytes (it rewrites only each page's
    // first 8).
    let p = pair("zraw", 64, &["counter", "noise"], 16);
    let (r, _) = migrate(&p, "zraw", &zstd(busy_opts(64.0)));
    let report = r.unwrap();
    print(&report);
    verified(&report);
    let c = report.compression.expect("compression figures");
    assert!(c.frames_raw > 0, "{c:?}");
    assert!(
        c.frames_raw >= 4 * c.frames_compressed,
        "random pages mostly go raw: {c:?}"
    );
    assert!(c.ratio() > 0.8, "{c:?}");
    runs_on_destination(&p, "zraw", &report);
}

#[test]
fn compressed_post_copy_lands_verified() {
    let _serial = serial();
    let p = pair("zpost", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Always,
        ..zstd(busy_opts(20.0))
    };
    let (r, _) = migrate(&p, "zpost", &opts);
    let report = r.unwrap();
    print(&report);
    let pc = postcopy_landed(&report);
    assert!(pc.pages_missing > 0);
    let c = report.compression.expect("compression figures");
    assert!(c.frames_compressed > 0 && c.ratio() < 0.1, "{c:?}");
    runs_on_destination(&p, "zpost", &report);
}
