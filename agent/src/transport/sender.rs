//! The frame sender: io_uring `SENDMSG` from guest memory, one frame in flight while the
//! next is prepared, or plain `writev` as the fallback; or, on a TLS channel, encrypted (a
//! copy of each page into the TLS records: without kernel TLS the kernel cannot send the
//! guest's pages itself).

use std::net::TcpStream;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::tls::{Channel, TlsWriter};
use super::{IoPath, Pacer};
use crate::guest::layout::PAGE_SIZE;
use crate::vm::memory::PageRef;

/// A frame the kernel may still be reading: its buffers must live until completion.
struct InFlight {
    _head: Vec<u8>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    /// Bytes still to send.
    left: usize,
}

enum Path {
    Uring(Box<IoUring>),
    Plain,
    Tls(TlsWriter),
}

/// A second writer of whole frames on the same connection (the post-copy uplink): each
/// `write_all` call must carry whole frames, and the caller serialises them with the
/// connection's other writer.
pub enum FrameSink {
    /// Plaintext, straight to the socket.
    Plain(TcpStream),
    /// Through the connection's TLS session.
    Tls(TlsWriterHandle),
}

/// The TLS side of a [`FrameSink`].
pub struct TlsWriterHandle(TlsWriter);

impl std::io::Write for FrameSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            FrameSink::Plain(s) => s.write(buf),
            FrameSink::Tls(t) => t.0.send(&[buf]).map(|_| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for FrameSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameSink::Plain(_) => "FrameSink::Plain",
            FrameSink::Tls(_) => "FrameSink::Tls",
        })
    }
}

/// Sends frames on a TCP stream.
pub struct FrameWriter {
    sock: TcpStream,
    path: Path,
    inflight: Option<InFlight>,
    pacer: Option<Pacer>,
    sent: u64,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("uring", &self.uses_uring())
            .field("sent", &self.sent)
            .finish()
    }
}

impl FrameWriter {
    /// A sender on a migration channel: encrypted through its TLS session if it has one
    /// (io_uring's zero-copy send would put the guest's pages on the wire in clear, so
    /// `IoPath::Uring` is refused there), else as [`FrameWriter::new`].
    pub fn on(ch: &Channel, path: IoPath, bandwidth: Option<f64>) -> std::io::Result<Self> {
        let pacer = bandwidth
            .map(Pacer::new)
            .transpose()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let Some(tls) = ch.tls_writer() else {
            return Self::new(ch.socket().try_clone()?, path, bandwidth);
        };
        if path == IoPath::Uring {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "--io uring sends guest pages unencrypted (no kernel TLS here): it needs --insecure on both agents",
            ));
        }
        Ok(Self {
            sock: ch.socket().try_clone()?,
            path: Path::Tls(tls),
            inflight: None,
            pacer,
            sent: 0,
        })
    }

    /// A sender on `sock`; `bandwidth` caps it in bytes per second (positive and finite).
    pub fn new(sock: TcpStream, path: IoPath, bandwidth: Option<f64>) -> std::io::Result<Self> {
        let pacer = bandwidth
            .map(Pacer::new)
            .transpose()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let path = match path {
            IoPath::Plain => Path::Plain,
            IoPath::Uring => Path::Uring(Box::new(IoUring::new(8)?)),
            IoPath::Auto => match IoUring::new(8) {
                Ok(r) => Path::Uring(Box::new(r)),
                Err(e) => {
                    tracing::warn!(cause = %e, "io_uring unavailable, sending with plain writev");
                    Path::Plain
                }
            },
        };
        Ok(Self {
            sock,
            path,
            inflight: None,
            pacer,
            sent: 0,
        })
    }

    /// Whether io_uring carries the frames.
    pub fn uses_uring(&self) -> bool {
        matches!(self.path, Path::Uring(_))
    }

    /// Whether frames are encrypted (TLS).
    pub fn encrypted(&self) -> bool {
        matches!(self.path, Path::Tls(_))
    }

    /// Another writer of whole frames on this connection (see [`FrameSink`]). Frames this
    /// writer sent are complete on the wire once `flush` returned.
    pub fn sink(&self) -> std::io::Result<FrameSink> {
        Ok(match &self.path {
            Path::Tls(t) => FrameSink::Tls(TlsWriterHandle(t.clone())),
            _ => FrameSink::Plain(self.sock.try_clone()?),
        })
    }

    /// Bytes handed to the socket (before encryption).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// The socket (to shut it down from a canceller).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Sends a frame whose bytes are all in `bytes` (control frames).
    pub fn send_bytes(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        // SAFETY: no pages are passed.
        unsafe { self.send_pages(bytes, &[]) }?;
        self.flush()
    }

    /// Sends `head` (frame header and metadata) followed by the guest pages `pages`, without
    /// copying them. Returns once the frame is submitted; the previous frame is complete by
    /// then.
    ///
    /// # Safety
    /// The guest memory the pages belong to must stay mapped until the next call on this
    /// writer (`send_*` or `flush`) returns: the kernel reads the pages after this returns,
    /// beyond the pages' borrow. Guest memory qualifies when its VM outlives the migration.
    pub unsafe fn send_pages(
        &mut self,
        head: Vec<u8>,
        pages: &[PageRef<'_>],
    ) -> std::io::Result<()> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.send_frame(head, pages) }
    }

    /// Like [`FrameWriter::send_pages`], for a frame someone waits for (a post-copy answer):
    /// the caller sends it before any queued push frame, and it waits for the bandwidth limit
    /// like every frame, so `--bandwidth` is a cap in post-copy too.
    ///
    /// # Safety
    /// As [`FrameWriter::send_pages`].
    pub unsafe fn send_pages_now(
        &mut self,
        head: Vec<u8>,
        pages: &[PageRef<'_>],
    ) -> std::io::Result<()> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.send_frame(head, pages) }
    }

    /// How long until the bandwidth limit lets the next frame go (zero without a limit).
    pub fn pace_delay(&self) -> std::time::Duration {
        self.pacer
            .as_ref()
            .map_or(std::time::Duration::ZERO, Pacer::delay)
    }

    /// # Safety
    /// As [`FrameWriter::send_pages`].
    unsafe fn send_frame(&mut self, head: Vec<u8>, pages: &[PageRef<'_>]) -> std::io::Result<()> {
        self.flush()?;
        let total = head.len() + pages.len() * PAGE_SIZE as usize;
        if let Some(p) = &mut self.pacer {
            p.wait(total as u64);
        }
        let mut iov = Vec::with_capacity(pages.len() + 1);
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iov.extend(pages.iter().map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: PAGE_SIZE as usize,
        }));
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        let mut f = InFlight {
            _head: head,
            iov,
            msg,
            left: total,
        };
        match &mut self.path {
            Path::Tls(t) => {
                let mut parts: Vec<&[u8]> = Vec::with_capacity(pages.len() + 1);
                parts.push(&f._head);
                // SAFETY: each `PageRef` is a whole 4 KiB page inside the live guest mapping,
                // which stays mapped until this call returns (the send is complete, encrypted
                // into the session's buffers, before it does). The guest may write a page
                // while it is read (a running round): the bytes read are what is sent and
                // authenticated, and such a page is dirty again and sent again.
                parts.extend(pages.iter().map(|p| unsafe {
                    std::slice::from_raw_parts(p.as_ptr(), PAGE_SIZE as usize)
                }));
                t.send(&parts)?;
                self.sent += total as u64;
            }
            Path::Plain => {
                writev_all(&self.sock, &mut f)?;
                self.sent += total as u64;
            }
            Path::Uring(ring) => {
                submit(ring, &self.sock, &mut f)?;
                self.inflight = Some(f);
            }
        }
        Ok(())
    }

    /// Waits until the frame in flight has been handed to the socket.
    pub fn flush(&mut self) -> std::io::Result<()> {
        let Some(mut f) = self.inflight.take() else {
            return Ok(());
        };
        let Path::Uring(ring) = &mut self.path else {
            unreachable!("only io_uring leaves frames in flight")
        };
        loop {
            ring.submit_and_wait(1)?;
            let cqe = ring.completion().next().expect("a completion after wait");
            let n = cqe.result();
            if n < 0 {
                return Err(std::io::Error::from_raw_os_error(-n));
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.sent += n as u64;
            advance(&mut f, n as usize);
            if f.left == 0 {
                return Ok(());
            }
            // A short send (signal, or the peer's window): send the rest.
            submit(ring, &self.sock, &mut f)?;
        }
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        if self.inflight.is_some() {
            // The kernel may still read the buffers: wait (an error ends the send anyway).
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            let _ = self.flush();
        }
    }
}

/// Drops the first `n` bytes of the frame's iovecs.
fn advance(f: &mut InFlight, mut n: usize) {
    f.left -= n;
    let mut skip = 0;
    for v in f.iov.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            skip += 1;
        } else {
            v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    f.iov.drain(..skip);
}

fn submit(ring: &mut IoUring, sock: &TcpStream, f: &mut InFlight) -> std::io::Result<()> {
    f.msg.msg_iov = f.iov.as_mut_ptr();
    f.msg.msg_iovlen = f.iov.len();
    let sqe = opcode::SendMsg::new(types::Fd(sock.as_raw_fd()), &*f.msg as *const libc::msghdr)
        .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
        .build();
    // SAFETY: the msghdr, its iovecs and the memory they point at live in `f` (or in guest
    // memory, per `send_pages`' contract) until `flush` has reaped this submission.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    ring.submit()?;
    Ok(())
}

fn writev_all(sock: &TcpStream, f: &mut InFlight) -> std::io::Result<()> {
    while f.left > 0 {
        let cnt = f.iov.len().min(1024);
        // SAFETY: the iovecs point at live buffers (see `send_pages`); writev only reads them.
        let n = unsafe { libc::writev(sock.as_raw_fd(), f.iov.as_ptr(), cnt as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        advance(f, n as usize);
    }
    Ok(())
}
