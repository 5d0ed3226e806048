//! The destination side: receives a VM, and registers and runs it only on the source's Go.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmig_uffd::{FaultHandler, PageSource, PageSourceError, Placement, PostcopyMemory};

use super::{cpu_digest, MigrateError, PageSum, PostcopyStats};
use crate::dirty::PageBitmap;
use crate::guest::layout::PAGE_SIZE;
use crate::inventory::{self, Inventory, Reservation, VmDef};
use crate::transport::{tune_socket, FrameReader, FrameWriter, IoPath};
use crate::vm::Vm;
use crate::wire::{self, messages as msg, pages, Frame, Kind, WireError};

/// How long the destination waits for the next frame before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Receives one incoming migration on `sock`. On any failure nothing stays registered and
/// the staged files are removed (the reservation's drop).
pub fn receive(
    sock: TcpStream,
    inv: Arc<Inventory>,
    agent: &str,
    io: IoPath,
) -> Result<String, MigrateError> {
    tune_socket(&sock)?;
    let mut reader = FrameReader::new(sock.try_clone()?, io, IDLE_TIMEOUT)?;
    let mut writer = FrameWriter::new(sock.try_clone()?, IoPath::Plain, None)?;
    let result = run(&mut reader, &mut writer, &inv, agent);
    if let Err(e) = &result {
        tracing::warn!(cause = %e, "incoming migration failed; nothing kept");
        if !matches!(e, MigrateError::Peer(_)) {
            let _ = writer.send_bytes(wire::control_frame(
                Kind::Error,
                &msg::Abort {
                    reason: e.to_string(),
                },
            ));
        }
        // Let the source read our reason before the connection closes: stop writing and
        // drain what it still sends for a moment (closing with unread data would reset).
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let mut s = &sock;
        let mut buf = vec![0u8; 1 << 16];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    result
}

/// The error for a frame other than `want`: the peer's reason if it is an `Abort`/`Error`.
fn not_expected(f: &Frame, want: &'static str) -> MigrateError {
    match f.header.kind {
        Kind::Abort | Kind::Error => match f.verify().and_then(|_| f.decode::<msg::Abort>()) {
            Ok(a) => MigrateError::Peer(a.reason),
            Err(e) => e.into(),
        },
        got => WireError::Unexpected { got, want }.into(),
    }
}

fn verified(reader: &mut FrameReader) -> Result<Frame, MigrateError> {
    let f = reader.read_frame()?;
    f.verify()?;
    if matches!(f.header.kind, Kind::Abort | Kind::Error) {
        return Err(MigrateError::Peer(f.decode::<msg::Abort>()?.reason));
    }
    Ok(f)
}

fn run(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    inv: &Arc<Inventory>,
    agent: &str,
) -> Result<String, MigrateError> {
    // 1. Pre-migration checks.
    let hello: msg::Hello = verified(reader)?.expect(Kind::Hello)?;
    if hello.version != wire::VERSION {
        return Err(WireError::Version { got: hello.version }.into());
    }
    if hello.page_size != PAGE_SIZE as u32 {
        return Err(MigrateError::Peer(format!(
            "page size {} is not supported",
            hello.page_size
        )));
    }
    let cpu = cpu_digest();
    if hello.cpu != cpu {
        return Err(MigrateError::Verify(format!(
            "incompatible CPU features: source {} destination {cpu}",
            hello.cpu
        )));
    }
    writer.send_bytes(wire::control_frame(
        Kind::Welcome,
        &msg::Welcome {
            agent: agent.into(),
        },
    ))?;

    // 2. Reservation (or the resumption of a post-copy that lost its connection).
    let f = verified(reader)?;
    if f.header.kind == Kind::Resume {
        return resume_session(reader, writer, inv, f.decode()?);
    }
    let reserve: msg::Reserve = f.expect(Kind::Reserve)?;
    let def = match VmDef::parse(&reserve.definition) {
        Ok(d) if d.name == reserve.name && d.spec() == reserve.spec => d,
        Ok(_) => {
            return Err(MigrateError::Peer(
                "the definition does not match the reservation".into(),
            ))
        }
        Err(e) => return Err(MigrateError::Peer(e.to_string())),
    };
    let reservation = match inv.reserve(&def) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(vm = %def.name, reason = %e, "refusing the reservation");
            writer.send_bytes(wire::control_frame(
                Kind::Refused,
                &msg::Refused {
                    reason: e.to_string(),
                },
            ))?;
            return Err(MigrateError::Refused(e.to_string()));
        }
    };
    let vm = Vm::create(&def.spec(), &def.name, Box::new(std::io::sink()))?;
    writer.send_bytes(wire::control_frame(
        Kind::Reserved,
        &msg::Reserved {
            memory: def.memory_bytes(),
        },
    ))?;
    tracing::info!(vm = %def.name, from = %hello.agent, "reserved; receiving");

    // 3. Pages and files, until the state arrives.
    let mut holds_data = PageBitmap::new(vm.ram().pages());
    let mut postcopy: Option<msg::Postcopy> = None;
    let state = loop {
        let f = reader.read_frame()?;
        match f.header.kind {
            Kind::Pages => apply_pages(&f, &vm, &mut holds_data)?,
            Kind::FileChunk => {
                f.verify()?;
                write_chunk(&f, &reservation)?;
            }
            Kind::RoundEnd => {
                f.verify()?;
                let r: msg::RoundEnd = f.decode()?;
                tracing::debug!(round = r.round, pages = r.pages, "round received");
            }
            Kind::State => {
                f.verify()?;
                break f.decode::<msg::State>()?;
            }
            Kind::Postcopy => {
                f.verify()?;
                let pc: msg::Postcopy = f.decode()?;
                let pages = vm.ram().pages();
                let bad_tail =
                    pages % 64 != 0 && pc.dirty.last().is_some_and(|w| w >> (pages % 64) != 0);
                if pc.dirty.len() as u64 != pages.div_ceil(64) || bad_tail {
                    return Err(WireError::BadPages(format!(
                        "post-copy bitmap of {} words for {pages} pages",
                        pc.dirty.len()
                    ))
                    .into());
                }
                tracing::info!(vm = %def.name, stale = pc.count, reason = %pc.reason, "switching to post-copy");
                postcopy = Some(pc);
            }
            _ => return Err(not_expected(&f, "Pages, FileChunk, RoundEnd or State")),
        }
    };

    if let Some(pc) = postcopy {
        let log = inv.open_log(&reservation.staging)?;
        return run_postcopy(
            reader,
            writer,
            inv,
            agent,
            &hello.agent,
            reservation,
            def,
            vm,
            state,
            pc,
            Box::new(log),
        );
    }

    // 4. Load the state; digests if asked; wait for the source to commit.
    let log = inv.open_log(&reservation.staging)?;
    vm.attach_disk(&reservation.staging.join(inventory::DISK), &def.name)?;
    vm.restore(&state.machine, Box::new(log))?;
    let mut ready = msg::Ready::default();
    if state.verify {
        let t = Instant::now();
        ready.memory_digest = Some(vm.ram().digest()?);
        ready.vcpu_digest = Some(vm.read_back()?.vcpu_digest());
        ready.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    writer.send_bytes(wire::control_frame(Kind::Ready, &ready))?;
    let _: msg::Go = verified(reader)?.expect(Kind::Go)?;

    // 5. Commitment: register, run, confirm.
    let t_go = Instant::now();
    let vm = Arc::new(vm);
    let name = def.name.clone();
    commit(inv, reservation, def, vm.clone())?;
    vm.resume();
    let resume_us = t_go.elapsed().as_micros() as u64;
    vm.devices().log_line(&format!(
        "migrated in from {}: running on {agent}",
        hello.agent
    ));
    let _ = writer.send_bytes(wire::control_frame(
        Kind::Running,
        &msg::Running { resume_us },
    ));
    reader.set_timeout(Duration::from_secs(10))?;
    match verified(reader).and_then(|f| Ok(f.expect::<msg::Released>(Kind::Released)?)) {
        Ok(_) => tracing::info!(vm = %name, "source released the VM"),
        Err(MigrateError::Peer(why)) => {
            // The source refused this copy (its verification failed) and keeps its own: this
            // one must not run on beside it.
            vm.pause();
            tracing::error!(vm = %name, cause = %why, "the source refused the VM after post-copy: paused here");
            vm.devices().log_line(&format!(
                "the source refused this copy after post-copy ({why}): paused; stop it with `vmig vm stop {name}`"
            ));
        }
        Err(e) => {
            tracing::warn!(vm = %name, cause = %e, "no release from the source (the VM runs here regardless)")
        }
    }
    Ok(name)
}

fn commit(
    inv: &Arc<Inventory>,
    r: Reservation,
    def: VmDef,
    vm: Arc<Vm>,
) -> Result<(), MigrateError> {
    Ok(inv.commit(r, def, vm)?)
}

/// The destination's half of a post-copy connection: the fault handler writes its page
/// requests here itself (no hand-off to another thread on the fault's path), and the page
/// loop its control frames.
struct Uplink {
    /// Whole control frames are written with `write_all` under the lock.
    sock: Mutex<TcpStream>,
    /// The connection failed: faults wait for the next one.
    down: AtomicBool,
}

impl Uplink {
    /// Sends one frame; false (and `down`) once the connection failed.
    fn send(&self, frame: Vec<u8>) -> bool {
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
        let frame =
            wire::control_frame(Kind::PageRequest, &msg::PageRequest { pages: vec![index] });
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
const _: () = assert!(4 * PLACED_REPORT_BYTES <= super::source::PUSH_WINDOW);

/// The post-copy destination: drop the stale pages, register them with userfaultfd, load
/// the state, and on Go run the VM while pages are placed as they arrive.
#[allow(clippy::too_many_arguments)]
fn run_postcopy(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    inv: &Arc<Inventory>,
    agent: &str,
    source: &str,
    reservation: Reservation,
    def: VmDef,
    vm: Vm,
    state: msg::State,
    pc: msg::Postcopy,
    log: Box<dyn Write + Send>,
) -> Result<String, MigrateError> {
    let ram = vm.ram().clone();
    let pages = ram.pages();
    let is_stale = |i: u64| pc.dirty[(i / 64) as usize] & (1 << (i % 64)) != 0;
    let stale: Vec<u64> = (0..pages).filter(|&i| is_stale(i)).collect();
    // Stale copies must go: userfaultfd only fills missing pages.
    ram.discard_pages(&stale)?;
    let known = vmig_uffd::PageBitmap::new(pages);
    for i in (0..pages).filter(|&i| !is_stale(i)) {
        known.set(i);
    }
    let mut ready = msg::Ready::default();
    let t = Instant::now();
    let mut sum = if state.verify {
        // Before registering: the pages kept at the switch, read while nothing runs.
        Some(PageSum::of_ram(&ram, |i| !is_stale(i))?)
    } else {
        None
    };
    vm.attach_disk(&reservation.staging.join(inventory::DISK), &def.name)?;
    vm.restore(&state.machine, log)?;
    if state.verify {
        ready.vcpu_digest = Some(vm.read_back()?.vcpu_digest());
        ready.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    // SAFETY: guest memory is one private anonymous mapping owned by `ram`, which the VM (kept
    // alive below for as long as `mem`) holds; the stale pages were just dropped with
    // MADV_DONTNEED and the VM has not run since, so every page not in `known` is missing.
    let mem = unsafe { PostcopyMemory::register(ram.page_ptr(0), ram.size() as usize, &known) }
        .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
    let handler = mem
        .start(Arc::new(NetSource::default()))
        .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
    #[cfg(test)]
    super::probe::test_hook::before_postcopy_run(&vm);
    writer.send_bytes(wire::control_frame(Kind::Ready, &ready))?;
    let _: msg::Go = verified(reader)?.expect(Kind::Go)?;

    // Commitment: from here the VM runs here, whatever happens to the connection.
    let t_go = Instant::now();
    let vm = Arc::new(vm);
    let name = def.name.clone();
    commit(inv, reservation, def, vm.clone())?;
    let key = (inv.datastore().to_path_buf(), name.clone());
    let mut session = Session {
        id: pc.session,
        vm,
        mem,
        handler: Some(handler),
        stale: stale.len() as u64,
        sum: sum.take(),
        t_run: Instant::now(),
    };
    set_slot(&key, Slot::Active(writer.socket().try_clone()?));
    let result = serve_session(reader, writer, &mut session, |up| {
        // Running goes before the vCPUs start: a page request can never overtake it.
        let resume_us = t_go.elapsed().as_micros() as u64;
        up.send(wire::control_frame(
            Kind::Running,
            &msg::Running { resume_us },
        ));
        SessionStart::Resume(format!(
            "migrated in from {source} (post-copy): running on {agent}"
        ))
    });
    end_session(reader, key, session, result)
}

/// A post-copy session on the destination: the VM runs here and its missing pages come from
/// the source, over one connection or, after a cut, over the next one (`Resume`).
struct Session {
    id: u64,
    vm: Arc<Vm>,
    mem: Arc<PostcopyMemory>,
    /// Runs until every page is here (across connections).
    handler: Option<FaultHandler>,
    /// Pages missing at the switch.
    stale: u64,
    /// Memory digest so far (the pages kept at the switch, then every page placed).
    sum: Option<PageSum>,
    t_run: Instant,
}

/// Where a post-copy session is.
enum Slot {
    /// Served over a connection (a clone of its socket, to cut a half-open one on resume).
    Active(TcpStream),
    /// Its connection failed: the VM waits on its faults for a `Resume`.
    Parked(Session),
    /// Every page arrived: the session id and the `PostcopyDone` sent.
    Completed(u64, msg::PostcopyDone),
}

/// Post-copy sessions of this process, by datastore and VM name.
static SESSIONS: Mutex<BTreeMap<(PathBuf, String), Slot>> = Mutex::new(BTreeMap::new());

fn sessions() -> std::sync::MutexGuard<'static, BTreeMap<(PathBuf, String), Slot>> {
    SESSIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gives up the parked post-copy session of VM `name` (its connection was lost): closes its
/// userfaultfd, so faults waiting on missing pages resolve to zero pages and the VM can be
/// powered off. Returns whether there was one.
pub fn discard_parked(datastore: &Path, name: &str) -> bool {
    let key = (datastore.to_path_buf(), name.to_string());
    let s = {
        let mut map = sessions();
        match map.remove(&key) {
            Some(Slot::Parked(s)) => s,
            Some(other) => {
                map.insert(key, other);
                return false;
            }
            None => return false,
        }
    };
    tracing::warn!(vm = %name, remaining = s.mem.remaining(), "discarding an interrupted post-copy session");
    s.vm.devices()
        .log_line("post-copy session discarded: the missing pages are given up");
    // The handler holds the memory too: stop it first, then the last reference closes the fd.
    drop(s);
    true
}

fn set_slot(key: &(PathBuf, String), slot: Slot) {
    sessions().insert(key.clone(), slot);
}

/// What `serve_session` does after queuing the opening frame.
enum SessionStart {
    /// Run the vCPUs (first connection), with this log line.
    Resume(String),
    /// The vCPUs already run (a resumed connection): log this line.
    Continue(String),
}

/// Serves a session over one connection: page requests go out through a writer thread, pages
/// are placed as they arrive, until none is missing. `start` queues the opening frame.
fn serve_session(
    reader: &mut FrameReader,
    writer: &FrameWriter,
    s: &mut Session,
    start: impl FnOnce(&Uplink) -> SessionStart,
) -> Result<msg::PostcopyDone, MigrateError> {
    // Every earlier frame was flushed by `send_bytes`: the uplink owns the direction now.
    let up = Arc::new(Uplink {
        sock: Mutex::new(writer.socket().try_clone()?),
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
                let f = reader.read_frame()?;
                let why = match f.header.kind {
                    Kind::DemandPages => Placement::Demand,
                    Kind::Pages => Placement::Push,
                    _ => return Err(not_expected(&f, "Pages or DemandPages")),
                };
                place_pages(&f, &s.mem, pages, why, s.sum.as_mut())?;
                placed_bytes += (wire::HEADER_LEN + f.payload.len()) as u64;
                if placed_bytes - reported >= PLACED_REPORT_BYTES {
                    reported = placed_bytes;
                    up.send(wire::control_frame(
                        Kind::PagesPlaced,
                        &msg::PagesPlaced {
                            bytes: placed_bytes,
                        },
                    ));
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
            let stats = PostcopyStats {
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
                ..Default::default()
            };
            let done = msg::PostcopyDone {
                stats,
                memory_digest: s.sum.as_ref().map(PageSum::hex),
            };
            up.send(wire::control_frame(Kind::PostcopyDone, &done));
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
fn end_session(
    reader: &mut FrameReader,
    key: (PathBuf, String),
    s: Session,
    result: Result<msg::PostcopyDone, MigrateError>,
) -> Result<String, MigrateError> {
    let name = key.1.clone();
    let vm = s.vm.clone();
    match result {
        Ok(done) => {
            // Kept: if the source never reads this `PostcopyDone` (the connection fails just
            // then), its `Resume` gets it again instead of a refusal that could lead an
            // operator to roll back a VM that arrived whole.
            set_slot(&key, Slot::Completed(s.id, done.clone()));
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
            set_slot(&key, Slot::Parked(s));
            return Err(e);
        }
    }
    reader.set_timeout(Duration::from_secs(10))?;
    match verified(reader).and_then(|f| Ok(f.expect::<msg::Released>(Kind::Released)?)) {
        Ok(_) => tracing::info!(vm = %name, "source released the VM"),
        Err(MigrateError::Peer(why)) => {
            // The source refused this copy (its verification failed) and keeps its own: this
            // one must not run on beside it.
            vm.pause();
            tracing::error!(vm = %name, cause = %why, "the source refused the VM after post-copy: paused here");
            vm.devices().log_line(&format!(
                "the source refused this copy after post-copy ({why}): paused; stop it with `vmig vm stop {name}`"
            ));
        }
        Err(e) => {
            tracing::warn!(vm = %name, cause = %e, "no release from the source (the VM runs here regardless)")
        }
    }
    Ok(name)
}

/// How long a resume waits for the previous connection of its session to fail.
const TAKEOVER: Duration = Duration::from_secs(10);

/// Picks up a parked post-copy session for the source that reconnected.
fn resume_session(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    inv: &Arc<Inventory>,
    r: msg::Resume,
) -> Result<String, MigrateError> {
    let key = (inv.datastore().to_path_buf(), r.name.clone());
    let t = Instant::now();
    let refusal = loop {
        let mut map = sessions();
        match map.remove(&key) {
            Some(Slot::Parked(s)) if s.id == r.session => {
                drop(map);
                return resume_parked(reader, writer, key, s);
            }
            Some(Slot::Completed(id, done)) if id == r.session => {
                map.insert(key.clone(), Slot::Completed(id, done.clone()));
                drop(map);
                return resume_completed(reader, writer, &r.name, done);
            }
            Some(slot @ (Slot::Parked(_) | Slot::Completed(..))) => {
                map.insert(key.clone(), slot);
                break format!("the post-copy of {} here is another session", r.name);
            }
            Some(Slot::Active(sock)) => {
                // The old connection may be half-open: cut it; its thread parks the session.
                let _ = sock.shutdown(std::net::Shutdown::Both);
                map.insert(key.clone(), Slot::Active(sock));
            }
            None => break format!("no post-copy of {} waits here", r.name),
        }
        drop(map);
        if t.elapsed() > TAKEOVER {
            break format!(
                "the post-copy of {} is still attached to its previous connection",
                r.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    tracing::info!(vm = %r.name, reason = %refusal, "refusing to resume");
    writer.send_bytes(wire::control_frame(
        Kind::Refused,
        &msg::Refused {
            reason: refusal.clone(),
        },
    ))?;
    Err(MigrateError::Refused(refusal))
}

/// A `Resume` for a session that completed: the source missed its `PostcopyDone`. Nothing
/// is missing; the same `PostcopyDone` again, then the release.
fn resume_completed(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    name: &str,
    done: msg::PostcopyDone,
) -> Result<String, MigrateError> {
    tracing::info!(vm = %name, "resume of a completed post-copy: sending its PostcopyDone again");
    writer.send_bytes(wire::control_frame(
        Kind::Resumed,
        // An empty bitmap: nothing is missing.
        &msg::Resumed {
            missing: Vec::new(),
            count: 0,
            waiting: 0,
        },
    ))?;
    writer.send_bytes(wire::control_frame(Kind::PostcopyDone, &done))?;
    reader.set_timeout(Duration::from_secs(10))?;
    let _: msg::Released = verified(reader)?.expect(Kind::Released)?;
    Ok(name.to_string())
}

fn resume_parked(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    key: (PathBuf, String),
    mut s: Session,
) -> Result<String, MigrateError> {
    let pages = s.vm.ram().pages();
    let mut missing = vec![0u64; pages.div_ceil(64) as usize];
    let list = s.mem.missing_pages();
    for &p in &list {
        missing[(p / 64) as usize] |= 1 << (p % 64);
    }
    let waiting = s.mem.pending().len() as u64;
    tracing::info!(vm = %key.1, missing = list.len(), waiting, "resuming post-copy");
    let active = writer
        .socket()
        .try_clone()
        .map(|sock| set_slot(&key, Slot::Active(sock)));
    let result = match active {
        Ok(()) => serve_session(reader, writer, &mut s, |up| {
            up.send(wire::control_frame(
                Kind::Resumed,
                &msg::Resumed {
                    missing,
                    count: list.len() as u64,
                    waiting,
                },
            ));
            SessionStart::Continue(format!(
                "post-copy resumed: {} pages missing, {waiting} faults waiting",
                list.len()
            ))
        }),
        Err(e) => Err(e.into()),
    };
    end_session(reader, key, s, result)
}

/// Checks a post-copy page frame and places its pages; never touches guest memory itself.
fn place_pages(
    f: &Frame,
    mem: &PostcopyMemory,
    pages: u64,
    why: Placement,
    mut sum: Option<&mut PageSum>,
) -> Result<(), MigrateError> {
    let entries = pages::decode(f.meta(), f.data().len(), pages)?;
    f.verify()?;
    let mut data = f.data().chunks_exact(PAGE_SIZE as usize);
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

/// Checks a page frame (bounds, lengths, CRC) and copies its pages into guest memory.
fn apply_pages(f: &Frame, vm: &Vm, holds_data: &mut PageBitmap) -> Result<(), MigrateError> {
    let ram = vm.ram();
    f.verify()?;
    let entries = pages::decode(f.meta(), f.data().len(), ram.pages())?;
    let mut data = f.data().chunks_exact(PAGE_SIZE as usize);
    for e in entries {
        if e.zero {
            // Fresh memory is zero: only a page that held data needs clearing.
            if holds_data.get(e.index) {
                ram.zero_page(e.index)?;
            }
        } else {
            ram.write_page(e.index, data.next().expect("lengths checked by decode"))?;
            holds_data.set(e.index);
        }
    }
    Ok(())
}

/// Writes a file piece into the staging folder.
fn write_chunk(f: &Frame, r: &Reservation) -> Result<(), MigrateError> {
    let c: msg::FileChunk = f.decode()?;
    if !inventory::FILES.contains(&c.name.as_str()) {
        return Err(WireError::BadPages(format!("unexpected file {:?}", c.name)).into());
    }
    let data = f.data();
    if c.offset
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > c.size)
    {
        return Err(WireError::BadPages(format!("file piece past the end of {:?}", c.name)).into());
    }
    let path = r.staging.join(&c.name);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)?;
    file.set_len(c.size)?;
    file.seek(SeekFrom::Start(c.offset))?;
    file.write_all(data)?;
    Ok(())
}
