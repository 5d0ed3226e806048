//! A disk image's digest kept block by block, so that a migration can hash the image as it
//! sends (or receives) it and, at the pause, re-hash only the blocks written since.
//!
//! The digest of an image of `size` bytes in blocks of `block` bytes is
//! `BLAKE3(size_le ‖ block_le ‖ h₀ ‖ h₁ ‖ …)` where `hᵢ = BLAKE3(block i)` (the last block may be
//! short). A block never written is all zeros, and its hash is computed once. Both sides of a
//! migration build it the same way, from the bytes each read or wrote; [`BlockDigest::of_file`]
//! builds it from a file in one pass, for checks from outside (tests, audits).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Per-block hashes of one image.
#[derive(Debug, Clone)]
pub struct BlockDigest {
    size: u64,
    block: u64,
    hashes: Vec<[u8; 32]>,
}

/// A piece that does not cover whole blocks of the image.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a piece at offset {offset} of {len} bytes is not whole {block}-byte blocks of a {size}-byte image")]
pub struct Misaligned {
    /// Where the piece starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The block size.
    pub block: u64,
    /// The image size.
    pub size: u64,
}

impl BlockDigest {
    /// The digest of an all-zero (sparse) image of `size` bytes, in `block`-byte blocks.
    pub fn new(size: u64, block: u64) -> Self {
        assert!(block > 0);
        let n = size.div_ceil(block);
        let full = blake3::hash(&vec![0u8; block.min(size) as usize]);
        let mut hashes = vec![*full.as_bytes(); n as usize];
        if !size.is_multiple_of(block) {
            let tail = blake3::hash(&vec![0u8; (size % block) as usize]);
            *hashes.last_mut().expect("n > 0") = *tail.as_bytes();
        }
        Self {
            size,
            block,
            hashes,
        }
    }

    /// Records the bytes `data` now at `offset`: whole blocks (the last block of the image may
    /// be short).
    pub fn update(&mut self, offset: u64, data: &[u8]) -> Result<(), Misaligned> {
        let len = data.len() as u64;
        let bad = Misaligned {
            offset,
            len,
            block: self.block,
            size: self.size,
        };
        let end = offset.checked_add(len).ok_or(bad)?;
        let whole = len.is_multiple_of(self.block) || end == self.size;
        if !offset.is_multiple_of(self.block) || !whole || end > self.size {
            return Err(bad);
        }
        let first = (offset / self.block) as usize;
        for (i, piece) in data.chunks(self.block as usize).enumerate() {
            self.hashes[first + i] = *blake3::hash(piece).as_bytes();
        }
        Ok(())
    }

    /// The image's digest, as hex.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        h.update(&self.block.to_le_bytes());
        for b in &self.hashes {
            h.update(b);
        }
        h.finalize().to_hex().to_string()
    }

    /// Reads a whole file (holes skipped) and returns its digest.
    pub fn of_file(file: &File, block: u64) -> std::io::Result<String> {
        let size = file.metadata()?.len();
        let mut d = Self::new(size, block);
        let chunk = (block as usize).max(1 << 20) / block as usize * block as usize;
        super::for_each_aligned_data_chunk::<std::io::Error>(file, chunk, block, |off, data| {
            d.update(off, data).map_err(std::io::Error::other)
        })?;
        Ok(d.digest())
    }

    /// Re-reads the given blocks from `file` and records them.
    pub fn reread(&mut self, file: &File, blocks: &[u64]) -> std::io::Result<()> {
        let mut buf = vec![0u8; self.block as usize];
        for &b in blocks {
            let off = b * self.block;
            let n = self.block.min(self.size.saturating_sub(off)) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            self.update(off, &buf[..n]).map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_content_and_matches_a_file_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        let size = (4 << 20) + 1000;
        f.set_len(size).unwrap();
        let empty = BlockDigest::new(size, 65536);
        assert_eq!(
            BlockDigest::of_file(&File::open(&p).unwrap(), 65536).unwrap(),
            empty.digest(),
            "a sparse file is all zeros"
        );
        f.write_all_at(&[3; 10], 70000).unwrap();
        f.write_all_at(&[9; 7], size - 7).unwrap();
        let mut d = BlockDigest::new(size, 65536);
        let mut block = vec![0u8; 65536];
        block[70000 - 65536..70000 - 65536 + 10].fill(3);
        d.update(65536, &block).unwrap();
        let mut tail = vec![0u8; 1000];
        tail[993..].fill(9);
        d.update(size - 1000, &tail).unwrap();
        let from_file = BlockDigest::of_file(&File::open(&p).unwrap(), 65536).unwrap();
        assert_eq!(d.digest(), from_file);
        assert_ne!(d.digest(), empty.digest());
        // The same bytes one block further differ.
        let mut moved = BlockDigest::new(size, 65536);
        moved.update(2 * 65536, &block).unwrap();
        moved.update(size - 1000, &tail).unwrap();
        assert_ne!(moved.digest(), d.digest());
        // Re-reading changed blocks brings a digest up to date.
        f.write_all_at(&[1; 1], 3 << 20).unwrap();
        d.reread(&File::open(&p).unwrap(), &[(3 << 20) / 65536])
            .unwrap();
        assert_eq!(
            d.digest(),
            BlockDigest::of_file(&File::open(&p).unwrap(), 65536).unwrap()
        );
    }

    #[test]
    fn pieces_must_be_whole_blocks() {
        let mut d = BlockDigest::new(1 << 20, 65536);
        assert!(d.update(1, &[0; 65536]).is_err());
        assert!(d.update(0, &[0; 100]).is_err());
        assert!(d.update(1 << 20, &[0; 65536]).is_err());
        assert!(d.update(u64::MAX - 10, &[0; 65536]).is_err());
        d.update(0, &[0; 131072]).unwrap();
    }
}
