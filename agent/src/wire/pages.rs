//! Page frames: a table of page entries, then the contents of the non-zero pages in order.
//!
//! Metadata: `count: u32`, then `count` entries of `u64`: the page index (bits 0..52) and,
//! in bit 63, the zero flag (a zero page travels as its entry alone, no 4 KiB).

use super::WireError;
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

/// Encodes the metadata of a page frame.
pub fn encode(entries: &[PageEntry], out: &mut Vec<u8>) {
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
