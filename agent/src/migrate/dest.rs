//! The destination side: receives a VM, and registers and runs it only on the source's Go.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmig_uffd::{PageSource, PageSourceError, Placement, PostcopyMemory};

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

    // 2. Reservation.
    let reserve: msg::Reserve = verified(reader)?.expect(Kind::Reserve)?;
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
            Kind::Abort | Kind::Error => {
                f.verify()?;
                return Err(MigrateError::Peer(f.decode::<msg::Abort>()?.reason));
            }
            other => {
                return Err(WireError::Unexpected {
                    got: other,
                    want: "Pages, FileChunk, RoundEnd or State",
                }
                .into())
            }
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

/// Frames the post-copy writer thread sends.
enum Out {
    /// A page a vCPU faulted on.
    Request(u64),
    /// A whole frame.
    Frame(Vec<u8>),
    /// Nothing more: end the thread.
    Close,
}

/// The fault handler's page source: queues the request for the writer thread, never blocks.
struct NetSource {
    tx: Mutex<mpsc::Sender<Out>>,
    down: Arc<AtomicBool>,
}

impl PageSource for NetSource {
    fn request(&self, index: u64) -> Result<(), PageSourceError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PageSourceError::Disconnected(
                "the migration connection failed".into(),
            ));
        }
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Out::Request(index))
            .map_err(|_| PageSourceError::Disconnected("the request writer ended".into()))
    }
}

/// Most page indices in one `PageRequest`.
const MAX_REQUEST: usize = 512;

/// Sends what the channel carries; page requests are batched into `PageRequest` frames.
fn write_requests(writer: &mut FrameWriter, rx: mpsc::Receiver<Out>, down: &AtomicBool) {
    let mut batch = Vec::new();
    let send = |w: &mut FrameWriter, bytes: Vec<u8>| {
        if let Err(e) = w.send_bytes(bytes) {
            if !down.swap(true, Ordering::SeqCst) {
                tracing::error!(cause = %e, "post-copy: cannot write to the source; faulting vCPUs wait");
            }
        }
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut close = false;
        while let Some(m) = next.take() {
            match m {
                Out::Request(i) => batch.push(i),
                Out::Frame(f) => {
                    if !batch.is_empty() {
                        let pages = std::mem::take(&mut batch);
                        send(
                            writer,
                            wire::control_frame(Kind::PageRequest, &msg::PageRequest { pages }),
                        );
                    }
                    send(writer, f);
                }
                Out::Close => close = true,
            }
            if batch.len() >= MAX_REQUEST || close {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            let pages = std::mem::take(&mut batch);
            send(
                writer,
                wire::control_frame(Kind::PageRequest, &msg::PageRequest { pages }),
            );
        }
        if close {
            return;
        }
    }
}

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
    let (tx, rx) = mpsc::channel();
    let down = Arc::new(AtomicBool::new(false));
    let handler = mem
        .start(Arc::new(NetSource {
            tx: Mutex::new(tx.clone()),
            down: down.clone(),
        }))
        .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
    #[cfg(test)]
    super::probe::test_hook::before_postcopy_run(&vm);
    writer.send_bytes(wire::control_frame(Kind::Ready, &ready))?;
    let _: msg::Go = verified(reader)?.expect(Kind::Go)?;

    // Commitment: from here the VM runs here, whatever happens to the connection.
    let t_go = Instant::now();
    // The requests' writer (every earlier frame was flushed by `send_bytes`).
    let req_sock = writer.socket().try_clone()?;
    let vm = Arc::new(vm);
    let name = def.name.clone();
    let outcome = std::thread::scope(|scope| {
        let w = scope.spawn(
            move || match FrameWriter::new(req_sock, IoPath::Plain, None) {
                Ok(mut req_writer) => write_requests(&mut req_writer, rx, &down),
                Err(e) => {
                    down.store(true, Ordering::SeqCst);
                    tracing::error!(cause = %e, "post-copy: no request writer");
                }
            },
        );
        let result = (|| -> Result<msg::PostcopyDone, MigrateError> {
            commit(inv, reservation, def, vm.clone())?;
            // Running is queued before the vCPUs start: their first fault queues a page
            // request behind it, and the source reads Running first (the writer keeps order).
            let resume_us = t_go.elapsed().as_micros() as u64;
            let _ = tx.send(Out::Frame(wire::control_frame(
                Kind::Running,
                &msg::Running { resume_us },
            )));
            vm.resume();
            vm.devices().log_line(&format!(
                "migrated in from {source} (post-copy): running on {agent}"
            ));
            let t_run = Instant::now();
            let mut placed = PageSum::default();
            while mem.remaining() > 0 {
                let f = reader.read_frame()?;
                let why = match f.header.kind {
                    Kind::DemandPages => Placement::Demand,
                    Kind::Pages => Placement::Push,
                    Kind::Abort | Kind::Error => {
                        f.verify()?;
                        return Err(MigrateError::Peer(f.decode::<msg::Abort>()?.reason));
                    }
                    other => {
                        return Err(WireError::Unexpected {
                            got: other,
                            want: "Pages or DemandPages",
                        }
                        .into())
                    }
                };
                place_pages(&f, &mem, pages, why, sum.is_some().then_some(&mut placed))?;
            }
            handler
                .stop()
                .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
            mem.unregister()
                .map_err(|e| MigrateError::Postcopy(e.to_string()))?;
            let st = mem.stats();
            let stats = PostcopyStats {
                pages_missing: stale.len() as u64,
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
                duration_ms: t_run.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            };
            if let Some(s) = &mut sum {
                s.merge(&placed);
            }
            let done = msg::PostcopyDone {
                stats,
                memory_digest: sum.map(|s| s.hex()),
            };
            let _ = tx.send(Out::Frame(wire::control_frame(Kind::PostcopyDone, &done)));
            Ok(done)
        })();
        let _ = tx.send(Out::Close);
        let _ = w.join();
        result
    });
    match outcome {
        Ok(done) => {
            tracing::info!(
                vm = %name,
                demand = done.stats.pages_demand,
                pushed = done.stats.pages_pushed,
                faults = done.stats.faults,
                p50_us = done.stats.latency_p50_us,
                p99_us = done.stats.latency_p99_us,
                "post-copy complete"
            );
            vm.devices()
                .log_line("post-copy complete: every page is here");
        }
        Err(e) => {
            // The VM runs here and may be blocked on pages only the source has: never let
            // the registration go (a missing page would then read as zeros).
            tracing::error!(vm = %name, cause = %e, remaining = mem.remaining(),
                "post-copy incomplete: the VM waits for pages that the source still holds");
            vm.devices().log_line(&format!(
                "post-copy incomplete ({} pages missing): {e}",
                mem.remaining()
            ));
            std::mem::forget(mem);
            return Err(e);
        }
    }
    reader.set_timeout(Duration::from_secs(10))?;
    match verified(reader).and_then(|f| Ok(f.expect::<msg::Released>(Kind::Released)?)) {
        Ok(_) => tracing::info!(vm = %name, "source released the VM"),
        Err(e) => {
            tracing::warn!(vm = %name, cause = %e, "no release from the source (the VM runs here regardless)")
        }
    }
    Ok(name)
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
