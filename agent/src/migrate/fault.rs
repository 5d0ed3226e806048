//! Fault injection for tests: a decorator on the source's [`Link`] that breaks one thing on
//! the way through. Compiled only into test builds and with the `fault-injection` feature: a
//! release binary has none of it.
//!
//! A fault is armed for the next migration a thread starts ([`arm`]), or, for an agent under
//! an end-to-end test, for every migration it starts from the environment variable
//! [`ENV`] (`VMIG_INJECT_FAULT=cut-postcopy`). Only the first connection of a migration
//! carries it: a reconnection is clean.

use std::cell::Cell;
use std::net::Shutdown;

use super::link::Link;
use super::MigrateError;
use crate::wire::{self, messages as msg, Frame, Header, Kind, HEADER_LEN};

/// The environment variable an agent reads its fault from.
pub const ENV: &str = "VMIG_INJECT_FAULT";

/// Faults a test can inject into an outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte in the first page frame after its checksum was computed.
    CorruptFrame,
    /// Speak protocol version 99 in the hello.
    BadVersion,
    /// Shut the connection down once half of the post-copy pages are sent (once).
    CutPostcopy,
    /// Drop the destination's `PostcopyDone` and the connection with it (once).
    LosePostcopyDone,
    /// Drop the destination's `Ready` and the connection with it: a failure after the state
    /// went (and, on shared storage, after the source released the image), before `Go`.
    LoseReady,
    /// Send none of the last round's dirty pages (a dirty-tracking miss): the destination ends
    /// with the pages as last sent, the source's memory is untouched; only `--verify` sees it.
    MissLastDirty,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        Ok(match s {
            "corrupt-frame" => Fault::CorruptFrame,
            "bad-version" => Fault::BadVersion,
            "cut-postcopy" => Fault::CutPostcopy,
            "lose-postcopy-done" => Fault::LosePostcopyDone,
            "lose-ready" => Fault::LoseReady,
            "miss-last-dirty" => Fault::MissLastDirty,
            other => return Err(format!("unknown fault {other:?}")),
        })
    }
}

thread_local! {
    static ARMED: Cell<Option<Fault>> = const { Cell::new(None) };
}

/// Arms `fault` for the next migration this thread starts.
pub fn arm(fault: Fault) {
    ARMED.with(|a| a.set(Some(fault)));
}

/// The fault for a migration starting now: the thread's armed one, else the environment's.
pub(super) fn take() -> Option<Fault> {
    ARMED.with(Cell::take).or_else(|| {
        let v = std::env::var(ENV).ok()?;
        match v.parse() {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(%e, "{ENV}: no fault injected");
                None
            }
        }
    })
}

/// A fault on one connection, and what it has seen.
#[derive(Debug)]
pub(super) struct Tap {
    fault: Fault,
    fired: bool,
    /// Post-copy: pages the switch left to send, once the `Postcopy` frame went out.
    switch_pages: Option<u64>,
    /// Pages sent in page frames since the switch.
    sent_since_switch: u64,
}

impl Tap {
    pub(super) fn new(fault: Fault) -> Tap {
        Tap {
            fault,
            fired: false,
            switch_pages: None,
            sent_since_switch: 0,
        }
    }

    fn fire(&mut self, fault: Fault) -> bool {
        let now = self.fault == fault && !self.fired;
        self.fired |= now;
        now
    }
}

impl Link {
    /// Arms a fault on this connection.
    pub(super) fn inject(&mut self, fault: Option<Fault>) {
        self.tap = fault.map(Tap::new);
    }

    /// A control frame on its way out.
    pub(super) fn tap_control(&mut self, frame: &mut [u8]) {
        let Some(tap) = &mut self.tap else { return };
        let header = Header::parse(frame[..HEADER_LEN].try_into().expect("a header"))
            .expect("our own frames parse");
        match header.kind {
            Kind::Hello if tap.fire(Fault::BadVersion) => {
                tracing::warn!("injected fault: speaking protocol version 99");
                wire::set_version(frame, 99);
            }
            Kind::Postcopy => {
                let f = Frame::parse(header, frame[HEADER_LEN..].to_vec()).expect("verified");
                let pc: msg::Postcopy = f.decode().expect("our own message decodes");
                tap.switch_pages = Some(pc.count);
            }
            _ => {}
        }
    }

    /// The head of a page frame of `pages` pages on its way out.
    pub(super) fn tap_pages(&mut self, head: &mut [u8], pages: usize) {
        let Some(tap) = &mut self.tap else { return };
        if tap.fire(Fault::CorruptFrame) {
            tracing::warn!("injected fault: corrupting a page frame");
            let last = head.len() - 1;
            head[last] ^= 0x40;
        }
        if tap.switch_pages.is_some() {
            tap.sent_since_switch += pages as u64;
        }
    }

    /// Page frames were flushed to the socket.
    pub(super) fn tap_flushed(&mut self) {
        let Some(tap) = &mut self.tap else { return };
        let Some(total) = tap.switch_pages else {
            return;
        };
        if tap.sent_since_switch >= total.div_ceil(2) && tap.fire(Fault::CutPostcopy) {
            tracing::warn!(
                sent = tap.sent_since_switch,
                total,
                "injected fault: cutting the post-copy connection"
            );
            let _ = self.socket().shutdown(Shutdown::Both);
        }
    }

    /// Whether the last round's dirty pages are to be "missed" (not sent).
    pub(super) fn tap_last_round(&mut self) -> bool {
        let Some(tap) = &mut self.tap else {
            return false;
        };
        let now = tap.fire(Fault::MissLastDirty);
        if now {
            tracing::warn!("injected fault: missing the last round's dirty pages");
        }
        now
    }

    /// A frame received.
    pub(super) fn tap_received(&mut self, f: &Frame) -> Result<(), MigrateError> {
        let Some(tap) = &mut self.tap else {
            return Ok(());
        };
        if f.kind() == Kind::Ready && tap.fire(Fault::LoseReady) {
            tracing::warn!("injected fault: losing Ready and the connection");
            let _ = self.socket().shutdown(Shutdown::Both);
            return Err(MigrateError::Peer(
                "injected: Ready lost with the connection".into(),
            ));
        }
        if f.kind() == Kind::PostcopyDone && tap.fire(Fault::LosePostcopyDone) {
            tracing::warn!("injected fault: losing PostcopyDone and the connection");
            let _ = self.socket().shutdown(Shutdown::Both);
            return Err(MigrateError::Peer(
                "injected: PostcopyDone lost with the connection".into(),
            ));
        }
        Ok(())
    }
}
