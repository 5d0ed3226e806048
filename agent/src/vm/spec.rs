//! What the VMM needs to build a VM: [`VmSpec`], and the checks that it fits the layout.

use serde::{Deserialize, Serialize};

use super::VmError;
use crate::dirty::DirtyTracking;
use crate::guest::{layout, Program};

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
