//! The migration stream: versioned, length-prefixed, checksummed frames.
//!
//! ```text
//! source                                   destination
//!   Hello{versions, page size, cpu} ───►     picks the highest common version, checks the rest
//!                                   ◄───   Welcome{version} | Error
//!   Reserve{name, spec, memory}     ───►     reserves memory and the name
//!                                   ◄───   Reserved | Refused{reason}
//!   FileChunk* (definition, NVRAM, log, disk)
//!   Pages* RoundEnd   (round 1: every page; round n: pages dirtied since)
//!                                   ◄───   RoundPlaced   (the round's pages placed)
//!   ... vCPUs paused ...
//!   Pages* (last dirty set, data checksummed) State{vCPUs, devices}
//!                                   ◄───   Ready{digests}   (state loaded, not running)
//!   Go                              ───►     registers the VM, runs its vCPUs
//!                                   ◄───   Running
//!   Released                        ───►     (the source has let the VM go)
//! ```
//! Either side may send `Abort`/`Error` instead; until `Go` the source owns the VM.
//!
//! Under `--verify` (the disk not on shared storage) the source hashes its paused memory after
//! `Running`, while the guest already runs on the destination, and compares it with `Ready`'s
//! memory digest (which the destination kept up to date as it placed pages) before it lets go:
//! ```text
//!                                   ◄───   Running
//!   (digests equal) Released        ───►
//!   (digests differ) Abort          ───►     stops the VM, removes its copy
//!                                   ◄───   Discarded   (the source runs the VM again)
//! ```
//!
//! Cold migration of a stopped VM (`migrate --offline`, [`messages::ColdOffer`]):
//! ```text
//!   Hello                           ───►
//!                                   ◄───   Welcome
//!   ColdOffer{op, definition, files, datastores}  ───►  checks name, space, definition
//!                                   ◄───   ColdAccepted{datastore, copy} | Refused{reason}
//!   (copy) FileChunk* ColdFileDone{digest}, for each file  ───►  staged, digests compared
//!   ColdCommit                      ───►     fsync files + folder, rename into the datastore
//!                                   ◄───   ColdRegistered{digests}   (durable)
//!   ColdReleased                    ───►     (the source deleted or marked its copy)
//! ```
//! After a crash, the side in doubt asks on a new connection: `Hello`, `ColdQuery{op}` →
//! `ColdAnswer{registered}` (an operation not registered yet is aborted by the question).
//!
//! Fencing stale copies (see `inventory::generation`), each on a new connection after `Hello`:
//! `OwnerQuery{names}` → `OwnerAnswer{(name, generation)*}`; after a rollback, the source to
//! the destination: `Fence{name, generation}` → `FenceAnswer{fenced, reason}`.
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
//!
//! The types carry the protocol's rules: a [`Message`] names its [`Kind`], so a frame is built
//! with [`control_frame`] and read with [`Frame::decode`] (which refuses a frame of another
//! kind); a [`Frame`] exists only once its header and CRC are checked ([`Frame::parse`]); page
//! frames are built by [`pages::PageFrameBuilder`] and page sets travel as a
//! [`bitmap::Bitmap`]. The messages are this module's own structs ([`messages`]): the engine
//! converts its types to and from them, so changing an engine type never changes the
//! protocol unnoticed. Nothing here depends on the engine (`migrate`) or the VMM (`vm`).

pub mod bitmap;
#[cfg(test)]
mod golden;
mod kind;
pub mod messages;
pub mod pages;

use std::ops::RangeInclusive;

use serde::{de::DeserializeOwned, Serialize};

use kind::kind_name;
pub use kind::Kind;

/// "VMIG" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMIG");
/// The protocol version this agent speaks by preference (the newest it knows).
/// 2: post-copy flow control (`PagesPlaced`). 3: a version range in `Hello`, the chosen version
/// in `Welcome`; wire-owned messages (a VM spec, the machine state as a section, post-copy
/// figures); `Error` its own message. 4: the disk program and its spec. 5: the disk mirror
/// (`verify` in `Reserve`, the disk's digest in `Ready`). 6: cold migration (kinds 40-47),
/// shared storage and the target datastore in `Reserve`, `shared` in `Reserved`. 7: the memory
/// digest is a page sum (`migrate::PageSum`) kept as pages are placed, checked after the
/// resume (`Discarded`); page frames compressed (`ZSTD`); ownership generations
/// (`generation` in the definitions `Reserve` and `ColdOffer` carry; kinds 48-51:
/// `OwnerQuery`, `OwnerAnswer`, `Fence`, `FenceAnswer`). 8: the destination answers each
/// pre-copy round's `RoundEnd` with `RoundPlaced` once it has placed the round's pages.
pub const VERSION: u16 = 8;
/// The oldest protocol version this agent still speaks (a 7 would never answer `RoundEnd`).
pub const MIN_VERSION: u16 = 8;
/// Header length.
pub const HEADER_LEN: usize = 24;
/// Largest payload a receiver accepts.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Flag: the CRC covers the data too.
pub const DATA_CRC: u16 = 1;
/// Flag: a page frame's data is one zstd frame holding its data pages (`--compress zstd`).
pub const ZSTD: u16 = 2;

const _: () = assert!(MIN_VERSION <= VERSION && VERSION < u16::MAX);

/// The protocol versions this agent speaks.
pub fn supported_versions() -> RangeInclusive<u16> {
    MIN_VERSION..=VERSION
}

/// The version two agents speak: the highest both support, if any.
pub fn negotiate(ours: RangeInclusive<u16>, theirs: RangeInclusive<u16>) -> Option<u16> {
    let high = (*ours.end()).min(*theirs.end());
    let low = (*ours.start()).max(*theirs.start());
    (low <= high).then_some(high)
}

/// A control message: the bincode-encoded metadata of a frame of kind [`Message::KIND`].
///
/// Pairing a message with its kind by type means a frame can neither be sent nor decoded as
/// the wrong kind.
pub trait Message: Serialize + DeserializeOwned {
    /// The kind of the frames that carry this message.
    const KIND: Kind;
}

/// Errors of the wire format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a vmig stream.
    #[error("bad magic {0:#010x}: not a vmig migration stream")]
    BadMagic(u32),
    /// The peer speaks another version.
    #[error(
        "protocol version {got} is not supported (this agent speaks {MIN_VERSION} to {VERSION})"
    )]
    Version {
        /// The peer's version.
        got: u16,
    },
    /// No version both sides speak.
    #[error("no common protocol version: the peer speaks {low} to {high}, this agent {MIN_VERSION} to {VERSION}")]
    NoCommonVersion {
        /// The peer's oldest version.
        low: u16,
        /// The peer's newest version.
        high: u16,
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
    /// A page bitmap does not fit the guest.
    #[error("bad page bitmap: {words} words for {pages} pages")]
    BadBitmap {
        /// Words received.
        words: usize,
        /// Guest pages.
        pages: u64,
    },
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
    /// Flags (`DATA_CRC`, `ZSTD`).
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
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
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
        if !supported_versions().contains(&version) {
            return Err(WireError::Version { got: version });
        }
        let kind = Kind::from_u16(u16_at(6)).ok_or(WireError::BadKind(u16_at(6)))?;
        if u16_at(8) & !(DATA_CRC | ZSTD) != 0 || u16_at(10) != 0 {
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

    /// A header for `meta` and `data_len` data bytes, its CRC over the header, `meta` and, when
    /// `data` is given, the data (`DATA_CRC`).
    fn sealed<'a>(
        kind: Kind,
        meta: &[u8],
        data_len: usize,
        data: Option<impl IntoIterator<Item = &'a [u8]>>,
    ) -> Header {
        Self::sealed_with(kind, meta, data_len, data, 0)
    }

    /// [`Header::sealed`] with more `flags` (`ZSTD`).
    fn sealed_with<'a>(
        kind: Kind,
        meta: &[u8],
        data_len: usize,
        data: Option<impl IntoIterator<Item = &'a [u8]>>,
        flags: u16,
    ) -> Header {
        let mut header = Header {
            kind,
            flags: flags | if data.is_some() { DATA_CRC } else { 0 },
            payload_len: (meta.len() + data_len) as u32,
            meta_len: meta.len() as u32,
            crc: 0,
        };
        header.crc = crc(&header, meta, data.into_iter().flatten());
        header
    }
}

/// A frame's CRC from its parts (the header with its CRC field zero, the metadata, the data).
fn crc<'a>(header: &Header, meta: &[u8], data: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&Header { crc: 0, ..*header }.encode());
    h.update(meta);
    for d in data {
        h.update(d);
    }
    h.finalize()
}

fn encode_meta<M: Message>(msg: &M) -> Vec<u8> {
    bincode::serialize(msg).expect("messages serialize")
}

/// A control frame: header + the bincode-encoded message, fully checksummed.
pub fn control_frame<M: Message>(msg: &M) -> Vec<u8> {
    data_frame(msg, &[])
}

/// A frame carrying a message and data after it (a file piece), all of it checksummed.
pub fn data_frame<M: Message>(msg: &M, data: &[u8]) -> Vec<u8> {
    let meta = encode_meta(msg);
    let header = Header::sealed(M::KIND, &meta, data.len(), Some([data]));
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + data.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&meta);
    out.extend_from_slice(data);
    out
}

/// A frame of `kind` whose metadata is `meta` (no data), sealed with its CRC: what any peer
/// that speaks the framing can send. The fuzz targets feed arbitrary metadata to every
/// message decoder this way.
pub fn frame_of(kind: Kind, meta: &[u8]) -> Frame {
    let header = Header::sealed(kind, meta, 0, None::<[&[u8]; 0]>);
    Frame {
        header,
        payload: meta.to_vec(),
    }
}

/// A received frame whose header and CRC were checked: the only way to get one is
/// [`Frame::parse`].
#[derive(Debug)]
pub struct Frame {
    header: Header,
    payload: Vec<u8>,
}

impl Frame {
    /// Checks a frame's CRC against its header (already parsed with [`Header::parse`]).
    pub fn parse(header: Header, payload: Vec<u8>) -> Result<Frame, WireError> {
        if payload.len() != header.payload_len as usize {
            return Err(WireError::BadLength {
                payload: payload.len() as u32,
                meta: header.meta_len,
            });
        }
        let (meta, data) = payload.split_at(header.meta_len as usize);
        let covered = (header.flags & DATA_CRC != 0).then_some(data);
        let got = crc(&header, meta, covered);
        if got != header.crc {
            return Err(WireError::Checksum {
                kind: header.kind,
                want: header.crc,
                got,
            });
        }
        Ok(Frame { header, payload })
    }

    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    /// Whether the frame's data is zstd-compressed (page frames only).
    pub fn compressed(&self) -> bool {
        self.header.flags & ZSTD != 0
    }

    /// Header and payload bytes (the frame's size on the wire).
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Metadata bytes.
    pub fn meta(&self) -> &[u8] {
        &self.payload[..self.header.meta_len as usize]
    }

    /// Data bytes.
    pub fn data(&self) -> &[u8] {
        &self.payload[self.header.meta_len as usize..]
    }

    /// Decodes the message, requiring the frame to be of its kind (size-limited).
    pub fn decode<M: Message>(&self) -> Result<M, WireError> {
        use bincode::Options;
        if self.header.kind != M::KIND {
            return Err(WireError::Unexpected {
                got: self.header.kind,
                want: kind_name(M::KIND),
            });
        }
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

    /// The peer's reason, when this frame is an `Abort` or an `Error`.
    pub fn failure(&self) -> Option<Result<String, WireError>> {
        match self.header.kind {
            Kind::Abort => Some(self.decode::<messages::Abort>().map(|a| a.reason)),
            Kind::Error => Some(self.decode::<messages::Error>().map(|e| e.reason)),
            _ => None,
        }
    }
}

/// Test support: rewrites the version field of an encoded frame's header. A receiver checks
/// the version before the CRC, so it refuses such a frame for its version.
#[cfg(any(test, feature = "fault-injection"))]
pub fn set_version(frame: &mut [u8], version: u16) {
    frame[4..6].copy_from_slice(&version.to_le_bytes());
}

#[cfg(test)]
mod tests;
