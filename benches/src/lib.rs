//! Benchmark helpers: local agents spawned from the release binary (the end-to-end tests'
//! [`Cluster`]), and the loopback baselines every figure is compared with in the same run.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod qemu;

/// Where a benchmark writes its JSON results: `$CARGO_TARGET_DIR` (or the workspace's
/// `target/`), created if missing.
pub fn results_path(file: &str) -> PathBuf {
    let dir = target_dir();
    let _ = std::fs::create_dir_all(&dir);
    dir.join(file)
}

/// The workspace's target folder (`CARGO_TARGET_DIR`, else `target/` at the root), where
/// `cargo xtask bench` builds the release `vmig` the benches run.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

pub use vmig_tests::{AgentOpts, Cluster, ClusterOpts};

/// How long a benchmark's CLI command may run (a migration of a large VM under a low
/// `--bandwidth` takes minutes).
const CLI_TIMEOUT: Duration = Duration::from_secs(3600);

/// Starts agents `names` with the `vmig` binary at `exe` (mutual TLS): the end-to-end tests'
/// [`Cluster`], agents logging at `warn` only.
pub fn cluster(exe: &Path, names: &[&str]) -> Cluster {
    cluster_with(exe, names, false)
}

/// Starts agents `names` with the `vmig` binary at `exe`: with mutual TLS, or all
/// `--insecure`.
pub fn cluster_with(exe: &Path, names: &[&str], insecure: bool) -> Cluster {
    let agent = AgentOpts {
        insecure,
        log: Some("warn".into()),
        ..AgentOpts::default()
    };
    let hosts: Vec<(&str, AgentOpts)> = names.iter().map(|n| (*n, agent.clone())).collect();
    let opts = ClusterOpts {
        bin: Some(exe.to_path_buf()),
        cli_timeout: Some(CLI_TIMEOUT),
    };
    Cluster::with(&opts, &hosts)
}

/// Plain loopback TCP: `bytes` written with `write_all` from a 1 MiB buffer, read into a
/// 1 MiB buffer. Returns bytes per second.
pub fn loopback_tcp(bytes: u64) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        vmig::transport::tune_socket(&s).expect("tune");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while n < bytes {
            let r = s.read(&mut buf).expect("read");
            assert!(r > 0, "closed early");
            n += r as u64;
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    vmig::transport::tune_socket(&s).expect("tune");
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&buf).expect("write");
        sent += buf.len() as u64;
    }
    reader.join().expect("reader");
    bytes as f64 / t.elapsed().as_secs_f64()
}

/// Round trip of a 1-byte ping-pong over loopback TCP, median of `n`, in µs.
pub fn loopback_rtt_us(n: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut v = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b).expect("write");
        s.read_exact(&mut b).expect("read");
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    let _ = echo.join();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}

/// The migration stream's sender alone: `bytes` of page frames (256 pages a frame, data
/// straight from a buffer standing in for guest memory) through [`vmig::transport::FrameWriter`],
/// to a reader that reads and discards. Returns bytes per second.
pub fn frame_sender(bytes: u64, io: vmig::transport::IoPath) -> f64 {
    use vmig::wire::pages::{PageFrameBuilder, PageFrameKind};
    let memory = vmig::vm::memory::GuestRam::new(64 << 20).expect("memory");
    for i in 0..memory.pages() {
        memory.write_page(i, &[0x6bu8; 4096]).expect("fill");
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        vmig::transport::tune_socket(&s).expect("tune");
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(r) = s.read(&mut buf) {
            if r == 0 {
                break;
            }
        }
    });
    let s = TcpStream::connect(addr).expect("connect");
    vmig::transport::tune_socket(&s).expect("tune");
    let mut w = vmig::transport::FrameWriter::new(s, io, None).expect("writer");
    let pages_total = memory.pages() as usize;
    let t = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut frame = PageFrameBuilder::new(PageFrameKind::Pages);
    while sent < bytes {
        let idx: Vec<u64> = (0..256)
            .map(|i| ((next + i) % pages_total) as u64)
            .collect();
        next = (next + 256) % pages_total;
        for &index in &idx {
            frame.push(index, false);
        }
        let refs: Vec<_> = idx
            .iter()
            .map(|&i| memory.page(i).expect("inside"))
            .collect();
        let head = frame.head();
        // SAFETY: the pages are of `memory`, which outlives the writer (it is flushed and
        // dropped below, before `memory`).
        unsafe { w.send_pages(head, &refs) }.expect("send");
        sent += (refs.len() * 4096) as u64;
    }
    w.flush().expect("flush");
    let secs = t.elapsed().as_secs_f64();
    drop(w);
    reader.join().expect("reader");
    sent as f64 / secs
}

/// The encrypted sender: as [`frame_sender`], over a mutual-TLS channel between two agents'
/// identities (a cluster CA made for the run), to a receiver that decrypts every frame
/// (through [`vmig::transport::FrameReader`]). Returns plaintext bytes per second.
pub fn tls_frame_sender(bytes: u64) -> f64 {
    use std::collections::HashMap;
    use std::sync::Arc;
    use vmig::transport::tls::TlsConfig;
    use vmig::transport::{FrameReader, FrameWriter, IoPath, Security};
    use vmig::wire::pages::{PageFrameBuilder, PageFrameKind};
    let dir = std::env::temp_dir().join(format!("vmig-bench-tls-{}", std::process::id()));
    vmig::certs::cluster(&dir, &["hostA", "hostB"]).expect("certificates");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let hosts: HashMap<String, String> = [
        ("hostA".to_string(), "127.0.0.1:1".to_string()),
        ("hostB".to_string(), addr.to_string()),
    ]
    .into();
    let load = |n: &str| Security::Tls(Arc::new(TlsConfig::load(n, &dir, &hosts).expect("tls")));
    let (a, b) = (load("hostA"), load("hostB"));
    let reader = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        vmig::transport::tune_socket(&s).expect("tune");
        let ch = b.accept(s).expect("TLS accept");
        let mut r = FrameReader::on(&ch, IoPath::Plain, Duration::from_secs(30)).expect("reader");
        while r.read_frame().is_ok() {}
    });
    let s = TcpStream::connect(addr).expect("connect");
    vmig::transport::tune_socket(&s).expect("tune");
    let ch = a.connect(s, addr, "hostB").expect("TLS connect");
    let mut w = FrameWriter::on(&ch, IoPath::Plain, None).expect("writer");
    let memory = vmig::vm::memory::GuestRam::new(64 << 20).expect("memory");
    for i in 0..memory.pages() {
        memory.write_page(i, &[0x6bu8; 4096]).expect("fill");
    }
    let pages_total = memory.pages() as usize;
    let t = Instant::now();
    let (mut sent, mut next) = (0u64, 0usize);
    let mut frame = PageFrameBuilder::new(PageFrameKind::Pages);
    while sent < bytes {
        let idx: Vec<u64> = (0..256)
            .map(|i| ((next + i) % pages_total) as u64)
            .collect();
        next = (next + 256) % pages_total;
        for &index in &idx {
            frame.push(index, false);
        }
        let refs: Vec<_> = idx
            .iter()
            .map(|&i| memory.page(i).expect("inside"))
            .collect();
        let head = frame.head();
        // SAFETY: the pages are of `memory`, which outlives the writer (flushed and dropped
        // below, before `memory`).
        unsafe { w.send_pages(head, &refs) }.expect("send");
        sent += (refs.len() * 4096) as u64;
    }
    w.flush().expect("flush");
    let secs = t.elapsed().as_secs_f64();
    let _ = ch.socket().shutdown(std::net::Shutdown::Both);
    drop(w);
    reader.join().expect("reader");
    let _ = std::fs::remove_dir_all(&dir);
    sent as f64 / secs
}

/// Panics, loudly, unless the migration report `r` carries verification digests and both the
/// memory and the vCPU digests of the two sides are equal. Benchmarks run with `--verify`: a
/// figure from a migration that lost or corrupted memory is worthless.
pub fn assert_verified(what: &str, r: &serde_json::Value) {
    let v = &r["verification"];
    assert!(
        v.is_object(),
        "{what}: the report has no verification (was --verify passed?): {r}"
    );
    for (equal, a, b) in [
        ("memory_equal", "source_memory", "dest_memory"),
        ("vcpus_equal", "source_vcpus", "dest_vcpus"),
    ] {
        assert!(
            v[equal].as_bool() == Some(true),
            "{what}: DIGESTS DIFFER: {equal} is false: source {} destination {}",
            v[a],
            v[b]
        );
    }
}

/// The median of `v` (the upper middle for an even length); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Fills the first `data_mib` MiB of `path` with non-zero bytes.
pub fn fill(path: &Path, data_mib: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut chunk = vec![0u8; (1u64 << 20) as usize];
    for m in 0..data_mib {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u64).wrapping_mul(m + 7) as u8 | 1;
        }
        f.write_all_at(&chunk, m * (1u64 << 20)).unwrap();
    }
    f.sync_all().unwrap();
}

/// A plain copy of `src` over loopback TCP into a new file beside it, written through the page
/// cache and synced (what `nc | dd conv=fdatasync` does). Bytes/s.
pub fn plain_copy(src: &Path) -> f64 {
    copy_over_tcp(src, false)
}

/// [`plain_copy`] with the receiver writing 1 MiB at a time with `O_DIRECT` from an aligned
/// buffer (what `nc | dd oflag=direct` does): the baseline for a receiver that bypasses the
/// page cache as vmig's does. Bytes/s.
pub fn plain_copy_direct(src: &Path) -> f64 {
    copy_over_tcp(src, true)
}

fn copy_over_tcp(src: &Path, direct: bool) -> f64 {
    use std::os::unix::fs::OpenOptionsExt;
    let dst = src.with_extension("copy");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Instant::now();
    let recv = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            let out = o.open(&dst).unwrap();
            let mut raw = vec![0u8; (1 << 20) + 4096];
            let start = raw.as_ptr().align_offset(4096);
            let buf = &mut raw[start..start + (1 << 20)];
            let mut at = 0u64;
            loop {
                // Whole buffers (direct I/O wants aligned lengths), the last one short.
                let mut n = 0;
                while n < buf.len() {
                    match s.read(&mut buf[n..]).unwrap() {
                        0 => break,
                        k => n += k,
                    }
                }
                if n == 0 {
                    break;
                }
                if direct && n % 4096 != 0 {
                    let whole = n / 4096 * 4096;
                    out.write_all_at(&buf[..whole], at).unwrap();
                    let tail = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
                    tail.write_all_at(&buf[whole..n], at + whole as u64)
                        .unwrap();
                    tail.sync_data().unwrap();
                } else {
                    out.write_all_at(&buf[..n], at).unwrap();
                }
                at += n as u64;
            }
            out.sync_data().unwrap();
            at
        })
    };
    let mut f = File::open(src).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
    }
    drop(s);
    let bytes = recv.join().unwrap();
    let rate = bytes as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&dst);
    rate
}
