//! Mutual TLS between agents, after QEMU's TLS migration tests (`tests/qtest/migration/
//! tls-tests.c`): matching certificates migrate (pre-copy and post-copy, verified), and every
//! mismatch is refused before a migration frame is read, with a clear error on both sides,
//! nothing registered on the destination and the source VM still running.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmig::certs::{self, Validity};
use vmig_tests::{wait_for, AgentOpts, Cluster};

const VM_ARGS: [&str; 6] = [
    "--memory-mib",
    "64",
    "--vcpus",
    "1",
    "--workload",
    "counter",
];

fn log_len(c: &Cluster, host: &str) -> usize {
    std::fs::read_to_string(&c.agent(host).log)
        .map(|s| s.len())
        .unwrap_or(0)
}

/// What `host` logged after byte `from` of its log.
fn log_since(c: &Cluster, host: &str, from: usize) -> String {
    let s = std::fs::read_to_string(&c.agent(host).log).unwrap_or_default();
    s.get(from..).unwrap_or("").to_string()
}

/// Migrating vm1 from hostA to `to` fails; the CLI's error contains `source_says`, `to`'s log
/// `dest_says`; vm1 still runs on hostA and `to` holds nothing of it.
fn refused(c: &Cluster, to: &str, source_says: &str, dest_says: &str) {
    refused_at(c, to, to, source_says, dest_says)
}

/// As [`refused`], where the agent reached for `to` is `at`.
fn refused_at(c: &Cluster, to: &str, at: &str, source_says: &str, dest_says: &str) {
    let mark = log_len(c, at);
    let o = c.migrate_raw("hostA", "vm1", to, &[]);
    assert!(!o.success(), "the migration should have been refused: {o}");
    assert!(
        o.stderr.contains(source_says),
        "the source's error does not say {source_says:?}: {o}\n{}",
        c.logs()
    );
    let said = wait_for(Duration::from_secs(5), || {
        log_since(c, at, mark).contains(dest_says).then_some(())
    });
    assert!(
        said.is_some(),
        "{at}'s log does not say {dest_says:?}:\n{}",
        log_since(c, at, mark)
    );
    assert!(
        !log_since(c, at, mark).contains("incoming migration peer="),
        "{at} read migration frames from a refused peer:\n{}",
        log_since(c, at, mark)
    );
    c.assert_stayed("vm1", "hostA", Some(at), true);
}

fn start_vm(c: &Cluster) {
    c.create_vm("hostA", "vm1", &VM_ARGS);
    c.assert_counting("hostA", "vm1", 0);
}

/// A folder for hostA with the cluster's CA certificate and a host certificate made by `f`.
fn pki_for_host_a(c: &Cluster, name: &str, f: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = c.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(c.pki_dir().join(certs::CA_CERT), dir.join(certs::CA_CERT)).unwrap();
    f(&dir);
    dir
}

#[test]
fn e2e_tls_matching_certificates_migrate_precopy_verified() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    start_vm(&c);
    let r = c.migrate("hostA", "vm1", "hostB", &[]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    let log = std::fs::read_to_string(&c.agent("hostB").log).unwrap();
    assert!(
        log.contains("TLS peer authenticated") && log.contains("peer=hostA"),
        "hostB did not authenticate hostA:\n{log}"
    );
}

#[test]
fn e2e_tls_matching_certificates_migrate_postcopy_verified() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    start_vm(&c);
    let r = c.migrate("hostA", "vm1", "hostB", &["--postcopy", "always"]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    assert!(
        r["mode"] == "post-copy" && r["postcopy"].is_object(),
        "the migration did not go through post-copy: {r:#}"
    );
}

/// The hosts file sends hostA to hostC's agent for "hostB": hostC's certificate (valid, same
/// CA) names hostC, not hostB, and hostA refuses it.
#[test]
fn e2e_tls_wrong_host_name_is_refused() {
    let mut c = Cluster::new(&[
        ("hostA", AgentOpts::new()),
        ("hostB", AgentOpts::new()),
        ("hostC", AgentOpts::new()),
    ]);
    let (a, cc) = (c.agent("hostA").port, c.agent("hostC").port);
    c.write_hosts(&[("hostA", a), ("hostB", cc), ("hostC", cc)]);
    c.restart("hostA");
    start_vm(&c);
    refused_at(
        &c,
        "hostB",
        "hostC",
        "does not name the host the hosts file says",
        "the peer refused this agent's certificate",
    );
    c.assert_clean("vm1", "hostB");
}

/// hostB's hosts file does not name hostA: its certificate, valid and from the cluster's CA,
/// names no host hostB knows.
#[test]
fn e2e_tls_peer_not_in_the_hosts_file_is_refused() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let b = c.agent("hostB").port;
    c.write_hosts(&[("hostB", b)]);
    c.restart("hostB");
    start_vm(&c);
    refused(
        &c,
        "hostB",
        "it names no host of the peer's hosts file",
        "names no host of this agent's hosts file",
    );
}

/// hostA's certificate names hostA but comes from another CA.
#[test]
fn e2e_tls_certificate_from_another_ca_is_refused() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let other = c.dir().join("other-ca");
    certs::init(&other, 10, false).unwrap();
    let dir = pki_for_host_a(&c, "pki-foreign", |d| {
        certs::issue(&other, "hostA", d, Validity::days(10)).unwrap();
    });
    c.restart_with("hostA", AgentOpts::pki_dir(dir));
    start_vm(&c);
    refused(
        &c,
        "hostB",
        "not signed by the peer's cluster CA",
        "not signed by this cluster's CA",
    );
}

/// hostA's certificate is from the cluster's CA, names hostA, and expired yesterday.
#[test]
fn e2e_tls_expired_certificate_is_refused() {
    let mut c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    let ca = c.pki_dir().to_path_buf();
    let dir = pki_for_host_a(&c, "pki-expired", |d| {
        certs::issue(&ca, "hostA", d, Validity::expired()).unwrap();
    });
    c.restart_with("hostA", AgentOpts::pki_dir(dir));
    start_vm(&c);
    refused(
        &c,
        "hostB",
        "refused this agent's certificate as expired",
        "expired or not yet valid",
    );
}

/// A plaintext (`--insecure`) source against a TLS destination.
#[test]
fn e2e_tls_plaintext_source_is_refused_by_a_tls_agent() {
    let c = Cluster::new(&[
        ("hostA", AgentOpts::insecure()),
        ("hostB", AgentOpts::new()),
    ]);
    start_vm(&c);
    refused(
        &c,
        "hostB",
        "the destination requires mutual TLS",
        "speaks the plaintext protocol",
    );
}

/// A TLS source against an `--insecure` destination.
#[test]
fn e2e_tls_source_is_refused_by_an_insecure_agent() {
    let c = Cluster::new(&[
        ("hostA", AgentOpts::new()),
        ("hostB", AgentOpts::insecure()),
    ]);
    start_vm(&c);
    refused(
        &c,
        "hostB",
        "speaks the plaintext protocol (it runs with --insecure?)",
        "opened a TLS session but this agent runs with --insecure",
    );
    let log = std::fs::read_to_string(&c.agent("hostB").log).unwrap();
    assert!(
        log.contains("INSECURE"),
        "the insecure agent did not warn at its start:\n{log}"
    );
}

/// A TLS client that trusts the cluster's CA but shows no certificate of its own.
#[test]
fn e2e_tls_anonymous_client_is_refused() {
    let c = Cluster::new(&[("hostB", AgentOpts::new())]);
    let mark = log_len(&c, "hostB");
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(c.pki_dir().join(certs::CA_CERT)).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(vmig::transport::tls::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("hostB").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", c.agent("hostB").port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // The handshake completes on this side; the refusal comes as the first read.
    let _ = tls.write_all(b"VMIG");
    let mut b = [0u8; 16];
    let r = tls.read(&mut b);
    assert!(
        matches!(r, Err(_) | Ok(0)),
        "an anonymous client got bytes from hostB: {r:?}"
    );
    if let Err(e) = &r {
        eprintln!("anonymous client: {e}");
    }
    let said = wait_for(Duration::from_secs(5), || {
        log_since(&c, "hostB", mark)
            .contains("the peer presented no certificate")
            .then_some(())
    });
    assert!(
        said.is_some(),
        "hostB's log does not name the missing certificate:\n{}",
        log_since(&c, "hostB", mark)
    );
    let list = c.json(&["--host", "hostB", "vm", "list", "--json"]);
    assert_eq!(list, serde_json::json!([]));
}

/// A TCP relay that records what the client sends.
fn recording_proxy(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        // One connection after another; the largest one recorded is the migration (an agent
        // also asks its peers about ownership generations, e.g. before `vm start`).
        while let Ok((mut client, _)) = l.accept() {
            let mut server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            let mut this = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        this.extend_from_slice(&buf[..n]);
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = server.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
            let mut r = rec.lock().unwrap();
            if this.len() > r.len() {
                *r = this;
            }
        }
    });
    (port, recorded)
}

/// A migration A → B recorded on the wire, replayed to hostC: the replayed handshake cannot
/// complete (fresh keys each session), and hostC registers nothing.
#[test]
fn e2e_tls_replayed_stream_is_refused() {
    let mut c = Cluster::new(&[
        ("hostA", AgentOpts::new()),
        ("hostB", AgentOpts::new()),
        ("hostC", AgentOpts::new()),
    ]);
    let (a, b, cc) = (
        c.agent("hostA").port,
        c.agent("hostB").port,
        c.agent("hostC").port,
    );
    let (proxy, recorded) = recording_proxy(b);
    c.write_hosts(&[("hostA", a), ("hostB", proxy), ("hostC", cc)]);
    c.restart("hostA");
    start_vm(&c);
    let r = c.migrate("hostA", "vm1", "hostB", &[]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    let stream = recorded.lock().unwrap().clone();
    assert!(
        stream.len() > 64 << 10,
        "recorded only {} bytes",
        stream.len()
    );
    assert!(
        !stream.windows(4).any(|w| w == b"VMIG"),
        "the recorded stream shows plaintext frame headers"
    );
    let mark = log_len(&c, "hostC");
    let mut s = TcpStream::connect(("127.0.0.1", cc)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&stream);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let said = wait_for(Duration::from_secs(10), || {
        log_since(&c, "hostC", mark)
            .contains("refused an incoming migration connection")
            .then_some(())
    });
    assert!(
        said.is_some(),
        "hostC did not refuse the replay:\n{}",
        log_since(&c, "hostC", mark)
    );
    c.assert_clean("vm1", "hostC");
}

/// Both agents `--insecure` (they agree): plaintext over writev one way and io_uring's
/// zero-copy sender the other, verified.
#[test]
fn e2e_insecure_agents_migrate_in_plaintext_over_both_io_paths() {
    let c = Cluster::new(&[
        ("hostA", AgentOpts::insecure()),
        ("hostB", AgentOpts::insecure()),
    ]);
    start_vm(&c);
    let r = c.migrate("hostA", "vm1", "hostB", &["--io", "plain"]);
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
    assert_eq!(r["io_path"], "plain", "{r:#}");
    let back = c.migrate("hostB", "vm1", "hostA", &["--io", "uring"]);
    c.assert_migrated(&back, "vm1", "hostB", "hostA");
    assert_eq!(back["io_path"], "io_uring", "{back:#}");
}

/// `--io uring` over TLS is refused with the reason (it would send guest pages in clear), and
/// the VM stays.
#[test]
fn e2e_tls_refuses_the_plaintext_io_uring_sender() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    start_vm(&c);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--io", "uring"]);
    assert!(!o.success(), "{o}");
    assert!(o.stderr.contains("needs --insecure"), "{o}");
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
}
