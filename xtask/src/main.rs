//! `cargo xtask`: setup, build, run, test, bench. Prints every command it runs.

use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = split_task(&args);
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
                 \n  bench compress --compress zstd against none at 64 MiB/s, compressible and random pages\
                 \n  bench qemu     vmig against QEMU (installed if missing) on the same guest work\
                 \n  bench qemu idle  only its idle 1 GiB row\
                 \n  bench tls      only the cost of mutual TLS (sender throughput, downtime) vs plaintext\
                 \n  bench disk     the live disk mirror against a plain copy of the same image, and its memory"
            );
            task == "help"
        }
    };
    exit(if ok { 0 } else { 1 });
}

/// Splits `cargo xtask TASK [--] ARGS` into the task and its arguments. The `--` that
/// `cargo xtask run -- migrate vm1 hostB` needs (so cargo does not read `migrate`'s flags) is
/// the separator of the task's own arguments, not one of them.
fn split_task(args: &[String]) -> (&str, &[String]) {
    match args.split_first() {
        None => ("help", &[]),
        Some((task, rest)) => match rest.split_first() {
            Some((sep, after)) if sep == "--" => (task.as_str(), after),
            _ => (task.as_str(), rest),
        },
    }
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
    setup();
    let mut c = cargo();
    c.args(["build", "--release", "--workspace"]).args(rest);
    sh(c)
}

fn run(rest: &[String]) -> bool {
    // The build needs libclang (bindgen, for userfaultfd) and clang (the BPF programs): a
    // fresh machine gets them here, not only through `cargo xtask test`.
    setup();
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
    let only = rest.first().map(String::as_str).filter(|a| {
        matches!(
            *a,
            "probes" | "holdback" | "compress" | "qemu" | "tls" | "disk" | "cold"
        )
    });
    if let Some(bin) = only {
        if matches!(bin, "qemu" | "tls" | "disk" | "cold") && !build_release_vmig() {
            return false;
        }
        return bench_bin(bin, &rest[1..]);
    }
    if !build_release_vmig() {
        return false;
    }
    bench_bin("migration", rest)
        && bench_bin("probes", &[])
        && bench_bin("holdback", &[])
        && bench_bin("compress", &[])
        && bench_bin("tls", &[])
        && bench_bin("disk", &[])
        && bench_bin("cold", &[])
        && bench_bin("qemu", &[])
}

fn build_release_vmig() -> bool {
    let mut b = cargo();
    b.args(["build", "--release", "-p", "vmig", "--bin", "vmig"]);
    sh(b)
}

fn bench_bin(bin: &str, rest: &[String]) -> bool {
    let mut c = cargo();
    c.args(["run", "--release", "-p", "vmig-benches", "--bin", bin, "--"])
        .args(rest);
    sh(c)
}

#[cfg(test)]
mod tests {
    use super::split_task;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn separator_after_the_task_is_not_an_argument() {
        let a = v(&[
            "run",
            "--",
            "migrate",
            "vm1",
            "hostB",
            "--max-downtime",
            "50",
        ]);
        let (task, rest) = split_task(&a);
        assert_eq!(task, "run");
        assert_eq!(
            rest,
            &v(&["migrate", "vm1", "hostB", "--max-downtime", "50"])[..]
        );
    }

    #[test]
    fn arguments_without_separator_pass_unchanged() {
        let a = v(&["run", "trace", "vm1"]);
        assert_eq!(split_task(&a), ("run", &v(&["trace", "vm1"])[..]));
        let a = v(&["test", "--", "--", "--nocapture"]);
        assert_eq!(split_task(&a), ("test", &v(&["--", "--nocapture"])[..]));
        assert_eq!(split_task(&[]).0, "help");
    }
}
