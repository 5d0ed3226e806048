//! One side's end of a migration connection, speaking typed messages: `send(&m)` sends a
//! message as a frame of its kind, `recv::<M>()` receives one and refuses any other kind.
//! Every frame it hands out was verified by the reader; a peer's `Abort`, `Error` or `Refused`
//! becomes an error carrying its reason.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{MigrateError, MigrateOptions};
use crate::transport::{tune_socket, FrameReader, FrameWriter, IoPath};
use crate::wire::{self, messages as msg, Frame, Kind, Message};

/// How long the source waits for a control reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration connection.
pub(super) struct Link {
    pub(super) writer: FrameWriter,
    pub(super) reader: FrameReader,
    /// A fault to inject on this connection (tests).
    pub(super) inject: Option<super::Fault>,
}

impl Link {
    /// Connects to the agent at `dest` (the source's end).
    pub(super) fn connect(dest: SocketAddr, opts: &MigrateOptions) -> Result<Link, MigrateError> {
        let sock = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).map_err(|cause| {
            MigrateError::Connect {
                addr: dest.to_string(),
                cause,
            }
        })?;
        tune_socket(&sock)?;
        let bandwidth = opts.bandwidth_mibs.map(|m| m * 1048576.0);
        Ok(Link {
            writer: FrameWriter::new(sock.try_clone()?, opts.io, bandwidth)?,
            reader: FrameReader::new(sock, IoPath::Plain, REPLY_TIMEOUT)?,
            inject: None,
        })
    }

    /// The destination's end of an accepted connection; reads give up after `idle`.
    pub(super) fn accept(
        sock: TcpStream,
        io: IoPath,
        idle: Duration,
    ) -> Result<Link, MigrateError> {
        tune_socket(&sock)?;
        Ok(Link {
            reader: FrameReader::new(sock.try_clone()?, io, idle)?,
            writer: FrameWriter::new(sock, IoPath::Plain, None)?,
            inject: None,
        })
    }

    /// The socket.
    pub(super) fn socket(&self) -> &TcpStream {
        self.writer.socket()
    }

    /// Sends a message in a frame of its kind.
    pub(super) fn send<M: Message>(&mut self, m: &M) -> Result<(), MigrateError> {
        Ok(self.writer.send_bytes(wire::control_frame(m))?)
    }

    /// Receives the next (verified) frame; a peer's `Abort`, `Error` or `Refused` becomes an
    /// error carrying its reason.
    pub(super) fn next(&mut self) -> Result<Frame, MigrateError> {
        let f = self.reader.read_frame()?;
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
