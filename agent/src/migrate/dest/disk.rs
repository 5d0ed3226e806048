//! The disk image arriving on the destination (`--storage copy`): pieces written into the
//! staged image as they come (first pass, then the blocks the guest wrote meanwhile), hashed
//! block by block under `--verify`, written by an [`ImageWriter`] (its own thread, bypassing
//! the page cache, so the receive goes at the disk's pace and does not pay for the copy into
//! the cache), synced at each round's end (without waiting: the receive loop goes on) and once
//! more before the VM runs here: that last sync, inside the downtime, finds little to do.

use std::path::{Path, PathBuf};

use crate::migrate::MigrateError;
use crate::storage::{BlockDigest, ImageWriter, DISK_BLOCK};
use crate::wire::WireError;

/// The staged image being written.
pub(super) struct DiskSink {
    path: PathBuf,
    writer: Option<ImageWriter>,
    size: u64,
    digest: Option<BlockDigest>,
    verify: bool,
    unsynced: bool,
    /// Payload bytes written.
    pub(super) written: u64,
}

impl DiskSink {
    /// A sink for the image at `path` (created on the first piece).
    pub(super) fn new(path: &Path, verify: bool) -> Self {
        Self {
            path: path.to_path_buf(),
            writer: None,
            size: 0,
            digest: None,
            verify,
            unsynced: false,
            written: 0,
        }
    }

    /// Writes one piece of the image (whole blocks, but the image's last).
    pub(super) fn write(
        &mut self,
        size: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), MigrateError> {
        if self.writer.is_none() {
            let w = ImageWriter::create(&self.path, size).map_err(|e| self.error("create", e))?;
            self.size = size;
            self.digest = self.verify.then(|| BlockDigest::new(size, DISK_BLOCK));
            self.writer = Some(w);
        }
        if size != self.size {
            return Err(WireError::BadPages(format!(
                "disk piece for a {size}-byte image, the image has {} bytes",
                self.size
            ))
            .into());
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(WireError::BadPages("disk piece past the end of the image".into()).into());
        }
        if let Some(d) = self.digest.as_mut() {
            d.update(offset, data)
                .map_err(|e| WireError::BadPages(e.to_string()))?;
        }
        let w = self.writer.as_mut().expect("opened above");
        if let Err(e) = w.write(offset, data) {
            return Err(self.error("write", e));
        }
        self.written += data.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Starts flushing what was written so far to stable storage without waiting for it: the
    /// first pass of a large image can take seconds to reach the disk, and the receive loop
    /// must go on meanwhile (a pause arriving then would otherwise wait for it). A flush that
    /// failed is reported by the next call.
    pub(super) fn sync_in_background(&mut self) -> Result<(), MigrateError> {
        if let (true, Some(w)) = (self.unsynced, self.writer.as_mut()) {
            self.unsynced = false;
            if let Err(e) = w.sync_in_background() {
                return Err(self.error("sync", e));
            }
        }
        Ok(())
    }

    /// Waits for every piece to be written, then flushes them to stable storage
    /// (`fdatasync`): when it returns, the image is durable.
    pub(super) fn sync(&mut self) -> Result<(), MigrateError> {
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.sync() {
                return Err(self.error("sync", e));
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// The image's digest as received (under `--verify`, once a piece came).
    pub(super) fn digest(&self) -> Option<String> {
        self.digest.as_ref().map(BlockDigest::digest)
    }

    fn error(&self, what: &str, e: std::io::Error) -> MigrateError {
        MigrateError::Disk(format!(
            "cannot {what} {} on the destination: {e}",
            self.path.display()
        ))
    }
}
