//! The device's worker thread: it takes the requests of the available ring, checks them, does
//! the file I/O with the guest's buffers, and completes them into the used ring.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{Shared, CHUNK, SECTOR};
use crate::vm::virtio::mmio::Transport;

/// The request header the driver puts first in every chain.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

impl Shared {
    pub(super) fn transport(&self) -> std::sync::MutexGuard<'_, Transport> {
        self.transport.lock().expect("blk transport")
    }

    /// `struct virtio_blk_config`: only `capacity` is meaningful (no optional feature that
    /// gives the other fields a meaning is offered).
    pub(super) fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        c
    }

    pub(super) fn kick(&self) {
        let mut w = self.work.lock().expect("blk work");
        w.kicked = true;
        self.cv.notify_all();
    }

    /// The worker thread: serves the queue on every kick until stopped.
    pub(super) fn serve(&self) {
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
            // Marked after the write reached the file: see the `blk` module's notes.
            self.log_written(offset, n as u64);
            offset += n as u64;
            self.counters
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
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
