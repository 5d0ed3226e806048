//! The disk's image file: where it is, its release and reopening for shared storage, the
//! switch to a copy in a storage move, and flushes.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{BlkError, VirtioBlk, SECTOR};

impl VirtioBlk {
    /// Path of the image.
    pub fn path(&self) -> PathBuf {
        self.shared.path.lock().expect("blk path").clone()
    }

    /// Records that the open image now lives at `path` (its folder was renamed, as when an
    /// incoming VM's staging folder joins the datastore); a reopen uses the new path.
    pub fn moved_to(&self, path: &Path) {
        *self.shared.path.lock().expect("blk path") = path.to_path_buf();
    }

    /// Drains, flushes (`fdatasync`) and closes the image, so that another host may open it
    /// (shared storage). Requests fail with `IOERR` until [`VirtioBlk::reacquire`]; the VM is
    /// meant to stay paused meanwhile.
    pub fn release(&self) -> Result<(), BlkError> {
        self.drain();
        let mut file = self.shared.file.write().expect("blk file");
        if let Some(f) = file.as_ref() {
            f.sync_data().map_err(|cause| BlkError::Flush {
                path: self.path(),
                cause,
            })?;
        }
        *file = None;
        tracing::info!(path = %self.path().display(), "virtio-blk image released");
        Ok(())
    }

    /// Reopens a released image (the VM stays on this host after all).
    pub fn reacquire(&self) -> Result<(), BlkError> {
        let mut file = self.shared.file.write().expect("blk file");
        if file.is_none() {
            *file = Some(open_image(&self.path())?);
        }
        Ok(())
    }

    /// Moves the disk onto another image at `path` (a copy of this one, synced): drains the
    /// requests in flight, flushes the old image, then every later request goes to the new
    /// one. The VM is meant to be paused meanwhile (a storage move's switch). On error the
    /// device stays on the old image.
    pub fn switch_to(&self, path: &Path) -> Result<(), BlkError> {
        self.drain();
        let new = open_image(path)?;
        let len = new
            .metadata()
            .map_err(|cause| BlkError::Open {
                path: path.to_path_buf(),
                cause,
            })?
            .len();
        if len / SECTOR != self.shared.capacity {
            return Err(BlkError::Open {
                path: path.to_path_buf(),
                cause: std::io::Error::other(format!(
                    "{len} bytes, the disk has {}",
                    self.shared.capacity * SECTOR
                )),
            });
        }
        let mut file = self.shared.file.write().expect("blk file");
        if let Some(f) = file.as_ref() {
            f.sync_data().map_err(|cause| BlkError::Flush {
                path: self.path(),
                cause,
            })?;
        }
        *file = Some(new);
        *self.shared.path.lock().expect("blk path") = path.to_path_buf();
        tracing::info!(path = %path.display(), "virtio-blk disk switched to another image");
        Ok(())
    }

    /// Whether the image is open (not released).
    pub fn is_open(&self) -> bool {
        self.shared.file.read().expect("blk file").is_some()
    }

    /// Flushes the image to stable storage (`fdatasync`).
    pub fn flush(&self) -> std::io::Result<()> {
        self.drain();
        match self.shared.file.read().expect("blk file").as_ref() {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

pub(super) fn open_image(path: &Path) -> Result<File, BlkError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|cause| BlkError::Open {
            path: path.to_path_buf(),
            cause,
        })
}
