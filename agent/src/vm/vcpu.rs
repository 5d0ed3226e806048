//! vCPU threads: each vCPU runs `KVM_RUN` on its own thread and parks at a gate when paused.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::devices::{Devices, PortAction};
use super::memory::GuestRam;
use crate::dirty::DirtyLog;

/// What the VMM wants of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// What the vCPU thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Inside (or about to enter) `KVM_RUN`.
    Running,
    /// Parked at the gate; the VMM may read and write its state.
    Paused,
    /// The thread ended (stopped, or the guest failed: the reason).
    Exited(Option<String>),
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    phase: Phase,
}

/// Shared between a vCPU thread and the VMM.
#[derive(Debug)]
pub struct VcpuShared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The vCPU fd; the thread holds the lock only inside `KVM_RUN` and exit handling.
    pub fd: Mutex<VcpuFd>,
    /// Linux thread id (for tracing filters).
    pub tid: AtomicI32,
    /// `KVM_RUN` exits handled.
    pub exits: AtomicU64,
    /// `pthread_self()` of the vCPU thread (0 until it started), for throttle kicks.
    pthread: AtomicU64,
}

/// Kicks vCPU `s` out of `KVM_RUN` if it is running (the throttle's timer uses this so a
/// guest that rarely exits still honours its duty cycle).
pub fn kick_if_running(s: &VcpuShared) {
    let c = s.ctl.lock().expect("vcpu ctl");
    let t = s.pthread.load(Ordering::Relaxed);
    if c.phase == Phase::Running && t != 0 {
        // SAFETY: the thread is alive: it sets its phase to Exited under this lock before
        // it returns, and we hold the lock and saw it Running.
        unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
    }
}

/// One vCPU and its thread.
#[derive(Debug)]
pub struct Vcpu {
    /// vCPU index.
    pub index: u32,
    /// Shared with the thread.
    pub shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
}

/// The environment a vCPU thread runs in.
#[derive(Debug, Clone)]
pub struct VcpuEnv {
    /// Guest memory.
    pub ram: Arc<GuestRam>,
    /// Devices.
    pub devices: Arc<Devices>,
    /// Dirty log (ring-full exits).
    pub dirty: Arc<DirtyLog>,
    /// What the vCPU's program may do per second (0: flat out): pages for `dirty`, blocks
    /// for `disk`.
    pub rate: u64,
    /// Auto-converge throttle, percent of each interval the vCPU sleeps (0: none).
    pub throttle: Arc<AtomicU32>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_signal_handler(SIGRTMIN(), kick_handler).expect("register the vCPU kick signal");
    });
    SIGRTMIN()
}

impl Vcpu {
    /// Spawns the thread of vCPU `index`, parked until [`Vcpu::resume`].
    pub fn spawn(index: u32, fd: VcpuFd, env: VcpuEnv, vm_name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(VcpuShared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                phase: Phase::Paused,
            }),
            cv: Condvar::new(),
            fd: Mutex::new(fd),
            tid: AtomicI32::new(0),
            exits: AtomicU64::new(0),
            pthread: AtomicU64::new(0),
        });
        kick_signal();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}-{vm_name}"))
            .spawn(move || run(index, &s, &env))?;
        Ok(Self {
            index,
            shared,
            thread: Some(thread),
        })
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.shared.ctl.lock().expect("vcpu ctl").phase.clone()
    }

    /// Whether the vCPU is held out of the guest: asked not to run, and not running.
    pub fn is_held(&self) -> bool {
        let c = self.shared.ctl.lock().expect("vcpu ctl");
        c.want != Want::Run && c.phase != Phase::Running
    }

    fn set_want(&self, want: Want) {
        let mut c = self.shared.ctl.lock().expect("vcpu ctl");
        if c.want != Want::Stop {
            c.want = want;
        }
        self.shared.cv.notify_all();
    }

    /// Asks the vCPU to pause and kicks it out of `KVM_RUN`; see [`Vcpu::wait_paused`].
    pub fn request_pause(&self) {
        self.set_want(Want::Pause);
    }

    /// Kicks until the thread is parked (or has exited).
    pub fn wait_paused(&self) {
        loop {
            {
                let c = self.shared.ctl.lock().expect("vcpu ctl");
                if c.phase != Phase::Running {
                    return;
                }
                if let Some(t) = &self.thread {
                    let _ = t.kill(kick_signal());
                }
                let _ = self
                    .shared
                    .cv
                    .wait_timeout(c, Duration::from_micros(500))
                    .expect("vcpu ctl");
            }
        }
    }

    /// Lets the vCPU run.
    pub fn resume(&self) {
        self.set_want(Want::Run);
    }

    /// Waits until the thread has left the gate after [`Vcpu::resume`] (or exited, or was
    /// asked to pause again meanwhile), so that a resumed VM reads as running.
    pub fn wait_resumed(&self) {
        let mut c = self.shared.ctl.lock().expect("vcpu ctl");
        while c.want == Want::Run && c.phase == Phase::Paused {
            c = self
                .shared
                .cv
                .wait_timeout(c, Duration::from_millis(50))
                .expect("vcpu ctl")
                .0;
        }
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        {
            let mut c = self.shared.ctl.lock().expect("vcpu ctl");
            c.want = Want::Stop;
            self.shared.cv.notify_all();
        }
        self.wait_paused();
        if let Some(t) = self.thread.take() {
            // Kick until it exits: it may be parked or in KVM_RUN.
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                self.shared.cv.notify_all();
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = t.join();
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Holds a `dirty` or `disk` vCPU to its rate: sleeps (interruptibly) when ahead of schedule.
struct Pacer {
    rate: u64,
    start: Instant,
    pages: u64,
}

impl Pacer {
    fn delay(&mut self, batch: u64) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        self.pages += batch;
        let due = self.start + Duration::from_secs_f64(self.pages as f64 / self.rate as f64);
        let now = Instant::now();
        if due > now {
            Some(due - now)
        } else {
            if now - due > Duration::from_millis(200) {
                // Far behind (the VM was paused): start a new schedule instead of bursting.
                self.start = now;
                self.pages = 0;
            }
            None
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The vCPU thread.
fn run(index: u32, s: &VcpuShared, env: &VcpuEnv) {
    s.tid.store(gettid(), Ordering::Relaxed);
    // SAFETY: pthread_self has no arguments and cannot fail.
    s.pthread
        .store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
    // Start of the current run slice, for the throttle's duty cycle.
    let mut slice = Instant::now();
    let mut pacer = Pacer {
        rate: env.rate,
        start: Instant::now(),
        pages: 0,
    };
    let mut wait: Option<Duration> = None;
    let mut wait_done = false;
    loop {
        // The gate: park while paused; leave when stopped; sleep through HLT or pacing.
        {
            let mut c = s.ctl.lock().expect("vcpu ctl");
            if let Some(d) = wait.take() {
                if c.want == Want::Run {
                    c = s.cv.wait_timeout(c, d).expect("vcpu ctl").0;
                }
                wait_done = true;
            }
            while c.want == Want::Pause {
                if c.phase != Phase::Paused {
                    c.phase = Phase::Paused;
                    s.cv.notify_all();
                }
                c = s.cv.wait(c).expect("vcpu ctl");
            }
            if c.want == Want::Stop {
                c.phase = Phase::Exited(None);
                s.cv.notify_all();
                return;
            }
            if c.phase != Phase::Running {
                c.phase = Phase::Running;
                s.cv.notify_all();
                pacer.start = Instant::now();
                pacer.pages = 0;
                wait_done = true;
            }
        }
        if wait_done {
            slice = Instant::now();
            wait_done = false;
        }
        let mut fd = s.fd.lock().expect("vcpu fd");
        let exit = fd.run();
        s.exits.fetch_add(1, Ordering::Relaxed);
        let failure = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                match env.devices.port_out(index, port, data, &env.ram) {
                    PortAction::DirtyBatch(n) => wait = pacer.delay(n),
                    PortAction::DiskBlock => wait = pacer.delay(1),
                    PortAction::CounterFailed | PortAction::None => {}
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                env.devices.port_in(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                env.devices.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                env.devices.mmio_write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                wait = Some(Duration::from_millis(20));
                None
            }
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::Unsupported(r)) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                env.dirty.on_ring_full(index).err().map(|e| e.to_string())
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        drop(fd);
        // Auto-converge: after running `ran`, sleep so that sleep / (run + sleep) = p %.
        let p = env.throttle.load(Ordering::Relaxed).min(99);
        if p > 0 {
            let ran = slice.elapsed();
            if ran >= Duration::from_millis(2) {
                let nap = ran.mul_f64(p as f64 / (100 - p) as f64);
                let nap = nap.min(Duration::from_secs(1));
                wait = Some(wait.map_or(nap, |w| w.max(nap)));
            }
        } else if wait.is_none() {
            slice = Instant::now();
        }
        if let Some(why) = failure {
            tracing::error!(vcpu = index, %why, "vCPU stopped");
            env.devices
                .log_line(&format!("vCPU {index} stopped: {why}"));
            let mut c = s.ctl.lock().expect("vcpu ctl");
            c.phase = Phase::Exited(Some(why));
            s.cv.notify_all();
            return;
        }
    }
}
