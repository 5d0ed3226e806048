//! Kernel-assisted tracking for one VM: BPF programs on KVM, exception and syscall tracepoints,
//! filtered to the VM's VMM process, vCPU threads and guest memory.
//!
//! The programs (`bpf/vmig.bpf.c`, C compiled by clang in `build.rs`) count, per VM:
//! - KVM-handled guest page faults (`kvm:kvm_page_fault`),
//! - dirty-ring pushes and the distinct pages they name per window (`kvm:kvm_dirty_ring_push`),
//!   ring-full exits and resets (`kvm:kvm_dirty_ring_exit`, `kvm:kvm_dirty_ring_reset`),
//! - VM exits by vCPU and reason (`kvm:kvm_exit`), instructions emulated (`kvm:kvm_emulate_insn`),
//! - faults of the VMM on guest memory (`exceptions:page_fault_{user,kernel}`) and, during
//!   post-copy, the time until a `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` covering the page returns
//!   (`syscalls:sys_{enter,exit}_ioctl`).
//!
//! [`VmProbes::attach`] loads and attaches them; dropping the [`VmProbes`] detaches them all.
//! [`available`] is a cheap check of whether attaching can work here.
#![deny(missing_docs, missing_debug_implementations)]

mod error;
mod event;
mod exits;
mod layout;
mod raw;

use std::collections::BTreeMap;
use std::sync::Once;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf};

pub use error::{chain_to_string, EbpfError};
pub use event::{Event, EventStream};
pub use exits::exit_reason_name;
pub use raw::{RawEvent, NO_VCPU};

use raw::{counter, ExitKey, RawConfig, TidSlot, TID_CACHE, TID_TOMBSTONE};

/// Set to `1` to use the classic `kvm:kvm_dirty_ring_push` tracepoint program even where the BTF
/// one loads (to compare the two).
pub const CLASSIC_PUSH_ENV: &str = "VMIG_EBPF_CLASSIC_PUSH";

/// Which program counts the dirty-ring pushes of a [`VmProbes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushProgram {
    /// `tp_btf/kvm_dirty_ring_push`: the kernel passes the tracepoint's raw arguments, formats no
    /// record, and the program's body is the lightest (counters only).
    Btf,
    /// The classic `kvm:kvm_dirty_ring_push` tracepoint program: with events, where BTF
    /// tracepoints are unavailable, or with [`CLASSIC_PUSH_ENV`] set.
    Classic,
    /// None: the probe set does not include the dirty-ring push.
    None,
}

/// Which VM to watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFilter {
    /// The VMM process (tgid). User faults and uffd ioctls count only in this process.
    pub pid: u32,
    /// Thread ids of the VM's vCPU threads; index `i` is vCPU `i`. KVM events count only on these
    /// threads (one agent process runs many VMs). More can be added with
    /// [`VmProbes::add_vcpu_tid`].
    pub vcpu_tids: Vec<u32>,
    /// Start of the guest memory mapping (host-virtual).
    pub mem_start: u64,
    /// Length of the guest memory mapping in bytes.
    pub mem_len: u64,
}

/// Which programs [`VmProbes::attach_set`] attaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbeSet {
    /// Every program: what `vmig trace` shows.
    #[default]
    All,
    /// Only the dirty-ring programs (`kvm:kvm_dirty_ring_push` and `kvm:kvm_dirty_ring_exit`):
    /// pushes, distinct pages per window and ring-full exits, the pre-copy controller's figures.
    /// Without events the pushes are counted by a BTF tracepoint program where it loads (see
    /// [`PushProgram`]).
    /// Every other counter stays 0, and nothing runs on the far more frequent tracepoints
    /// (`kvm_emulate_insn` fires per emulated guest instruction, `sys_enter_ioctl` per `KVM_RUN`).
    DirtyRing,
}

impl ProbeSet {
    fn includes(self, program: &str) -> bool {
        match self {
            ProbeSet::All => true,
            ProbeSet::DirtyRing => {
                matches!(program, "vmig_dirty_ring_push" | "vmig_dirty_ring_exit")
            }
        }
    }
}

/// Totals since attach (sums over CPUs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// KVM-handled guest page faults on the VM's vCPU threads.
    pub kvm_page_faults: u64,
    /// Dirty-ring entries pushed (on emulated writes: one per write, duplicates included).
    pub dirty_ring_pushes: u64,
    /// Distinct pages pushed, summed over windows ([`VmProbes::start_dirty_window`]): within one
    /// window a page counts once.
    pub dirty_pages_distinct: u64,
    /// vCPU exits to user space because the dirty ring was full.
    pub dirty_ring_full: u64,
    /// Ring resets (`KVM_RESET_DIRTY_RINGS` that recycled entries of one ring) by the VMM.
    pub dirty_ring_resets: u64,
    /// Faults of the VMM process on guest memory (user mode and kernel mode).
    pub user_faults: u64,
    /// Of [`Counters::user_faults`], those taken in kernel mode on the user address.
    pub kernel_mode_faults: u64,
    /// Faulted pages later covered by a returning `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
    pub user_faults_resolved: u64,
    /// Sum of the fault-to-resolution times of [`Counters::user_faults_resolved`], in ns.
    pub user_fault_wait_ns: u64,
    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` ioctls on guest memory by the VMM.
    pub uffd_ioctls: u64,
    /// VM exits on the VM's vCPU threads.
    pub kvm_exits: u64,
    /// Guest instructions run by KVM's instruction emulator on the VM's vCPU threads.
    pub emulated_insns: u64,
    /// VM exits by reason (`kvm_exit`'s raw `exit_reason`; see [`exit_reason_name`]).
    pub exits_by_reason: BTreeMap<u32, u64>,
    /// VM exits by (vCPU index, reason).
    pub exits_by_vcpu: BTreeMap<(u32, u32), u64>,
    /// Events lost because the ring buffer was full (the reader is too slow).
    pub events_dropped: u64,
}

/// The attached probes of one VM. Dropping it detaches every program and frees the maps.
pub struct VmProbes {
    config: Array<MapData, RawConfig>,
    vcpu_tids: HashMap<MapData, u32, u32>,
    vcpu_tid_cache: Array<MapData, TidSlot>,
    counters: PerCpuArray<MapData, u64>,
    exits: HashMap<MapData, ExitKey, u64>,
    events: Option<RingBuf<MapData>>,
    raw_config: RawConfig,
    push: PushProgram,
    // Owns the programs and their links: dropped last (declaration order), detaching everything.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for VmProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmProbes")
            .field("config", &self.raw_config)
            .field("events", &self.events.is_some())
            .field("push", &self.push)
            .finish_non_exhaustive()
    }
}

/// The BPF object compiled by build.rs, when clang was found.
#[cfg(vmig_bpf_built)]
fn object() -> Result<&'static [u8], EbpfError> {
    Ok(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/vmig.bpf.o"
    )))
}

#[cfg(not(vmig_bpf_built))]
fn object() -> Result<&'static [u8], EbpfError> {
    Err(EbpfError::NotBuilt(env!("VMIG_BPF_NOT_BUILT_REASON")))
}

/// The kernel's BTF, parsed once per process: megabytes, which every attach would otherwise
/// parse twice (the loader's relocations and the BTF tracepoint), tens of milliseconds of CPU
/// inside an attach that runs beside a migration's first round.
fn kernel_btf() -> Option<&'static Btf> {
    static BTF: std::sync::OnceLock<Option<Btf>> = std::sync::OnceLock::new();
    BTF.get_or_init(|| match Btf::from_sys_fs() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::debug!(cause = %e, "the kernel's BTF cannot be read");
            None
        }
    })
    .as_ref()
}

/// Parses the kernel's BTF now (see [`kernel_btf`]), so that the first attach does not: an
/// agent calls it once at start, off its critical paths.
pub fn warm_up() {
    let _ = kernel_btf();
}

/// Cheap check that [`VmProbes::attach`] can work here: the object was built, the process has
/// the capabilities, tracefs is mounted and every tracepoint exists with the expected layout.
/// Loads nothing.
pub fn available() -> Result<(), EbpfError> {
    object()?;
    check_capabilities()?;
    let root = layout::tracefs_root()?;
    layout::check_all(&root)
}

/// Tracepoint programs need CAP_SYS_ADMIN, or CAP_BPF and CAP_PERFMON.
fn check_capabilities() -> Result<(), EbpfError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| EbpfError::Io {
        what: "reading /proc/self/status".into(),
        source,
    })?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(EbpfError::PermissionDenied(
            "needs root, or CAP_BPF and CAP_PERFMON, to load BPF programs on tracepoints".into(),
        ))
    }
}

impl VmProbes {
    /// Loads the programs, installs `filter`, and attaches every program. With `with_events`
    /// false the programs only count (no ring-buffer traffic) and [`VmProbes::event_stream`]
    /// fails.
    pub fn attach(filter: &VmFilter, with_events: bool) -> Result<Self, EbpfError> {
        Self::attach_set(filter, with_events, ProbeSet::All)
    }

    /// Like [`VmProbes::attach`], attaching only the programs of `set`.
    pub fn attach_set(
        filter: &VmFilter,
        with_events: bool,
        set: ProbeSet,
    ) -> Result<Self, EbpfError> {
        let bytes = object()?;
        check_capabilities()?;
        let root = layout::tracefs_root()?;
        layout::check_all(&root)?;

        // One dirty_pages entry per guest page (4 KiB), within sane bounds.
        let pages = (filter.mem_len / 4096).clamp(1024, 1 << 24) as u32;
        let mut ebpf = aya::EbpfLoader::new()
            .btf(kernel_btf())
            .set_max_entries("dirty_pages", pages)
            .set_max_entries("dirty_gen_slot0", pages)
            .load(bytes)
            .map_err(|e| match e {
                // The object holds a BTF-tracepoint program, so aya fails the whole load when the
                // kernel refuses the object's BTF: without CAP_BPF that is a permission error.
                aya::EbpfError::BtfError(b) => match error::denied_in(&b) {
                    Some(why) => EbpfError::PermissionDenied(why),
                    None => EbpfError::NoBtf(error::chain_to_string(&b)),
                },
                other => EbpfError::LoadFailed(Box::new(other)).classify(),
            })?;

        let raw_config = RawConfig {
            mem_start: filter.mem_start,
            mem_len: filter.mem_len,
            tgid: filter.pid,
            events: u32::from(with_events),
            generation: 1,
            pad: 0,
        };
        let mut probes = VmProbes {
            config: take_map(&mut ebpf, "config")?,
            vcpu_tids: take_map(&mut ebpf, "vcpu_tids")?,
            vcpu_tid_cache: take_map(&mut ebpf, "vcpu_tid_cache")?,
            counters: take_map(&mut ebpf, "counters")?,
            exits: take_map(&mut ebpf, "exits")?,
            events: with_events
                .then(|| take_map(&mut ebpf, "events"))
                .transpose()?,
            raw_config,
            push: PushProgram::None,
            _ebpf: ebpf,
        };
        for (vcpu, &tid) in filter.vcpu_tids.iter().enumerate() {
            probes.add_vcpu_tid(tid, vcpu as u32)?;
        }
        probes.write_config()?;

        for probe in layout::PROBES.iter().filter(|p| set.includes(p.program)) {
            if probe.program == PUSH_PROGRAM {
                probes.push = if !with_events && attach_push_btf(&mut probes._ebpf) {
                    PushProgram::Btf
                } else {
                    PushProgram::Classic
                };
                if probes.push == PushProgram::Btf {
                    continue;
                }
            }
            attach_one(&mut probes._ebpf, probe)?;
        }
        tracing::debug!(
            pid = filter.pid,
            vcpus = filter.vcpu_tids.len(),
            ?set,
            push = ?probes.push,
            "vmig BPF probes attached"
        );
        Ok(probes)
    }

    /// Registers one more vCPU thread (`tid`) as vCPU `vcpu`.
    pub fn add_vcpu_tid(&mut self, tid: u32, vcpu: u32) -> Result<(), EbpfError> {
        self.vcpu_tids
            .insert(tid, vcpu, 0)
            .map_err(|e| map_err("vcpu_tids", e))?;
        // The push program's cache: only into an empty slot (or this tid's own); a collision
        // leaves the other tid there and this one is found in vcpu_tids.
        let idx = tid & (TID_CACHE - 1);
        let slot = self
            .vcpu_tid_cache
            .get(&idx, 0)
            .map_err(|e| map_err("vcpu_tid_cache", e))?;
        if slot.tid == 0 || slot.tid == tid {
            self.vcpu_tid_cache
                .set(idx, TidSlot { tid, vcpu }, 0)
                .map_err(|e| map_err("vcpu_tid_cache", e))?;
        }
        Ok(())
    }

    /// Forgets a vCPU thread (e.g. after it exited: tids are reused).
    pub fn remove_vcpu_tid(&mut self, tid: u32) -> Result<(), EbpfError> {
        // Its cache slot becomes a tombstone, not empty: a colliding tid may be in vcpu_tids.
        let idx = tid & (TID_CACHE - 1);
        let slot = self
            .vcpu_tid_cache
            .get(&idx, 0)
            .map_err(|e| map_err("vcpu_tid_cache", e))?;
        if slot.tid == tid {
            let tombstone = TidSlot {
                tid: TID_TOMBSTONE,
                vcpu: 0,
            };
            self.vcpu_tid_cache
                .set(idx, tombstone, 0)
                .map_err(|e| map_err("vcpu_tid_cache", e))?;
        }
        match self.vcpu_tids.remove(&tid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("vcpu_tids", e)),
        }
    }

    /// Changes the guest-memory range that user faults and uffd ioctls are matched against.
    pub fn set_memory_range(&mut self, start: u64, len: u64) -> Result<(), EbpfError> {
        self.raw_config.mem_start = start;
        self.raw_config.mem_len = len;
        self.write_config()
    }

    /// Starts a new dirty-page window: from now on every page pushed to a dirty ring counts once
    /// more in [`Counters::dirty_pages_distinct`]. The distinct pages of a window are the
    /// difference of that counter between two calls (e.g. one pre-copy round).
    pub fn start_dirty_window(&mut self) -> Result<(), EbpfError> {
        self.raw_config.generation = self.raw_config.generation.wrapping_add(1).max(1);
        self.write_config()
    }

    /// Reads all counters.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let get = |idx: u32| -> Result<u64, EbpfError> {
            let per_cpu = self
                .counters
                .get(&idx, 0)
                .map_err(|e| map_err("counters", e))?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        let mut c = Counters {
            kvm_page_faults: get(counter::KVM_PAGE_FAULTS)?,
            dirty_ring_pushes: get(counter::DIRTY_RING_PUSHES)?,
            dirty_pages_distinct: get(counter::DIRTY_PAGES_DISTINCT)?,
            dirty_ring_full: get(counter::DIRTY_RING_FULL)?,
            dirty_ring_resets: get(counter::DIRTY_RING_RESETS)?,
            user_faults: get(counter::USER_FAULTS)?,
            kernel_mode_faults: get(counter::KERNEL_MODE_FAULTS)?,
            user_faults_resolved: get(counter::USER_FAULTS_RESOLVED)?,
            user_fault_wait_ns: get(counter::USER_FAULT_WAIT_NS)?,
            uffd_ioctls: get(counter::UFFD_IOCTLS)?,
            kvm_exits: get(counter::KVM_EXITS)?,
            emulated_insns: get(counter::EMULATED_INSNS)?,
            events_dropped: get(counter::EVENTS_DROPPED)?,
            ..Counters::default()
        };
        for entry in self.exits.iter() {
            let (key, n) = entry.map_err(|e| map_err("exits", e))?;
            *c.exits_by_reason.entry(key.reason).or_default() += n;
            *c.exits_by_vcpu.entry((key.vcpu, key.reason)).or_default() += n;
        }
        Ok(c)
    }

    /// Takes the event stream (once). Must be called inside a tokio runtime.
    pub fn event_stream(&mut self) -> Result<EventStream, EbpfError> {
        if self.raw_config.events == 0 {
            return Err(EbpfError::NoEvents(
                "probes attached with with_events = false",
            ));
        }
        let ring = self
            .events
            .take()
            .ok_or(EbpfError::NoEvents("event stream already taken"))?;
        EventStream::new(ring)
    }

    /// Which program counts the dirty-ring pushes.
    pub fn push_program(&self) -> PushProgram {
        self.push
    }

    /// Reports whether attaching can work here; same as [`available`].
    pub fn available() -> Result<(), EbpfError> {
        available()
    }

    fn write_config(&mut self) -> Result<(), EbpfError> {
        self.config
            .set(0, self.raw_config, 0)
            .map_err(|e| map_err("config", e))
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Map {
        map: name,
        cause: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(map).map_err(|e| map_err(name, e))
}

fn map_err(map: &'static str, e: aya::maps::MapError) -> EbpfError {
    EbpfError::Map {
        map,
        cause: Box::new(e),
    }
    .classify()
}

/// The classic push program (in [`layout::PROBES`]) and its BTF-tracepoint twin.
const PUSH_PROGRAM: &str = "vmig_dirty_ring_push";
const PUSH_PROGRAM_BTF: &str = "vmig_dirty_ring_push_btf";

/// Loads and attaches the BTF-tracepoint push program; false (and the reason logged once per
/// process) if it cannot, and the caller attaches the classic one.
fn attach_push_btf(ebpf: &mut Ebpf) -> bool {
    static WHY_NOT_LOGGED: Once = Once::new();
    if std::env::var_os(CLASSIC_PUSH_ENV).is_some_and(|v| v == "1") {
        return false;
    }
    let mut attach = || -> Result<(), String> {
        let btf =
            kernel_btf().ok_or("the kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read")?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(PUSH_PROGRAM_BTF)
            .ok_or_else(|| format!("{PUSH_PROGRAM_BTF} not in the object"))?
            .try_into()
            .map_err(|e| error::chain_to_string(&e))?;
        prog.load("kvm_dirty_ring_push", btf)
            .map_err(|e| format!("loading: {}", error::chain_to_string(&e)))?;
        prog.attach()
            .map_err(|e| format!("attaching: {}", error::chain_to_string(&e)))?;
        Ok(())
    };
    match attach() {
        Ok(()) => true,
        Err(why) => {
            WHY_NOT_LOGGED.call_once(|| {
                tracing::info!(
                    %why,
                    "BTF tracepoint tp_btf/kvm_dirty_ring_push unavailable: \
                     counting dirty-ring pushes with the classic tracepoint (slower)"
                );
            });
            false
        }
    }
}

fn attach_one(ebpf: &mut Ebpf, probe: &layout::Probe) -> Result<(), EbpfError> {
    let fail = |e: aya::programs::ProgramError| {
        EbpfError::AttachFailed {
            program: probe.program,
            cause: Box::new(e),
        }
        .classify()
    };
    let prog: &mut TracePoint = ebpf
        .program_mut(probe.program)
        .ok_or_else(|| fail(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(fail)?;
    prog.load().map_err(fail)?;
    prog.attach(probe.group, probe.name).map_err(fail)?;
    Ok(())
}
