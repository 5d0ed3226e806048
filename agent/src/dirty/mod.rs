//! Dirty-page tracking: one [`DirtyLog`] over the KVM dirty ring (per-vCPU rings of dirtied
//! guest frames) or the classic KVM dirty bitmap.
//!
//! The ring must be enabled before the vCPUs exist, so the mechanism is chosen when the VM is
//! built ([`DirtyMode::choose`]); logging itself is switched on only while a migration runs
//! (the memory slot's `KVM_MEM_LOG_DIRTY_PAGES` flag).

mod ring;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, VmFd};
use serde::{Deserialize, Serialize};

pub use ring::DirtyRing;
pub use vmig_uffd::PageBitmap;

/// Bytes of one dirty-ring entry (`struct kvm_dirty_gfn`).
const RING_ENTRY_BYTES: u32 = 16;
/// Ring size we ask for, capped by what KVM offers (1 MiB, 65,536 entries, on this platform).
const RING_BYTES_WANTED: u32 = 1 << 20;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The user forced the ring but KVM does not offer it.
    #[error("the KVM dirty ring is not available on this host (KVM_CAP_DIRTY_LOG_RING)")]
    RingUnavailable,
    /// Enabling the ring capability failed.
    #[error("cannot enable the KVM dirty ring: {0}")]
    EnableRing(kvm_ioctls::Error),
    /// Mapping a vCPU's ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu}: {cause}")]
    MapRing {
        /// vCPU index.
        vcpu: u32,
        /// errno.
        cause: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    ResetRings(std::io::Error),
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    GetLog(kvm_ioctls::Error),
    /// Changing the memory slot's flags failed.
    #[error("cannot switch dirty logging on the memory slot: {0}")]
    SetSlot(kvm_ioctls::Error),
    /// A migration asked for a mechanism the running VM was not built with.
    #[error("the VM tracks dirty pages with the {have}; restart it with dirty_tracking = \"{want}\" to use the {want}")]
    ModeMismatch {
        /// What the VM has.
        have: DirtyMode,
        /// What was asked.
        want: DirtyMode,
    },
}

/// What the user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DirtyTracking {
    /// The dirty ring where KVM has it, else the bitmap.
    #[default]
    Auto,
    /// The KVM dirty ring, or fail.
    Ring,
    /// The KVM dirty bitmap.
    Bitmap,
}

/// The mechanism a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyMode {
    /// Per-vCPU KVM dirty rings; the value is the ring size in bytes.
    Ring(u32),
    /// The KVM dirty bitmap.
    Bitmap,
}

impl std::fmt::Display for DirtyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyMode::Ring(_) => f.write_str("ring"),
            DirtyMode::Bitmap => f.write_str("bitmap"),
        }
    }
}

impl DirtyMode {
    /// Picks the mechanism for a new VM and, for the ring, enables it on `vm` (before any
    /// vCPU is created).
    pub fn choose(vm: &VmFd, want: DirtyTracking) -> Result<DirtyMode, DirtyError> {
        if want == DirtyTracking::Bitmap {
            return Ok(DirtyMode::Bitmap);
        }
        let acq_rel = vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL as u64);
        let plain = vm.check_extension_int(Cap::DirtyLogRing);
        let (cap, max) = if acq_rel > 0 {
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel)
        } else if plain > 0 {
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING, plain)
        } else if want == DirtyTracking::Ring {
            return Err(DirtyError::RingUnavailable);
        } else {
            tracing::warn!("KVM dirty ring unavailable, using the dirty bitmap");
            return Ok(DirtyMode::Bitmap);
        };
        let bytes = RING_BYTES_WANTED.min(max as u32);
        let mut c = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        c.args[0] = bytes as u64;
        vm.enable_cap(&c).map_err(DirtyError::EnableRing)?;
        Ok(DirtyMode::Ring(bytes))
    }

    /// Whether a migration asking for `want` can use this VM's mechanism.
    pub fn check(self, want: DirtyTracking) -> Result<(), DirtyError> {
        match (self, want) {
            (DirtyMode::Bitmap, DirtyTracking::Ring) => Err(DirtyError::ModeMismatch {
                have: self,
                want: DirtyMode::Ring(0),
            }),
            (DirtyMode::Ring(_), DirtyTracking::Bitmap) => Err(DirtyError::ModeMismatch {
                have: self,
                want: DirtyMode::Bitmap,
            }),
            _ => Ok(()),
        }
    }
}

/// The dirty log of one VM.
#[derive(Debug)]
pub struct DirtyLog {
    mode: DirtyMode,
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    rings: Mutex<Vec<Arc<DirtyRing>>>,
    /// Pages harvested from the rings (by vCPU threads on ring-full exits, or by `harvest`)
    /// and not yet taken by the migration.
    pending: PageBitmap,
    active: AtomicBool,
    /// Ring entries read in all (one per emulated write, so duplicates included).
    ring_entries: AtomicU64,
    ring_full_exits: AtomicU64,
    /// Ring-full exits that found nothing to harvest (an overflowed ring).
    overflows: AtomicU64,
    /// The background ring harvester while logging is on (ring mode).
    harvester: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How often the background harvester drains the rings while logging is on.
///
/// On this platform guest writes are emulated by KVM and a vCPU can push far past the ring's
/// soft limit inside one `KVM_RUN`: once a ring overflows, KVM keeps exiting with
/// `KVM_EXIT_DIRTY_RING_FULL` and never pushes again (measured: `ring_wrap_probe`). Draining
/// every few milliseconds keeps each ring far from full (a vCPU dirties at most ~400 k pages/s
/// here, ~2 k entries per interval against 65,536).
const HARVEST_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

impl DirtyLog {
    /// A dirty log over the VM's single memory slot.
    pub fn new(mode: DirtyMode, vm: Arc<VmFd>, region: kvm_userspace_memory_region) -> Self {
        let pages = region.memory_size / crate::guest::layout::PAGE_SIZE;
        Self {
            mode,
            vm,
            region,
            rings: Mutex::new(Vec::new()),
            pending: PageBitmap::new(pages),
            active: AtomicBool::new(false),
            ring_entries: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            harvester: Mutex::new(None),
            overflows: AtomicU64::new(0),
        }
    }

    /// The mechanism.
    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// Maps the ring of a new vCPU (ring mode only).
    pub fn add_vcpu(&self, vcpu: u32, fd: &kvm_ioctls::VcpuFd) -> Result<(), DirtyError> {
        if let DirtyMode::Ring(bytes) = self.mode {
            let ring = DirtyRing::map(vcpu, fd, bytes / RING_ENTRY_BYTES)?;
            self.rings.lock().expect("rings").push(Arc::new(ring));
        }
        Ok(())
    }

    /// Switches logging on: from now on every guest write is recorded.
    pub fn start(self: &Arc<Self>) -> Result<(), DirtyError> {
        self.set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.active.store(true, Ordering::SeqCst);
        // Anything left from an earlier migration is stale.
        let _ = self.harvest()?;
        if matches!(self.mode, DirtyMode::Ring(_)) {
            let me = Arc::downgrade(self);
            let t = std::thread::Builder::new()
                .name("dirty-harvest".into())
                .spawn(move || loop {
                    std::thread::sleep(HARVEST_INTERVAL);
                    let Some(log) = me.upgrade() else { return };
                    if !log.is_active() {
                        return;
                    }
                    if let Err(e) = log.drain_rings() {
                        tracing::warn!(cause = %e, "background dirty-ring harvest failed");
                    }
                })
                .ok();
            *self.harvester.lock().expect("harvester") = t;
        }
        Ok(())
    }

    /// Moves every ring's entries into the pending set and resets the rings.
    fn drain_rings(&self) -> Result<(), DirtyError> {
        let rings = self.rings.lock().expect("rings").clone();
        for ring in &rings {
            let n = ring.harvest(&self.pending, self.region.guest_phys_addr);
            self.ring_entries.fetch_add(n, Ordering::Relaxed);
        }
        ring::reset_rings(&self.vm)
    }

    /// Switches logging off.
    pub fn stop(&self) -> Result<(), DirtyError> {
        self.active.store(false, Ordering::SeqCst);
        if let Some(t) = self.harvester.lock().expect("harvester").take() {
            let _ = t.join();
        }
        self.set_slot_flags(0)?;
        let _ = self.harvest();
        Ok(())
    }

    fn set_slot_flags(&self, flags: u32) -> Result<(), DirtyError> {
        let mut region = self.region;
        region.flags = flags;
        // SAFETY: the region describes the VM's own guest mapping, which lives as long as the
        // VM; only its flags change.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(DirtyError::SetSlot)
    }

    /// Called by a vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`: moves its ring into the
    /// pending set and resets the rings so the vCPU can go on.
    pub fn on_ring_full(&self, vcpu: u32) -> Result<(), DirtyError> {
        self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        let ring = self
            .rings
            .lock()
            .expect("rings")
            .get(vcpu as usize)
            .cloned();
        if let Some(ring) = ring {
            let n = ring.harvest(&self.pending, self.region.guest_phys_addr);
            self.ring_entries.fetch_add(n, Ordering::Relaxed);
            if n == 0 {
                // KVM says full, yet nothing is pushed where we read: the ring overflowed
                // (see HARVEST_INTERVAL); KVM keeps this vCPU exiting.
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
        }
        ring::reset_rings(&self.vm)
    }

    /// Collects every page dirtied since the last call. With the vCPUs paused the answer is
    /// complete; with them running, later writes show up in the next call.
    pub fn harvest(&self) -> Result<Vec<u64>, DirtyError> {
        match self.mode {
            DirtyMode::Ring(_) => {
                self.drain_rings()?;
            }
            DirtyMode::Bitmap => {
                let words = self
                    .vm
                    .get_dirty_log(self.region.slot, self.region.memory_size as usize)
                    .map_err(DirtyError::GetLog)?;
                self.pending.or_words(&words);
            }
        }
        Ok(self.pending.take())
    }

    /// Records that the VMM itself (a device) wrote `len` bytes of guest memory at `addr`:
    /// KVM logs only the guest's own writes. No-op while logging is off.
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 || !self.is_active() {
            return;
        }
        let page = crate::guest::layout::PAGE_SIZE;
        let base = self.region.guest_phys_addr;
        let end = self.region.guest_phys_addr + self.region.memory_size;
        let (from, to) = (addr.max(base), addr.saturating_add(len).min(end));
        if from >= to {
            return;
        }
        for p in (from - base) / page..=(to - 1 - base) / page {
            self.pending.set(p);
        }
    }

    /// Counters: ring entries read (duplicates included) and ring-full exits.
    pub fn ring_counters(&self) -> (u64, u64) {
        (
            self.ring_entries.load(Ordering::Relaxed),
            self.ring_full_exits.load(Ordering::Relaxed),
        )
    }

    /// Ring-full exits that found nothing to harvest: non-zero means a ring overflowed and
    /// its vCPU is stuck until logging stops (see `HARVEST_INTERVAL`).
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Whether logging is on.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}
