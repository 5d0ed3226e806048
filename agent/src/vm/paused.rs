//! Proof that a VM's vCPUs are paused: [`Paused`]. Only it hands out guest pages as slices and
//! saves the vCPU state, both of which need the guest not to run. While a `Paused` lives,
//! [`Vm::resume`] waits: the slices it gave out cannot change under their reader.

use std::sync::{PoisonError, RwLockReadGuard};
use std::time::Duration;

use super::memory::PageRef;
use super::state::MachineState;
use super::{Vm, VmError};
use crate::guest::layout::PAGE_SIZE;

/// The vCPUs of `vm` are paused, and stay paused while this lives.
#[derive(Debug)]
pub struct Paused<'vm> {
    vm: &'vm Vm,
    took: Duration,
    _hold: RwLockReadGuard<'vm, ()>,
}

impl<'vm> Paused<'vm> {
    /// Takes the proof for a VM whose vCPUs are all paused now (None otherwise).
    pub(super) fn of(vm: &'vm Vm, took: Duration) -> Option<Paused<'vm>> {
        let hold = vm
            .resume_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        // Checked under the gate: no resume can slip in between.
        vm.all_paused().then_some(Paused {
            vm,
            took,
            _hold: hold,
        })
    }

    /// How long pausing took (zero for a proof taken on a VM paused before).
    pub fn took(&self) -> Duration {
        self.took
    }

    /// The contents of a page of the VM's memory.
    pub fn page<'a>(&'a self, page: PageRef<'a>) -> &'a [u8] {
        assert!(
            std::ptr::eq(page.ram(), &**self.vm.ram()),
            "a page of another VM's memory"
        );
        // SAFETY: the page is 4 KiB inside the VM's live guest mapping (a `PageRef` is
        // bounds-checked, and this borrow of the VM keeps the mapping alive); nothing writes
        // it while the slice lives: the vCPUs are paused and cannot resume before this proof
        // (which the slice borrows) is dropped, and the VMM writes a paused VM's memory only
        // through copies on the destination side, never on a VM being sent.
        unsafe { std::slice::from_raw_parts(page.as_ptr(), PAGE_SIZE as usize) }
    }

    /// Saves the vCPU and device state.
    pub fn save(&self) -> Result<MachineState, VmError> {
        self.vm.save_state()
    }
}
