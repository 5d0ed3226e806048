//! The TLS channel over loopback, without KVM: frames cross both ways, a reader blocked on
//! one thread never holds up a writer on another, buffered frames are seen without the
//! socket, and io_uring's plaintext path is refused on an encrypted channel.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tls::{Channel, Security, TlsConfig, TlsError};
use super::{FrameReader, FrameWriter, IoPath};
use crate::certs::{self, Validity};
use crate::wire::{self, messages as msg, Kind};

struct Pair {
    _dir: tempfile::TempDir,
    a: Security,
    b: Security,
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    certs::cluster(dir.path(), &["hostA", "hostB"]).unwrap();
    let hosts: HashMap<String, String> = [("hostA", "127.0.0.1:1"), ("hostB", "127.0.0.1:2")]
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect();
    let load = |n| Security::Tls(Arc::new(TlsConfig::load(n, dir.path(), &hosts).unwrap()));
    Pair {
        a: load("hostA"),
        b: load("hostB"),
        _dir: dir,
    }
}

/// hostA connects to hostB: (source side, destination side).
fn connect(p: &Pair) -> (Channel, Channel) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let b = p.b.clone();
    let server = std::thread::spawn(move || b.accept(l.accept().unwrap().0));
    let sock = TcpStream::connect(addr).unwrap();
    let a = p.a.connect(sock, addr, "hostB").unwrap();
    (a, server.join().unwrap().unwrap())
}

fn go() -> Vec<u8> {
    wire::control_frame(&msg::Go {})
}

#[test]
fn tls_frames_cross_both_ways_with_the_peer_identified() {
    let p = pair();
    let (a, b) = connect(&p);
    assert_eq!(a.peer(), Some("hostB"));
    assert_eq!(b.peer(), Some("hostA"));
    assert_eq!(a.suite(), Some("TLS13_AES_128_GCM_SHA256"));
    let ram = crate::vm::memory::GuestRam::new(16 << 20).unwrap();
    for i in 0..256u64 {
        ram.write_page(i, &[(i % 251) as u8; 4096]).unwrap();
    }
    let reader = std::thread::spawn(move || {
        let mut r = FrameReader::on(&b, IoPath::Auto, Duration::from_secs(10)).unwrap();
        assert_eq!(r.peer(), Some("hostA"));
        let f = r.read_frame().unwrap();
        let g = r.read_frame().unwrap();
        let mut w = FrameWriter::on(&b, IoPath::Plain, None).unwrap();
        w.send_bytes(go()).unwrap();
        (f, g)
    });
    let mut w = FrameWriter::on(&a, IoPath::Auto, None).unwrap();
    assert!(w.encrypted() && !w.uses_uring());
    w.send_bytes(go()).unwrap();
    let mut frame = wire::pages::PageFrameBuilder::new(wire::pages::PageFrameKind::Pages);
    let pages: Vec<_> = (0..256u64).map(|i| ram.page(i).unwrap()).collect();
    for p in &pages {
        frame.push(p.index(), false);
    }
    let head = frame.head();
    // SAFETY: the pages are of `ram`, which outlives the writer's flush below.
    unsafe { w.send_pages(head, &pages) }.unwrap();
    w.flush().unwrap();
    let mut r = FrameReader::on(&a, IoPath::Plain, Duration::from_secs(10)).unwrap();
    assert_eq!(r.read_frame().unwrap().kind(), Kind::Go);
    let (f, g) = reader.join().unwrap();
    assert_eq!(f.kind(), Kind::Go);
    assert_eq!(g.data().len(), 256 * 4096);
    assert_eq!(&g.data()[255 * 4096..], &[255u8 % 251; 4096][..]);
}

#[test]
fn a_blocked_tls_reader_does_not_hold_up_a_writer_on_another_thread() {
    let p = pair();
    let (a, b) = connect(&p);
    // b's reader waits for a frame that a only sends after it got b's sink's frame.
    let reader = std::thread::spawn({
        let mut r = FrameReader::on(&b, IoPath::Plain, Duration::from_secs(10)).unwrap();
        move || r.read_frame().map(|f| f.kind())
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut sink = FrameWriter::on(&b, IoPath::Plain, None)
        .unwrap()
        .sink()
        .unwrap();
    let t = Instant::now();
    sink.write_all(&go()).unwrap();
    let mut ra = FrameReader::on(&a, IoPath::Plain, Duration::from_secs(5)).unwrap();
    assert_eq!(ra.read_frame().unwrap().kind(), Kind::Go);
    assert!(t.elapsed() < Duration::from_secs(2));
    FrameWriter::on(&a, IoPath::Plain, None)
        .unwrap()
        .send_bytes(go())
        .unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), Kind::Go);
}

#[test]
fn frames_already_decrypted_show_as_buffered() {
    let p = pair();
    let (a, b) = connect(&p);
    let w = FrameWriter::on(&a, IoPath::Plain, None).unwrap();
    let mut two = go();
    two.extend_from_slice(&go());
    // Both frames in one write: one read of the socket brings both.
    w.sink().unwrap().write_all(&two).unwrap();
    let mut r = FrameReader::on(&b, IoPath::Plain, Duration::from_secs(5)).unwrap();
    r.read_frame().unwrap();
    assert!(r.buffered(), "the second frame is here already");
    r.read_frame().unwrap();
    assert!(!r.buffered());
}

#[test]
fn io_uring_plaintext_sends_are_refused_on_an_encrypted_channel() {
    let p = pair();
    let (a, _b) = connect(&p);
    let e = FrameWriter::on(&a, IoPath::Uring, None).unwrap_err();
    assert!(e.to_string().contains("--insecure"), "{e}");
}

#[test]
fn an_expired_certificate_is_refused_in_the_handshake() {
    let p = pair();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        p._dir.path().join(certs::CA_CERT),
        dir.path().join(certs::CA_CERT),
    )
    .unwrap();
    certs::issue(p._dir.path(), "hostA", dir.path(), Validity::expired()).unwrap();
    let hosts: HashMap<String, String> = [
        ("hostA".into(), "127.0.0.1:1".into()),
        ("hostB".into(), "127.0.0.1:2".into()),
    ]
    .into();
    let old = Security::Tls(Arc::new(
        TlsConfig::load("hostA", dir.path(), &hosts).unwrap(),
    ));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let b = p.b.clone();
    let server = std::thread::spawn(move || b.accept(l.accept().unwrap().0));
    let e = old
        .connect(TcpStream::connect(addr).unwrap(), addr, "hostB")
        .unwrap_err();
    assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    let s = server.join().unwrap().unwrap_err();
    assert!(s.to_string().contains("expired"), "{s}");
}

#[test]
fn a_destination_not_in_the_hosts_file_is_refused_before_the_handshake() {
    let p = pair();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let e =
        p.a.connect(TcpStream::connect(addr).unwrap(), addr, &addr.to_string())
            .unwrap_err();
    assert!(matches!(e, TlsError::NotInHosts { .. }), "{e}");
}

#[test]
fn an_agent_whose_certificate_names_another_host_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    certs::cluster(dir.path(), &["hostC"]).unwrap();
    std::fs::copy(
        certs::host_cert(dir.path(), "hostC"),
        certs::host_cert(dir.path(), "hostB"),
    )
    .unwrap();
    std::fs::copy(
        certs::host_key(dir.path(), "hostC"),
        certs::host_key(dir.path(), "hostB"),
    )
    .unwrap();
    let e = TlsConfig::load("hostB", dir.path(), &HashMap::new()).unwrap_err();
    assert!(e.to_string().contains("does not name host hostB"), "{e}");
    let missing = TlsConfig::load("hostD", dir.path(), &HashMap::new()).unwrap_err();
    assert!(matches!(missing, TlsError::Load { .. }), "{missing}");
}
