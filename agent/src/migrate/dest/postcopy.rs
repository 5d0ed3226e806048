//! Post-copy on the destination: at the switch the stale pages are dropped and registered
//! with userfaultfd, the state is loaded, `Ready`; on `Go` the VM is registered and runs while
//! its vCPUs fault on missing pages (each fault a `PageRequest` written by the fault handler
//! itself) and the pages arrive (demanded or pushed), placed with `UFFDIO_COPY`, until none is
//! missing: `PostcopyDone`. A session outlives its connection: the registry keeps it for the
//! source's `Resume` ([`super::resume`]).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use vmig_uffd::{FaultHandler, PageSource, PageSourceError, Placement, PostcopyMemory};

use super::disk::DiskSink;
use super::precopy::{Loaded, Placed, Switch};
use super::reservation::Arrival;
use super::{commit, Destination};
use crate::dirty::PageBitmap;
use crate::guest::layout::PAGE_SIZE;
use crate::migrate::link::{not_allowed, Link};
use crate::migrate::registry::{Migration, Registry};
use crate::migrate::{MigrateError, PageSum, Phase};
use crate::vm::Vm;
use crate::wire::{self, messages as msg, pages, Frame, Kind};

/// The destination's half of a post-copy connection: the fault handler writes its page
/// requests here itself (no hand-off to another thread on the fault's path), and the page
/// loop its control frames.
pub(super) struct Uplink {
    /// Whole control frames are written with `write_all` under the lock (encrypted through
    /// the connection's TLS session, if any).
    sock: Mutex<crate::transport::FrameSink>,
    /// The connection failed: faults wait for the next one.
    down: AtomicBool,
}

impl Uplink {
    /// Sends one frame; false (and `down`) once the connection failed.
    pub(super) fn send(&self, frame: Vec<u8>) -> bool {
        if self.down.load(Ordering::SeqCst) {
            return false;
        }
        let sent = self
            .sock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&frame);
        if let Err(e) = sent {
            if !self.down.swap(true, Ordering::SeqCst) {
                tracing::error!(cause = %e, "post-copy: cannot write to the source; faulting vCPUs wait");
            }
            return false;
        }
        true
    }
}

/// The fault handler's page source: a `PageRequest` straight onto the connection, if any.
#[derive(Default)]
struct NetSource {
    /// None until a connection serves the session.
    uplink: Option<Arc<Uplink>>,
}

impl PageSource for NetSource {
    fn request(&self, index: u64) -> Result<(), PageSourceError> {
        let Some(up) = &self.uplink else {
            return Err(PageSourceError::Disconnected(
                "no connection serves the post-copy yet".into(),
            ));
        };
        let frame = wire::control_frame(&msg::PageRequest { pages: vec![index] });
        if up.send(frame) {
            Ok(())
        } else {
            Err(PageSourceError::Disconnected(
                "the migration connection failed".into(),
            ))
        }
    }
}

/// Post-copy: the destination reports placed page-frame bytes (`PagesPlaced`) every this many
/// bytes. Must stay well below the source's push window (`source::PUSH_WINDOW`), or the push
/// would stall waiting for a report that never comes.
const PLACED_REPORT_BYTES: u64 = 64 << 10;
const _: () = assert!(4 * PLACED_REPORT_BYTES <= crate::migrate::source::PUSH_WINDOW);

/// The post-copy destination: drop the stale pages, register them with userfaultfd, load
/// the state, and on Go run the VM while pages are placed as they arrive.
pub(super) fn run(
    link: &mut Link,
    to: &Destination<'_>,
    a: Box<Arrival<'_>>,
    state: Loaded,
    mut disk: DiskSink,
    pc: Switch,
    placed: Placed,
) -> Result<String, MigrateError> {
    let vm = &a.vm;
    // The disk is in sync at the switch (the source sent its last blocks before the state):
    // durable before the VM runs here.
    disk.sync()?;
    let log = Box::new(to.inv.open_log(&a.reservation.staging)?);
    let ram = vm.ram().clone();
    let pages = ram.pages();
    let stale = pc.stale;
    let stale_set = PageBitmap::new(pages);
    for &i in &stale {
        stale_set.set(i);
    }
    let is_stale = |i: u64| stale_set.get(i);
    let t = Instant::now();
    let mut sum = match placed.sum {
        // The sum of the pages kept at the switch: the stale ones' terms taken out.
        Some(mut sum) => {
            for &i in &stale {
                sum.sub_term(&placed.terms[i as usize]);
            }
            Some(sum)
        }
        None => None,
    };
    // Stale copies must go: userfaultfd only fills missing pages.
    ram.discard_pages(&stale)?;
    let known = PageBitmap::new(pages);
    for i in (0..pages).filter(|&i| !is_stale(i)) {
        known.set(i);
    }
    let mut ready = msg::Ready::default();
    vm.attach_disk(
        &a.reservation.staging.join(crate::inventory::DISK),
        &a.def.name,
    )?;
    vm.restore(&state.machine, log)?;
    if state.verify {
        ready.vcpu_digest = Some(vm.read_back()?.vcpu_digest());
        ready.disk_digest = disk.digest();
        ready.verify_ms = (t.elapsed() + placed.hashing_since_round).as_secs_f64() * 1e3;
    }
    // SAFETY: guest memory is one private anonymous mapping owned by `ram`, which the VM (kept
    // alive below for as long as `mem`) holds; the stale pages were just dropped with
    // MADV_DONTNEED and the VM has not run since, so every page not in `known` is missing.
    let mem = unsafe {
        PostcopyMemory::register(ram.host_base() as *mut u8, ram.size() as usize, &known)
    }
    .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
    let handler = mem
        .start(Arc::new(NetSource::default()))
        .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
    #[cfg(test)]
    crate::migrate::probe::test_hook::before_postcopy_run(vm);
    link.send(&ready)?;

    // Commitment: from here the VM runs here, whatever happens to the connection.
    let (name, source) = (a.def.name.clone(), a.source.clone());
    let (vm, t_go) = commit::register(link, to, a, true)?;
    let mut session = Session {
        id: pc.session,
        vm,
        mem,
        handler: Some(handler),
        stale: stale.len() as u64,
        sum: sum.take(),
        t_run: Instant::now(),
    };
    set_slot(
        to.registry,
        &name,
        PostcopyIn::Active(link.socket().try_clone()?),
    );
    // Only this peer may resume the session (a session id read off a stream is no credential).
    crate::migrate::owner::record(
        &(to.inv.datastore().to_path_buf(), name.clone()),
        link.peer(),
    );
    let result = serve_session(link, &mut session, |up| {
        // Running goes before the vCPUs start: a page request can never overtake it.
        let resume_us = t_go.elapsed().as_micros() as u64;
        up.send(wire::control_frame(&msg::Running { resume_us }));
        SessionStart::Resume(format!(
            "migrated in from {source} (post-copy): running on {}",
            to.agent
        ))
    });
    end_session(link, to, &name, session, result)
}

/// A post-copy session on the destination: the VM runs here and its missing pages come from
/// the source, over one connection or, after a cut, over the next one (`Resume`).
pub struct Session {
    pub(super) id: u64,
    pub(super) vm: Arc<Vm>,
    pub(super) mem: Arc<PostcopyMemory>,
    /// Runs until every page is here (across connections).
    handler: Option<FaultHandler>,
    /// Pages missing at the switch.
    stale: u64,
    /// Memory digest so far (the pages kept at the switch, then every page placed).
    sum: Option<PageSum>,
    t_run: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("remaining", &self.mem.remaining())
            .finish()
    }
}

/// Where a post-copy session in is (the registry keeps it).
#[derive(Debug)]
pub enum PostcopyIn {
    /// Served over a connection (a clone of its socket, to cut a half-open one on resume).
    Active(TcpStream),
    /// Its connection failed: the VM waits on its faults for a `Resume`.
    Waiting(Session),
    /// Every page arrived: the session id and the `PostcopyDone` sent (kept to answer a
    /// `Resume` from a source that missed it).
    Completed(u64, msg::PostcopyDone),
}

/// Records where the post-copy session of `name` is.
pub(super) fn set_slot(registry: &Registry, name: &str, slot: PostcopyIn) {
    registry
        .lock()
        .insert(name.into(), Migration::IncomingPostcopy(slot));
}

/// What `serve_session` does after queuing the opening frame.
pub(super) enum SessionStart {
    /// Run the vCPUs (first connection), with this log line.
    Resume(String),
    /// The vCPUs already run (a resumed connection): log this line.
    Continue(String),
}

/// Serves a session over one connection: the fault handler writes page requests onto the
/// uplink itself, pages are placed as they arrive, until none is missing. `start` queues the
/// opening frame.
pub(super) fn serve_session(
    link: &mut Link,
    s: &mut Session,
    start: impl FnOnce(&Uplink) -> SessionStart,
) -> Result<msg::PostcopyDone, MigrateError> {
    // Every earlier frame was flushed by `send_bytes`: the uplink owns the direction now.
    let up = Arc::new(Uplink {
        sock: Mutex::new(link.writer.sink()?),
        down: AtomicBool::new(false),
    });
    s.mem.set_source(Arc::new(NetSource {
        uplink: Some(up.clone()),
    }));
    let pages = s.vm.ram().pages();
    {
        let result = (|| -> Result<msg::PostcopyDone, MigrateError> {
            match start(&up) {
                SessionStart::Resume(line) => {
                    s.vm.resume();
                    s.vm.devices().log_line(&line);
                }
                SessionStart::Continue(line) => s.vm.devices().log_line(&line),
            }
            // Faults that waited while no connection was up (none on the first one).
            if let Err(e) = s.mem.reissue_pending() {
                tracing::warn!(cause = %e, "post-copy: re-requesting waiting faults failed");
            }
            // Page-frame bytes placed on this connection, and the count last reported to the
            // source (its push window).
            let (mut placed_bytes, mut reported) = (0u64, 0u64);
            while s.mem.remaining() > 0 {
                let f = link.next()?;
                let why = match f.kind() {
                    Kind::DemandPages => Placement::Demand,
                    Kind::Pages => Placement::Push,
                    _ => return Err(not_allowed(Phase::Postcopy, &f)),
                };
                place_pages(&f, &s.mem, pages, why, s.sum.as_mut())?;
                placed_bytes += f.wire_len() as u64;
                if placed_bytes - reported >= PLACED_REPORT_BYTES {
                    reported = placed_bytes;
                    up.send(wire::control_frame(&msg::PagesPlaced {
                        bytes: placed_bytes,
                    }));
                }
            }
            if let Some(h) = s.handler.take() {
                h.stop()
                    .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
            }
            s.mem
                .unregister()
                .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
            let st = s.mem.stats();
            let stats = msg::PostcopyFigures {
                pages_missing: s.stale,
                faults: st.faults,
                duplicate_faults: st.duplicate_faults,
                zero_local: st.zero_local,
                requests: st.requests,
                pages_demand: st.pages_demand,
                pages_pushed: st.pages_pushed,
                bytes_demand: st.bytes_demand,
                bytes_pushed: st.bytes_pushed,
                latency_count: st.latency.count,
                latency_p50_us: st.latency.p50_us,
                latency_p99_us: st.latency.p99_us,
                latency_max_us: st.latency.max_us,
                duration_ms: s.t_run.elapsed().as_secs_f64() * 1e3,
            };
            let done = msg::PostcopyDone {
                stats,
                memory_digest: s.sum.as_ref().map(PageSum::hex),
            };
            up.send(wire::control_frame(&done));
            Ok(done)
        })();
        if result.is_err() {
            // Faults from now on wait for the next connection.
            up.down.store(true, Ordering::SeqCst);
        }
        result
    }
}

/// After a connection of a session ended: completes it, or parks it for a `Resume`.
pub(super) fn end_session(
    link: &mut Link,
    to: &Destination<'_>,
    name: &str,
    s: Session,
    result: Result<msg::PostcopyDone, MigrateError>,
) -> Result<String, MigrateError> {
    let registry = to.registry;
    match result {
        Ok(done) => {
            // Kept: if the source never reads this `PostcopyDone` (the connection fails just
            // then), its `Resume` gets it again instead of a refusal that could lead an
            // operator to roll back a VM that arrived whole.
            set_slot(registry, name, PostcopyIn::Completed(s.id, done.clone()));
            tracing::info!(
                vm = %name,
                demand = done.stats.pages_demand,
                pushed = done.stats.pages_pushed,
                faults = done.stats.faults,
                p50_us = done.stats.latency_p50_us,
                p99_us = done.stats.latency_p99_us,
                "post-copy complete"
            );
            s.vm.devices()
                .log_line("post-copy complete: every page is here");
            to.inv.postcopy_in_done(name);
        }
        Err(e) => {
            // The VM runs here and may be blocked on pages only the source has: never let
            // the registration go (a missing page would then read as zeros). The handler
            // keeps recording faults; the source's `Resume` picks the session up.
            tracing::error!(vm = %name, cause = %e, remaining = s.mem.remaining(),
                "post-copy connection lost: the VM waits for pages that the source holds, until it resumes");
            s.vm.devices().log_line(&format!(
                "post-copy interrupted ({} pages missing): {e}; waiting for the source to resume",
                s.mem.remaining()
            ));
            set_slot(registry, name, PostcopyIn::Waiting(s));
            return Err(e);
        }
    }
    let vm = s.vm.clone();
    commit::released(link, name, &vm)?;
    Ok(name.to_string())
}

/// Checks a post-copy page frame and places its pages; never touches guest memory itself.
pub(super) fn place_pages(
    f: &Frame,
    mem: &PostcopyMemory,
    pages: u64,
    why: Placement,
    mut sum: Option<&mut PageSum>,
) -> Result<(), MigrateError> {
    let (entries, data) = pages::frame_pages(f, pages)?;
    let mut data = data.chunks_exact(PAGE_SIZE as usize);
    for e in entries {
        let content = if e.zero {
            None
        } else {
            Some(data.next().expect("lengths checked by decode"))
        };
        let placed = mem
            .place(e.index, content, why)
            .map_err(|err| MigrateError::Postcopy(err.to_string()))?;
        if let (true, Some(c), Some(s)) = (placed, content, sum.as_deref_mut()) {
            s.add(e.index, c);
        }
    }
    Ok(())
}
