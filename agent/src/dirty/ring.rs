//! One vCPU's KVM dirty ring, mapped from the vCPU fd, harvested from any thread.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use super::{DirtyError, PageBitmap};
use crate::guest::layout::PAGE_SIZE;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// Entry flag: KVM pushed this entry.
const GFN_DIRTY: u32 = 1;
/// Entry flag: user space harvested it; KVM may recycle it after `KVM_RESET_DIRTY_RINGS`.
const GFN_RESET: u32 = 2;

/// The ring of one vCPU.
#[derive(Debug)]
pub struct DirtyRing {
    base: usize,
    entries: u32,
    /// Next entry to read (free-running; modulo `entries`).
    fetch: Mutex<u32>,
}

impl DirtyRing {
    /// Maps the ring of `fd` (`entries` entries of 16 bytes).
    pub fn map(vcpu: u32, fd: &VcpuFd, entries: u32) -> Result<Self, DirtyError> {
        let len = entries as usize * super::RING_ENTRY_BYTES as usize;
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * PAGE_SIZE as i64;
        // SAFETY: maps the kernel's dirty ring of a live vCPU fd at the offset KVM documents;
        // the result is checked below and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::MapRing {
                vcpu,
                cause: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: p as usize,
            entries,
            fetch: Mutex::new(0),
        })
    }

    fn flags(&self, i: u32) -> &AtomicU32 {
        let entry = self.base + (i % self.entries) as usize * super::RING_ENTRY_BYTES as usize;
        // SAFETY: `entry` is inside the mapped ring; `flags` is the first u32 of a
        // 16-byte-aligned `kvm_dirty_gfn` shared with the kernel, accessed atomically.
        unsafe { &*(entry as *const AtomicU32) }
    }

    /// Moves every pushed entry into `out`; returns the number of entries read.
    pub fn harvest(&self, out: &PageBitmap, slot_base: u64) -> u64 {
        let mut fetch = self.fetch.lock().expect("ring fetch index");
        let mut n = 0;
        loop {
            let i = (*fetch % self.entries) as usize;
            let entry = self.base + i * super::RING_ENTRY_BYTES as usize;
            let flags = self.flags(*fetch);
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire); `offset` is the u64 at
            // byte 8 of the same entry.
            let offset = unsafe { std::ptr::read_volatile((entry + 8) as *const u64) };
            out.set_within(slot_base / PAGE_SIZE + offset);
            flags.store(GFN_RESET, Ordering::Release);
            *fetch = fetch.wrapping_add(1) % self.entries;
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing uses it after drop.
        unsafe {
            libc::munmap(
                self.base as *mut libc::c_void,
                self.entries as usize * super::RING_ENTRY_BYTES as usize,
            )
        };
    }
}

/// Tells KVM the harvested entries of every ring may be reused.
pub fn reset_rings(vm: &VmFd) -> Result<(), DirtyError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and acts on the VM fd only.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(DirtyError::ResetRings(std::io::Error::last_os_error()));
    }
    Ok(())
}
