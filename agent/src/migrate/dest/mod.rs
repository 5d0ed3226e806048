//! The destination side: receives a VM, and registers and runs it only on the source's `Go`.
//!
//! The five stages, each a file of this module:
//! 1. **Pre-migration** ([`handshake`]): the source's `Hello` checked (a common version, the
//!    page size, the CPU features); `Welcome`.
//! 2. **Reservation** ([`reservation`]): memory and the name reserved, the VM built, not
//!    running; or `Refused`. A `Resume` here instead picks up an interrupted post-copy
//!    ([`resume`]).
//! 3. **Pre-copy** ([`precopy`]): pages and files, round after round, until the state.
//! 4. **Stop and copy** ([`stop_and_copy`]): the state loaded, `Ready` (digests under
//!    `--verify`); or the **post-copy** switch ([`postcopy`]): stale pages dropped and
//!    registered with userfaultfd, then the state.
//! 5. **Commitment** ([`commit`]): on `Go`, register and run the VM, `Running`; in post-copy,
//!    place pages as they come until none is missing.
//!
//! On any failure before `Go` nothing stays registered and the staged files are removed
//! (the reservation's drop).

mod commit;
mod disk;
mod handshake;
mod postcopy;
mod precopy;
mod reservation;
mod resume;
mod stop_and_copy;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::Link;
use super::registry::Registry;
use super::MigrateError;
use crate::inventory::Inventory;
use crate::transport::{Channel, IoPath};
use crate::wire::messages as msg;

pub use postcopy::PostcopyIn;
pub(crate) use resume::discard_waiting;

/// How long the destination waits for the next frame before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// This agent as the destination of migrations.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// Where arriving VMs go.
    pub inv: &'a Arc<Inventory>,
    /// The agent's migrations (post-copy sessions outlive their connections here).
    pub registry: &'a Registry,
    /// This agent's name.
    pub agent: &'a str,
    /// I/O path of incoming streams.
    pub io: IoPath,
}

/// Receives one incoming migration on `ch` (secured by the caller); returns the VM's name.
pub fn receive(ch: Channel, to: &Destination<'_>) -> Result<String, MigrateError> {
    let sock = ch.socket().try_clone()?;
    let mut link = Link::accept(&ch, to.io, IDLE_TIMEOUT)?;
    let result = run(&mut link, to);
    if let Err(e) = &result {
        tracing::warn!(cause = %e, "incoming migration failed; nothing kept");
        if !matches!(e, MigrateError::Peer(_)) {
            let _ = link.send(&msg::Error {
                reason: e.to_string(),
            });
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

/// The five stages, in order.
fn run(link: &mut Link, to: &Destination<'_>) -> Result<String, MigrateError> {
    // 1. Pre-migration checks.
    let source = handshake::welcome(link, to.agent)?;
    // 2. Reservation (or the resumption of a post-copy that lost its connection).
    let arrival = match reservation::reserve(link, to, source.clone())? {
        reservation::Next::Arrival(a) => a,
        reservation::Next::Resume(r) => return resume::resume_session(link, to, r),
        reservation::Next::Cold(offer) => {
            return super::cold::dest::receive(link, to, &source, offer)
        }
        reservation::Next::ColdQuery(q) => {
            let registered = to.inv.cold_query(&q.op, &q.name);
            tracing::info!(vm = %q.name, op = %q.op, registered, "a recovering source asked about a cold migration");
            super::cold::crash::point(super::cold::crash::Crash::DestAnswering);
            link.send(&msg::ColdAnswer { registered })?;
            return Ok(q.name);
        }
        reservation::Next::OwnerQuery(q) => return super::fence::answer(link, to, q),
        reservation::Next::Fence(f) => return super::fence::fenced_by(link, to, &source, f),
    };
    // 3. Pages and files, until the state arrives.
    let received = precopy::receive(link, &arrival)?;
    // 4. Load the state and answer `Ready`, or switch to post-copy;
    // 5. and on `Go`, commit: register (at the source's generation + 1) and run the VM.
    let placed = received.placed;
    match received.switch {
        None => {
            // Under `--verify`, the source checks its memory against ours after the resume,
            // unless the disk is shared (a copy that ran on it could not be undone).
            let checked_after_resume = received.state.verify && !arrival.reservation.is_shared();
            stop_and_copy::load(link, to, &arrival, received.state, received.disk, placed)?;
            commit::run(link, to, arrival, checked_after_resume)
        }
        Some(switch) => postcopy::run(
            link,
            to,
            arrival,
            received.state,
            received.disk,
            switch,
            placed,
        ),
    }
}
