//! Driving a TLS handshake on a blocking socket with a deadline, the source's wait for the
//! destination's acceptance, and the failures explained in words.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::Instant;

use rustls::{AlertDescription, CertificateError, Connection};

use super::{TlsError, ACCEPTED, HANDSHAKE_TIMEOUT};
use crate::wire;

/// What a TLS failure means, for the people reading the logs of both sides.
fn explain(e: &rustls::Error) -> String {
    use rustls::Error as E;
    let what = match e {
        E::AlertReceived(AlertDescription::AccessDenied) => {
            "the peer refused this agent's certificate: it names no host of the peer's hosts file"
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            "the peer refused this agent's certificate as expired or not yet valid"
        }
        E::AlertReceived(AlertDescription::UnknownCA) => {
            "the peer refused this agent's certificate: not signed by the peer's cluster CA"
        }
        E::AlertReceived(AlertDescription::DecryptError) => {
            "the peer could not verify this agent's certificate: not signed by the peer's cluster CA?"
        }
        E::AlertReceived(AlertDescription::BadCertificate) => {
            "the peer refused this agent's certificate"
        }
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the peer requires a client certificate and got none"
        }
        E::NoCertificatesPresented => "the peer presented no certificate",
        #[allow(deprecated)]
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the peer's certificate is not signed by this cluster's CA"
        }
        E::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the peer's certificate is expired or not yet valid",
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the peer's certificate does not name the host the hosts file says is at that address",
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the peer's certificate names no host of this agent's hosts file"
        }
        _ => "",
    };
    if what.is_empty() {
        e.to_string()
    } else {
        format!("{what} ({e})")
    }
}

/// Runs the handshake of `conn` on `sock` until it completes, with a deadline. Returns the
/// first bytes the peer sent (to recognise a plaintext peer in a failure).
pub(super) fn handshake(
    conn: &mut Connection,
    sock: &mut TcpStream,
    peer: &str,
    deadline: Instant,
) -> Result<(), TlsError> {
    let mut first = Vec::new();
    let mut raw = vec![0u8; 16 << 10];
    let io_err = |cause: io::Error| TlsError::Io {
        peer: peer.into(),
        cause,
    };
    loop {
        while conn.wants_write() {
            conn.write_tls(sock).map_err(io_err)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: peer.into(),
                timeout: HANDSHAKE_TIMEOUT,
            });
        }
        sock.set_read_timeout(Some(left)).map_err(io_err)?;
        let n = match sock.read(&mut raw) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(TlsError::Timeout {
                    peer: peer.into(),
                    timeout: HANDSHAKE_TIMEOUT,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if first.len() < 4 {
            first.extend_from_slice(&raw[..n.min(4 - first.len())]);
        }
        if first.starts_with(&wire::MAGIC.to_le_bytes()) {
            return Err(TlsError::PlaintextPeer { peer: peer.into() });
        }
        if n == 0 {
            return Err(TlsError::Handshake {
                peer: peer.into(),
                why: "the peer closed the connection during the handshake".into(),
            });
        }
        let mut slice = &raw[..n];
        while !slice.is_empty() {
            conn.read_tls(&mut slice).map_err(io_err)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), then give up.
                let _ = conn.write_tls(sock);
                return Err(TlsError::Handshake {
                    peer: peer.into(),
                    why: explain(&e),
                });
            }
        }
    }
}

/// Reads, through rustls, the destination's confirmation byte (or the alert that refuses
/// this agent), within the handshake's deadline.
pub(super) fn await_acceptance(
    conn: &mut Connection,
    sock: &mut TcpStream,
    peer: &str,
    deadline: Instant,
) -> Result<(), TlsError> {
    let refused = |why: String| TlsError::Handshake {
        peer: peer.into(),
        why,
    };
    let mut raw = [0u8; 512];
    loop {
        let mut b = [0u8; 1];
        match conn.reader().read(&mut b) {
            Ok(1) if b[0] == ACCEPTED => return Ok(()),
            Ok(_) => {
                return Err(refused(
                    "the peer closed the connection instead of accepting it".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(refused(e.to_string())),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: peer.into(),
                timeout: HANDSHAKE_TIMEOUT,
            });
        }
        sock.set_read_timeout(Some(left))
            .map_err(|cause| TlsError::Io {
                peer: peer.into(),
                cause,
            })?;
        // One record at most (the confirmation, or an alert): nothing follows it before
        // this side's first frame, so nothing is read past it.
        let n = match sock.read(&mut raw) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(TlsError::Timeout {
                    peer: peer.into(),
                    timeout: HANDSHAKE_TIMEOUT,
                })
            }
            Err(cause) => {
                return Err(TlsError::Io {
                    peer: peer.into(),
                    cause,
                })
            }
        };
        let mut slice = &raw[..n];
        if n == 0 {
            let _ = conn.read_tls(&mut slice);
        }
        while !slice.is_empty() {
            conn.read_tls(&mut slice).map_err(|cause| TlsError::Io {
                peer: peer.into(),
                cause,
            })?;
            conn.process_new_packets()
                .map_err(|e| refused(explain(&e)))?;
        }
        if n == 0 {
            conn.process_new_packets()
                .map_err(|e| refused(explain(&e)))?;
            return Err(refused(
                "the peer closed the connection instead of accepting it".into(),
            ));
        }
    }
}
