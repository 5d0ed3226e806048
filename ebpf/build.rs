//! Compiles `bpf/vmig.bpf.c` into `$OUT_DIR/vmig.bpf.o` with clang.
//!
//! A missing clang (or missing libbpf headers) is not a build failure: the crate then builds
//! without the object, sets no `vmig_bpf_built` cfg, and `VmProbes::attach` returns
//! `EbpfError::NotBuilt` with the reason recorded here. A C compile error is a build failure.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// clang binaries tried in order when `VMIG_CLANG` / `CLANG` is not set.
const CLANG_CANDIDATES: &[&str] = &["clang", "clang-19", "clang-22", "clang-16", "clang-14"];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(vmig_bpf_built)");
    println!("cargo:rerun-if-changed=bpf/vmig.bpf.c");
    println!("cargo:rerun-if-changed=bpf/vmig.h");
    println!("cargo:rerun-if-env-changed=VMIG_CLANG");
    println!("cargo:rerun-if-env-changed=CLANG");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    match build_bpf(&out_dir) {
        Ok(()) => {
            println!("cargo:rustc-cfg=vmig_bpf_built");
            println!("cargo:rustc-env=VMIG_BPF_NOT_BUILT_REASON=");
        }
        Err(reason) => {
            println!("cargo:warning=vmig-ebpf: BPF programs not built: {reason}; kernel-assisted tracking will be unavailable (see ebpf/README.md)");
            println!("cargo:rustc-env=VMIG_BPF_NOT_BUILT_REASON={reason}");
        }
    }
}

/// Compiles the BPF object, or says why it could not be attempted.
fn build_bpf(out_dir: &Path) -> Result<(), String> {
    let clang = find_clang().ok_or_else(|| "clang not found at build time".to_string())?;
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err(
            "libbpf headers (bpf/bpf_helpers.h, package libbpf-dev) not found at build time".into(),
        );
    }
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let (arch_define, multiarch) = match target_arch.as_str() {
        "x86_64" => ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
        "aarch64" => ("-D__TARGET_ARCH_arm64", "/usr/include/aarch64-linux-gnu"),
        other => return Err(format!("unsupported target architecture {other}")),
    };
    let out = out_dir.join("vmig.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-g",
            "-O2",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            arch_define,
        ])
        .arg(format!("-I{multiarch}"))
        .arg("-Ibpf")
        .args(["-c", "bpf/vmig.bpf.c", "-o"])
        .arg(&out)
        .status()
        .map_err(|e| format!("running {clang}: {e}"))?;
    if !status.success() {
        panic!("{clang} failed to compile bpf/vmig.bpf.c ({status})");
    }
    Ok(())
}

/// The clang to use: `VMIG_CLANG` or `CLANG` if set (and runnable), else the first runnable
/// candidate.
fn find_clang() -> Option<String> {
    let runs = |c: &str| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for var in ["VMIG_CLANG", "CLANG"] {
        if let Some(c) = env::var_os(var) {
            let c = c.to_string_lossy().into_owned();
            return runs(&c).then_some(c);
        }
    }
    CLANG_CANDIDATES
        .iter()
        .find(|c| runs(c))
        .map(|c| c.to_string())
}
