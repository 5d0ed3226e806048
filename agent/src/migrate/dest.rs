//! The destination side: receives a VM, and registers and runs it only on the source's Go.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{cpu_digest, MigrateError};
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

/// Checks a page frame (bounds, lengths, CRC) and copies its pages into guest memory.
fn apply_pages(f: &Frame, vm: &Vm, holds_data: &mut PageBitmap) -> Result<(), MigrateError> {
    let ram = vm.ram();
    let entries = pages::decode(f.meta(), f.data().len(), ram.pages())?;
    f.verify()?;
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
