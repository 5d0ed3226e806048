//! The virtio-mmio transport, register layout version 2 (virtio 1.x, "modern" only).
//!
//! The driver probes the magic, version and device id, acknowledges the device, negotiates
//! features 32 bits at a time (it must accept `VIRTIO_F_VERSION_1`), sets `FEATURES_OK`
//! (which the device keeps only if the features are acceptable), configures its queue
//! (size, the three ring addresses, ready), and sets `DRIVER_OK`. From then on a write to
//! `QueueNotify` tells the device the available ring has new requests. Writing 0 to
//! `Status` resets the device. There is no interrupt line in this VMM: the device raises the
//! used-buffer bit in `InterruptStatus` and the driver polls the used ring.
//!
//! The transport holds the register state and the queue; the device behind it (virtio-blk)
//! says what its features and configuration space are and does the work.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::vm::state::{VirtioMmioState, VirtqueueState};

/// Bytes of register space of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const VERSION: u32 = 2;
/// "vmig", little-endian.
const VENDOR: u32 = 0x6769_6d76;

/// What a register write asks of the device behind the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Nothing.
    Nothing,
    /// The driver notified queue 0: there may be new requests.
    Notify,
}

/// Register state of one virtio-mmio device with a single queue.
#[derive(Debug)]
pub struct Transport {
    device_id: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The device's one queue.
    pub queue: Queue,
}

impl Transport {
    /// A transport in reset state for device `device_id` offering `features`, with a queue
    /// of at most `queue_max` entries (a power of two).
    pub fn new(device_id: u32, features: u64, queue_max: u16) -> Self {
        Self {
            device_id,
            device_features: features | (1 << VIRTIO_F_VERSION_1),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue: Queue::new(queue_max).expect("the device's queue size is a power of two"),
        }
    }

    /// Whether the driver finished initialisation (and the device may use the queue).
    pub fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.queue.ready()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Records that the device put buffers in the used ring.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
    }

    /// Back to the state after power-on (the driver wrote 0 to `Status`).
    pub fn reset(&mut self) {
        *self = Self::new(self.device_id, self.device_features, self.queue.max_size());
    }

    /// A read of `data.len()` bytes at `offset`; `config` is the device's configuration space.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        data.fill(0);
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            // Config space: any width, bytes past its end read as zero.
            let start = (offset - VIRTIO_MMIO_CONFIG as u64) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|at| config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register read"
            );
            return;
        }
        let q = &self.queue;
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_id,
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if self.queue_sel == 0 => q.max_size() as u32,
            VIRTIO_MMIO_QUEUE_READY if self.queue_sel == 0 => q.ready() as u32,
            VIRTIO_MMIO_QUEUE_DESC_LOW if self.queue_sel == 0 => q.desc_table() as u32,
            VIRTIO_MMIO_QUEUE_DESC_HIGH if self.queue_sel == 0 => (q.desc_table() >> 32) as u32,
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if self.queue_sel == 0 => q.avail_ring() as u32,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if self.queue_sel == 0 => (q.avail_ring() >> 32) as u32,
            VIRTIO_MMIO_QUEUE_USED_LOW if self.queue_sel == 0 => q.used_ring() as u32,
            VIRTIO_MMIO_QUEUE_USED_HIGH if self.queue_sel == 0 => (q.used_ring() >> 32) as u32,
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` (config space is read-only for virtio-blk). A write of 0
    /// to `Status` must be handled by the caller (drain the device, then [`Transport::reset`]).
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> Written {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register write"
            );
            return Written::Nothing;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers may change only while the driver sets the device up.
        let configuring = self.queue_sel == 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let q = &mut self.queue;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                let ok = u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok());
                if !ok {
                    tracing::warn!(size = v, "virtio-mmio: invalid queue size refused");
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configuring => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configuring => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configuring => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configuring => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW if configuring => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH if configuring => q.set_used_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_READY if configuring => {
                q.set_ready(v == 1);
                if v == 1 && !q.is_valid(mem) {
                    tracing::warn!("virtio-mmio: queue rings outside guest memory; not ready");
                    q.set_ready(false);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if v == 0 && self.driver_ok() => return Written::Notify,
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!(offset, value = v, "virtio-mmio: write ignored"),
        }
        Written::Nothing
    }

    /// The driver sets status bits one step at a time; a step backwards (other than the
    /// reset, handled by the caller) or an unacceptable feature set fails the device.
    fn set_status(&mut self, v: u32) {
        if v & self.status != self.status {
            tracing::warn!(
                from = self.status,
                to = v,
                "virtio-mmio: status cleared bits"
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let mut v = v;
        let new = v & !self.status;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features;
            let modern = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            let steps = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            if unknown != 0 || !modern || v & steps != steps {
                tracing::warn!(
                    features = self.driver_features,
                    "virtio-mmio: features refused"
                );
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = v;
    }

    /// The registers and the queue, for the saved state.
    pub fn save(&self) -> VirtioMmioState {
        let q = self.queue.state();
        VirtioMmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queue: VirtqueueState {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx: q.event_idx_enabled,
            },
        }
    }

    /// Loads a saved state; a queue that is not valid for this device or this guest memory
    /// is refused.
    pub fn restore(&mut self, s: &VirtioMmioState, mem: &GuestMemoryMmap) -> Result<(), String> {
        let q = &s.queue;
        if q.max_size != self.queue.max_size() {
            return Err(format!(
                "queue of {} entries at most, this device has {}",
                q.max_size,
                self.queue.max_size()
            ));
        }
        if s.driver_features & !self.device_features != 0 {
            return Err(format!(
                "driver features {:#x} not offered by this device ({:#x})",
                s.driver_features, self.device_features
            ));
        }
        let queue = Queue::try_from(QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        })
        .map_err(|e| format!("queue: {e}"))?;
        if queue.ready() && !queue.is_valid(mem) {
            return Err("queue rings outside guest memory".into());
        }
        self.queue = queue;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}
