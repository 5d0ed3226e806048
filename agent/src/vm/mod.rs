//! The VMM: a KVM VM with one guest-memory slot, vCPU threads, port-I/O devices, a
//! virtio-blk disk over virtio-mmio, and the complete save/restore of its state that
//! migration needs.

pub mod devices;
pub mod memory;
mod paused;
pub mod state;
pub mod vcpu;
pub mod virtio;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, DirtyLog, DirtyMode, DirtyTracking};
use crate::guest::{layout, param, Program};
use devices::Devices;
use memory::{GuestRam, MemoryError};
pub use paused::Paused;
use state::{MachineState, StateError};
use vcpu::{Phase, Vcpu, VcpuEnv};
use virtio::blk::{BlkError, VirtioBlk};

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened or used.
    #[error("KVM: {what}: {cause}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// errno.
        cause: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Dirty tracking.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// vCPU state.
    #[error(transparent)]
    State(#[from] StateError),
    /// A definition the VMM cannot run.
    #[error("invalid VM: {0}")]
    Invalid(String),
    /// Spawning a thread failed.
    #[error("cannot spawn a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The virtio-blk disk.
    #[error(transparent)]
    Disk(#[from] BlkError),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |cause| VmError::Kvm { what, cause }
}

/// What the VMM needs to build a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Guest memory in bytes.
    pub memory: u64,
    /// The program of each vCPU.
    pub programs: Vec<Program>,
    /// Working set of each `dirty` vCPU, bytes.
    pub dirty_bytes: u64,
    /// Pages per second each `dirty` vCPU writes (0: flat out).
    pub dirty_rate: u64,
    /// Dirty-tracking mechanism.
    pub dirty_tracking: DirtyTracking,
    /// Blocks (4 KiB) per second the `disk` vCPU writes and checks (0: flat out).
    #[serde(default)]
    pub disk_rate: u64,
    /// First block of the `disk` region.
    #[serde(default)]
    pub disk_first_block: u64,
    /// Blocks in the `disk` region (0: to the end of the disk).
    #[serde(default)]
    pub disk_blocks: u64,
}

impl VmSpec {
    /// Checks the spec fits the VMM's layout.
    pub fn validate(&self) -> Result<(), VmError> {
        let n = self.programs.len() as u32;
        if n == 0 || n > layout::MAX_VCPUS {
            return Err(VmError::Invalid(format!(
                "{n} vCPUs (1 to {} supported)",
                layout::MAX_VCPUS
            )));
        }
        let disks = self
            .programs
            .iter()
            .filter(|&&p| p == Program::Disk)
            .count();
        if disks > 1 {
            return Err(VmError::Invalid(format!(
                "{disks} disk vCPUs (the disk has one queue: at most one)"
            )));
        }
        let dirty = self
            .programs
            .iter()
            .filter(|p| p.uses_working_set())
            .count() as u64;
        if dirty > 0 {
            if self.dirty_bytes < layout::PAGE_SIZE
                || !self.dirty_bytes.is_multiple_of(layout::PAGE_SIZE)
            {
                return Err(VmError::Invalid(format!(
                    "dirty working set {} bytes is not a positive number of pages",
                    self.dirty_bytes
                )));
            }
            let end = layout::WORKING_SETS + dirty * self.dirty_bytes;
            if end > self.memory {
                return Err(VmError::Invalid(format!(
                    "{dirty} working sets of {} MiB do not fit in {} MiB of memory",
                    self.dirty_bytes >> 20,
                    self.memory >> 20
                )));
            }
        }
        Ok(())
    }
}

/// Counters of a running VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// Latest counter value reported by a `counter` vCPU.
    pub counter: u64,
    /// Counter reports received.
    pub counter_reports: u64,
    /// Failed counter self-checks (must stay 0).
    pub counter_failures: u64,
    /// Pages written by `dirty` vCPUs (from their reports).
    pub dirty_pages_written: u64,
    /// Blocks the `disk` vCPU wrote and read back correctly.
    #[serde(default)]
    pub disk_blocks_verified: u64,
    /// The `disk` vCPU's generation (passes over its region).
    #[serde(default)]
    pub disk_generation: u64,
    /// Failed `disk` self-checks (must stay 0).
    #[serde(default)]
    pub disk_failures: u64,
    /// Requests the virtio-blk device completed.
    #[serde(default)]
    pub disk_requests: u64,
    /// Bytes the guest wrote to its disk.
    #[serde(default)]
    pub disk_bytes_written: u64,
    /// vCPU exits handled.
    pub exits: u64,
    /// Per vCPU: "running", "paused" or "exited: why".
    pub vcpus: Vec<String>,
    /// Dirty-tracking mechanism.
    pub dirty_mode: String,
}

/// A VM: KVM VM, guest memory, vCPU threads, devices.
#[derive(Debug)]
pub struct Vm {
    spec: VmSpec,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    devices: Arc<Devices>,
    dirty: Arc<DirtyLog>,
    vcpus: Vec<Vcpu>,
    msr_list: Vec<u32>,
    /// Auto-converge throttle, percent (shared with the vCPU threads).
    throttle: Arc<AtomicU32>,
    /// Whether the throttle's kick timer thread runs.
    kicker: Arc<AtomicBool>,
    /// Held (shared) by every [`Paused`]: a resume waits for them to go.
    resume_gate: RwLock<()>,
}

impl Vm {
    /// Builds a VM whose vCPUs are parked; [`Vm::boot`] loads the guest programs, or
    /// [`Vm::restore`] loads a migrated state; then [`Vm::resume`] runs it.
    pub fn create(spec: &VmSpec, name: &str, log: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        spec.validate()?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        let ram = Arc::new(GuestRam::new(spec.memory)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: spec.memory,
            userspace_addr: ram.host_base() as u64,
        };
        // SAFETY: the region is the VM's own guest mapping, which `ram` keeps alive as long as
        // the VM fd (both are dropped together with this Vm).
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mode = DirtyMode::choose(&vm_fd, spec.dirty_tracking)?;
        let dirty = Arc::new(DirtyLog::new(mode, vm_fd.clone(), region));
        let devices = Arc::new(Devices::new(log));
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        let mut msr_list = Vec::new();
        let throttle = Arc::new(AtomicU32::new(0));
        for i in 0..spec.programs.len() as u32 {
            let fd = vm_fd
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if i == 0 {
                msr_list = migratable_msrs(&kvm, &fd);
            }
            dirty.add_vcpu(i, &fd)?;
            let env = VcpuEnv {
                ram: ram.clone(),
                devices: devices.clone(),
                dirty: dirty.clone(),
                rate: match spec.programs[i as usize] {
                    Program::Disk => spec.disk_rate,
                    _ => spec.dirty_rate,
                },
                throttle: throttle.clone(),
            };
            vcpus.push(Vcpu::spawn(i, fd, env, name).map_err(VmError::Thread)?);
        }
        Ok(Vm {
            spec: spec.clone(),
            vm_fd,
            ram,
            devices,
            dirty,
            vcpus,
            msr_list,
            throttle,
            kicker: Arc::new(AtomicBool::new(false)),
            resume_gate: RwLock::new(()),
        })
    }

    /// Sets the auto-converge throttle: each vCPU sleeps `percent` % of the time (0 to 99).
    /// While it is non-zero a timer kicks the vCPUs out of `KVM_RUN` every 10 ms so that a
    /// guest that rarely exits is throttled too.
    pub fn set_throttle(&self, percent: u32) {
        let percent = percent.min(99);
        self.throttle.store(percent, Ordering::SeqCst);
        if percent == 0 || self.kicker.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared: Vec<_> = self.vcpus.iter().map(|v| v.shared.clone()).collect();
        let throttle = self.throttle.clone();
        let kicker = self.kicker.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(Duration::from_millis(10));
                    for s in &shared {
                        vcpu::kick_if_running(s);
                    }
                }
                kicker.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.kicker.store(false, Ordering::SeqCst);
        }
    }

    /// Attaches the disk image at `path` as the VM's virtio-blk device (before it boots or
    /// restores); `serial` is the disk's id.
    pub fn attach_disk(&self, path: &Path, serial: &str) -> Result<(), VmError> {
        let blk = VirtioBlk::open(path, serial, self.ram.clone(), self.dirty.clone())?;
        self.devices
            .attach_blk(blk)
            .map_err(|_| VmError::Invalid("a disk is already attached".into()))
    }

    /// The auto-converge throttle, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Loads page tables, programs and parameters, and points every vCPU at its program.
    pub fn boot(&self, name: &str) -> Result<(), VmError> {
        self.write_page_tables()?;
        for p in Program::ALL {
            self.ram.write(p.entry(), &p.code())?;
        }
        let mut dirty_index = 0;
        for (i, p) in self.spec.programs.iter().enumerate() {
            let i = i as u32;
            let params = layout::params(i);
            let w = |off: u8, v: u64| self.ram.write_u64(params + off as u64, v);
            w(0, 0x564d_4947_5041_5241)?; // "ARAPGIMV": marks a parameter page.
            if p.uses_working_set() {
                let pages = self.spec.dirty_bytes / layout::PAGE_SIZE;
                w(
                    param::WS_BASE,
                    layout::WORKING_SETS + dirty_index * self.spec.dirty_bytes,
                )?;
                w(param::WS_PAGES, pages)?;
                let batch = if self.spec.dirty_rate == 0 || *p == Program::Fill {
                    pages
                } else {
                    (self.spec.dirty_rate / 100).clamp(1, pages)
                };
                w(param::BATCH, batch)?;
                dirty_index += 1;
            }
            if *p == Program::Disk {
                let (first, end) = self.disk_region()?;
                w(param::DISK_MMIO, layout::VIRTIO_MMIO)?;
                w(param::DISK_FIRST, first)?;
                w(param::DISK_END, end)?;
                w(param::DISK_GEN, 0)?;
                w(param::DISK_BLOCK, first)?;
            }
            let banner = format!("vmig guest {name} vcpu{i}: {}\n\0", p.name());
            self.ram
                .write(params + param::BANNER as u64, banner.as_bytes())?;
            let v = &self.vcpus[i as usize];
            let fd = v.shared.fd.lock().expect("vcpu fd");
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: p.entry(),
                rsi: params,
                rsp: params + layout::PAGE_SIZE,
                rflags: 2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// The `disk` program's blocks [first, end), inside the attached disk.
    fn disk_region(&self) -> Result<(u64, u64), VmError> {
        let blk = self.devices.blk().ok_or_else(|| {
            VmError::Invalid("the disk workload needs a disk: none is attached".into())
        })?;
        let blocks = blk.capacity_bytes() / layout::disk::BLOCK;
        let first = self.spec.disk_first_block;
        let end = match self.spec.disk_blocks {
            0 => blocks,
            n => first.saturating_add(n),
        };
        if first >= end || end > blocks {
            return Err(VmError::Invalid(format!(
                "disk region of blocks {first}..{end} is not inside the disk's {blocks} blocks"
            )));
        }
        Ok((first, end))
    }

    fn write_page_tables(&self) -> Result<(), VmError> {
        let gib = self.spec.memory.div_ceil(1 << 30);
        self.ram.write_u64(layout::PML4, layout::PDPT | 3)?;
        for g in 0..gib {
            let pd = layout::PD + g * layout::PAGE_SIZE;
            self.ram.write_u64(layout::PDPT + g * 8, pd | 3)?;
            let mut table = vec![0u8; layout::PAGE_SIZE as usize];
            for (e, chunk) in table.chunks_exact_mut(8).enumerate() {
                let addr = (g << 30) + ((e as u64) << 21);
                chunk.copy_from_slice(&(addr | 0x83).to_le_bytes());
            }
            self.ram.write(pd, &table)?;
        }
        // The virtio-mmio registers: one uncached 2 MiB page (PCD) past the end of RAM.
        let gib = layout::VIRTIO_MMIO >> 30;
        self.ram
            .write_u64(layout::PDPT + gib * 8, layout::MMIO_PD | 3)?;
        self.ram
            .write_u64(layout::MMIO_PD, layout::VIRTIO_MMIO | 0x93)?;
        Ok(())
    }

    /// Lets every vCPU run (once no [`Paused`] proof is held).
    pub fn resume(&self) {
        let _gate = self
            .resume_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Pauses every vCPU and drains the devices (no disk request in flight: nothing writes
    /// guest memory while the proof is held); returns when all are parked and idle, with the
    /// proof (which says how long it took).
    pub fn pause(&self) -> Paused<'_> {
        let t = Instant::now();
        loop {
            for v in &self.vcpus {
                v.request_pause();
            }
            for v in &self.vcpus {
                v.wait_paused();
            }
            self.devices.drain();
            // A resume from another thread may come between the wait and the proof: again.
            if let Some(p) = Paused::of(self, t.elapsed()) {
                return p;
            }
        }
    }

    /// The proof that the VM is paused, if every vCPU is (a VM paused earlier).
    pub fn paused(&self) -> Option<Paused<'_>> {
        Paused::of(self, Duration::ZERO)
    }

    fn all_paused(&self) -> bool {
        self.vcpus.iter().all(Vcpu::is_held)
    }

    /// Saves vCPU and device state; the VM must not run ([`Paused::save`], [`Vm::read_back`]).
    fn save_state(&self) -> Result<MachineState, VmError> {
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let fd = v.shared.fd.lock().expect("vcpu fd");
            vcpus.push(state::VcpuState::save(v.index, &fd, &self.msr_list)?);
        }
        Ok(MachineState {
            vcpus,
            devices: self.devices.save(),
        })
    }

    /// Loads a saved state into the paused VM; devices write to `log` from now on.
    pub fn restore(&self, s: &MachineState, log: Box<dyn Write + Send>) -> Result<(), VmError> {
        if s.vcpus.len() != self.vcpus.len() {
            return Err(VmError::Invalid(format!(
                "state has {} vCPUs, the VM {}",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let fd = v.shared.fd.lock().expect("vcpu fd");
            st.restore(&fd)?;
        }
        self.devices.restore(&s.devices, log)?;
        Ok(())
    }

    /// Reads back the vCPU state (for the round-trip check after a restore).
    pub fn read_back(&self) -> Result<MachineState, VmError> {
        self.save_state()
    }

    /// Counters.
    pub fn stats(&self) -> VmStats {
        let r = &self.devices.reports;
        VmStats {
            counter: r.counter.load(Ordering::Relaxed),
            counter_reports: r.counter_reports.load(Ordering::Relaxed),
            counter_failures: r.counter_failures.load(Ordering::Relaxed),
            dirty_pages_written: r.dirty_pages.load(Ordering::Relaxed),
            disk_blocks_verified: r.disk_blocks.load(Ordering::Relaxed),
            disk_generation: r.disk_generation.load(Ordering::Relaxed),
            disk_failures: r.disk_failures.load(Ordering::Relaxed),
            disk_requests: self
                .devices
                .blk()
                .map_or(0, |b| b.counters().requests.load(Ordering::Relaxed)),
            disk_bytes_written: self
                .devices
                .blk()
                .map_or(0, |b| b.counters().bytes_written.load(Ordering::Relaxed)),
            exits: self
                .vcpus
                .iter()
                .map(|v| v.shared.exits.load(Ordering::Relaxed))
                .sum(),
            vcpus: self
                .vcpus
                .iter()
                .map(|v| match v.phase() {
                    Phase::Running => "running".to_string(),
                    Phase::Paused => "paused".to_string(),
                    Phase::Exited(why) => format!("exited: {}", why.unwrap_or_default()),
                })
                .collect(),
            dirty_mode: self.dirty.mode().to_string(),
        }
    }

    /// Whether every vCPU is running.
    pub fn is_running(&self) -> bool {
        self.vcpus.iter().all(|v| v.phase() == Phase::Running)
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The dirty log.
    pub fn dirty(&self) -> &Arc<DirtyLog> {
        &self.dirty
    }

    /// Devices (console, reports).
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Thread ids of the vCPU threads (0 until a thread has started).
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus
            .iter()
            .map(|v| v.shared.tid.load(Ordering::Relaxed))
            .collect()
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.throttle.store(0, Ordering::SeqCst);
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}

/// Puts a vCPU in 64-bit long mode with the identity page tables of [`layout`].
fn long_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
}

/// The MSRs KVM lets us both read and write back on this host (computed once).
fn migratable_msrs(kvm: &Kvm, fd: &kvm_ioctls::VcpuFd) -> Vec<u32> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| {
        let Ok(all) = kvm.get_msr_index_list() else {
            return Vec::new();
        };
        all.as_slice()
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&[entry]) else {
                    return false;
                };
                matches!(fd.get_msrs(&mut msrs), Ok(1)) && matches!(fd.set_msrs(&msrs), Ok(1))
            })
            .collect()
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::PAGE_SIZE;

    fn spec(programs: Vec<Program>, tracking: DirtyTracking) -> VmSpec {
        VmSpec {
            memory: 64 << 20,
            programs,
            dirty_bytes: 1 << 20,
            dirty_rate: 0,
            dirty_tracking: tracking,
            disk_rate: 0,
            disk_first_block: 0,
            disk_blocks: 0,
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn counter_and_dirty_guests_run_and_report() {
        let log = Box::new(std::io::sink());
        let vm = Vm::create(
            &spec(vec![Program::Counter, Program::Dirty], DirtyTracking::Auto),
            "t",
            log,
        )
        .unwrap();
        vm.boot("t").unwrap();
        vm.resume();
        wait_for("counter reports", || vm.stats().counter_reports >= 3);
        wait_for("dirty passes", || vm.stats().dirty_pages_written >= 512);
        let s = vm.stats();
        assert_eq!(s.counter_failures, 0);
        assert!(s.counter >= 3 * crate::guest::COUNTER_REPORT_EVERY);
        vm.pause();
        let a = vm.ram().digest().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(a, vm.ram().digest().unwrap(), "memory changed while paused");
        let c = vm.stats().counter;
        vm.resume();
        wait_for("counter goes on after resume", || vm.stats().counter > c);
    }

    #[test]
    fn state_round_trips_between_two_vms() {
        let s = spec(vec![Program::Counter, Program::Idle], DirtyTracking::Auto);
        let a = Vm::create(&s, "a", Box::new(std::io::sink())).unwrap();
        a.boot("a").unwrap();
        a.resume();
        wait_for("counter", || a.stats().counter_reports >= 2);
        assert!(a.paused().is_none(), "no proof of a pause while it runs");
        let st = a.pause().save().unwrap();
        assert!(a.paused().is_some());
        let b = Vm::create(&s, "b", Box::new(std::io::sink())).unwrap();
        b.restore(&st, Box::new(std::io::sink())).unwrap();
        let back = b.read_back().unwrap();
        assert_eq!(st.vcpu_digest(), back.vcpu_digest());
        assert_eq!(st.vcpus[0].regs, back.vcpus[0].regs);
        assert_eq!(st.vcpus[0].sregs, back.vcpus[0].sregs);
    }

    /// The dirty program writes exactly its working set and its parameter page (the pass
    /// number); after a first harvest has absorbed the page-table accessed/dirty bits, each
    /// mechanism must report exactly those pages: none missing, none extra.
    fn dirty_log_reports_exactly_the_written_pages(tracking: DirtyTracking) {
        let s = spec(vec![Program::Dirty], tracking);
        let vm = Vm::create(&s, "d", Box::new(std::io::sink())).unwrap();
        vm.boot("d").unwrap();
        vm.dirty().start().unwrap();
        vm.resume();
        wait_for("two passes", || vm.stats().dirty_pages_written >= 2 * 256);
        vm.dirty().harvest().unwrap();
        let before = vm.stats().dirty_pages_written;
        wait_for("two more passes", || {
            vm.stats().dirty_pages_written >= before + 2 * 256
        });
        vm.pause();
        let got = vm.dirty().harvest().unwrap();
        let first = layout::WORKING_SETS / PAGE_SIZE;
        let mut want: Vec<u64> = (first..first + 256).collect();
        want.push(layout::params(0) / PAGE_SIZE);
        want.sort();
        assert_eq!(got, want, "mode {}", vm.dirty().mode());
        vm.dirty().stop().unwrap();
    }

    #[test]
    fn dirty_ring_reports_exactly_the_written_pages() {
        dirty_log_reports_exactly_the_written_pages(DirtyTracking::Ring);
    }

    #[test]
    fn dirty_bitmap_reports_exactly_the_written_pages() {
        dirty_log_reports_exactly_the_written_pages(DirtyTracking::Bitmap);
    }
}

#[cfg(test)]
mod ring_wrap {
    use super::*;

    /// Between two harvests 600 ms apart a flat-out `dirty` vCPU pushes far more entries
    /// than its ring holds; the background harvester must keep the ring from overflowing, so
    /// every harvest still reports the whole working set (see `dirty::HARVEST_INTERVAL`).
    #[test]
    fn dirty_ring_keeps_reporting_across_many_wraps() {
        let s = VmSpec {
            memory: 64 << 20,
            programs: vec![Program::Dirty],
            dirty_bytes: 16 << 20,
            dirty_rate: 0,
            dirty_tracking: DirtyTracking::Ring,
            disk_rate: 0,
            disk_first_block: 0,
            disk_blocks: 0,
        };
        let vm = Vm::create(&s, "w", Box::new(std::io::sink())).unwrap();
        vm.boot("w").unwrap();
        vm.dirty().start().unwrap();
        vm.resume();
        // Until the ring wrapped several times (as fast as the machine lets the guest run).
        let t = Instant::now();
        let mut i = 0;
        while vm.dirty().ring_counters().0 < 4 * 65536 {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the ring did not wrap 4 times in 120 s ({} entries): the vCPU stalled",
                vm.dirty().ring_counters().0
            );
            let before = vm.stats().dirty_pages_written;
            std::thread::sleep(Duration::from_millis(600));
            let written = vm.stats().dirty_pages_written - before;
            let got = vm.dirty().harvest().unwrap();
            let (entries, _) = vm.dirty().ring_counters();
            // Every page the guest reported writing is in the harvest (up to the 4096 pages of
            // its working set; 10 % slack for writes reported across a harvest).
            assert!(
                written > 0 && got.len() as u64 >= written.min(4096) * 9 / 10,
                "harvest {i}: {} pages after {written} writes ({entries} ring entries so far)",
                got.len()
            );
            i += 1;
        }
        vm.dirty().stop().unwrap();
    }

    /// Two VMs of one process (as in an agent), each with a flat-out `dirty` vCPU and a dirty
    /// ring: each VM's harvests hold what its own guest wrote, while both run and wrap.
    #[test]
    fn two_vms_in_one_process_keep_their_own_dirty_rings() {
        let spec = VmSpec {
            memory: 64 << 20,
            programs: vec![Program::Dirty],
            dirty_bytes: 16 << 20,
            dirty_rate: 0,
            dirty_tracking: DirtyTracking::Ring,
            disk_rate: 0,
            disk_first_block: 0,
            disk_blocks: 0,
        };
        let vms: Vec<Vm> = ["a", "b"]
            .iter()
            .map(|n| {
                let vm = Vm::create(&spec, n, Box::new(std::io::sink())).unwrap();
                vm.boot(n).unwrap();
                vm.dirty().start().unwrap();
                vm.resume();
                vm
            })
            .collect();
        let t = Instant::now();
        let mut harvests = 0;
        while vms
            .iter()
            .any(|vm| vm.dirty().ring_counters().0 < 2 * 65536)
        {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the rings did not wrap twice in 120 s: a vCPU stalled"
            );
            let before: Vec<u64> = vms
                .iter()
                .map(|vm| vm.stats().dirty_pages_written)
                .collect();
            std::thread::sleep(Duration::from_millis(600));
            for (vm, b) in vms.iter().zip(&before) {
                let written = vm.stats().dirty_pages_written - b;
                let got = vm.dirty().harvest().unwrap();
                assert!(
                    written > 0 && got.len() as u64 >= written.min(4096) * 9 / 10,
                    "harvest {harvests}: {} pages after {written} writes, {} overflows",
                    got.len(),
                    vm.dirty().overflows()
                );
            }
            harvests += 1;
        }
        for vm in &vms {
            vm.dirty().stop().unwrap();
        }
    }
}
