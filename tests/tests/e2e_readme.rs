//! The README's "Using it" block, run as written: the commands a new user types first.
//!
//! The block is read from `README.md` (the `sh` block after `<!-- e2e_readme: run -->`), so
//! the README and this test cannot drift apart. It uses the README's own paths and ports
//! (`/etc/vmig`, `/var/lib/vmig`, `127.0.0.1:7401-7402`) and builds with `cargo xtask build`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "<!-- e2e_readme: run -->";
const TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `sh` block after the marker.
fn readme_block(readme: &str) -> String {
    let after = readme
        .split_once(MARKER)
        .unwrap_or_else(|| panic!("README.md has no {MARKER} block"))
        .1;
    let body = after
        .split_once("```sh\n")
        .expect("a ```sh block after the marker")
        .1;
    body.split_once("\n```")
        .expect("the block's closing fence")
        .0
        .to_string()
}

/// The last `vm show` counter line: `counter = N (R reports, F failed checks)` as (N, F).
fn last_counter(text: &str) -> Option<(u64, u64)> {
    let rest = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("counter = "))?;
    let n = rest.split_whitespace().next()?.parse().ok()?;
    let failed = rest
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((n, failed))
}

#[test]
fn e2e_readme_using_it_runs_as_written() {
    vmig_tests::require_kvm();
    let root = root();
    let block = readme_block(&std::fs::read_to_string(root.join("README.md")).unwrap());
    assert!(
        block.contains("cargo xtask run -- migrate vm1 hostB"),
        "{block}"
    );
    // Left over by an earlier failed run of this test: the README creates vm1 anew.
    for host in ["hostA", "hostB"] {
        let d = Path::new("/var/lib/vmig").join(host).join("vm1");
        if d.exists() {
            eprintln!("removing {} left by an earlier run", d.display());
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
    let _ = std::fs::remove_file("/tmp/vm1-back.json");
    let script = format!("set -euxo pipefail\n{block}\n");
    let log = tempfile::NamedTempFile::new().unwrap();
    // Its own session, so the agents it starts in the background are killed with it.
    let mut child = Command::new("setsid")
        .args(["bash", "-c", &script])
        .current_dir(&root)
        .env_remove("VMIG_RUN_DIR")
        .env_remove("VMIG_AGENT")
        .env_remove("VMIG_HOSTS")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: signals the process group of the session the test started (setsid makes the
    // child its leader); it contains only the script and what it started.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
    let out = std::fs::read_to_string(log.path()).unwrap();
    let logs: String = ["hostA", "hostB"]
        .iter()
        .map(|h| {
            let p = format!("/var/log/vmig/{h}.log");
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(20).collect();
            format!(
                "--- {p} (last lines)\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
    assert!(
        status.is_some_and(|s| s.success()),
        "the README's commands failed ({status:?} after {:.0} s):\n{out}\n{logs}",
        t.elapsed().as_secs_f64()
    );
    // The first migration verified both sides before committing and landed on hostB.
    assert!(out.contains("vm1") && out.contains("hostB"), "{out}");
    // The way back: a JSON report whose verification matched, and the guest runs on hostA.
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("/tmp/vm1-back.json").unwrap()).unwrap();
    let v = &back["verification"];
    assert_eq!(v["memory_equal"], true, "{back:#}");
    assert_eq!(v["vcpus_equal"], true, "{back:#}");
    let at_pause = back["counter_at_pause"].as_u64().expect("counter_at_pause");
    let (counter, failed) = last_counter(&out).expect("`vm show` printed the counter");
    assert!(
        counter > at_pause,
        "the counter did not go on after the migration back: {counter} <= {at_pause}\n{out}"
    );
    assert_eq!(
        failed, 0,
        "the guest's self-check failed after landing\n{out}"
    );
    // The cold migration: every file's digest equal on both sides (the definition, NVRAM,
    // disk and log at least).
    assert!(out.contains("vm1 moved hostA -> hostB"), "{out}");
    let equal = out.lines().filter(|l| l.ends_with("digest equal")).count();
    assert!(equal >= 4, "{equal} files with equal digests\n{out}");
    assert!(!out.contains("DIFFER"), "{out}");
}

#[test]
fn readme_block_and_counter_line_are_found() {
    assert_eq!(
        last_counter(
            "counter = 5 (1 reports, 0 failed checks)\ncounter = 9 (2 reports, 3 failed checks)\n"
        ),
        Some((9, 3))
    );
    let b = readme_block("x\n<!-- e2e_readme: run -->\n```sh\necho a\necho b\n```\nrest");
    assert_eq!(b, "echo a\necho b");
}
