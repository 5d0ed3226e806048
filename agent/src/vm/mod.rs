//! The VMM: a KVM VM with one guest-memory slot, vCPU threads, port-I/O devices, a
//! virtio-blk disk over virtio-mmio, and the complete save/restore of its state that
//! migration needs.

mod boot;
pub mod devices;
pub mod memory;
mod paused;
mod run;
mod save;
mod spec;
pub mod state;
mod stats;
pub mod vcpu;
pub mod virtio;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

use crate::dirty::{DirtyError, DirtyLog, DirtyMode};
use crate::guest::Program;
use devices::Devices;
use memory::{GuestRam, MemoryError};
pub use paused::Paused;
use save::migratable_msrs;
pub use spec::VmSpec;
use state::StateError;
pub use stats::VmStats;
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

    /// Attaches the disk image at `path` as the VM's virtio-blk device (before it boots or
    /// restores); `serial` is the disk's id.
    pub fn attach_disk(&self, path: &Path, serial: &str) -> Result<(), VmError> {
        let blk = VirtioBlk::open(path, serial, self.ram.clone(), self.dirty.clone())?;
        self.devices
            .attach_blk(blk)
            .map_err(|_| VmError::Invalid("a disk is already attached".into()))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dirty::DirtyTracking;
    use crate::guest::layout::{self, PAGE_SIZE};

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
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dirty::DirtyTracking;

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
