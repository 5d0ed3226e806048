//! Complete saved state of a vCPU and of the VMM's devices, as plain serde structs.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// The TSC MSR: it runs with the wall clock, so it never reads back exactly.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM get/set ioctl failed.
    #[error("{what} failed on vCPU {vcpu}: {cause}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// vCPU index.
        vcpu: u32,
        /// errno.
        cause: kvm_ioctls::Error,
    },
    /// KVM took only part of the MSRs.
    #[error("KVM_SET_MSRS on vCPU {vcpu} stopped at MSR {index:#x} ({set} of {total} set)")]
    Msrs {
        /// vCPU index.
        vcpu: u32,
        /// The MSR KVM refused.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
}

/// Everything KVM holds for one vCPU of this VMM (no in-kernel irqchip, so no LAPIC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: FpuState,
    /// XSAVE area (the legacy 4 KiB `kvm_xsave` region).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Run state.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

fn io(what: &'static str, vcpu: u32) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |cause| StateError::Ioctl { what, vcpu, cause }
}

impl VcpuState {
    /// Reads the state of a stopped vCPU; `msr_list` is the set of MSRs to save.
    pub fn save(index: u32, fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, StateError> {
        let entries: Vec<kvm_msr_entry> = msr_list
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("MSR list fits");
        let n = fd.get_msrs(&mut msrs).map_err(io("KVM_GET_MSRS", index))?;
        Ok(Self {
            index,
            regs: fd.get_regs().map_err(io("KVM_GET_REGS", index))?,
            sregs: fd.get_sregs().map_err(io("KVM_GET_SREGS", index))?,
            fpu: FpuState::from(&fd.get_fpu().map_err(io("KVM_GET_FPU", index))?),
            xsave: fd
                .get_xsave()
                .map_err(io("KVM_GET_XSAVE", index))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().map_err(io("KVM_GET_XCRS", index))?,
            msrs: msrs.as_slice()[..n].to_vec(),
            events: fd
                .get_vcpu_events()
                .map_err(io("KVM_GET_VCPU_EVENTS", index))?,
            mp_state: fd.get_mp_state().map_err(io("KVM_GET_MP_STATE", index))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(io("KVM_GET_DEBUGREGS", index))?,
        })
    }

    /// Loads the state into a vCPU that is not running.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let index = self.index;
        fd.set_sregs(&self.sregs)
            .map_err(io("KVM_SET_SREGS", index))?;
        fd.set_regs(&self.regs).map_err(io("KVM_SET_REGS", index))?;
        fd.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(io("KVM_SET_FPU", index))?;
        let mut xsave = kvm_xsave::default();
        let n = self.xsave.len().min(xsave.region.len());
        xsave.region[..n].copy_from_slice(&self.xsave[..n]);
        // SAFETY: `xsave` is a whole legacy 4 KiB `kvm_xsave`; KVM_SET_XSAVE reads no more
        // than that struct (no XSAVE2 extension is in use).
        unsafe { fd.set_xsave(&xsave) }.map_err(io("KVM_SET_XSAVE", index))?;
        fd.set_xcrs(&self.xcrs).map_err(io("KVM_SET_XCRS", index))?;
        let msrs = Msrs::from_entries(&self.msrs).expect("MSR list fits");
        let set = fd.set_msrs(&msrs).map_err(io("KVM_SET_MSRS", index))?;
        if set != self.msrs.len() {
            return Err(StateError::Msrs {
                vcpu: index,
                index: self.msrs[set].index,
                set,
                total: self.msrs.len(),
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(io("KVM_SET_VCPU_EVENTS", index))?;
        fd.set_mp_state(self.mp_state)
            .map_err(io("KVM_SET_MP_STATE", index))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(io("KVM_SET_DEBUGREGS", index))?;
        Ok(())
    }

    /// A digest of the state, leaving out the TSC (it advances with the wall clock between
    /// save and read-back, so it never compares equal).
    pub fn digest(&self) -> String {
        let mut s = self.clone();
        s.msrs.retain(|m| m.index != MSR_IA32_TSC);
        let bytes = bincode::serialize(&s).expect("vCPU state serializes");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// The legacy FPU/SSE state (`kvm_fpu`, which has no serde support of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control, status and abridged tag words, last opcode.
    pub words: [u16; 4],
    /// Last instruction and data pointers.
    pub last: [u64; 2],
    /// SSE registers.
    pub xmm: [[u8; 16]; 16],
    /// SSE control/status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            words: [f.fcw, f.fsw, f.ftwx as u16, f.last_opcode],
            last: [f.last_ip, f.last_dp],
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.words[0],
            fsw: f.words[1],
            ftwx: f.words[2] as u8,
            last_opcode: f.words[3],
            last_ip: f.last[0],
            last_dp: f.last[1],
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The 16550 UART's registers (mirrors `vm_superio::serial::SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR in that order.
    pub regs: [u8; 9],
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        let r = s.regs;
        Self {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A virtqueue's configuration and ring positions (mirrors `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Most entries the device offers.
    pub max_size: u16,
    /// Entries the driver chose.
    pub size: u16,
    /// The driver set the queue up.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx: bool,
}

/// The registers of a virtio-mmio transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Device status (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK...).
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The request queue.
    pub queue: VirtqueueState,
}

/// The virtio-blk disk. Saved with no request in flight: pausing the VM drains the device
/// (every request it took from the queue is completed in the used ring first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// Transport registers and the queue.
    pub mmio: VirtioMmioState,
    /// Capacity of the disk the guest saw, 512-byte sectors (the restoring VM's must match).
    pub capacity: u64,
}

/// State of the VMM's devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The serial console.
    pub serial: SerialState,
    /// The virtio-blk disk, when the VM has one. (`serde(default)` lets a self-describing
    /// encoding of an older state decode; the migration stream's bincode has no such
    /// tolerance and relies on both sides' versions instead.)
    #[serde(default)]
    pub blk: Option<VirtioBlkState>,
}

/// Everything but memory: what stop-and-copy sends after the last pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// One per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceState,
}

impl MachineState {
    /// Digest of all vCPU states (TSC excluded, see [`VcpuState::digest`]).
    pub fn vcpu_digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for v in &self.vcpus {
            h.update(v.digest().as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}
