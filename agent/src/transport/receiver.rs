//! The frame receiver: io_uring `RECV` (with a linked timeout) or plain `read`.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::tls::{Channel, TlsReader};
use super::IoPath;
use crate::wire::{Frame, Header, WireError, HEADER_LEN};

/// A frame's payload buffer grows by at most this much at a time, as its bytes arrive.
const ALLOC_STEP: usize = 4 << 20;

/// Errors receiving a frame.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The socket failed or timed out.
    #[error("receive failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads frames from a TCP stream, or from a TLS session on one.
pub struct FrameReader {
    sock: TcpStream,
    ring: Option<IoUring>,
    tls: Option<TlsReader>,
    /// The peer's verified host name (TLS only).
    peer: Option<String>,
    timeout: Duration,
    /// The socket's read timeout is set below `timeout` (the rest of a frame's time).
    shortened: bool,
    received: u64,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("uring", &self.ring.is_some())
            .field("tls", &self.tls.is_some())
            .field("received", &self.received)
            .finish()
    }
}

impl FrameReader {
    /// A reader on a migration channel: through its TLS session if it has one (then `path`
    /// does not apply), else as [`FrameReader::new`].
    pub fn on(ch: &Channel, path: IoPath, timeout: Duration) -> std::io::Result<Self> {
        let tls = ch.tls_reader()?;
        let path = if tls.is_some() { IoPath::Plain } else { path };
        let mut r = Self::new(ch.socket().try_clone()?, path, timeout)?;
        r.tls = tls;
        r.peer = ch.peer().map(str::to_owned);
        Ok(r)
    }

    /// A reader on `sock`; a frame that does not arrive whole within `timeout` fails.
    pub fn new(sock: TcpStream, path: IoPath, timeout: Duration) -> std::io::Result<Self> {
        let ring = match path {
            IoPath::Plain => None,
            IoPath::Uring => Some(IoUring::new(4)?),
            IoPath::Auto => IoUring::new(4).ok(),
        };
        sock.set_read_timeout(Some(timeout))?;
        Ok(Self {
            sock,
            ring,
            tls: None,
            peer: None,
            timeout,
            shortened: false,
            received: 0,
        })
    }

    /// The peer's host name, verified by its certificate (None in plaintext).
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Whether bytes of a next frame are already here (decrypted, or read and not yet
    /// decrypted), where polling the socket would not show them.
    pub fn buffered(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsReader::buffered)
    }

    /// Bytes received.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Changes the timeout.
    pub fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.timeout = timeout;
        self.sock.set_read_timeout(Some(timeout))
    }

    /// Reads one frame and checks it whole: the header (magic, version, kind, lengths) before
    /// reading the payload, then the CRC. Only a verified frame comes out. The whole frame
    /// must arrive within the timeout (a peer trickling bytes does not restart it).
    pub fn read_frame(&mut self) -> Result<Frame, RecvError> {
        let deadline = Instant::now() + self.timeout;
        let mut h = [0u8; HEADER_LEN];
        let r = self.read_exact(&mut h, deadline).and_then(|_| {
            let header = Header::parse(&h)?;
            // Memory follows the bytes that arrive: a header announcing 16 MiB does not get
            // 16 MiB before they come.
            let len = header.payload_len as usize;
            let mut payload = Vec::new();
            while payload.len() < len {
                let start = payload.len();
                payload.resize(start + (len - start).min(ALLOC_STEP), 0);
                self.read_exact(&mut payload[start..], deadline)?;
            }
            Ok(Frame::parse(header, payload)?)
        });
        if self.shortened {
            self.shortened = false;
            self.sock.set_read_timeout(Some(self.timeout))?;
        }
        r
    }

    fn read_exact(&mut self, mut buf: &mut [u8], deadline: Instant) -> Result<(), RecvError> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no whole frame within {:?}", self.timeout),
                )
                .into());
            }
            if self.ring.is_none() && left + Duration::from_millis(500) < self.timeout {
                // Only what is left of the frame's time (not again the whole timeout).
                self.sock.set_read_timeout(Some(left))?;
                self.shortened = true;
            }
            let n = match (&mut self.tls, &mut self.ring) {
                (Some(t), _) => match t.read(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                },
                (None, None) => match self.sock.read(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                },
                (None, Some(ring)) => recv_uring(ring, &self.sock, buf, left)?,
            };
            if n == 0 {
                return Err(RecvError::Closed);
            }
            self.received += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }
}

fn recv_uring(
    ring: &mut IoUring,
    sock: &TcpStream,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<usize, RecvError> {
    let ts = types::Timespec::new()
        .sec(timeout.as_secs())
        .nsec(timeout.subsec_nanos());
    let recv = opcode::Recv::new(
        types::Fd(sock.as_raw_fd()),
        buf.as_mut_ptr(),
        buf.len() as u32,
    )
    .flags(libc::MSG_WAITALL)
    .build()
    .flags(squeue::Flags::IO_LINK)
    .user_data(1);
    let limit = opcode::LinkTimeout::new(&ts).build().user_data(2);
    // SAFETY: `buf` and `ts` outlive the submission: this function waits for both
    // completions (the receive and its linked timeout) before returning.
    unsafe {
        let mut sq = ring.submission();
        sq.push(&recv)
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        sq.push(&limit)
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    }
    let mut result = None;
    let mut seen = 0;
    while seen < 2 {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            seen += 1;
            if cqe.user_data() == 1 {
                result = Some(cqe.result());
            }
        }
    }
    match result.expect("the receive completed") {
        n if n >= 0 => Ok(n as usize),
        e if -e == libc::ECANCELED => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data for {timeout:?}"),
        )
        .into()),
        e => Err(std::io::Error::from_raw_os_error(-e).into()),
    }
}
