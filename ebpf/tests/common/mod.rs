//! Shared helpers of the integration tests: skip checks, and a tiny real KVM VM with a dirty ring.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Returns why the probes cannot run here, after printing a loud SKIPPED line, or `None`.
pub fn skip_reason(test: &str) -> Option<String> {
    ensure_tracefs();
    match vmig_ebpf::available() {
        Ok(()) => None,
        Err(e) => {
            let why = format!("{e}");
            eprintln!("SKIPPED: {test}: {why}");
            Some(why)
        }
    }
}

/// Mounts tracefs if this is root and it is not mounted (the tests' setup, not the library's).
pub fn ensure_tracefs() {
    if std::path::Path::new("/sys/kernel/tracing/events").is_dir() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let _ = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status();
}

pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

pub fn getpid() -> u32 {
    std::process::id()
}

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous mapping; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `struct kvm_dirty_gfn`.
#[repr(C)]
struct DirtyGfn {
    flags: AtomicU32,
    slot: u32,
    offset: u64,
}

const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
const KVM_DIRTY_LOG_PAGE_OFFSET: i64 = 64;
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;
/// `KVM_EXIT_DIRTY_RING_FULL`, which kvm-ioctls 0.25 reports as `VcpuExit::Unsupported(31)`.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Guest-physical address of the first page the guest writes.
pub const FIRST_DATA_GPA: u64 = 0x10000;
/// The guest's memory: 1 MiB at gpa 0 (real mode reaches no further).
pub const GUEST_MEM: usize = 1 << 20;
const CODE_GPA: u64 = 0x1000;

/// What one run of the guest produced, as the VMM saw it.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Every dirty-ring entry harvested, in order: (slot, offset).
    pub harvested: Vec<(u32, u64)>,
    /// Exits with KVM_EXIT_DIRTY_RING_FULL.
    pub ring_full_exits: u64,
    /// KVM_RESET_DIRTY_RINGS calls that reset at least one entry.
    pub resets: u64,
    /// Exits to user space in total.
    pub exits: u64,
}

impl RunReport {
    pub fn distinct(&self) -> BTreeSet<(u32, u64)> {
        self.harvested.iter().copied().collect()
    }
}

/// Held by every [`TinyVm`] while it exists: on this platform two dirty-ring VMs running at
/// once in one process lose ring entries (the VMM of one harvested 459 of the 600 entries the
/// probes saw KVM push on its vCPU thread) or spin on ring-full exits, so the tests' VMs run one
/// at a time.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A one-vCPU real-mode VM whose memory slot logs dirty pages into a dirty ring.
pub struct TinyVm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    _mem: Mapping,
    ring: NonNull<DirtyGfn>,
    ring_entries: u32,
    ring_bytes: usize,
    next: u32,
    pub host_mem: u64,
    // Last: released after the VM is gone.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl TinyVm {
    /// Builds the VM with a guest that, `rounds` times, writes one byte into each of `pages`
    /// consecutive pages from [`FIRST_DATA_GPA`], then halts. `ring_bytes` is the requested
    /// dirty-ring size; it is raised to the smallest size KVM accepts.
    pub fn new(pages: u16, rounds: u16, ring_bytes: u32) -> TinyVm {
        Self::build(real_mode_code(pages, rounds), false, pages, ring_bytes)
    }

    /// Like [`TinyVm::new`] (one round), with a 64-bit long-mode guest: identity-mapped with one
    /// 2 MiB page, so the guest runs natively where the platform allows.
    pub fn new_long_mode(pages: u16, ring_bytes: u32) -> TinyVm {
        Self::build(long_mode_code(pages), true, pages, ring_bytes)
    }

    fn build(code: Vec<u8>, long_mode: bool, pages: u16, ring_bytes: u32) -> TinyVm {
        assert!(u64::from(pages) * 4096 + FIRST_DATA_GPA <= GUEST_MEM as u64);
        let one_at_a_time = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
        assert!(max > 0, "KVM_CAP_DIRTY_LOG_RING unsupported");
        // KVM wants a power of two at least a page, and more than its reserved entries.
        let mut size = ring_bytes.next_power_of_two().max(4096);
        loop {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_DIRTY_LOG_RING,
                ..Default::default()
            };
            cap.args[0] = size.into();
            match vm.enable_cap(&cap) {
                Ok(()) => break,
                Err(e) if e.errno() == libc::EINVAL && (size as i32) < max => size *= 2,
                Err(e) => panic!("enable KVM_CAP_DIRTY_LOG_RING({size}): {e}"),
            }
        }

        let mem = Mapping::new(GUEST_MEM);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: GUEST_MEM as u64,
            userspace_addr: mem.addr(),
        };
        // SAFETY: the region is a live mapping of GUEST_MEM bytes owned by this TinyVm, which
        // keeps it mapped for as long as the VM (dropped first: field order) exists.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

        if long_mode {
            write_page_tables(&mem);
        }
        // SAFETY: CODE_GPA + code.len() lies inside the GUEST_MEM-byte mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                code.as_ptr(),
                mem.ptr.as_ptr().add(CODE_GPA as usize),
                code.len(),
            )
        };

        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut sregs = vcpu.get_sregs().expect("get sregs");
        if long_mode {
            set_long_mode(&mut sregs);
        } else {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        vcpu.set_sregs(&sregs).expect("set sregs");
        let mut regs = vcpu.get_regs().expect("get regs");
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("set regs");

        // SAFETY: maps the vCPU's dirty ring (size bytes at page 64 of the vcpu fd) shared; the
        // result is checked and unmapped in Drop.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET * 4096,
            )
        };
        assert_ne!(
            ring,
            libc::MAP_FAILED,
            "mmap dirty ring: {}",
            std::io::Error::last_os_error()
        );
        TinyVm {
            host_mem: mem.addr(),
            _kvm: kvm,
            vm,
            vcpu,
            _mem: mem,
            ring: NonNull::new(ring.cast()).expect("mmap returned null"),
            ring_entries: size / 16,
            ring_bytes: size as usize,
            next: 0,
            _one_at_a_time: one_at_a_time,
        }
    }

    pub fn ring_entries(&self) -> u32 {
        self.ring_entries
    }

    /// Runs the guest on the calling thread until HLT, harvesting the ring whenever it fills.
    pub fn run(&mut self) -> RunReport {
        let mut report = RunReport::default();
        let mut fruitless = 0u32;
        loop {
            report.exits += 1;
            match self.vcpu.run().expect("KVM_RUN") {
                VcpuExit::Hlt => break,
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    report.ring_full_exits += 1;
                    let before = report.harvested.len();
                    self.harvest(&mut report);
                    // A ring that overflowed inside one KVM_RUN never recovers: fail, never hang.
                    fruitless = if report.harvested.len() == before {
                        fruitless + 1
                    } else {
                        0
                    };
                    assert!(
                        fruitless < 10_000,
                        "the dirty ring jammed: ring-full exits with nothing to harvest"
                    );
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        self.harvest(&mut report);
        report
    }

    /// Collects every dirty entry, marks it for reset, and resets the rings.
    fn harvest(&mut self, report: &mut RunReport) {
        let mut n = 0;
        loop {
            let idx = (self.next % self.ring_entries) as usize;
            // SAFETY: idx < ring_entries, so the entry lies inside the mapped ring.
            let e = unsafe { &*self.ring.as_ptr().add(idx) };
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            report.harvested.push((e.slot, e.offset));
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is our VM's.
            let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
            assert!(
                r >= 0,
                "KVM_RESET_DIRTY_RINGS: {}",
                std::io::Error::last_os_error()
            );
            report.resets += 1;
        }
    }
}

impl Drop for TinyVm {
    fn drop(&mut self) {
        // SAFETY: exactly the ring mapping created in `new`, unmapped once.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes) };
    }
}

const PML4_GPA: u64 = 0x2000;

/// PML4 -> PDPT -> PD with one 2 MiB identity page at 0.
fn write_page_tables(mem: &Mapping) {
    let entries: [(u64, u64); 3] = [
        (PML4_GPA, 0x3000 | 0x3), // PML4[0] -> PDPT, present + writable
        (0x3000, 0x4000 | 0x3),   // PDPT[0] -> PD
        (0x4000, 0x83),           // PD[0] -> 2 MiB page at 0, present + writable + PS
    ];
    for (gpa, value) in entries {
        // SAFETY: gpa + 8 lies inside the GUEST_MEM-byte mapping; unaligned write is allowed.
        unsafe {
            mem.ptr
                .as_ptr()
                .add(gpa as usize)
                .cast::<u64>()
                .write_unaligned(value)
        };
    }
}

/// Paging, PAE, long mode, and flat 64-bit segments.
fn set_long_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment {
        selector: 0x10,
        type_: 3,
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
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
}

/// 64-bit code: for `pages` times { `mov byte [rdi], 0x5a`; `rdi += 4096` }; `hlt`.
fn long_mode_code(pages: u16) -> Vec<u8> {
    let [a0, a1, a2, a3] = (FIRST_DATA_GPA as u32).to_le_bytes();
    let [p0, p1, p2, p3] = u32::from(pages).to_le_bytes();
    vec![
        0xBF, a0, a1, a2, a3, // mov edi, FIRST_DATA_GPA
        0xB9, p0, p1, p2, p3, // mov ecx, pages
        // loop:
        0xC6, 0x07, 0x5A, // mov byte [rdi], 0x5a
        0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
        0xFF, 0xC9, // dec ecx
        0x75, 0xF2, // jnz loop (-14)
        0xF4, // hlt
    ]
}

/// 16-bit code: `rounds` times { for `pages` times { `mov byte [ds:0], 0x5a`; `ds += 0x100`
/// (4 KiB) } }; `hlt`.
fn real_mode_code(pages: u16, rounds: u16) -> Vec<u8> {
    let [plo, phi] = pages.to_le_bytes();
    let [rlo, rhi] = rounds.to_le_bytes();
    let [dlo, dhi] = ((FIRST_DATA_GPA >> 4) as u16).to_le_bytes();
    vec![
        0xBA, rlo, rhi, // mov dx, rounds
        // outer (offset 3):
        0xB9, plo, phi, // mov cx, pages
        0xB8, dlo, dhi, // mov ax, FIRST_DATA_GPA >> 4
        0x8E, 0xD8, // mov ds, ax
        // inner (offset 11):
        0xC6, 0x06, 0x00, 0x00, 0x5A, // mov byte [0], 0x5a
        0x8C, 0xD8, // mov ax, ds
        0x05, 0x00, 0x01, // add ax, 0x100
        0x8E, 0xD8, // mov ds, ax
        0xE2, 0xF2, // loop inner (-14)
        0x4A, // dec dx
        0x75, 0xE7, // jnz outer (3 - 28 = -25)
        0xF4, // hlt
    ]
}
