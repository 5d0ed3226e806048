//! `cargo xtask`: setup, build, run, test, bench. Prints every command it runs.

use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    let ok = match task {
        "setup" => setup(),
        "build" => build(rest),
        "run" => run(rest),
        "test" => test(rest),
        "bench" => bench(rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\
                 \n  setup          install the system packages the build and tests need (apt)\
                 \n  build          build everything (release)\
                 \n  run -- ARGS    run `vmig ARGS` (release build); `run` alone runs the demo\
                 \n  test           setup, then the whole test suite (needs root and /dev/kvm)\
                 \n  bench          migration benchmarks (release), ratios against loopback TCP,\
                 \n                 then the probe overhead and hot-page holdback experiments\
                 \n  bench probes   only the BPF probe overhead (guest dirtying rate with/without)\
                 \n  bench holdback only the hot-page holdback experiment (bytes sent, downtime)\
                 \n  bench tls      only the cost of mutual TLS (sender throughput, downtime) vs plaintext"
            );
            task == "help"
        }
    };
    exit(if ok { 0 } else { 1 });
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn sh(mut c: Command) -> bool {
    eprintln!("$ {}", format!("{c:?}").replace('"', ""));
    match c.status() {
        Ok(s) => s.success(),
        Err(e) => {
            eprintln!("cannot run: {e}");
            false
        }
    }
}

/// Installs clang (for the BPF programs) and what else the build needs, if missing.
fn setup() -> bool {
    let mut c = Command::new("bash");
    c.arg(root().join("ebpf/install-deps.sh"));
    if !sh(c) {
        eprintln!("warning: could not install the eBPF build dependencies; kernel-assisted tracing will be off");
    }
    let tracefs = Path::new("/sys/kernel/tracing/events");
    if !tracefs.exists() {
        let mut m = Command::new("mount");
        m.args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]);
        let _ = sh(m);
    }
    true
}

fn build(rest: &[String]) -> bool {
    let mut c = cargo();
    c.args(["build", "--release", "--workspace"]).args(rest);
    sh(c)
}

fn run(rest: &[String]) -> bool {
    let args: Vec<String> = if rest.is_empty() {
        vec!["demo".into()]
    } else {
        rest.to_vec()
    };
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "vmig",
        "--bin",
        "vmig",
        "--",
    ])
    .args(&args);
    sh(c)
}

fn test(rest: &[String]) -> bool {
    setup();
    let mut b = cargo();
    b.args(["build", "-p", "vmig", "--bin", "vmig"]);
    if !sh(b) {
        return false;
    }
    let mut c = cargo();
    c.args(["test", "--workspace", "--exclude", "xtask"]);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("\n*** SKIPPED: no /dev/kvm on this machine: every test that runs a VM (`vm::`, `migrate::tests`, `e2e`) is skipped ***\n");
        c.args([
            "--",
            "--skip",
            "vm::",
            "--skip",
            "migrate::tests",
            "--skip",
            "e2e",
        ]);
    }
    c.args(rest);
    sh(c)
}

fn bench(rest: &[String]) -> bool {
    setup();
    // In-process experiments, each its own binary of vmig-benches.
    let only = rest
        .first()
        .map(String::as_str)
        .filter(|a| matches!(*a, "probes" | "holdback" | "tls"));
    if let Some(bin) = only {
        return bench_bin(bin, &rest[1..]);
    }
    let mut b = cargo();
    b.args(["build", "--release", "-p", "vmig", "--bin", "vmig"]);
    if !sh(b) {
        return false;
    }
    bench_bin("migration", rest)
        && bench_bin("probes", &[])
        && bench_bin("holdback", &[])
        && bench_bin("tls", &[])
}

fn bench_bin(bin: &str, rest: &[String]) -> bool {
    let mut c = cargo();
    c.args(["run", "--release", "-p", "vmig-benches", "--bin", bin, "--"])
        .args(rest);
    sh(c)
}
