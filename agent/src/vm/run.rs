//! Running control of the vCPUs: resume, pause (with the [`Paused`] proof), and the
//! auto-converge throttle that slows them down.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::vcpu::{self, Vcpu};
use super::{Paused, Vm};

impl Vm {
    /// Sets the auto-converge throttle: each vCPU sleeps `percent` % of the time (0 to 99).
    /// While it is non-zero a timer kicks the vCPUs out of `KVM_RUN` every 10 ms so that a
    /// guest that rarely exits is throttled too.
    pub fn set_throttle(&self, percent: u32) {
        let percent = percent.min(99);
        self.throttle.store(percent, Ordering::SeqCst);
        if percent == 0 || self.kicker.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared: Vec<_> = self.vcpus.iter().map(|v| v.shared.clone()).collect();
        let throttle = self.throttle.clone();
        let kicker = self.kicker.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(Duration::from_millis(10));
                    for s in &shared {
                        vcpu::kick_if_running(s);
                    }
                }
                kicker.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.kicker.store(false, Ordering::SeqCst);
        }
    }

    /// The auto-converge throttle, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Lets every vCPU run (once no [`Paused`] proof is held).
    pub fn resume(&self) {
        let _gate = self
            .resume_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for v in &self.vcpus {
            v.resume();
        }
        for v in &self.vcpus {
            v.wait_resumed();
        }
    }

    /// Pauses every vCPU and drains the devices (no disk request in flight: nothing writes
    /// guest memory while the proof is held); returns when all are parked and idle, with the
    /// proof (which says how long it took).
    pub fn pause(&self) -> Paused<'_> {
        let t = Instant::now();
        loop {
            for v in &self.vcpus {
                v.request_pause();
            }
            for v in &self.vcpus {
                v.wait_paused();
            }
            self.devices.drain();
            // A resume from another thread may come between the wait and the proof: again.
            if let Some(p) = Paused::of(self, t.elapsed()) {
                return p;
            }
        }
    }

    /// The proof that the VM is paused, if every vCPU is (a VM paused earlier).
    pub fn paused(&self) -> Option<Paused<'_>> {
        Paused::of(self, Duration::ZERO)
    }

    pub(super) fn all_paused(&self) -> bool {
        self.vcpus.iter().all(Vcpu::is_held)
    }
}
