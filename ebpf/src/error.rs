//! Why the probes could not be loaded, attached or read.

use std::io;

/// Errors of [`crate::VmProbes`] and [`crate::available`]: each says which step failed and why, so
/// the agent can print once why kernel-assisted tracking is off.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The BPF object was not compiled into this binary (e.g. clang missing at build time).
    #[error("vmig BPF programs not built: {0}")]
    NotBuilt(&'static str),

    /// The process may not load BPF programs or open tracepoints (needs root, or CAP_BPF +
    /// CAP_PERFMON).
    #[error("permission denied loading BPF programs: {0}")]
    PermissionDenied(String),

    /// Kernel BTF is unusable for loading the object.
    #[error("kernel BTF unavailable or rejected: {0}")]
    NoBtf(String),

    /// tracefs is not mounted (mount it with `mount -t tracefs nodev /sys/kernel/tracing`).
    #[error("tracefs not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing")]
    NoTracefs,

    /// A tracepoint the probes need does not exist on this kernel.
    #[error("tracepoint {group}:{name} not found in tracefs")]
    MissingTracepoint {
        /// Tracepoint group, e.g. `kvm`.
        group: &'static str,
        /// Tracepoint name, e.g. `kvm_dirty_ring_push`.
        name: &'static str,
    },

    /// A tracepoint's record layout differs from the one the C programs were written against.
    #[error("tracepoint {tracepoint} layout differs from vmig.bpf.c: {detail}")]
    LayoutMismatch {
        /// `group:name` of the tracepoint.
        tracepoint: String,
        /// The first field found different.
        detail: String,
    },

    /// The object failed to load (verifier rejection, map creation...).
    #[error("loading the BPF object failed")]
    LoadFailed(#[source] Box<aya::EbpfError>),

    /// One program failed to load or attach.
    #[error("attaching BPF program {program} failed")]
    AttachFailed {
        /// The program's name in vmig.bpf.c.
        program: &'static str,
        /// What aya or the kernel reported.
        #[source]
        cause: Box<aya::programs::ProgramError>,
    },

    /// Reading or writing one of the maps failed.
    #[error("BPF map {map} failed")]
    Map {
        /// The map's name in vmig.bpf.c.
        map: &'static str,
        /// What aya or the kernel reported.
        #[source]
        cause: Box<aya::maps::MapError>,
    },

    /// `event_stream` was already taken, or the probes were attached with `with_events = false`.
    #[error("event stream unavailable: {0}")]
    NoEvents(&'static str),

    /// An I/O error outside aya (tracefs, the ring buffer's epoll registration).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl EbpfError {
    /// Turns an error whose cause chain holds EPERM/EACCES into [`EbpfError::PermissionDenied`].
    pub(crate) fn classify(self) -> Self {
        match denied_in(&self) {
            Some(why) => EbpfError::PermissionDenied(why),
            None => self,
        }
    }
}

/// The error and its causes as a string if its cause chain holds EPERM/EACCES.
pub(crate) fn denied_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return Some(chain_to_string(e));
            }
        }
        cur = c.source();
    }
    None
}

/// Formats an error with all its causes, `a: b: c`.
pub fn chain_to_string(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
