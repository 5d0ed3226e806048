//! Page frames: a table of page entries, then the contents of the non-zero pages in order.
//!
//! Metadata: `count: u32`, then `count` entries of `u64`: the page index (bits 0..52) and,
//! in bit 63, the zero flag (a zero page travels as its entry alone, no 4 KiB).
//!
//! [`PageFrameBuilder`] builds the head of a page frame (header and page table, with its CRC);
//! the contents of its non-zero pages follow it on the wire straight from guest memory.
//!
//! Under `--compress zstd[:LEVEL]` the sender may instead send a frame whose data is one zstd
//! frame of those contents (header flag `ZSTD`, the CRC over the compressed bytes): the
//! [`PageCompressor`] keeps a frame raw when compressing it does not save an eighth. The
//! receiver takes any page frame through [`frame_pages`], which inflates a compressed one to
//! exactly the size its page table says, never more.

use std::borrow::Cow;

use super::{Frame, Header, Kind, WireError, HEADER_LEN, ZSTD};
use crate::guest::layout::PAGE_SIZE;

/// Most pages in one frame (1 MiB of data).
pub const MAX_PAGES: usize = 256;
/// Entry flag: the page is all zeros.
pub const ZERO: u64 = 1 << 63;
const INDEX_MASK: u64 = (1 << 52) - 1;

/// One page of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Guest page index (guest-physical address / 4096).
    pub index: u64,
    /// All zeros: no data follows for it.
    pub zero: bool,
}

/// Which page frame: pages of a pre-copy round or of the post-copy push, or answers to a
/// `PageRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrameKind {
    /// `Pages`.
    Pages,
    /// `DemandPages`.
    Demand,
}

impl PageFrameKind {
    /// The frame kind.
    pub fn kind(self) -> Kind {
        match self {
            PageFrameKind::Pages => Kind::Pages,
            PageFrameKind::Demand => Kind::DemandPages,
        }
    }
}

/// Builds page frames: add up to [`MAX_PAGES`] entries, then take the head (header and page
/// table) and send the data pages after it, in the order they were added.
#[derive(Debug)]
pub struct PageFrameBuilder {
    kind: PageFrameKind,
    entries: Vec<PageEntry>,
    data_pages: usize,
    meta: Vec<u8>,
}

impl PageFrameBuilder {
    /// An empty frame of `kind`.
    pub fn new(kind: PageFrameKind) -> Self {
        Self {
            kind,
            entries: Vec::with_capacity(MAX_PAGES),
            data_pages: 0,
            meta: Vec::with_capacity(4 + 8 * MAX_PAGES),
        }
    }

    /// Adds page `index`: a zero page (an entry alone) or a data page (its contents follow).
    pub fn push(&mut self, index: u64, zero: bool) {
        assert!(
            self.entries.len() < MAX_PAGES,
            "a page frame holds {MAX_PAGES} pages"
        );
        assert!(
            index <= INDEX_MASK,
            "page index {index} does not fit an entry"
        );
        self.entries.push(PageEntry { index, zero });
        self.data_pages += usize::from(!zero);
    }

    /// Entries added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Data pages added (the pages whose contents follow the head).
    pub fn data_pages(&self) -> usize {
        self.data_pages
    }

    /// The frame's head, its CRC over the header and the table only (pages read while the
    /// guest runs, which may change under the send); empties the builder.
    pub fn head(&mut self) -> Vec<u8> {
        self.seal(None::<[&[u8]; 0]>)
    }

    /// The frame's head, its CRC also over `data`, the contents of the data pages in order
    /// (pages read with the vCPUs paused); empties the builder.
    pub fn head_checked<'a>(&mut self, data: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        self.seal(Some(data))
    }

    /// The whole frame with `compressed` (the zstd frame of the data pages' contents) as its
    /// data, its CRC also over it when `checked` (the vCPUs paused); empties the builder.
    fn compressed_frame(&mut self, compressed: &[u8], checked: bool) -> Vec<u8> {
        encode(&self.entries, &mut self.meta);
        let header = Header::sealed_with(
            self.kind.kind(),
            &self.meta,
            compressed.len(),
            checked.then_some([compressed]),
            ZSTD,
        );
        let mut frame = Vec::with_capacity(HEADER_LEN + self.meta.len() + compressed.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&self.meta);
        frame.extend_from_slice(compressed);
        self.entries.clear();
        self.data_pages = 0;
        frame
    }

    fn seal<'a>(&mut self, data: Option<impl IntoIterator<Item = &'a [u8]>>) -> Vec<u8> {
        encode(&self.entries, &mut self.meta);
        let data_len = self.data_pages * PAGE_SIZE as usize;
        let header = Header::sealed(self.kind.kind(), &self.meta, data_len, data);
        let mut head = Vec::with_capacity(HEADER_LEN + self.meta.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(&self.meta);
        self.entries.clear();
        self.data_pages = 0;
        head
    }
}

/// Counters of a [`PageCompressor`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompressionStats {
    /// The zstd level.
    pub level: i32,
    /// Page contents offered to the compressor, bytes.
    pub raw_bytes: u64,
    /// What those contents took on the wire, bytes (compressed, or raw where it did not pay).
    pub wire_bytes: u64,
    /// Frames sent compressed.
    pub frames_compressed: u64,
    /// Frames sent raw because compressing them saved less than an eighth.
    pub frames_raw: u64,
    /// Seconds spent compressing.
    pub secs: f64,
}

impl CompressionStats {
    /// Wire bytes over raw bytes (1.0 when nothing was offered).
    pub fn ratio(&self) -> f64 {
        if self.raw_bytes == 0 {
            1.0
        } else {
            self.wire_bytes as f64 / self.raw_bytes as f64
        }
    }
}

/// zstd for page frames: a context kept across frames, and a buffer for the contents.
pub struct PageCompressor {
    ctx: zstd::bulk::Compressor<'static>,
    raw: Vec<u8>,
    out: Vec<u8>,
    stats: CompressionStats,
}

impl std::fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCompressor")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Levels `--compress zstd:LEVEL` accepts.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

impl PageCompressor {
    /// A compressor at `level` (within [`ZSTD_LEVELS`]).
    pub fn new(level: i32) -> std::io::Result<Self> {
        if !ZSTD_LEVELS.contains(&level) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "zstd level {level} is outside {}..={}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                ),
            ));
        }
        Ok(Self {
            ctx: zstd::bulk::Compressor::new(level)?,
            raw: Vec::with_capacity(MAX_PAGES * PAGE_SIZE as usize),
            out: Vec::with_capacity(MAX_PAGES * PAGE_SIZE as usize),
            stats: CompressionStats {
                level,
                ..Default::default()
            },
        })
    }

    /// The buffer the caller fills with the frame's data pages' contents, in order.
    pub fn contents(&mut self) -> &mut Vec<u8> {
        self.raw.clear();
        &mut self.raw
    }

    /// Compresses the contents put in [`contents`](Self::contents) for the frame in
    /// `builder`: the whole frame, or none (the builder untouched) when it would not save an
    /// eighth of the contents; the caller then sends the frame raw.
    pub fn frame(&mut self, builder: &mut PageFrameBuilder, checked: bool) -> Option<Vec<u8>> {
        let raw = self.raw.len();
        assert_eq!(
            raw,
            builder.data_pages() * PAGE_SIZE as usize,
            "the frame's contents"
        );
        if raw == 0 {
            return None;
        }
        let t = std::time::Instant::now();
        self.out.resize(zstd::zstd_safe::compress_bound(raw), 0);
        let n = self.ctx.compress_to_buffer(&self.raw, &mut self.out[..]);
        self.stats.secs += t.elapsed().as_secs_f64();
        self.stats.raw_bytes += raw as u64;
        match n {
            Ok(n) if n < raw - raw / 8 => {
                self.stats.wire_bytes += n as u64;
                self.stats.frames_compressed += 1;
                Some(builder.compressed_frame(&self.out[..n], checked))
            }
            _ => {
                self.stats.wire_bytes += raw as u64;
                self.stats.frames_raw += 1;
                None
            }
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> CompressionStats {
        self.stats
    }
}

/// A page frame's entries and its data pages' contents (inflated if the frame is
/// compressed, to exactly what the page table says and never more), checked against the
/// guest size.
pub fn frame_pages(
    f: &Frame,
    guest_pages: u64,
) -> Result<(Vec<PageEntry>, Cow<'_, [u8]>), WireError> {
    if !f.compressed() {
        let entries = decode(f.meta(), f.data().len(), guest_pages)?;
        return Ok((entries, Cow::Borrowed(f.data())));
    }
    let meta = f.meta();
    let count = meta.get(4..).map_or(0, |rest| {
        rest.chunks_exact(8).filter(|c| c[7] & 0x80 == 0).count()
    });
    let want = count * PAGE_SIZE as usize;
    if want == 0 || want > MAX_PAGES * PAGE_SIZE as usize {
        return Err(WireError::BadPages(format!(
            "a compressed frame of {count} data pages"
        )));
    }
    let data = zstd::bulk::decompress(f.data(), want)
        .map_err(|e| WireError::BadPages(format!("a compressed page frame: {e}")))?;
    let entries = decode(meta, data.len(), guest_pages)?;
    Ok((entries, Cow::Owned(data)))
}

/// Encodes the metadata of a page frame.
fn encode(entries: &[PageEntry], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        let v = e.index | if e.zero { ZERO } else { 0 };
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Decodes and checks a page frame's metadata against the data length and the guest size.
pub fn decode(meta: &[u8], data_len: usize, guest_pages: u64) -> Result<Vec<PageEntry>, WireError> {
    let bad = |s: String| Err(WireError::BadPages(s));
    if meta.len() < 4 {
        return bad(format!("metadata of {} bytes", meta.len()));
    }
    let count = u32::from_le_bytes(meta[..4].try_into().expect("4 bytes")) as usize;
    if count > MAX_PAGES {
        return bad(format!("{count} pages in one frame (limit {MAX_PAGES})"));
    }
    if meta.len() != 4 + 8 * count {
        return bad(format!(
            "metadata of {} bytes for {count} entries",
            meta.len()
        ));
    }
    let mut entries = Vec::with_capacity(count);
    let mut data_pages = 0usize;
    for c in meta[4..].chunks_exact(8) {
        let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        if v & !(INDEX_MASK | ZERO) != 0 {
            return bad(format!("entry {v:#x} has reserved bits set"));
        }
        let index = v & INDEX_MASK;
        if index >= guest_pages {
            return bad(format!(
                "page {index} is outside guest memory ({guest_pages} pages)"
            ));
        }
        let zero = v & ZERO != 0;
        if !zero {
            data_pages += 1;
        }
        entries.push(PageEntry { index, zero });
    }
    if data_len != data_pages * PAGE_SIZE as usize {
        return bad(format!(
            "{data_len} data bytes for {data_pages} non-zero pages"
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    #[test]
    fn a_built_frame_parses_and_checks_its_data() {
        let page = vec![7u8; PAGE_SIZE as usize];
        let mut b = PageFrameBuilder::new(PageFrameKind::Demand);
        b.push(2, true);
        b.push(5, false);
        assert_eq!((b.len(), b.data_pages()), (2, 1));
        let head = b.head_checked([&page[..]]);
        assert!(b.is_empty());
        let mut bytes = head.clone();
        bytes.extend_from_slice(&page);
        let header = Header::parse(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        let f = Frame::parse(header, bytes[HEADER_LEN..].to_vec()).unwrap();
        assert_eq!(f.kind(), Kind::DemandPages);
        let e = decode(f.meta(), f.data().len(), 10).unwrap();
        assert_eq!(
            e[1],
            PageEntry {
                index: 5,
                zero: false
            }
        );
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        let header = Header::parse(bad[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(
            Frame::parse(header, bad[HEADER_LEN..].to_vec()).is_err(),
            "data covered"
        );
        // Without the data checksum, data may change (a running guest's page) but not the table.
        b.push(5, false);
        let mut bytes = b.head();
        bytes.extend_from_slice(&page);
        *bytes.last_mut().unwrap() ^= 1;
        let header = Header::parse(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(Frame::parse(header, bytes[HEADER_LEN..].to_vec()).is_ok());
    }

    #[test]
    fn round_trip_and_bounds() {
        let e = vec![
            PageEntry {
                index: 3,
                zero: false,
            },
            PageEntry {
                index: 9,
                zero: true,
            },
        ];
        let mut m = Vec::new();
        encode(&e, &mut m);
        assert_eq!(decode(&m, 4096, 10).unwrap(), e);
        assert!(decode(&m, 4096, 9).is_err(), "page 9 of a 9-page guest");
        assert!(decode(&m, 0, 10).is_err(), "missing data");
        assert!(decode(&m, 8192, 10).is_err(), "extra data");
        assert!(decode(&m[..m.len() - 1], 4096, 10).is_err(), "short table");
        let mut big = Vec::new();
        encode(
            &vec![
                PageEntry {
                    index: 0,
                    zero: true
                };
                MAX_PAGES + 1
            ],
            &mut big,
        );
        assert!(decode(&big, 0, 10).is_err());
        let mut reserved = m.clone();
        reserved[10] = 0x10;
        assert!(decode(&reserved, 4096, u64::MAX).is_err());
    }
}
