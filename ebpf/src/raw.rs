//! Rust mirrors of the structs in `bpf/vmig.h`. Sizes are asserted; none has implicit padding.

use std::mem::size_of;

/// One record of the `events` ring buffer (`struct vmig_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` when the tracepoint fired (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Address: gpa, hva or gfn offset depending on `kind`.
    pub addr: u64,
    /// Kind-specific value: error code, latency, ring fill.
    pub aux: u64,
    /// `enum vmig_event_kind`.
    pub kind: u32,
    /// Thread that hit the tracepoint (the faulting thread for a resolution).
    pub tid: u32,
    /// vCPU index, or [`NO_VCPU`].
    pub vcpu: u32,
    /// Memslot for dirty-ring pushes; 1 for kernel-mode user faults.
    pub slot: u32,
}
const _: () = assert!(size_of::<RawEvent>() == 40);
// SAFETY: RawEvent is repr(C), made only of integers, with no padding (size asserted above), so
// every bit pattern is a valid value.
unsafe impl aya::Pod for RawEvent {}

/// `vcpu` value of an event that did not come from a registered vCPU thread.
pub const NO_VCPU: u32 = u32::MAX;

/// Values of [`RawEvent::kind`] (`enum vmig_event_kind`).
pub(crate) mod kind {
    pub const KVM_PAGE_FAULT: u32 = 1;
    pub const DIRTY_RING_PUSH: u32 = 2;
    pub const DIRTY_RING_FULL: u32 = 3;
    pub const USER_FAULT: u32 = 4;
    pub const USER_FAULT_RESOLVED: u32 = 5;
    pub const DIRTY_RING_RESET: u32 = 6;
}

/// The filter and switches (`struct vmig_config`), entry 0 of the `config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RawConfig {
    pub mem_start: u64,
    pub mem_len: u64,
    pub tgid: u32,
    pub events: u32,
    pub generation: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<RawConfig>() == 32);
// SAFETY: repr(C), integers only, no padding (size asserted above).
unsafe impl aya::Pod for RawConfig {}

/// Key of the `exits` hash (`struct vmig_exit_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ExitKey {
    pub vcpu: u32,
    pub reason: u32,
}
const _: () = assert!(size_of::<ExitKey>() == 8);
// SAFETY: repr(C), integers only, no padding (size asserted above).
unsafe impl aya::Pod for ExitKey {}

/// Entries of the `vcpu_tid_cache` array (`VMIG_TID_CACHE`, a power of two).
pub(crate) const TID_CACHE: u32 = 4096;
/// A `vcpu_tid_cache` slot whose tid was removed (`VMIG_TID_TOMBSTONE`).
pub(crate) const TID_TOMBSTONE: u32 = u32::MAX;

/// Value of the `vcpu_tid_cache` array (`struct vmig_tid_slot`): `tid` 0 is an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TidSlot {
    pub tid: u32,
    pub vcpu: u32,
}
const _: () = assert!(size_of::<TidSlot>() == 8);
// SAFETY: repr(C), integers only, no padding (size asserted above).
unsafe impl aya::Pod for TidSlot {}

/// Indices of the `counters` per-CPU array (`enum vmig_counter`).
pub(crate) mod counter {
    pub const KVM_PAGE_FAULTS: u32 = 0;
    pub const DIRTY_RING_PUSHES: u32 = 1;
    pub const DIRTY_RING_FULL: u32 = 2;
    pub const DIRTY_PAGES_DISTINCT: u32 = 3;
    pub const USER_FAULTS: u32 = 4;
    pub const USER_FAULTS_RESOLVED: u32 = 5;
    pub const USER_FAULT_WAIT_NS: u32 = 6;
    pub const UFFD_IOCTLS: u32 = 7;
    pub const KVM_EXITS: u32 = 8;
    pub const EVENTS_DROPPED: u32 = 9;
    pub const DIRTY_RING_RESETS: u32 = 10;
    pub const KERNEL_MODE_FAULTS: u32 = 11;
    pub const EMULATED_INSNS: u32 = 12;
}
