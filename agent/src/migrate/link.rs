//! One side's end of a migration connection, speaking typed messages: `send(&m)` sends a
//! message as a frame of its kind, `recv::<M>()` receives one and refuses any other kind.
//! Every frame it hands out was verified by the reader; a peer's `Abort`, `Error` or `Refused`
//! becomes an error carrying its reason.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{Event, MigrateError, MigrateOptions, Phase};
use crate::transport::{tune_socket, Channel, FrameReader, FrameWriter, IoPath, Security};
use crate::vm::memory::PageRef;
use crate::wire::pages::PageCompressor;
use crate::wire::{self, messages as msg, Frame, Kind, Message};

/// How long the source waits for a control reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration connection.
pub(super) struct Link {
    pub(super) writer: FrameWriter,
    pub(super) reader: FrameReader,
    /// Page frames compressed (`--compress zstd`), on the sending side.
    pub(super) compressor: Option<PageCompressor>,
    /// The fault injected on this connection, if any (test builds only).
    #[cfg(any(test, feature = "fault-injection"))]
    pub(super) tap: Option<super::fault::Tap>,
}

impl Link {
    /// Connects to the agent at `dest` (host `dest_name`): the source's end, through mutual
    /// TLS unless `security` is insecure.
    pub(super) fn connect(
        security: &Security,
        dest: SocketAddr,
        dest_name: &str,
        opts: &MigrateOptions,
    ) -> Result<Link, MigrateError> {
        let sock = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).map_err(|cause| {
            MigrateError::Connect {
                addr: dest.to_string(),
                cause,
            }
        })?;
        tune_socket(&sock)?;
        let ch = security.connect(sock, dest, dest_name)?;
        let bandwidth = opts.bandwidth_mibs.map(|m| m * 1048576.0);
        let compressor = match opts.compress {
            super::Compression::Off => None,
            super::Compression::Zstd { level } => Some(PageCompressor::new(level)?),
        };
        Ok(Link {
            writer: FrameWriter::on(&ch, opts.io, bandwidth)?,
            reader: FrameReader::on(&ch, IoPath::Plain, REPLY_TIMEOUT)?,
            compressor,
            #[cfg(any(test, feature = "fault-injection"))]
            tap: None,
        })
    }

    /// The destination's end of an accepted connection (secured by the caller); reads give
    /// up after `idle`.
    pub(super) fn accept(ch: &Channel, io: IoPath, idle: Duration) -> Result<Link, MigrateError> {
        tune_socket(ch.socket())?;
        Ok(Link {
            reader: FrameReader::on(ch, io, idle)?,
            writer: FrameWriter::on(ch, IoPath::Plain, None)?,
            compressor: None,
            #[cfg(any(test, feature = "fault-injection"))]
            tap: None,
        })
    }

    /// The authenticated host name of the peer (None over `--insecure`).
    pub(super) fn peer(&self) -> Option<&str> {
        self.reader.peer()
    }

    /// The socket.
    pub(super) fn socket(&self) -> &TcpStream {
        self.writer.socket()
    }

    /// Sends a message in a frame of its kind.
    pub(super) fn send<M: Message>(&mut self, m: &M) -> Result<(), MigrateError> {
        #[allow(unused_mut)]
        let mut frame = wire::control_frame(m);
        #[cfg(any(test, feature = "fault-injection"))]
        self.tap_control(&mut frame);
        Ok(self.writer.send_bytes(frame)?)
    }

    /// Sends a page frame: `head` (from a `PageFrameBuilder`) and then the data pages at
    /// `pages`, without copying them; `urgent` (a vCPU waits for them) skips the bandwidth
    /// limit's wait.
    ///
    /// # Safety
    /// As [`FrameWriter::send_pages`]: the guest memory of `pages` stays mapped until the next
    /// send or flush on this link returns.
    pub(super) unsafe fn send_pages(
        &mut self,
        #[allow(unused_mut)] mut head: Vec<u8>,
        entries: usize,
        pages: &[PageRef<'_>],
        urgent: bool,
    ) -> Result<(), MigrateError> {
        #[cfg(any(test, feature = "fault-injection"))]
        self.tap_pages(&mut head, entries);
        let _ = entries;
        if urgent {
            // SAFETY: the caller's contract is this function's.
            unsafe { self.writer.send_pages_now(head, pages) }?;
        } else {
            // SAFETY: the caller's contract is this function's.
            unsafe { self.writer.send_pages(head, pages) }?;
        }
        Ok(())
    }

    /// Sends a whole page frame of `entries` pages built compressed (its bytes owned);
    /// `urgent` as for [`Link::send_pages`].
    pub(super) fn send_compressed(
        &mut self,
        #[allow(unused_mut)] mut frame: Vec<u8>,
        entries: usize,
        urgent: bool,
    ) -> Result<(), MigrateError> {
        #[cfg(any(test, feature = "fault-injection"))]
        {
            // The fault corrupts the head (header and page table), as for a raw frame.
            let meta = u32::from_le_bytes(frame[16..20].try_into().expect("a header")) as usize;
            self.tap_pages(&mut frame[..wire::HEADER_LEN + meta], entries);
        }
        let _ = entries;
        // SAFETY: no guest pages are passed: the frame's bytes are all its own.
        unsafe {
            if urgent {
                self.writer.send_pages_now(frame, &[])
            } else {
                self.writer.send_pages(frame, &[])
            }
        }?;
        Ok(())
    }

    /// Waits until every frame sent is handed to the socket.
    pub(super) fn flush(&mut self) -> Result<(), MigrateError> {
        self.writer.flush()?;
        #[cfg(any(test, feature = "fault-injection"))]
        self.tap_flushed();
        Ok(())
    }

    /// Receives the next (verified) frame; a peer's `Abort`, `Error` or `Refused` becomes an
    /// error carrying its reason.
    pub(super) fn next(&mut self) -> Result<Frame, MigrateError> {
        let f = self.reader.read_frame()?;
        #[cfg(any(test, feature = "fault-injection"))]
        self.tap_received(&f)?;
        if let Some(reason) = f.failure() {
            return Err(MigrateError::Peer(reason?));
        }
        if f.kind() == Kind::Refused {
            return Err(MigrateError::Refused(f.decode::<msg::Refused>()?.reason));
        }
        Ok(f)
    }

    /// Receives the next message, which must be an `M`.
    pub(super) fn recv<M: Message>(&mut self) -> Result<M, MigrateError> {
        Ok(self.next()?.decode::<M>()?)
    }

    /// Receives the next message of `phase`, which must be an `M`; another frame is refused
    /// by name.
    pub(super) fn recv_in<M: Message>(&mut self, phase: Phase) -> Result<M, MigrateError> {
        let f = self.next()?;
        if f.kind() != M::KIND {
            return Err(not_allowed(phase, &f));
        }
        Ok(f.decode::<M>()?)
    }

    /// After a send failed: the peer may have said why before closing.
    pub(super) fn explain(&mut self, e: MigrateError) -> MigrateError {
        if !matches!(e, MigrateError::Io(_)) {
            return e;
        }
        let _ = self.reader.set_timeout(Duration::from_secs(2));
        match self.next() {
            Err(peer @ (MigrateError::Peer(_) | MigrateError::Refused(_))) => peer,
            _ => e,
        }
    }
}

/// The refusal of a frame that `phase` does not allow.
pub(super) fn not_allowed(phase: Phase, f: &Frame) -> MigrateError {
    MigrateError::NotAllowed {
        phase,
        event: Event::Frame(f.kind()),
    }
}
