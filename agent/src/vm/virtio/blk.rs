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

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::mmio::{Transport, Written};
use crate::dirty::{DirtyLog, PageBitmap};
use crate::vm::memory::GuestRam;
use crate::vm::state::VirtioBlkState;

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

/// Blocks written since a mirror started: block `i` covers bytes `[i << shift, (i + 1) << shift)`.
#[derive(Debug)]
struct BlockLog {
    shift: u32,
    written: PageBitmap,
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

/// The request header the driver puts first in every chain.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
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

    /// Path of the image.
    pub fn path(&self) -> PathBuf {
        self.shared.path.lock().expect("blk path").clone()
    }

    /// Records that the open image now lives at `path` (its folder was renamed, as when an
    /// incoming VM's staging folder joins the datastore); a reopen uses the new path.
    pub fn moved_to(&self, path: &Path) {
        *self.shared.path.lock().expect("blk path") = path.to_path_buf();
    }

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

fn open_image(path: &Path) -> Result<File, BlkError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|cause| BlkError::Open {
            path: path.to_path_buf(),
            cause,
        })
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

impl Shared {
    fn transport(&self) -> std::sync::MutexGuard<'_, Transport> {
        self.transport.lock().expect("blk transport")
    }

    /// `struct virtio_blk_config`: only `capacity` is meaningful (no optional feature that
    /// gives the other fields a meaning is offered).
    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        c
    }

    fn kick(&self) {
        let mut w = self.work.lock().expect("blk work");
        w.kicked = true;
        self.cv.notify_all();
    }

    /// The worker thread: serves the queue on every kick until stopped.
    fn serve(&self) {
        loop {
            {
                let mut w = self.work.lock().expect("blk work");
                while !w.kicked && !w.stop {
                    w = self.cv.wait(w).expect("blk work");
                }
                if w.stop {
                    return;
                }
                w.kicked = false;
                w.busy = true;
            }
            self.serve_queue();
            let mut w = self.work.lock().expect("blk work");
            w.busy = false;
            self.cv.notify_all();
        }
    }

    /// Completes every request in the available ring.
    fn serve_queue(&self) {
        let mem = self.ram.mem();
        loop {
            let chain = {
                let mut t = self.transport();
                if !t.driver_ok() {
                    return;
                }
                match t.queue.pop_descriptor_chain(mem) {
                    Some(c) => c,
                    None => return,
                }
            };
            let head = chain.head_index();
            let used = self.execute(chain);
            let mut t = self.transport();
            if let Err(e) = t.queue.add_used(mem, head, used) {
                tracing::warn!(cause = %e, "virtio-blk: cannot fill the used ring");
                return;
            }
            t.signal_used();
            // The VMM's own writes to guest memory are dirty pages too.
            let ring = t.queue.used_ring();
            self.dirty.mark(ring, 6 + 8 * t.queue.size() as u64);
        }
    }

    /// Serves one request; returns the bytes written into the guest's buffers (status
    /// included), for the used ring.
    fn execute(&self, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let file = self.file.read().expect("blk file");
        let mem = self.ram.mem();
        let writable: Vec<(u64, u64)> = chain
            .clone()
            .writable()
            .map(|d| (d.addr().0, d.len() as u64))
            .collect();
        let (mut reader, mut writer) =
            match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(r), Ok(w)) => (r, w),
                _ => {
                    tracing::warn!("virtio-blk: request with buffers outside guest memory");
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return 0;
                }
            };
        let writable_bytes = writer.available_bytes();
        if writable_bytes == 0 {
            tracing::warn!("virtio-blk: request without a status byte");
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        // The status byte is the last writable byte; `writer` keeps the data part.
        let Ok(mut status_writer) = writer.split_at(writable_bytes - 1) else {
            return 0;
        };
        let status = match (read_header(&mut reader), file.as_ref()) {
            (Some(h), Some(f)) => self.request(f, h, &mut reader, &mut writer),
            (Some(_), None) => {
                tracing::warn!("virtio-blk: request while the image is released");
                VIRTIO_BLK_S_IOERR
            }
            (None, _) => VIRTIO_BLK_S_IOERR,
        };
        if status != VIRTIO_BLK_S_OK {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let _ = status_writer.write_all(&[status as u8]);
        for (addr, len) in writable {
            self.dirty.mark(addr, len);
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        (writer.bytes_written() + 1) as u32
    }

    /// Does what the header asks; returns the status.
    fn request(
        &self,
        file: &File,
        h: Header,
        reader: &mut Reader<'_>,
        writer: &mut Writer<'_>,
    ) -> u32 {
        match h.kind {
            VIRTIO_BLK_T_IN => {
                let Some(offset) = self.range(h.sector, writer.available_bytes()) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                match self.read_into(file, offset, writer) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => {
                        tracing::warn!(sector = h.sector, cause = %e, "virtio-blk: read failed");
                        VIRTIO_BLK_S_IOERR
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                let Some(offset) = self.range(h.sector, reader.available_bytes()) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                match self.write_from(file, offset, reader) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => {
                        tracing::warn!(sector = h.sector, cause = %e, "virtio-blk: write failed");
                        VIRTIO_BLK_S_IOERR
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match file.sync_data() {
                Ok(()) => {
                    self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                    VIRTIO_BLK_S_OK
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "virtio-blk: fdatasync failed");
                    VIRTIO_BLK_S_IOERR
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            other => {
                tracing::debug!(kind = other, "virtio-blk: unsupported request");
                VIRTIO_BLK_S_UNSUPP
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let sectors = len / SECTOR;
        let inside = sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.capacity);
        if !len.is_multiple_of(SECTOR) || !inside {
            tracing::debug!(
                sector,
                len,
                capacity = self.capacity,
                "virtio-blk: bad range"
            );
            return None;
        }
        Some(sector * SECTOR)
    }

    fn read_into(
        &self,
        file: &File,
        mut offset: u64,
        writer: &mut Writer<'_>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; writer.available_bytes().min(CHUNK)];
        while writer.available_bytes() > 0 {
            let n = writer.available_bytes().min(CHUNK);
            file.read_exact_at(&mut buf[..n], offset)?;
            writer.write_all(&buf[..n])?;
            offset += n as u64;
            self.counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_from(
        &self,
        file: &File,
        mut offset: u64,
        reader: &mut Reader<'_>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; reader.available_bytes().min(CHUNK)];
        while reader.available_bytes() > 0 {
            let n = reader.available_bytes().min(CHUNK);
            reader.read_exact(&mut buf[..n])?;
            file.write_all_at(&buf[..n], offset)?;
            // Marked after the write reached the file: see the module's notes.
            self.log_written(offset, n as u64);
            offset += n as u64;
            self.counters
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Shared {
    /// Marks the blocks of `[offset, offset + len)` written, if a block log runs.
    fn log_written(&self, offset: u64, len: u64) {
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

/// Reads the 16-byte request header (type, reserved, sector).
fn read_header(reader: &mut Reader<'_>) -> Option<Header> {
    let mut b = [0u8; 16];
    reader.read_exact(&mut b).ok()?;
    Some(Header {
        kind: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        sector: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
    })
}
