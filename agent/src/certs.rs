//! The cluster's keys and certificates: one certificate authority (CA), and for each host a
//! key and a certificate signed by the CA that names the host (its name as a DNS subject
//! alternative name). Agents authenticate each other with them (mutual TLS, see
//! [`crate::transport::tls`]).
//!
//! A folder (`--pki-dir`, default [`DEFAULT_DIR`]) holds, every file mode 0600:
//!
//! | file | what | needed by |
//! |---|---|---|
//! | `ca.crt` | the CA's certificate | every agent |
//! | `ca.key` | the CA's key | only `vmig certs issue` (keep it off the hosts in production) |
//! | `HOST.crt` | HOST's certificate, signed by the CA | HOST's agent |
//! | `HOST.key` | HOST's key | HOST's agent |

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The default folder of the keys and certificates.
pub const DEFAULT_DIR: &str = "/etc/vmig/pki";
/// The CA's certificate, in the folder.
pub const CA_CERT: &str = "ca.crt";
/// The CA's key, in the folder.
pub const CA_KEY: &str = "ca.key";

/// Errors creating or reading keys and certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file or folder could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// The file is there already (pass `--force` to replace it).
    #[error("{0} exists already (--force replaces it)")]
    Exists(PathBuf),
    /// A host name that cannot be a certificate's DNS name.
    #[error("{0:?} cannot name a host in a certificate (letters, digits, '-' and '.' only)")]
    BadHost(String),
    /// Key generation, signing or parsing failed.
    #[error("{what}: {cause}")]
    Rcgen {
        /// What was being done.
        what: String,
        /// Cause.
        cause: rcgen::Error,
    },
}

/// The folder of the keys and certificates: `$VMIG_PKI_DIR`, else [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os("VMIG_PKI_DIR")
        .map(Into::into)
        .unwrap_or_else(|| DEFAULT_DIR.into())
}

/// The certificate of `host` in `dir`.
pub fn host_cert(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}.crt"))
}

/// The key of `host` in `dir`.
pub fn host_key(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}.key"))
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not before.
    pub not_before: OffsetDateTime,
    /// Not after.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) to `days` from now.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A certificate that expired yesterday (tests: an expired certificate must be refused).
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// Whether `host` can be a certificate's DNS name (and so an agent's name under TLS).
pub fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && rustls_pki_types::DnsName::try_from(host).is_ok()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |cause| CertError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |cause| CertError::Rcgen { what, cause }
}

/// Creates `dir` (mode 0700) if missing.
fn make_dir(dir: &Path) -> Result<(), CertError> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Writes `text` to `path` with mode 0600 (replacing the file only with `force`).
fn write_private(path: &Path, text: &str, force: bool) -> Result<(), CertError> {
    if path.exists() {
        if !force {
            return Err(CertError::Exists(path.to_path_buf()));
        }
        fs::remove_file(path).map_err(io_err(path))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))?;
    // The mode given at creation is masked by the umask: set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// The CA's subject and constraints. A host certificate's issuer is the CA's name and key
/// (its authority key identifier is derived from the key), so the CA's key and these
/// parameters sign as the CA without parsing its certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "vmig cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Creates a new CA in `dir`: `ca.key` and `ca.crt` (valid `days`). Returns the certificate's
/// path. Refuses to replace an existing CA unless `force`.
pub fn init(dir: &Path, days: i64, force: bool) -> Result<PathBuf, CertError> {
    make_dir(dir)?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !force {
        for p in [&cert, &key] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    let k = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut params = ca_params();
    let v = Validity::days(days);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
    let c = params
        .self_signed(&k)
        .map_err(rc("signing the CA certificate"))?;
    write_private(&key, &k.serialize_pem(), force)?;
    write_private(&cert, &c.pem(), force)?;
    Ok(cert)
}

/// Issues a key and a certificate for `host`, signed by the CA of `ca_dir`, into `out_dir`
/// (`HOST.key`, `HOST.crt`), replacing any there. Returns (certificate, key) paths.
pub fn issue(
    ca_dir: &Path,
    host: &str,
    out_dir: &Path,
    valid: Validity,
) -> Result<(PathBuf, PathBuf), CertError> {
    if !valid_host(host) {
        return Err(CertError::BadHost(host.into()));
    }
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)
        .map_err(rc(format!("reading {}", ca_key_path.display())))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let k = KeyPair::generate().map_err(rc(format!("generating the key of {host}")))?;
    let mut params =
        CertificateParams::new(vec![host.to_string()]).map_err(rc(format!("naming {host}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // An agent is a server (incoming migrations) and a client (outgoing ones).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = valid.not_before;
    params.not_after = valid.not_after;
    let c = params
        .signed_by(&k, &issuer)
        .map_err(rc(format!("signing the certificate of {host}")))?;
    make_dir(out_dir)?;
    let (cert, key) = (host_cert(out_dir, host), host_key(out_dir, host));
    write_private(&key, &k.serialize_pem(), true)?;
    write_private(&cert, &c.pem(), true)?;
    Ok((cert, key))
}

/// A CA and a certificate for each of `hosts` in `dir` (a new CA replaces any there): what
/// the demo, the tests and the benchmarks run their local agents with.
pub fn cluster(dir: &Path, hosts: &[&str]) -> Result<(), CertError> {
    init(dir, 30, true)?;
    for h in hosts {
        issue(dir, h, dir, Validity::days(30))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn init_and_issue_write_private_files_and_refuse_to_overwrite_a_ca() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("pki");
        init(&dir, 10, false).unwrap();
        assert!(matches!(init(&dir, 10, false), Err(CertError::Exists(_))));
        issue(&dir, "hostB", &dir, Validity::days(10)).unwrap();
        for f in [CA_CERT, CA_KEY, "hostB.crt", "hostB.key"] {
            let m = fs::metadata(dir.join(f)).unwrap();
            assert_eq!(m.mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert!(matches!(
            issue(&dir, "bad name", &dir, Validity::days(1)),
            Err(CertError::BadHost(_))
        ));
    }

    #[test]
    fn host_names_must_be_dns_names() {
        assert!(valid_host("hostA"));
        assert!(valid_host("node-1.rack2"));
        assert!(!valid_host(""));
        assert!(!valid_host("a b"));
        assert!(!valid_host("../x"));
    }
}
