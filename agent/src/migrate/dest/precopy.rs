//! Stage 3 on the destination: page frames and file pieces, round after round, until the
//! state (`State`), with perhaps the switch to post-copy (`Postcopy`) before it.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use super::disk::DiskSink;
use super::reservation::Arrival;
use crate::dirty::PageBitmap;
use crate::guest::layout::PAGE_SIZE;
use crate::inventory::{self, Reservation};
use crate::migrate::link::{not_allowed, Link};
use crate::migrate::{MigrateError, PageSum, Phase};
use crate::vm::state::MachineState;
use crate::vm::Vm;
use crate::wire::{messages as msg, pages, Frame, Kind, WireError};

/// The state sent at the pause, decoded.
pub(super) struct Loaded {
    /// vCPUs and devices.
    pub(super) machine: MachineState,
    /// Whether the source wants digests before it commits.
    pub(super) verify: bool,
}

/// The source's switch to post-copy: the stale pages and the session's id.
pub(super) struct Switch {
    /// Pages the destination must drop and fetch.
    pub(super) stale: Vec<u64>,
    /// The session's id.
    pub(super) session: u64,
}

/// What pre-copy delivered.
pub(super) struct Received {
    /// The state.
    pub(super) state: Loaded,
    /// The switch to post-copy, if the source made it.
    pub(super) switch: Option<Switch>,
    /// The disk image as received.
    pub(super) disk: DiskSink,
    /// Under `--verify`: the memory as placed (see [`Placed`]).
    pub(super) placed: Placed,
}

/// What the destination knows of the memory it placed: which pages hold data and, under
/// `--verify`, their page sum, kept up to date frame by frame (each page placed takes the
/// term of the page it overwrites out of the sum and adds its own), so that the digest at the
/// pause only costs one hash per page of the last round.
pub(super) struct Placed {
    /// Pages that were written with data (the rest of guest memory is still fresh, zero).
    pub(super) holds_data: PageBitmap,
    /// The page sum of guest memory, under `--verify`.
    pub(super) sum: Option<PageSum>,
    /// Under `--verify`, each page's term in the sum (all zeros for a zero page): 32 bytes a
    /// page (0.8 % of guest memory, touched only for pages placed), so that overwriting a
    /// page never re-reads and re-hashes what it held.
    pub(super) terms: Vec<[u8; 32]>,
    /// Time spent hashing since the last round's end: with the vCPUs paused on the source,
    /// this is the verification's share of the downtime here.
    pub(super) hashing_since_round: Duration,
}

/// Receives pages and files until the state.
pub(super) fn receive(link: &mut Link, a: &Arrival<'_>) -> Result<Received, MigrateError> {
    let vm = &a.vm;
    let mut placed = Placed {
        holds_data: PageBitmap::new(vm.ram().pages()),
        sum: a.verify.then(PageSum::default),
        terms: if a.verify {
            vec![[0; 32]; vm.ram().pages() as usize]
        } else {
            Vec::new()
        },
        hashing_since_round: Duration::ZERO,
    };
    let mut switch: Option<Switch> = None;
    let mut disk = DiskSink::new(&a.reservation.staging.join(inventory::DISK), a.verify);
    loop {
        let f = link.next()?;
        match f.kind() {
            Kind::Pages => apply_pages(&f, vm, &mut placed)?,
            Kind::FileChunk => write_chunk(&f, &a.reservation, &mut disk)?,
            Kind::RoundEnd => {
                let r: msg::RoundEnd = f.decode()?;
                tracing::debug!(round = r.round, pages = r.pages, "round received");
                // Every frame before it is placed: the source ends its round on this.
                link.send(&msg::RoundPlaced { round: r.round })?;
                placed.hashing_since_round = Duration::ZERO;
                // What arrived so far goes to the disk now, not at the pause (in the
                // background: the receive loop does not wait for it).
                disk.sync_in_background()?;
            }
            Kind::State => {
                let state: msg::State = f.decode()?;
                let state = Loaded {
                    machine: MachineState::try_from(&state.machine)?,
                    verify: state.verify,
                };
                return Ok(Received {
                    state,
                    switch,
                    disk,
                    placed,
                });
            }
            Kind::Postcopy if switch.is_none() => {
                let pc: msg::Postcopy = f.decode()?;
                let stale = pc.dirty.pages(vm.ram().pages())?;
                tracing::info!(vm = %a.def.name, stale = pc.count, reason = %pc.reason, "switching to post-copy");
                switch = Some(Switch {
                    stale,
                    session: pc.session,
                });
            }
            _ => return Err(not_allowed(Phase::Precopy, &f)),
        }
    }
}

/// Checks a page frame against the guest (bounds, lengths) and copies its pages into guest
/// memory; under `--verify`, moves the page sum from each page's old content to its new one.
fn apply_pages(f: &Frame, vm: &Vm, placed: &mut Placed) -> Result<(), MigrateError> {
    let ram = vm.ram();
    let (entries, data) = pages::frame_pages(f, ram.pages())?;
    let mut data = data.chunks_exact(PAGE_SIZE as usize);
    let mut hashing = Duration::ZERO;
    for e in entries {
        let page = if e.zero {
            // Fresh memory is zero: only a page that held data needs clearing.
            if placed.holds_data.get(e.index) {
                ram.zero_page(e.index)?;
            }
            None
        } else {
            let page = data.next().expect("lengths checked by decode");
            ram.write_page(e.index, page)?;
            placed.holds_data.set(e.index);
            Some(page)
        };
        if let Some(sum) = placed.sum.as_mut() {
            let t = Instant::now();
            let slot = &mut placed.terms[e.index as usize];
            sum.sub_term(slot);
            *slot = page.map_or([0; 32], |p| PageSum::term(e.index, p));
            sum.add_term(slot);
            hashing += t.elapsed();
        }
    }
    placed.hashing_since_round += hashing;
    Ok(())
}

/// Writes a file piece into the staging folder (the disk's into its sink).
fn write_chunk(f: &Frame, r: &Reservation, disk: &mut DiskSink) -> Result<(), MigrateError> {
    let c: msg::FileChunk = f.decode()?;
    if r.is_shared() {
        // The VM's files stay in its folder on the shared datastore: nothing may overwrite them.
        return Err(WireError::BadPages(format!(
            "file {:?} sent for a VM on shared storage",
            c.name
        ))
        .into());
    }
    if !inventory::FILES.contains(&c.name.as_str()) {
        return Err(WireError::BadPages(format!("unexpected file {:?}", c.name)).into());
    }
    let data = f.data();
    if c.name == inventory::DISK {
        return disk.write(c.size, c.offset, data);
    }
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
