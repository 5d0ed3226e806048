//! The tracepoints the programs attach to, and a check of each record layout against the running
//! kernel's tracefs `format` files.
//!
//! `vmig.bpf.c` declares the tracepoint records by hand (no `vmlinux.h`). Before attaching, every
//! field the C code reads is looked up in `/sys/kernel/tracing/events/<group>/<name>/format`; a
//! different offset or size is [`EbpfError::LayoutMismatch`] instead of silently wrong numbers.

use std::fs;
use std::path::{Path, PathBuf};

use crate::EbpfError;

/// A field the C code reads: name, offset, size (bytes).
type Field = (&'static str, u32, u32);

/// One program of `vmig.bpf.c` and the tracepoint it attaches to.
pub(crate) struct Probe {
    /// Function name in `vmig.bpf.c`.
    pub program: &'static str,
    /// Tracepoint group (`kvm`, `exceptions`, `syscalls`).
    pub group: &'static str,
    /// Tracepoint name.
    pub name: &'static str,
    /// Fields read by the program, as declared in the C struct.
    pub fields: &'static [Field],
}

/// Every program, in attach order. Syscall probes come last: they only matter during post-copy.
pub(crate) const PROBES: &[Probe] = &[
    Probe {
        program: "vmig_kvm_page_fault",
        group: "kvm",
        name: "kvm_page_fault",
        fields: &[("fault_address", 24, 8), ("error_code", 32, 8)],
    },
    Probe {
        program: "vmig_dirty_ring_push",
        group: "kvm",
        name: "kvm_dirty_ring_push",
        fields: &[
            ("dirty_index", 12, 4),
            ("reset_index", 16, 4),
            ("slot", 20, 4),
            ("offset", 24, 8),
        ],
    },
    Probe {
        program: "vmig_dirty_ring_exit",
        group: "kvm",
        name: "kvm_dirty_ring_exit",
        fields: &[("vcpu_id", 8, 4)],
    },
    Probe {
        program: "vmig_dirty_ring_reset",
        group: "kvm",
        name: "kvm_dirty_ring_reset",
        fields: &[
            ("index", 8, 4),
            ("dirty_index", 12, 4),
            ("reset_index", 16, 4),
        ],
    },
    Probe {
        program: "vmig_kvm_emulate_insn",
        group: "kvm",
        name: "kvm_emulate_insn",
        fields: &[],
    },
    Probe {
        program: "vmig_kvm_exit",
        group: "kvm",
        name: "kvm_exit",
        fields: &[("exit_reason", 8, 4)],
    },
    Probe {
        program: "vmig_page_fault_user",
        group: "exceptions",
        name: "page_fault_user",
        fields: &[("address", 8, 8), ("error_code", 24, 8)],
    },
    Probe {
        program: "vmig_page_fault_kernel",
        group: "exceptions",
        name: "page_fault_kernel",
        fields: &[("address", 8, 8), ("error_code", 24, 8)],
    },
    Probe {
        program: "vmig_sys_enter_ioctl",
        group: "syscalls",
        name: "sys_enter_ioctl",
        fields: &[("cmd", 24, 8), ("arg", 32, 8)],
    },
    Probe {
        program: "vmig_sys_exit_ioctl",
        group: "syscalls",
        name: "sys_exit_ioctl",
        fields: &[("ret", 16, 8)],
    },
];

/// The tracefs mount holding `events/`, if any.
pub(crate) fn tracefs_root() -> Result<PathBuf, EbpfError> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
        .ok_or(EbpfError::NoTracefs)
}

/// Checks every probe's tracepoint exists and has the layout the C code expects.
pub(crate) fn check_all(root: &Path) -> Result<(), EbpfError> {
    PROBES.iter().try_for_each(|p| check(root, p))
}

fn check(root: &Path, probe: &Probe) -> Result<(), EbpfError> {
    let path = root
        .join("events")
        .join(probe.group)
        .join(probe.name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|_| EbpfError::MissingTracepoint {
        group: probe.group,
        name: probe.name,
    })?;
    for &(field, offset, size) in probe.fields {
        let found = parse_field(&text, field);
        if found != Some((offset, size)) {
            return Err(EbpfError::LayoutMismatch {
                tracepoint: format!("{}:{}", probe.group, probe.name),
                detail: match found {
                    Some((o, s)) => {
                        format!("{field} is at offset {o} size {s}, expected offset {offset} size {size}")
                    }
                    None => format!("field {field} not found"),
                },
            });
        }
    }
    Ok(())
}

/// Finds `field:<type> <name>;\toffset:<o>;\tsize:<s>;` in a format file.
fn parse_field(format: &str, name: &str) -> Option<(u32, u32)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let decl_name = decl.rsplit(' ').next()?.split('[').next()?;
        if decl_name != name {
            return None;
        }
        let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
        let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
        Some((offset, size))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUSH: &str = "name: kvm_dirty_ring_push\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:u32 slot;\toffset:20;\tsize:4;\tsigned:0;\n\tfield:u64 offset;\toffset:24;\tsize:8;\tsigned:0;\n";

    #[test]
    fn parses_fields_of_a_format_file() {
        assert_eq!(parse_field(PUSH, "slot"), Some((20, 4)));
        assert_eq!(parse_field(PUSH, "offset"), Some((24, 8)));
        assert_eq!(parse_field(PUSH, "common_type"), Some((0, 2)));
        assert_eq!(parse_field(PUSH, "missing"), None);
    }
}
