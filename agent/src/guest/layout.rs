//! Guest-physical memory layout shared by the VMM and the guest programs.

/// Page size of guest memory and of the migration stream.
pub const PAGE_SIZE: u64 = 4096;
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
