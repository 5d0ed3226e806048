//! Port-I/O devices: the serial console and the ports the guest programs report on; and the
//! MMIO device, the virtio-blk disk, when the VM has one.

use std::io::{LineWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::state::{DeviceState, SerialState};
use super::virtio::blk::{BlkError, VirtioBlk};
use super::virtio::mmio::MMIO_SIZE;
use crate::guest::{self, layout, param};
use crate::vm::memory::GuestRam;

/// The console has no interrupt line: the guest programs only write to it.
#[derive(Debug)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

type Console = Serial<NoIrq, NoEvents, Box<dyn Write + Send>>;

/// What the guest programs reported.
#[derive(Debug, Default)]
pub struct GuestReports {
    /// Latest full counter value, read from the counter vCPU's parameter page at its report.
    pub counter: AtomicU64,
    /// Number of counter reports.
    pub counter_reports: AtomicU64,
    /// Failed counter self-checks.
    pub counter_failures: AtomicU64,
    /// Pages written by `dirty` programs (from their batch reports).
    pub dirty_pages: AtomicU64,
    /// Blocks the `disk` program wrote and read back correctly.
    pub disk_blocks: AtomicU64,
    /// The `disk` program's latest generation (pass over its region).
    pub disk_generation: AtomicU64,
    /// Failed `disk` checks or requests (must stay 0).
    pub disk_failures: AtomicU64,
}

/// The devices of one VM.
pub struct Devices {
    console: Mutex<Console>,
    /// Reports from the guest programs.
    pub reports: GuestReports,
    /// The virtio-blk disk at [`layout::VIRTIO_MMIO`], once attached.
    blk: OnceLock<VirtioBlk>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("reports", &self.reports)
            .finish()
    }
}

/// What a port write asks of the vCPU thread.
#[derive(Debug, PartialEq, Eq)]
pub enum PortAction {
    /// Nothing more.
    None,
    /// `dirty` finished a batch of this many pages: hold it to its rate.
    DirtyBatch(u64),
    /// The counter's self-check failed.
    CounterFailed,
    /// `disk` finished a block: hold it to its rate.
    DiskBlock,
}

const SERIAL_PORTS: std::ops::Range<u16> = guest::PORT_SERIAL..guest::PORT_SERIAL + 8;

impl Devices {
    /// Devices writing the console to `log`.
    pub fn new(log: Box<dyn Write + Send>) -> Self {
        Self {
            console: Mutex::new(Serial::new(NoIrq, Box::new(LineWriter::new(log)))),
            reports: GuestReports::default(),
            blk: OnceLock::new(),
        }
    }

    /// Attaches the disk (once, before the guest runs).
    pub fn attach_blk(&self, blk: VirtioBlk) -> Result<(), VirtioBlk> {
        self.blk.set(blk)
    }

    /// The disk, if attached.
    pub fn blk(&self) -> Option<&VirtioBlk> {
        self.blk.get()
    }

    /// Waits until no device has work in flight (the disk's worker is idle).
    pub fn drain(&self) {
        if let Some(b) = self.blk.get() {
            b.drain();
        }
    }

    /// Restores device state into fresh devices writing to `log`. A state whose guest is
    /// using its disk needs this VM's disk attached (and of the same size).
    pub fn restore(&self, state: &DeviceState, log: Box<dyn Write + Send>) -> Result<(), BlkError> {
        match (&state.blk, self.blk.get()) {
            (Some(s), Some(b)) => b.restore(s)?,
            (Some(s), None) if s.mmio.status != 0 => return Err(BlkError::NoDisk),
            _ => {}
        }
        let s = vm_superio::serial::SerialState::from(&state.serial);
        let serial = Serial::from_state(&s, NoIrq, NoEvents, Box::new(LineWriter::new(log)) as _)
            .expect("a console state saved by this VMM is valid");
        *self.console.lock().expect("console") = serial;
        Ok(())
    }

    /// Saves device state (the disk drains first: no request in flight).
    pub fn save(&self) -> DeviceState {
        let blk = self.blk.get().map(|b| b.save());
        let console = self.console.lock().expect("console");
        DeviceState {
            serial: SerialState::from(console.state()),
            blk,
        }
    }

    /// A guest read of MMIO at `addr` (outside RAM).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match (self.blk.get(), addr.checked_sub(layout::VIRTIO_MMIO)) {
            (Some(b), Some(off)) if off < MMIO_SIZE => b.mmio_read(off, data),
            _ => data.fill(0xff),
        }
    }

    /// A guest write of MMIO at `addr` (outside RAM).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match (self.blk.get(), addr.checked_sub(layout::VIRTIO_MMIO)) {
            (Some(b), Some(off)) if off < MMIO_SIZE => b.mmio_write(off, data),
            _ => tracing::debug!(addr, "MMIO write to nothing"),
        }
    }

    /// Sends the console (and the agent's lines) to `log` from now on (the VM's folder moved).
    pub fn reopen_log(&self, log: Box<dyn Write + Send>) {
        let mut c = self.console.lock().expect("console");
        let _ = c.writer_mut().flush();
        *c.writer_mut() = Box::new(LineWriter::new(log));
    }

    /// Writes a line into the VM's log through the console's writer (agent events).
    pub fn log_line(&self, line: &str) {
        let mut c = self.console.lock().expect("console");
        let _ = writeln!(c.writer_mut(), "[vmig] {line}");
        let _ = c.writer_mut().flush();
    }

    /// A port write by vCPU `vcpu`.
    pub fn port_out(&self, vcpu: u32, port: u16, data: &[u8], ram: &GuestRam) -> PortAction {
        let value = data
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64);
        match port {
            p if SERIAL_PORTS.contains(&p) => {
                let mut c = self.console.lock().expect("console");
                let _ = c.write((p - guest::PORT_SERIAL) as u8, data[0]);
                PortAction::None
            }
            guest::PORT_DIRTY_BATCH => {
                let batch = ram
                    .read_u64(layout::params(vcpu) + param::BATCH as u64)
                    .unwrap_or(0);
                self.reports.dirty_pages.fetch_add(batch, Ordering::Relaxed);
                PortAction::DirtyBatch(batch)
            }
            guest::PORT_COUNTER => {
                let full = ram
                    .read_u64(layout::params(vcpu) + param::COUNTER as u64)
                    .unwrap_or(value);
                self.reports.counter.fetch_max(full, Ordering::Relaxed);
                self.reports.counter_reports.fetch_add(1, Ordering::Relaxed);
                PortAction::None
            }
            guest::PORT_COUNTER_FAIL => {
                self.reports
                    .counter_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.log_line(&format!(
                    "vCPU {vcpu}: counter self-check FAILED at {value}"
                ));
                PortAction::CounterFailed
            }
            guest::PORT_DISK => {
                let generation = ram
                    .read_u64(layout::params(vcpu) + param::DISK_GEN as u64)
                    .unwrap_or(0);
                self.reports.disk_blocks.fetch_add(1, Ordering::Relaxed);
                self.reports
                    .disk_generation
                    .fetch_max(generation, Ordering::Relaxed);
                PortAction::DiskBlock
            }
            guest::PORT_DISK_FAIL => {
                self.reports.disk_failures.fetch_add(1, Ordering::Relaxed);
                self.log_line(&format!(
                    "vCPU {vcpu}: disk self-check FAILED at block {value}"
                ));
                PortAction::None
            }
            _ => PortAction::None,
        }
    }

    /// A port read.
    pub fn port_in(&self, port: u16, data: &mut [u8]) {
        if SERIAL_PORTS.contains(&port) {
            let mut c = self.console.lock().expect("console");
            data[0] = c.read((port - guest::PORT_SERIAL) as u8);
        } else {
            data.fill(0xff);
        }
    }
}
