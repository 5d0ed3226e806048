//! The virtio-blk device: one request queue over the virtio-mmio transport, backed by the
//! VM's disk image.
//!
//! The vCPU thread only handles register accesses: a `QueueNotify` write wakes the device's
//! worker thread and returns to the guest at once. The worker takes every available request
//! from the queue, does the file I/O (`pread`/`pwrite`, `fdatasync` for a flush) with the
//! guest memory of the request's buffers, writes the status byte, and puts the request in the
//! used ring. The guest polls the used ring (there is no interrupt line in this VMM).
//!
//! Everything the guest hands the device is checked: descriptor addresses and lengths must
//! lie in guest memory (the queue's `Reader`/`Writer` refuse others), data lengths must be
//! whole sectors, and a request that reaches past the end of the disk fails with
//! `VIRTIO_BLK_S_IOERR` without touching the file.
//!
//! Pausing drains the device: [`VirtioBlk::drain`] returns when the worker has completed
//! everything it took from the queue, so the saved state holds no request in flight (those
//! the guest queued and did not yet notify stay in the available ring, in guest memory, and
//! are served after the restore when the guest notifies).
//!
//! For moving the disk with the VM the device offers two things. A written-block log
//! ([`VirtioBlk::start_block_log`]): every block the guest writes is marked *after* its write
//! reached the file, so a mirror that takes the marks and then reads the blocks never misses a
//! write that raced with its own copy (the block is marked again and re-sent). And a release
//! ([`VirtioBlk::release`]): drain, `fdatasync`, close the image, so another host may open a
//! shared image; [`VirtioBlk::reacquire`] reopens it if the VM stays.

mod block_log;
mod image;
mod worker;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

use super::mmio::{Transport, Written};
use crate::dirty::DirtyLog;
use crate::vm::memory::GuestRam;
use crate::vm::state::VirtioBlkState;
use block_log::BlockLog;
use image::open_image;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Most entries of the request queue.
const QUEUE_MAX: u16 = 256;
/// The worker moves data between the file and guest memory in pieces of at most this.
const CHUNK: usize = 128 << 10;

/// Errors of the disk device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened.
    #[error("disk image {path}: {cause}")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot spawn the disk worker thread: {0}")]
    Thread(std::io::Error),
    /// The saved disk is not the disk of this VM.
    #[error("the saved disk has {saved} sectors, this VM's image {attached}")]
    Capacity {
        /// Sectors in the saved state.
        saved: u64,
        /// Sectors of the attached image.
        attached: u64,
    },
    /// A saved device state this device cannot take.
    #[error("invalid virtio-blk state: {0}")]
    BadState(String),
    /// The state has a disk in use and the VM has none.
    #[error("the guest is using its virtio-blk disk and this VM has no disk attached")]
    NoDisk,
    /// Flushing the image at its release failed.
    #[error("flushing disk image {path}: {cause}")]
    Flush {
        /// Path of the image.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
}

/// Counters of the device.
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes read from the image into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest into the image.
    pub bytes_written: AtomicU64,
    /// Flushes (`fdatasync`) done.
    pub flushes: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
}

/// The worker's schedule: a pending kick, whether it is serving, whether to stop.
#[derive(Debug, Default)]
struct Work {
    kicked: bool,
    busy: bool,
    stop: bool,
}

/// What the vCPU threads and the worker share.
#[derive(Debug)]
struct Shared {
    transport: Mutex<Transport>,
    ram: Arc<GuestRam>,
    dirty: Arc<DirtyLog>,
    /// Where the image is (its folder may be renamed while it is open: see `moved_to`).
    path: Mutex<PathBuf>,
    /// The image; `None` while released.
    file: RwLock<Option<File>>,
    log: Mutex<Option<BlockLog>>,
    /// Capacity in sectors.
    capacity: u64,
    /// `GET_ID` answer: the serial, NUL-padded.
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    work: Mutex<Work>,
    cv: Condvar,
    counters: BlkCounters,
}

/// A virtio-blk device and its worker thread.
#[derive(Debug)]
pub struct VirtioBlk {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl VirtioBlk {
    /// Opens the image at `path` (read-write) as the disk of a VM with guest memory `ram`;
    /// `serial` is what `GET_ID` answers (cut to 20 bytes).
    pub fn open(
        path: &Path,
        serial: &str,
        ram: Arc<GuestRam>,
        dirty: Arc<DirtyLog>,
    ) -> Result<Self, BlkError> {
        let file = open_image(path)?;
        let len = file
            .metadata()
            .map_err(|cause| BlkError::Open {
                path: path.to_path_buf(),
                cause,
            })?
            .len();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let shared = Arc::new(Shared {
            transport: Mutex::new(Transport::new(
                VIRTIO_ID_BLOCK,
                1 << VIRTIO_BLK_F_FLUSH,
                QUEUE_MAX,
            )),
            ram,
            dirty,
            path: Mutex::new(path.to_path_buf()),
            file: RwLock::new(Some(file)),
            log: Mutex::new(None),
            capacity: len / SECTOR,
            id,
            work: Mutex::new(Work::default()),
            cv: Condvar::new(),
            counters: BlkCounters::default(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name(format!("blk-{serial}"))
            .spawn(move || s.serve())
            .map_err(BlkError::Thread)?;
        tracing::info!(path = %path.display(), sectors = len / SECTOR, "virtio-blk disk attached");
        Ok(Self {
            shared,
            worker: Some(worker),
        })
    }

    /// Capacity in bytes (whole sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.shared.capacity * SECTOR
    }

    /// The device's counters.
    pub fn counters(&self) -> &BlkCounters {
        &self.shared.counters
    }

    /// Features the driver accepted (0 before negotiation).
    pub fn driver_features(&self) -> u64 {
        self.shared.transport().driver_features()
    }

    /// A guest read of the device's registers at `offset`.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let config = self.shared.config();
        self.shared.transport().read(offset, data, &config);
    }

    /// A guest write of the device's registers at `offset`.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset == VIRTIO_MMIO_STATUS as u64 && data == [0, 0, 0, 0] {
            // Reset: nothing the worker took may complete into a queue the driver re-uses.
            self.drain();
            self.shared.transport().reset();
            return;
        }
        let written = self
            .shared
            .transport()
            .write(offset, data, self.shared.ram.mem());
        if written == Written::Notify {
            self.shared.kick();
        }
    }

    /// Waits until the worker has completed everything it was asked to serve.
    pub fn drain(&self) {
        let mut w = self.shared.work.lock().expect("blk work");
        while w.kicked || w.busy {
            w = self.shared.cv.wait(w).expect("blk work");
        }
    }

    /// The device state; drains first, so no request is in flight in what it returns.
    pub fn save(&self) -> VirtioBlkState {
        self.drain();
        VirtioBlkState {
            mmio: self.shared.transport().save(),
            capacity: self.shared.capacity,
        }
    }

    /// Loads a saved state into this (idle) device.
    pub fn restore(&self, s: &VirtioBlkState) -> Result<(), BlkError> {
        if s.capacity != self.shared.capacity {
            return Err(BlkError::Capacity {
                saved: s.capacity,
                attached: self.shared.capacity,
            });
        }
        self.drain();
        self.shared
            .transport()
            .restore(&s.mmio, self.shared.ram.mem())
            .map_err(BlkError::BadState)
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        {
            let mut w = self.shared.work.lock().expect("blk work");
            w.stop = true;
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
    }
}
