//! Guest-physical memory layout shared by the VMM and the guest programs.

/// Page size of guest memory and of the migration stream: the one of `vmig-uffd` (the unit
/// userfaultfd resolves), as a `u64` for guest-physical arithmetic.
pub const PAGE_SIZE: u64 = vmig_uffd::PAGE_SIZE as u64;
/// Level-4 page table.
pub const PML4: u64 = 0x1000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0x2000;
/// First page directory; one per GiB of guest memory follows it.
pub const PD: u64 = 0x3000;
/// Most guest memory the page tables map (16 page directories).
pub const MAX_MEMORY: u64 = 16 << 30;
/// Smallest guest memory.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Guest code: one 1 KiB slot per program.
pub const CODE: u64 = 0x20000;
/// Parameter pages, one per vCPU.
pub const PARAMS: u64 = 0x30000;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 4;
/// Start of the `dirty` working sets: each dirty vCPU gets its own range from here.
pub const WORKING_SETS: u64 = 0x100000;

/// Parameter page of a vCPU.
pub fn params(vcpu: u32) -> u64 {
    PARAMS + PAGE_SIZE * vcpu as u64
}

/// Guest-physical base of the virtio-mmio disk's registers: just past the most memory a VM
/// may have, so it never overlaps RAM; the page tables map it (one 2 MiB page).
pub const VIRTIO_MMIO: u64 = MAX_MEMORY;
/// Page directory mapping [`VIRTIO_MMIO`] (after the 16 of RAM).
pub const MMIO_PD: u64 = PD + 16 * PAGE_SIZE;

/// The `disk` program's driver area: its virtqueue, request header, status and buffer.
pub mod disk {
    /// Base of the area (below the working sets, above the parameter pages).
    pub const AREA: u64 = 0x40000;
    /// Descriptor table (offset from [`AREA`]).
    pub const DESC: u32 = 0x0000;
    /// Available (driver) ring.
    pub const AVAIL: u32 = 0x1000;
    /// Used (device) ring.
    pub const USED: u32 = 0x2000;
    /// Request header: type u32, reserved u32, sector u64.
    pub const HEADER: u32 = 0x3000;
    /// Status byte.
    pub const STATUS: u32 = 0x3010;
    /// Data buffer: one block.
    pub const DATA: u32 = 0x4000;
    /// End of the area.
    pub const END: u64 = AREA + 0x5000;
    /// Block size of the `disk` program, bytes.
    pub const BLOCK: u64 = 4096;
    /// Entries of its queue.
    pub const QUEUE_SIZE: u16 = 8;
}
