//! The disk image arriving on the destination (`--storage copy`): pieces written into the
//! staged image as they come (first pass, then the blocks the guest wrote meanwhile), hashed
//! block by block under `--verify`, handed to writeback as they land (at most
//! [`WRITE_BEHIND`] bytes waiting for the disk, so the receive goes at the disk's pace), synced
//! at each round's end (on a thread of its own: the receive loop does not wait for it) and
//! once more before the VM runs here: that last sync, inside the downtime, finds little to do.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::migrate::MigrateError;
use crate::storage::writeback::WRITE_BEHIND;
use crate::storage::{BlockDigest, WriteBehind, DISK_BLOCK};
use crate::wire::WireError;

/// The staged image being written.
pub(super) struct DiskSink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    digest: Option<BlockDigest>,
    verify: bool,
    unsynced: bool,
    /// The round-end sync in flight, if any.
    syncing: Option<JoinHandle<std::io::Result<()>>>,
    /// The pieces written and not yet on disk.
    behind: WriteBehind,
    /// Payload bytes written.
    pub(super) written: u64,
}

impl DiskSink {
    /// A sink for the image at `path` (created on the first piece).
    pub(super) fn new(path: &Path, verify: bool) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            size: 0,
            digest: None,
            verify,
            unsynced: false,
            syncing: None,
            behind: WriteBehind::new(WRITE_BEHIND),
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
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)
                .map_err(|e| self.error("create", e))?;
            f.set_len(size).map_err(|e| self.error("size", e))?;
            self.size = size;
            self.digest = self.verify.then(|| BlockDigest::new(size, DISK_BLOCK));
            self.file = Some(f);
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
        let file = self.file.as_ref().expect("opened above");
        file.write_all_at(data, offset)
            .map_err(|e| self.error("write", e))?;
        self.behind
            .written(file, offset, data.len() as u64)
            .map_err(|e| self.error("write back", e))?;
        self.written += data.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Starts flushing what was written so far to stable storage (`fdatasync` on a thread of
    /// its own), unless a flush is still running: the first pass of a large image can take
    /// seconds to reach the disk, and the receive loop must go on meanwhile (a pause arriving
    /// then would otherwise wait for it). A flush that failed is reported here or by [`sync`].
    ///
    /// [`sync`]: DiskSink::sync
    pub(super) fn sync_in_background(&mut self) -> Result<(), MigrateError> {
        if self.syncing.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        self.join()?;
        if let (true, Some(f)) = (self.unsynced, self.file.as_ref()) {
            let f = f.try_clone().map_err(|e| self.error("sync", e))?;
            self.unsynced = false;
            let h = std::thread::Builder::new()
                .name("disk-sync".into())
                .spawn(move || f.sync_data())
                .map_err(|e| self.error("sync", e))?;
            self.syncing = Some(h);
        }
        Ok(())
    }

    /// Flushes everything written to stable storage (`fdatasync`), waiting for a flush in flight
    /// first: when it returns, the image is durable.
    pub(super) fn sync(&mut self) -> Result<(), MigrateError> {
        self.join()?;
        if let (true, Some(f)) = (self.unsynced, self.file.as_ref()) {
            f.sync_data().map_err(|e| self.error("sync", e))?;
            self.unsynced = false;
            self.behind.synced();
        }
        Ok(())
    }

    fn join(&mut self) -> Result<(), MigrateError> {
        match self.syncing.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(self.error("sync", e)),
            Some(Err(_)) => Err(self.error("sync", std::io::Error::other("the sync thread died"))),
        }
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
