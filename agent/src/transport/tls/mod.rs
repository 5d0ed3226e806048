//! Mutual TLS between agents: every migration connection (pre-copy, post-copy, resume) is a
//! TLS 1.3 session in which both agents show a certificate signed by the cluster's CA
//! ([`crate::certs`]), and each checks that the other's names the host the hosts file says:
//!
//! - the **source** (TLS client) connects to a host of the hosts file and accepts only a
//!   certificate for that host name (a DNS subject alternative name), signed by the CA and
//!   valid now;
//! - the **destination** (TLS server) requires a client certificate, signed by the CA, valid
//!   now, naming exactly one host of its hosts file: that name is the peer's identity for
//!   the whole connection ([`Channel::peer`]; a post-copy session belongs to it).
//!
//! Both checks run inside the handshake, so a refused peer never gets a migration frame read;
//! the destination then confirms with one byte ([`ACCEPTED`]) that the source waits for, so a
//! source whose certificate was refused learns it in [`Security::connect`] too. A peer that
//! speaks plaintext (an `--insecure` agent) is recognised by its first bytes and told so in
//! its own protocol.
//!
//! After the handshake the session is shared by one [`FrameReader`](super::FrameReader) and
//! any number of writers (the frame writer, the post-copy uplink): reads and writes take the
//! session's lock only to decrypt or encrypt, never across a blocking socket call, so a
//! thread blocked reading never holds up a writer.

mod channel;
mod config;
mod handshake;
mod security;
mod verify;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use channel::Channel;
pub(crate) use channel::{TlsReader, TlsWriter};
pub use config::{provider, TlsConfig};
pub use security::Security;

/// How long a TLS handshake (and its confirmation) may take, whatever the peer sends.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte the destination sends once it accepted the source's certificate.
const ACCEPTED: u8 = 0xA5;

/// Errors setting up or running a secure channel.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key or certificate file could not be read.
    #[error("cannot load {what} {path}: {cause} (create them with `vmig certs init` and `vmig certs issue HOST`, or run every agent with --insecure)")]
    Load {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        cause: String,
    },
    /// The TLS configuration could not be built (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The destination is not a host of the hosts file.
    #[error("{dest} is not a host of the hosts file: with mutual TLS the destination must be a host the hosts file names (its certificate must name it)")]
    NotInHosts {
        /// What the user gave.
        dest: String,
    },
    /// The handshake failed: the peer is not who the hosts file says, or we were refused.
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake {
        /// Peer (name or address).
        peer: String,
        /// What went wrong, in words.
        why: String,
    },
    /// The peer speaks plaintext vmig (it runs with `--insecure`).
    #[error("{peer} speaks the plaintext protocol (it runs with --insecure?) but this agent requires mutual TLS: refused")]
    PlaintextPeer {
        /// Peer.
        peer: String,
    },
    /// A TLS client reached this `--insecure` agent.
    #[error("{peer} opened a TLS session but this agent runs with --insecure (both sides must agree): refused")]
    TlsPeer {
        /// Peer.
        peer: String,
    },
    /// The handshake did not finish in time.
    #[error("TLS handshake with {peer} did not finish within {timeout:?}")]
    Timeout {
        /// Peer.
        peer: String,
        /// Limit.
        timeout: Duration,
    },
    /// Socket failure during the handshake.
    #[error("TLS handshake with {peer}: {cause}")]
    Io {
        /// Peer.
        peer: String,
        /// Cause.
        cause: io::Error,
    },
}
