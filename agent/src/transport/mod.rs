//! Moving frames over TCP: an io_uring sender that sends page data straight from guest
//! memory (`IORING_OP_SENDMSG` with one iovec per guest page, no copy into a buffer), an
//! io_uring receiver, and plain-socket fallbacks where io_uring is unavailable; between
//! agents, mutual TLS ([`tls`]) unless both run `--insecure`.

mod pacer;
mod receiver;
mod record;
mod sender;
pub mod tls;
#[cfg(test)]
mod tls_tests;

use serde::{Deserialize, Serialize};

pub use pacer::Pacer;
pub use receiver::{FrameReader, RecvError};
pub use sender::{FrameSink, FrameWriter};
pub use tls::{Channel, Security};

/// Which I/O path to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoPath {
    /// io_uring where the kernel allows it, else plain sockets.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Plain `writev`/`read` system calls.
    Plain,
}

/// How long a peer may stay silent before the connection is declared dead: data unacknowledged
/// this long (`TCP_USER_TIMEOUT`), or an idle connection whose keepalive probes go unanswered
/// (one per second after one idle second, [`KEEPALIVE_PROBES`] of them). A cut link or a dead
/// host is noticed within seconds in every phase, not after the minute-long read timeouts.
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Unanswered keepalive probes before an idle connection is dead.
pub const KEEPALIVE_PROBES: libc::c_int = 4;

fn setsockopt(
    s: &std::net::TcpStream,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt on a live socket fd with a pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the socket options a migration stream wants: no Nagle, 8 MiB buffers, and dead-peer
/// detection within [`PEER_TIMEOUT`].
pub fn tune_socket(s: &std::net::TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        setsockopt(s, libc::SOL_SOCKET, opt, size)?;
    }
    setsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES)?;
    setsockopt(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        PEER_TIMEOUT.as_millis() as libc::c_int,
    )?;
    Ok(())
}

/// Whether `e` says the peer stopped answering (the kernel gave up on it).
pub fn is_peer_silent(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{GuestRam, PageRef};
    use crate::wire::pages::{PageFrameBuilder, PageFrameKind};
    use crate::wire::{self, Kind};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn frames_cross(path: IoPath) {
        let (a, b) = pair();
        let pages: Vec<Vec<u8>> = (0..300u32).map(|i| vec![(i % 251) as u8; 4096]).collect();
        let ram = GuestRam::new(16 << 20).unwrap();
        for (i, p) in pages.iter().enumerate() {
            ram.write_page(i as u64, p).unwrap();
        }
        let reader = std::thread::spawn(move || {
            let mut r = FrameReader::new(b, path, std::time::Duration::from_secs(10)).unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(r.read_frame().unwrap());
            }
            got
        });
        let mut w = FrameWriter::new(a, path, None).unwrap();
        w.send_bytes(wire::control_frame(&wire::messages::Go {}))
            .unwrap();
        let refs: Vec<PageRef<'_>> = (0..pages.len() as u64)
            .map(|i| ram.page(i).unwrap())
            .collect();
        let mut frame = PageFrameBuilder::new(PageFrameKind::Pages);
        for (c, chunk) in refs.chunks(200).enumerate() {
            for p in chunk {
                frame.push(p.index(), false);
            }
            let head =
                frame.head_checked(pages[c * 200..c * 200 + chunk.len()].iter().map(|p| &p[..]));
            // SAFETY: `ram` outlives the writer's sends (flushed below).
            unsafe { w.send_pages(head, chunk) }.unwrap();
        }
        w.flush().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got[0].kind(), Kind::Go);
        assert_eq!(got[1].data().len(), 200 * 4096);
        assert_eq!(got[2].data().len(), 100 * 4096);
        assert_eq!(&got[2].data()[..4096], &pages[200][..]);
        assert_eq!(
            w.bytes_sent(),
            got.iter().map(|f| f.wire_len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn frames_cross_with_io_uring() {
        frames_cross(IoPath::Uring);
    }

    #[test]
    fn frames_cross_with_plain_sockets() {
        frames_cross(IoPath::Plain);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (a, b) = pair();
        drop(a);
        let mut r = FrameReader::new(b, IoPath::Auto, std::time::Duration::from_secs(5)).unwrap();
        assert!(r.read_frame().is_err());
    }
}
