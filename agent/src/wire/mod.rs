//! The migration stream: versioned, length-prefixed, checksummed frames.
//!
//! ```text
//! source                                   destination
//!   Hello{version, page size, cpu}  ───►     checks version and compatibility
//!                                   ◄───   Welcome | Error
//!   Reserve{name, spec, memory}     ───►     reserves memory and the name
//!                                   ◄───   Reserved | Refused{reason}
//!   FileChunk* (definition, NVRAM, log, disk)
//!   Pages* RoundEnd   (round 1: every page; round n: pages dirtied since)
//!   ... vCPUs paused ...
//!   Pages* (last dirty set, data checksummed) State{vCPUs, devices}
//!                                   ◄───   Ready{digests}   (state loaded, not running)
//!   Go                              ───►     registers the VM, runs its vCPUs
//!                                   ◄───   Running
//!   Released                        ───►     (the source has let the VM go)
//! ```
//! Either side may send `Abort`/`Error` instead; until `Go` the source owns the VM.
//!
//! Post-copy (the controller's switch, or `--postcopy always`) replaces the last dirty pages:
//! ```text
//!   ... vCPUs paused ...
//!   Postcopy{dirty bitmap}  State   ───►     drops the stale pages, registers userfaultfd
//!                                   ◄───   Ready{vCPU digest}
//!   Go                              ───►     registers the VM, runs its vCPUs
//!                                   ◄───   Running
//!                                   ◄───   PageRequest{pages}*   (vCPU faults)
//!   DemandPages* (answers)  Pages* (background push)  ───►   placed with UFFDIO_COPY
//!                                   ◄───   PagesPlaced{bytes}*   (flow control of the push)
//!                                   ◄───   PostcopyDone{fault stats, digest}
//!   Released                        ───►
//! ```
//! Until `PostcopyDone` the source keeps the VM paused with all of its memory. The source keeps
//! at most a small window of push data beyond the last `PagesPlaced`: an answer to a
//! `PageRequest` shares the stream with the push, and must not queue behind megabytes of it.
//!
//! If the connection drops during post-copy, the destination's vCPUs wait on their faults and
//! both sides keep their state; the source reconnects (automatically within its resume window,
//! or on `vmig migrate --resume`):
//! ```text
//!   Hello                           ───►
//!                                   ◄───   Welcome
//!   Resume{name, session}           ───►     finds the waiting session
//!                                   ◄───   Resumed{pages still missing} | Refused{reason}
//!                                   ◄───   PageRequest{pages}*   (faults waiting since the cut)
//!   DemandPages* Pages*             ───►
//!                                   ◄───   PostcopyDone
//!   Released                        ───►
//! ```
//!
//! Every frame is a 24-byte little-endian header followed by `payload_len` bytes:
//! `meta_len` bytes of metadata (a page table, or a bincode-encoded message), then data (page
//! contents, file bytes). The CRC-32 covers the header (CRC field zero) and the metadata, and
//! also the data when the `DATA_CRC` flag is set. Page data sent while the guest runs is not
//! covered: the guest may legitimately change a page while it is on the wire, and such a page
//! is dirty again and resent; every frame sent with the vCPUs paused carries `DATA_CRC`.
//! The receiver checks the magic, version, kind, lengths and CRC before using a byte, and
//! bounds-checks every page index against the guest's size.

pub mod messages;
pub mod pages;

use serde::{de::DeserializeOwned, Serialize};

/// "VMIG" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMIG");
/// The protocol version this agent speaks. 2: post-copy flow control (`PagesPlaced`).
pub const VERSION: u16 = 2;
/// Header length.
pub const HEADER_LEN: usize = 24;
/// Largest payload a receiver accepts.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Flag: the CRC covers the data too.
pub const DATA_CRC: u16 = 1;

/// Frame kinds. `Invalid = 0` is reserved so a zeroed header never parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Never sent.
    Invalid = 0,
    /// Source introduces itself.
    Hello = 1,
    /// Destination accepts the protocol.
    Welcome = 2,
    /// Source asks for memory and the name.
    Reserve = 3,
    /// Destination reserved.
    Reserved = 4,
    /// Destination refused the reservation.
    Refused = 5,
    /// Guest pages.
    Pages = 6,
    /// End of a pre-copy round.
    RoundEnd = 7,
    /// A piece of one of the VM's files.
    FileChunk = 8,
    /// vCPU and device state.
    State = 9,
    /// Destination loaded the state.
    Ready = 10,
    /// Source commits: run on the destination.
    Go = 11,
    /// Destination runs the VM.
    Running = 12,
    /// Either side gives up.
    Abort = 13,
    /// Either side reports an error.
    Error = 14,
    /// Source released the VM.
    Released = 15,
    /// Source switches to post-copy: the pages the destination must not trust.
    Postcopy = 16,
    /// Destination asks for pages a vCPU faulted on.
    PageRequest = 17,
    /// Guest pages answering a `PageRequest` (same layout as `Pages`).
    DemandPages = 18,
    /// Destination holds every page: post-copy is over.
    PostcopyDone = 19,
    /// Source reconnects to finish an interrupted post-copy.
    Resume = 20,
    /// Destination: the post-copy session waits here; the pages it still lacks.
    Resumed = 21,
    /// Destination placed the post-copy page frames up to a byte count (flow control).
    PagesPlaced = 22,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Welcome,
            Reserve,
            Reserved,
            Refused,
            Pages,
            RoundEnd,
            FileChunk,
            State,
            Ready,
            Go,
            Running,
            Abort,
            Error,
            Released,
            Postcopy,
            PageRequest,
            DemandPages,
            PostcopyDone,
            Resume,
            Resumed,
            PagesPlaced,
        ]
        .into_iter()
        .find(|k| *k as u16 == v)
    }
}

/// Errors of the wire format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a vmig stream.
    #[error("bad magic {0:#010x}: not a vmig migration stream")]
    BadMagic(u32),
    /// The peer speaks another version.
    #[error("protocol version {got} is not supported (this agent speaks {VERSION})")]
    Version {
        /// The peer's version.
        got: u16,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u16),
    /// Unknown flags or a non-zero reserved field.
    #[error("unknown flags or reserved header bits set")]
    Reserved,
    /// Payload too large or inconsistent lengths.
    #[error("bad frame length: payload {payload}, metadata {meta} (limit {MAX_PAYLOAD})")]
    BadLength {
        /// Payload length.
        payload: u32,
        /// Metadata length.
        meta: u32,
    },
    /// Checksum mismatch.
    #[error("checksum mismatch on a {kind:?} frame: header says {want:#010x}, content gives {got:#010x}")]
    Checksum {
        /// Frame kind.
        kind: Kind,
        /// CRC in the header.
        want: u32,
        /// CRC computed.
        got: u32,
    },
    /// A message failed to decode.
    #[error("cannot decode a {kind:?} message: {cause}")]
    Decode {
        /// Frame kind.
        kind: Kind,
        /// Why.
        cause: String,
    },
    /// A page frame is malformed or addresses memory outside the guest.
    #[error("bad page frame: {0}")]
    BadPages(String),
    /// The peer sent a frame the protocol does not allow here.
    #[error("unexpected {got:?} frame while waiting for {want}")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What was expected.
        want: &'static str,
    },
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Kind.
    pub kind: Kind,
    /// Flags (`DATA_CRC`).
    pub flags: u16,
    /// Metadata plus data bytes.
    pub payload_len: u32,
    /// Metadata bytes.
    pub meta_len: u32,
    /// CRC-32.
    pub crc: u32,
}

impl Header {
    /// Encodes the header (24 bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        self.encode_version(VERSION)
    }

    /// Encodes with an arbitrary version (tests of version refusal).
    pub fn encode_version(&self, version: u16) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..10].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Parses and checks a header: magic, version, kind, lengths.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(WireError::Version { got: version });
        }
        let kind = Kind::from_u16(u16_at(6)).ok_or(WireError::BadKind(u16_at(6)))?;
        if u16_at(8) & !DATA_CRC != 0 || u16_at(10) != 0 {
            return Err(WireError::Reserved);
        }
        let (payload_len, meta_len) = (u32_at(12), u32_at(16));
        if payload_len > MAX_PAYLOAD || meta_len > payload_len {
            return Err(WireError::BadLength {
                payload: payload_len,
                meta: meta_len,
            });
        }
        Ok(Header {
            kind,
            flags: u16_at(8),
            payload_len,
            meta_len,
            crc: u32_at(20),
        })
    }
}

/// Computes a frame's CRC from its parts (`data` chunks only counted with `DATA_CRC`).
pub fn frame_crc<'a>(
    header: &Header,
    meta: &[u8],
    data: impl IntoIterator<Item = &'a [u8]>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&Header { crc: 0, ..*header }.encode());
    h.update(meta);
    if header.flags & DATA_CRC != 0 {
        for d in data {
            h.update(d);
        }
    }
    h.finalize()
}

/// A control frame: header + bincode metadata, fully checksummed.
pub fn control_frame<T: Serialize>(kind: Kind, msg: &T) -> Vec<u8> {
    let meta = bincode::serialize(msg).expect("messages serialize");
    let mut header = Header {
        kind,
        flags: DATA_CRC,
        payload_len: meta.len() as u32,
        meta_len: meta.len() as u32,
        crc: 0,
    };
    header.crc = frame_crc(&header, &meta, []);
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&meta);
    out
}

/// A received frame: header and payload.
#[derive(Debug)]
pub struct Frame {
    /// Header.
    pub header: Header,
    /// Metadata then data.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Metadata bytes.
    pub fn meta(&self) -> &[u8] {
        &self.payload[..self.header.meta_len as usize]
    }

    /// Data bytes.
    pub fn data(&self) -> &[u8] {
        &self.payload[self.header.meta_len as usize..]
    }

    /// Checks the CRC.
    pub fn verify(&self) -> Result<(), WireError> {
        let got = frame_crc(&self.header, self.meta(), [self.data()]);
        if got != self.header.crc {
            return Err(WireError::Checksum {
                kind: self.header.kind,
                want: self.header.crc,
                got,
            });
        }
        Ok(())
    }

    /// Decodes the metadata as a message of this kind (size-limited).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        use bincode::Options;
        bincode::options()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(MAX_PAYLOAD as u64)
            .deserialize(self.meta())
            .map_err(|e| WireError::Decode {
                kind: self.header.kind,
                cause: e.to_string(),
            })
    }

    /// Decodes a message, requiring the frame to be of kind `want`.
    pub fn expect<T: DeserializeOwned>(&self, want: Kind) -> Result<T, WireError> {
        if self.header.kind != want {
            return Err(WireError::Unexpected {
                got: self.header.kind,
                want: kind_name(want),
            });
        }
        self.decode()
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Welcome => "Welcome",
        Kind::Reserved => "Reserved",
        Kind::Ready => "Ready",
        Kind::Running => "Running",
        Kind::Go => "Go",
        Kind::Hello => "Hello",
        Kind::Reserve => "Reserve",
        Kind::PostcopyDone => "PostcopyDone",
        Kind::Resume => "Resume",
        Kind::Resumed => "Resumed",
        _ => "another frame",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_frame(bytes: &[u8]) -> Result<Frame, WireError> {
        let header = Header::parse(bytes[..HEADER_LEN].try_into().unwrap())?;
        let f = Frame {
            header,
            payload: bytes[HEADER_LEN..].to_vec(),
        };
        f.verify()?;
        Ok(f)
    }

    #[test]
    fn control_frames_round_trip() {
        let msg = messages::Refused {
            reason: "no room".into(),
        };
        let bytes = control_frame(Kind::Refused, &msg);
        let f = parse_frame(&bytes).unwrap();
        assert_eq!(f.header.kind, Kind::Refused);
        let back: messages::Refused = f.expect(Kind::Refused).unwrap();
        assert_eq!(back.reason, "no room");
        assert!(matches!(
            f.expect::<messages::Refused>(Kind::Reserved),
            Err(WireError::Unexpected { .. })
        ));
    }

    #[test]
    fn every_corrupted_byte_is_caught() {
        let bytes = control_frame(
            Kind::Refused,
            &messages::Refused {
                reason: "x".repeat(40),
            },
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(parse_frame(&b).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn header_checks_magic_version_kind_and_lengths() {
        let h = Header {
            kind: Kind::Go,
            flags: 0,
            payload_len: 0,
            meta_len: 0,
            crc: 0,
        };
        let other = VERSION + 1;
        assert!(matches!(
            Header::parse(&h.encode_version(other)),
            Err(WireError::Version { got }) if got == other
        ));
        let mut b = h.encode();
        b[0] = 0;
        assert!(matches!(Header::parse(&b), Err(WireError::BadMagic(_))));
        let mut b = h.encode();
        b[6] = 99;
        assert!(matches!(Header::parse(&b), Err(WireError::BadKind(99))));
        let big = Header {
            payload_len: MAX_PAYLOAD + 1,
            ..h
        };
        assert!(matches!(
            Header::parse(&big.encode()),
            Err(WireError::BadLength { .. })
        ));
        let inconsistent = Header {
            payload_len: 4,
            meta_len: 8,
            ..h
        };
        assert!(Header::parse(&inconsistent.encode()).is_err());
        let zero = [0u8; HEADER_LEN];
        assert!(Header::parse(&zero).is_err());
    }
}
