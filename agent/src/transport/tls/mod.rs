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

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, ServerConnection,
    SignatureScheme,
};

use super::record::{Opener, Sealer};
use crate::certs;
use crate::wire;

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

/// How this agent talks to other agents.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS (the default).
    Tls(Arc<TlsConfig>),
    /// Plaintext, unauthenticated (`--insecure`).
    Insecure,
}

/// This agent's identity and trust: its certificate and key, the cluster CA, the hosts.
pub struct TlsConfig {
    name: String,
    /// Host name → address, from the hosts file.
    hosts: HashMap<String, String>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("name", &self.name)
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The crypto provider: aws-lc-rs, TLS 1.3 suites with AES-128-GCM first (AES-NI/VAES make
/// it the fastest here; AES-256-GCM and ChaCha20-Poly1305 stay available).
pub fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |cause: String| TlsError::Load {
        what,
        path: path.into(),
        cause,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The one host of `hosts` that `cert` names; None if it names none or several.
fn host_of<'h>(
    cert: &CertificateDer<'_>,
    hosts: impl Iterator<Item = &'h String>,
) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut found = None;
    for h in hosts {
        let Ok(name) = ServerName::try_from(h.as_str()) else {
            continue;
        };
        if ee.verify_is_valid_for_subject_name(&name).is_ok() {
            if found.is_some() {
                return None;
            }
            found = Some(h.clone());
        }
    }
    found
}

/// The destination's client-certificate check: the CA's (chain, validity, purpose), then
/// "names exactly one host of the hosts file".
#[derive(Debug)]
struct KnownHosts {
    ca: Arc<dyn ClientCertVerifier>,
    hosts: Vec<String>,
}

impl ClientCertVerifier for KnownHosts {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.ca.verify_client_cert(end_entity, intermediates, now)?;
        match host_of(end_entity, self.hosts.iter()) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

impl TlsConfig {
    /// Loads agent `name`'s identity from `dir` (`ca.crt`, `NAME.crt`, `NAME.key`) and trusts
    /// the peers of `hosts` (name → address).
    pub fn load(
        name: &str,
        dir: &Path,
        hosts: &HashMap<String, String>,
    ) -> Result<TlsConfig, TlsError> {
        if !certs::valid_host(name) {
            return Err(TlsError::Config(format!(
                "the agent name {name:?} cannot be a certificate's host name"
            )));
        }
        let ca_path = dir.join(certs::CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in load_certs("the CA certificate", &ca_path)? {
            roots.add(c).map_err(|e| TlsError::Load {
                what: "the CA certificate",
                path: ca_path.clone(),
                cause: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs("this host's certificate", &certs::host_cert(dir, name))?;
        let key_path = certs::host_key(dir, name);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Load {
            what: "this host's key",
            path: key_path.clone(),
            cause: e.to_string(),
        })?;
        // Our own certificate must name us: a mix-up of files is caught at start, not in
        // every peer's log.
        if host_of(&chain[0], std::iter::once(&name.to_string())).is_none() {
            return Err(TlsError::Config(format!(
                "{} does not name host {name}",
                certs::host_cert(dir, name).display()
            )));
        }
        let provider = Arc::new(provider());
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let ca = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(Arc::new(KnownHosts {
                ca,
                hosts: hosts.keys().cloned().collect(),
            }))
            .with_single_cert(chain, key)
            .map_err(cfg)?;
        // No resumption: every connection is a full handshake with both certificates.
        server.send_tls13_tickets = 0;
        // After the handshake the record layer runs on the session keys (`record`).
        server.enable_secret_extraction = true;
        client.enable_secret_extraction = true;
        Ok(TlsConfig {
            name: name.into(),
            hosts: hosts.clone(),
            client: Arc::new(client),
            server: Arc::new(server),
            provider,
        })
    }

    /// The cipher suites offered, most preferred first (for the log).
    pub fn suites(&self) -> Vec<String> {
        self.provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect()
    }

    /// The host name to expect at `dest` (what the user gave) reached at `addr`: `dest` itself
    /// if the hosts file names it, else the host whose address is `addr`.
    fn expected_name(&self, dest: &str, addr: SocketAddr) -> Result<String, TlsError> {
        if self.hosts.contains_key(dest) {
            return Ok(dest.to_string());
        }
        let mut by_addr = self.hosts.iter().filter(|(_, a)| {
            a.to_socket_addrs()
                .map(|mut it| it.any(|x| x == addr))
                .unwrap_or(false)
        });
        match (by_addr.next(), by_addr.next()) {
            (Some((name, _)), None) => Ok(name.clone()),
            _ => Err(TlsError::NotInHosts { dest: dest.into() }),
        }
    }
}

/// The read side of a TLS channel, owned by one [`FrameReader`](super::FrameReader).
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
/// verified host name. Each direction has its own keys (see [`super::record`]).
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
    fn established(conn: Connection, sock: TcpStream, peer: String) -> Result<Channel, TlsError> {
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
fn handshake(
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
fn await_acceptance(
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
