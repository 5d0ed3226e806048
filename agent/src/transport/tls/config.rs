//! This agent's identity and trust ([`TlsConfig`]): its key and certificate, the cluster CA
//! and the hosts file, loaded into rustls' client and server configurations.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::verify::{host_of, KnownHosts};
use super::TlsError;
use crate::certs;

/// This agent's identity and trust: its certificate and key, the cluster CA, the hosts.
pub struct TlsConfig {
    pub(super) name: String,
    /// Host name → address, from the hosts file.
    pub(super) hosts: HashMap<String, String>,
    pub(super) client: Arc<ClientConfig>,
    pub(super) server: Arc<ServerConfig>,
    pub(super) provider: Arc<CryptoProvider>,
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
    pub(super) fn expected_name(&self, dest: &str, addr: SocketAddr) -> Result<String, TlsError> {
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
