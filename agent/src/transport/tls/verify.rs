//! The checks of a peer's certificate beyond the CA's: which host of the hosts file it names
//! ([`host_of`]), and the destination's client-certificate verifier built on it.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The one host of `hosts` that `cert` names; None if it names none or several.
pub(super) fn host_of<'h>(
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
pub(super) struct KnownHosts {
    pub(super) ca: Arc<dyn ClientCertVerifier>,
    pub(super) hosts: Vec<String>,
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
