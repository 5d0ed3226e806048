//! Saving and restoring a VM's machine state (vCPUs and devices) for migration, and the
//! MSRs that state carries.

use std::io::Write;
use std::sync::OnceLock;

use kvm_ioctls::Kvm;

use super::state::{self, MachineState};
use super::{Vm, VmError};

impl Vm {
    /// Saves vCPU and device state; the VM must not run
    /// ([`Paused::save`](super::Paused::save), [`Vm::read_back`]).
    pub(super) fn save_state(&self) -> Result<MachineState, VmError> {
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let fd = v.shared.fd.lock().expect("vcpu fd");
            vcpus.push(state::VcpuState::save(v.index, &fd, &self.msr_list)?);
        }
        Ok(MachineState {
            vcpus,
            devices: self.devices.save(),
        })
    }

    /// Loads a saved state into the paused VM; devices write to `log` from now on.
    pub fn restore(&self, s: &MachineState, log: Box<dyn Write + Send>) -> Result<(), VmError> {
        if s.vcpus.len() != self.vcpus.len() {
            return Err(VmError::Invalid(format!(
                "state has {} vCPUs, the VM {}",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let fd = v.shared.fd.lock().expect("vcpu fd");
            st.restore(&fd)?;
        }
        self.devices.restore(&s.devices, log)?;
        Ok(())
    }

    /// Reads back the vCPU state (for the round-trip check after a restore).
    pub fn read_back(&self) -> Result<MachineState, VmError> {
        self.save_state()
    }
}

/// The MSRs KVM lets us both read and write back on this host (computed once).
pub(super) fn migratable_msrs(kvm: &Kvm, fd: &kvm_ioctls::VcpuFd) -> Vec<u32> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| {
        let Ok(all) = kvm.get_msr_index_list() else {
            return Vec::new();
        };
        all.as_slice()
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&[entry]) else {
                    return false;
                };
                matches!(fd.get_msrs(&mut msrs), Ok(1)) && matches!(fd.set_msrs(&msrs), Ok(1))
            })
            .collect()
    })
    .clone()
}
