//! The written-block log a disk mirror reads: every block the guest writes is marked after
//! its write reached the file (see the notes of [`super`]).

use super::{Shared, VirtioBlk, SECTOR};
use crate::dirty::PageBitmap;

/// Blocks written since a mirror started: block `i` covers bytes `[i << shift, (i + 1) << shift)`.
#[derive(Debug)]
pub(super) struct BlockLog {
    shift: u32,
    written: PageBitmap,
}

impl VirtioBlk {
    /// Starts logging the blocks of `block_bytes` (a power of two, at least a sector) the
    /// guest writes; any earlier log is dropped.
    pub fn start_block_log(&self, block_bytes: u64) {
        assert!(
            block_bytes.is_power_of_two() && block_bytes >= SECTOR,
            "block size {block_bytes}"
        );
        let blocks = (self.shared.capacity * SECTOR).div_ceil(block_bytes);
        *self.shared.log.lock().expect("blk log") = Some(BlockLog {
            shift: block_bytes.trailing_zeros(),
            written: PageBitmap::new(blocks),
        });
    }

    /// Takes the blocks written since the log started or since the last take, in ascending
    /// order. With the VM paused (drained) the answer is complete.
    pub fn take_written_blocks(&self) -> Vec<u64> {
        self.shared
            .log
            .lock()
            .expect("blk log")
            .as_ref()
            .map(|l| l.written.take())
            .unwrap_or_default()
    }

    /// How many blocks are marked written and not taken yet (0 without a log).
    pub fn written_block_count(&self) -> u64 {
        self.shared
            .log
            .lock()
            .expect("blk log")
            .as_ref()
            .map_or(0, |l| l.written.count_set())
    }

    /// Stops logging written blocks.
    pub fn stop_block_log(&self) {
        *self.shared.log.lock().expect("blk log") = None;
    }
}

impl Shared {
    /// Marks the blocks of `[offset, offset + len)` written, if a block log runs.
    pub(super) fn log_written(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(l) = self.log.lock().expect("blk log").as_ref() {
            for b in offset >> l.shift..=(offset + len - 1) >> l.shift {
                l.written.set(b);
            }
        }
    }
}
