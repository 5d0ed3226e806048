//! The live disk mirror on the source (`--storage copy`): the image goes once in chunks (holes
//! and all-zero chunks skipped), then every pre-copy round re-sends the blocks the guest wrote
//! since, beside the round's dirty pages, and the pause sends the last ones.
//!
//! The device's written-block log starts before the first chunk is read, and marks a block
//! after its write reached the file; so a write racing with its own copy is marked again and
//! goes again: none is lost (`docs/storage.md`). Under `--verify` the mirror keeps a
//! [`BlockDigest`] of what it sent, so the image's digest at the pause costs only the blocks
//! sent during the pause.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{stream, Outgoing};
use crate::inventory;
use crate::migrate::link::Link;
use crate::migrate::report::{DiskReport, ProgressPhase, StorageUsed};
use crate::migrate::{Cancel, MigrateError, Progress};
use crate::storage::{self, BlockDigest, DISK_BLOCK};

/// Pieces of the image go in chunks of up to this size (a multiple of [`DISK_BLOCK`]).
const CHUNK: usize = 1 << 20;

/// The mirror of one VM's image.
pub(super) struct DiskMirror {
    file: File,
    size: u64,
    digest: Option<BlockDigest>,
    /// The figures so far.
    pub(super) report: DiskReport,
    written_at_start: u64,
}

/// What one pass over the written blocks sent.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Resent {
    /// Blocks sent.
    pub(super) blocks: u64,
    /// Payload bytes sent.
    pub(super) bytes: u64,
}

impl DiskMirror {
    /// Opens the image for the mirror and starts the device's written-block log (from here
    /// on every guest write is re-sent later).
    pub(super) fn open(out: &Outgoing<'_>, verify: bool) -> Result<Self, MigrateError> {
        let path = out.dir.join(inventory::DISK);
        let file = File::open(&path).map_err(|e| file_error(&path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| file_error(&path, "read the size of", e))?
            .len();
        let blk = out.vm.devices().blk();
        if let Some(blk) = &blk {
            blk.start_block_log(DISK_BLOCK);
        }
        let written_at_start = blk.map_or(0, |b| {
            b.counters()
                .bytes_written
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        Ok(Self {
            file,
            size,
            digest: verify.then(|| BlockDigest::new(size, DISK_BLOCK)),
            report: DiskReport {
                mode: StorageUsed::Copy,
                image_bytes: size,
                ..Default::default()
            },
            written_at_start,
        })
    }

    /// Sends the whole image (its data: holes and all-zero chunks are not sent).
    pub(super) fn send_image(
        &mut self,
        link: &mut Link,
        cancel: &Cancel,
        progress: &dyn Fn(Progress),
    ) -> Result<(), MigrateError> {
        let t = Instant::now();
        let size = self.size;
        let mut sent = 0u64;
        let mut shown = t;
        progress(Progress::new(ProgressPhase::DiskCopy, 0, 0, size));
        let digest = &mut self.digest;
        let read = storage::for_each_aligned_data_chunk(
            &self.file,
            CHUNK,
            DISK_BLOCK,
            |offset, chunk| -> Result<(), Pass> {
                if cancel.is_cancelled() {
                    return Err(Pass::Send(MigrateError::Cancelled));
                }
                if let Some(d) = digest.as_mut() {
                    d.update(offset, chunk)
                        .map_err(|e| Pass::Send(io_other(e)))?;
                }
                send_piece(link, size, offset, chunk).map_err(Pass::Send)?;
                sent += chunk.len() as u64;
                if shown.elapsed().as_millis() >= 200 {
                    shown = Instant::now();
                    let at = offset + chunk.len() as u64;
                    progress(Progress::new(ProgressPhase::DiskCopy, 0, at, size));
                }
                Ok(())
            },
        )
        .map_err(|e| match e {
            Pass::Read(e) => MigrateError::Disk(format!("reading the disk image: {e}")),
            Pass::Send(e) => e,
        })?;
        if sent == 0 {
            // An empty (all-hole) image still tells the destination its size.
            send_piece(link, size, 0, &[])?;
        }
        link.flush()?;
        let secs = t.elapsed().as_secs_f64();
        self.report.copied_bytes = sent;
        self.report.read_bytes = read;
        self.report.copy_ms = secs * 1e3;
        self.report.copy_mibs = sent as f64 / 1048576.0 / secs.max(1e-9);
        Ok(())
    }

    /// Sends the blocks written since the last pass (in runs of adjacent blocks). With the VM
    /// paused and its disk drained, the image here equals the destination's afterwards.
    pub(super) fn send_written(
        &mut self,
        link: &mut Link,
        out: &Outgoing<'_>,
    ) -> Result<Resent, MigrateError> {
        let Some(blk) = out.vm.devices().blk() else {
            return Ok(Resent::default());
        };
        let blocks = blk.take_written_blocks();
        let mut buf = vec![0u8; CHUNK];
        let per_chunk = CHUNK as u64 / DISK_BLOCK;
        let mut done = Resent::default();
        let mut i = 0;
        while i < blocks.len() {
            // A run of adjacent blocks, at most one chunk long.
            let first = blocks[i];
            let mut n = 1;
            while i + n < blocks.len()
                && blocks[i + n] == first + n as u64
                && (n as u64) < per_chunk
            {
                n += 1;
            }
            let offset = first * DISK_BLOCK;
            let len = (n as u64 * DISK_BLOCK).min(self.size.saturating_sub(offset)) as usize;
            self.file
                .read_exact_at(&mut buf[..len], offset)
                .map_err(|e| MigrateError::Disk(format!("reading the disk image: {e}")))?;
            if let Some(d) = self.digest.as_mut() {
                d.update(offset, &buf[..len]).map_err(io_other)?;
            }
            send_piece(link, self.size, offset, &buf[..len])?;
            done.blocks += n as u64;
            done.bytes += len as u64;
            i += n;
        }
        self.report.resent_blocks += done.blocks;
        self.report.resent_bytes += done.bytes;
        Ok(done)
    }

    /// The last pass, with the VM paused: the written blocks, then the log stops.
    pub(super) fn finish(
        &mut self,
        link: &mut Link,
        out: &Outgoing<'_>,
    ) -> Result<Resent, MigrateError> {
        let last = self.send_written(link, out)?;
        if let Some(blk) = out.vm.devices().blk() {
            blk.stop_block_log();
            self.report.guest_written_bytes = blk
                .counters()
                .bytes_written
                .load(std::sync::atomic::Ordering::Relaxed)
                - self.written_at_start;
        }
        self.report.blocks_at_pause = last.blocks;
        tracing::info!(
            blocks = last.blocks,
            resent = self.report.resent_blocks,
            "disk blocks written during the migration sent"
        );
        Ok(last)
    }

    /// Blocks written and not sent yet.
    pub(super) fn pending(out: &Outgoing<'_>) -> u64 {
        out.vm
            .devices()
            .blk()
            .map_or(0, |b| b.written_block_count())
    }

    /// The image's digest as sent (under `--verify`).
    pub(super) fn digest(&self) -> Option<String> {
        self.digest.as_ref().map(BlockDigest::digest)
    }
}

/// A failure of the first pass: reading the image, or sending it.
enum Pass {
    Read(std::io::Error),
    Send(MigrateError),
}

impl From<std::io::Error> for Pass {
    fn from(e: std::io::Error) -> Self {
        Pass::Read(e)
    }
}

fn send_piece(link: &mut Link, size: u64, offset: u64, chunk: &[u8]) -> Result<(), MigrateError> {
    stream::send_chunk(link, inventory::DISK, size, offset, chunk)
}

fn io_other(e: storage::digest::Misaligned) -> MigrateError {
    MigrateError::Internal(e.to_string())
}

fn file_error(path: &std::path::Path, what: &str, e: std::io::Error) -> MigrateError {
    MigrateError::Disk(format!("cannot {what} {}: {e}", path.display()))
}
