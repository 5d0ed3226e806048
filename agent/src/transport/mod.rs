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

/// Sets the socket options a migration stream wants.
pub fn tune_socket(s: &std::net::TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a live socket fd with a pointer to a c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let reader = std::thread::spawn(move || {
            let mut r = FrameReader::new(b, path, std::time::Duration::from_secs(10)).unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                let f = r.read_frame().unwrap();
                f.verify().unwrap();
                got.push(f);
            }
            got
        });
        let mut w = FrameWriter::new(a, path, None).unwrap();
        w.send_bytes(wire::control_frame(Kind::Go, &wire::messages::Go {}))
            .unwrap();
        let ptrs: Vec<*const u8> = pages.iter().map(|p| p.as_ptr()).collect();
        for chunk in ptrs.chunks(200) {
            let meta = vec![7u8; 12];
            let data_len = chunk.len() * 4096;
            let mut h = wire::Header {
                kind: Kind::Pages,
                flags: wire::DATA_CRC,
                payload_len: (meta.len() + data_len) as u32,
                meta_len: meta.len() as u32,
                crc: 0,
            };
            // SAFETY: the pages are live Vecs of 4096 bytes owned by this test.
            let slices: Vec<&[u8]> = chunk
                .iter()
                .map(|&p| unsafe { std::slice::from_raw_parts(p, 4096) })
                .collect();
            h.crc = wire::frame_crc(&h, &meta, slices);
            let mut head = h.encode().to_vec();
            head.extend_from_slice(&meta);
            // SAFETY: every pointer is a live 4 KiB page that outlives the send (flushed below).
            unsafe { w.send_pages(head, chunk) }.unwrap();
        }
        w.flush().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got[0].header.kind, Kind::Go);
        assert_eq!(got[1].data().len(), 200 * 4096);
        assert_eq!(got[2].data().len(), 100 * 4096);
        assert_eq!(&got[2].data()[..4096], &pages[200][..]);
        assert_eq!(
            w.bytes_sent(),
            got.iter().map(|f| 24 + f.payload.len() as u64).sum::<u64>()
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
