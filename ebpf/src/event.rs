//! Typed events decoded from the `events` ring buffer, and the async stream that yields them.

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::raw::{kind, RawEvent, NO_VCPU};
use crate::EbpfError;

/// One thing the probes saw. Timestamps are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// KVM handled a guest page fault (`kvm:kvm_page_fault`).
    KvmPageFault {
        /// vCPU index (from the filter's tid map).
        vcpu: u32,
        /// Faulting guest-physical address.
        gpa: u64,
        /// x86 page-fault error code (or EPT/NPT exit qualification bits).
        error_code: u64,
        /// When.
        ts_ns: u64,
    },
    /// KVM pushed one entry onto a vCPU's dirty ring (`kvm:kvm_dirty_ring_push`).
    DirtyRingPush {
        /// vCPU index.
        vcpu: u32,
        /// Memslot as KVM reports it (`as_id << 16 | slot`).
        slot: u32,
        /// Page offset (gfn - slot base gfn) inside the slot.
        offset: u64,
        /// Entries in the ring not yet reset, after this push.
        ring_used: u32,
        /// When.
        ts_ns: u64,
    },
    /// The vCPU's dirty ring hit its soft limit: it exits with `KVM_EXIT_DIRTY_RING_FULL`.
    DirtyRingFull {
        /// vCPU index.
        vcpu: u32,
        /// When.
        ts_ns: u64,
    },
    /// `KVM_RESET_DIRTY_RINGS` recycled harvested entries of one ring (`kvm:kvm_dirty_ring_reset`).
    DirtyRingReset {
        /// Ring index (KVM's vCPU id).
        ring: u32,
        /// Entries outstanding before the reset.
        entries: u32,
        /// When.
        ts_ns: u64,
    },
    /// A thread of the VMM faulted on guest memory (`exceptions:page_fault_user`, or
    /// `page_fault_kernel` when the kernel touched the user address, e.g. KVM's emulator).
    UserFault {
        /// Faulting thread.
        tid: u32,
        /// vCPU index if the thread is a registered vCPU thread.
        vcpu: Option<u32>,
        /// Faulting host-virtual address.
        addr: u64,
        /// x86 page-fault error code.
        error_code: u64,
        /// The fault was taken in kernel mode on the user address.
        kernel_mode: bool,
        /// When.
        ts_ns: u64,
    },
    /// A `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` returned covering a page that had faulted.
    UserFaultResolved {
        /// The thread that faulted.
        tid: u32,
        /// vCPU index if that thread is a registered vCPU thread.
        vcpu: Option<u32>,
        /// Page-aligned host-virtual address.
        addr: u64,
        /// Time from the fault to the return of the resolving ioctl.
        latency_ns: u64,
        /// When the ioctl returned.
        ts_ns: u64,
    },
}

impl Event {
    /// Decodes a ring-buffer record; `None` for an unknown kind.
    pub fn from_raw(raw: &RawEvent) -> Option<Event> {
        let vcpu = (raw.vcpu != NO_VCPU).then_some(raw.vcpu);
        Some(match raw.kind {
            kind::KVM_PAGE_FAULT => Event::KvmPageFault {
                vcpu: raw.vcpu,
                gpa: raw.addr,
                error_code: raw.aux,
                ts_ns: raw.ts_ns,
            },
            kind::DIRTY_RING_PUSH => Event::DirtyRingPush {
                vcpu: raw.vcpu,
                slot: raw.slot,
                offset: raw.addr,
                ring_used: raw.aux as u32,
                ts_ns: raw.ts_ns,
            },
            kind::DIRTY_RING_FULL => Event::DirtyRingFull {
                vcpu: raw.vcpu,
                ts_ns: raw.ts_ns,
            },
            kind::DIRTY_RING_RESET => Event::DirtyRingReset {
                ring: raw.vcpu,
                entries: raw.aux as u32,
                ts_ns: raw.ts_ns,
            },
            kind::USER_FAULT => Event::UserFault {
                tid: raw.tid,
                vcpu,
                addr: raw.addr,
                error_code: raw.aux,
                kernel_mode: raw.slot != 0,
                ts_ns: raw.ts_ns,
            },
            kind::USER_FAULT_RESOLVED => Event::UserFaultResolved {
                tid: raw.tid,
                vcpu,
                addr: raw.addr,
                latency_ns: raw.aux,
                ts_ns: raw.ts_ns,
            },
            _ => return None,
        })
    }

    /// Decodes the bytes of one ring-buffer record.
    fn from_bytes(bytes: &[u8]) -> Option<Event> {
        if bytes.len() < std::mem::size_of::<RawEvent>() {
            return None;
        }
        // SAFETY: the slice holds at least size_of::<RawEvent>() bytes (checked above),
        // read_unaligned has no alignment requirement, and RawEvent is Pod (any bits are valid).
        let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) };
        Event::from_raw(&raw)
    }
}

/// Events of one [`crate::VmProbes`], read from the BPF ring buffer through tokio's reactor.
///
/// Must be created and polled inside a tokio runtime with I/O enabled. It stays valid after the
/// probes are dropped (it then yields what is left, and afterwards waits forever).
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("fd", &self.ring.get_ref().as_raw_fd())
            .finish()
    }
}

impl EventStream {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<Self, EbpfError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EbpfError::NoEvents(
                "event_stream must be called inside a tokio runtime",
            ));
        }
        // SAFETY: the fd is the ring buffer map's, owned by `ring`, which the AsyncFd owns: it
        // stays open and the same for the AsyncFd's whole life, and as_raw_fd always returns it.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                EbpfError::Io {
                    what: "registering the BPF ring buffer with tokio".into(),
                    source: e.into(),
                }
            })?;
        Ok(EventStream { ring })
    }

    /// Waits for and returns the next event. `None` only if the ring buffer's fd fails.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.try_next() {
                return Some(e);
            }
            let mut guard = self.ring.readable_mut().await.ok()?;
            // Drain under the guard: readiness is only cleared once the ring is seen empty.
            if let Some(e) = Self::pop(guard.get_inner_mut()) {
                return Some(e);
            }
            guard.clear_ready();
        }
    }

    /// Returns an already-queued event without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        Self::pop(self.ring.get_mut())
    }

    /// Returns every already-queued event without waiting.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    fn pop(ring: &mut RingBuf<MapData>) -> Option<Event> {
        while let Some(item) = ring.next() {
            if let Some(e) = Event::from_bytes(&item) {
                return Some(e);
            }
        }
        None
    }
}
