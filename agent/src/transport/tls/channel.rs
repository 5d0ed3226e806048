//! A connection after its handshake ([`Channel`]): plaintext, or TLS run by the record layer
//! on the session's keys, split into one reader and cloneable writers.

use std::io;
use std::net::TcpStream;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::Connection;

use super::TlsError;
use crate::transport::record::{Opener, Sealer};

/// The read side of a TLS channel, owned by one [`FrameReader`](crate::transport::FrameReader).
pub(crate) struct TlsReader(Opener);

impl TlsReader {
    /// Reads decrypted bytes; Ok(0) at the end of the stream.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }

    /// Whether bytes are already here (decrypted or not) that the socket will not signal.
    pub(crate) fn buffered(&self) -> bool {
        self.0.buffered()
    }
}

/// The write side of a TLS channel (cloneable: the post-copy uplink has one). Whole frames
/// are sealed and written under its lock, so frames of several writers never interleave.
#[derive(Clone)]
pub(crate) struct TlsWriter(Arc<Mutex<Sealer>>);

impl TlsWriter {
    /// Encrypts and sends `parts` (one frame).
    pub(crate) fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(parts)
    }
}

/// A connection to another agent, after the handshake: plaintext, or TLS with the peer's
/// verified host name. Each direction has its own keys (see [`crate::transport::record`]).
pub struct Channel {
    sock: TcpStream,
    tx: Option<TlsWriter>,
    rx: Mutex<Option<Opener>>,
    peer: Option<String>,
    suite: Option<String>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.peer)
            .field("tls", &self.suite)
            .finish()
    }
}

impl Channel {
    /// A plaintext channel (`--insecure`, and tests of the engine over plain sockets).
    pub fn plain(sock: TcpStream) -> Channel {
        Channel {
            sock,
            tx: None,
            rx: Mutex::new(None),
            peer: None,
            suite: None,
        }
    }

    /// The TCP socket underneath (to shut it down, or read its addresses).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The peer's host name, verified by its certificate (None in plaintext).
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// The negotiated cipher suite (None in plaintext).
    pub fn suite(&self) -> Option<&str> {
        self.suite.as_deref()
    }

    /// The channel's reader (TLS: there is one, and this takes it).
    pub(crate) fn tls_reader(&self) -> io::Result<Option<TlsReader>> {
        if self.tx.is_none() {
            return Ok(None);
        }
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|o| Some(TlsReader(o)))
            .ok_or_else(|| io::Error::other("the TLS channel's reader is taken already"))
    }

    pub(crate) fn tls_writer(&self) -> Option<TlsWriter> {
        self.tx.clone()
    }

    /// Hands the established session's keys to the record layer (rustls is done).
    pub(super) fn established(
        conn: Connection,
        sock: TcpStream,
        peer: String,
    ) -> Result<Channel, TlsError> {
        let suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        let err = |why: String| TlsError::Handshake {
            peer: peer.clone(),
            why,
        };
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| err(format!("cannot take over the session keys: {e}")))?;
        let io = |e: io::Error| err(e.to_string());
        let tx =
            Sealer::new(secrets.tx.0, secrets.tx.1, sock.try_clone().map_err(io)?).map_err(io)?;
        let rx = Opener::new(
            secrets.rx.0,
            secrets.rx.1,
            sock.try_clone().map_err(io)?,
            &[],
        )
        .map_err(io)?;
        Ok(Channel {
            sock,
            tx: Some(TlsWriter(Arc::new(Mutex::new(tx)))),
            rx: Mutex::new(Some(rx)),
            peer: Some(peer),
            suite: Some(suite),
        })
    }
}
