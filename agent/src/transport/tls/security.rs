//! How this agent secures its connections ([`Security`]): a TLS client towards a destination,
//! a TLS server for a source, or plaintext under `--insecure` (refusing the other kind).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

use super::handshake::{await_acceptance, handshake};
use super::verify::host_of;
use super::{Channel, TlsConfig, TlsError, ACCEPTED, HANDSHAKE_TIMEOUT};
use crate::wire;

/// How this agent talks to other agents.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS (the default).
    Tls(Arc<TlsConfig>),
    /// Plaintext, unauthenticated (`--insecure`).
    Insecure,
}

/// A plaintext vmig `Error` frame carrying `reason` (what a plaintext peer can read).
fn plaintext_refusal(reason: &str) -> Vec<u8> {
    wire::control_frame(&wire::messages::Error {
        reason: reason.into(),
    })
}

impl Security {
    /// Whether connections are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// Secures a fresh connection to `dest` (the name the user gave) at `addr`: as a TLS
    /// client that expects the certificate of the host the hosts file names for it.
    pub fn connect(
        &self,
        mut sock: TcpStream,
        addr: SocketAddr,
        dest: &str,
    ) -> Result<Channel, TlsError> {
        let Security::Tls(cfg) = self else {
            return Ok(Channel::plain(sock));
        };
        let expected = cfg.expected_name(dest, addr)?;
        let peer = format!("{expected} ({addr})");
        let name = ServerName::try_from(expected.clone())
            .map_err(|e| TlsError::Config(format!("host name {expected:?}: {e}")))?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut conn: Connection = ClientConnection::new(cfg.client.clone(), name)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .into();
        handshake(&mut conn, &mut sock, &peer, deadline)?;
        // The destination checks our certificate after its side of the handshake: wait for
        // its verdict before the first frame.
        await_acceptance(&mut conn, &mut sock, &peer, deadline)?;
        let ch = Channel::established(conn, sock, expected)?;
        tracing::debug!(peer = %peer, suite = %ch.suite().unwrap_or(""), "TLS session open");
        Ok(ch)
    }

    /// Secures an incoming connection: as a TLS server that requires the certificate of a
    /// host of the hosts file. Under `--insecure`, refuses a TLS client (both sides must agree).
    pub fn accept(&self, mut sock: TcpStream) -> Result<Channel, TlsError> {
        let addr = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let Security::Tls(cfg) = self else {
            // A TLS record starts with 0x16 (handshake); a vmig frame with its magic.
            sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
                .map_err(|cause| TlsError::Io {
                    peer: addr.clone(),
                    cause,
                })?;
            let mut b = [0u8; 1];
            if matches!(sock.peek(&mut b), Ok(1)) && b[0] == 0x16 {
                let e = TlsError::TlsPeer { peer: addr };
                let _ = sock.write_all(&plaintext_refusal(&format!(
                    "the destination runs with --insecure and does not speak TLS: {e}"
                )));
                return Err(e);
            }
            return Ok(Channel::plain(sock));
        };
        let mut conn: Connection = ServerConnection::new(cfg.server.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?
            .into();
        match handshake(&mut conn, &mut sock, &addr, deadline) {
            Ok(()) => {}
            Err(e @ TlsError::PlaintextPeer { .. }) => {
                let _ = sock.write_all(&plaintext_refusal(&format!(
                    "the destination requires mutual TLS (this source runs with --insecure?): {e}"
                )));
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        let certs = conn.peer_certificates().unwrap_or_default();
        let Some(peer) = certs.first().and_then(|c| host_of(c, cfg.hosts.keys())) else {
            // The verifier checked it already; never serve an anonymous peer regardless.
            return Err(TlsError::Handshake {
                peer: addr,
                why: "no certificate naming a known host".into(),
            });
        };
        let sent = conn.writer().write_all(&[ACCEPTED]).and_then(|_| {
            while conn.wants_write() {
                conn.write_tls(&mut sock)?;
            }
            Ok(())
        });
        sent.map_err(|cause| TlsError::Io {
            peer: addr.clone(),
            cause,
        })?;
        let ch = Channel::established(conn, sock, peer.clone())?;
        tracing::info!(%peer, %addr, suite = %ch.suite().unwrap_or(""), "TLS peer authenticated");
        Ok(ch)
    }
}
