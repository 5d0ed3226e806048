//! Disk images on the move: reading an image in chunks for a migration, holes skipped, every
//! read checked (never the whole file in memory, never a silent short read).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub mod cold;
pub mod digest;
pub mod direct;
pub mod writeback;

pub use digest::BlockDigest;
pub use direct::ImageWriter;
pub use writeback::WriteBehind;

/// Granularity of a live disk mirror: the device's written-block log, the blocks sent again,
/// the image digest.
pub const DISK_BLOCK: u64 = 64 << 10;

/// Calls `f(offset, data)` for each chunk of at most `chunk` bytes of `file` that holds data:
/// the file's holes (`SEEK_HOLE`/`SEEK_DATA`) are skipped, and so are chunks read as all
/// zeros (the receiver starts from a sparse file of the full size). Returns the bytes read.
/// A read error, or the file shrinking under the reader, is an error.
pub fn for_each_data_chunk<E: From<std::io::Error>>(
    file: &File,
    chunk: usize,
    f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    for_each_aligned_data_chunk(file, chunk, 1, f)
}

/// [`for_each_data_chunk`] with every chunk starting at a multiple of `align` and holding whole
/// `align`-byte blocks (but the file's last, which may be short): data extents are widened to
/// block boundaries, so a receiver can keep one digest per block. `chunk` must be a multiple of
/// `align`.
pub fn for_each_aligned_data_chunk<E: From<std::io::Error>>(
    file: &File,
    chunk: usize,
    align: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    assert!(chunk > 0 && align > 0 && (chunk as u64).is_multiple_of(align));
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; chunk.min(size as usize)];
    let mut read = 0;
    let mut at = 0;
    while at < size {
        let Some((start, end)) = next_data(file, at, size)? else {
            break;
        };
        let start = (start / align * align).max(at);
        let end = end.div_ceil(align).saturating_mul(align).min(size);
        let mut off = start;
        while off < end {
            let n = (chunk as u64).min(end - off) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            read += n as u64;
            if buf[..n].iter().any(|&b| b != 0) {
                f(off, &buf[..n])?;
            }
            off += n as u64;
        }
        at = end;
    }
    Ok(read)
}

/// The next data extent `[start, end)` at or after `from`, or `None` past the last one. On a
/// file system without `SEEK_DATA`, the whole rest of the file.
fn next_data(file: &File, from: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    let start = match seek(file, from, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((from, size))),
        Err(e) => return Err(e),
    };
    let end = match seek(file, start, libc::SEEK_HOLE) {
        Ok(e) => e.min(size),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size,
        Err(e) => return Err(e),
    };
    Ok((start < size).then_some((start, end)))
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let offset =
        i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor `file` owns and keeps open for the call; it reads no
    // memory of ours. (It moves the shared file offset, which nothing here relies on: every
    // read is positioned.)
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_is_read_and_holes_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1; 5000], 3 << 20).unwrap();
        f.write_all_at(&[2; 10], (64 << 20) - 10).unwrap();
        let f = File::open(&p).unwrap();
        let mut seen = Vec::new();
        let read = for_each_data_chunk::<std::io::Error>(&f, 1 << 20, |off, d| {
            seen.push((off, d.len(), d.iter().map(|&b| b as u64).sum::<u64>()));
            Ok(())
        })
        .unwrap();
        // Far less than the 64 MiB of the file is read (extents are file-system blocks).
        assert!(read < 4 << 20, "read {read} bytes");
        let total: u64 = seen.iter().map(|s| s.2).sum();
        assert_eq!(total, 5000 + 20, "every data byte delivered once: {seen:?}");
        let covers = |at: u64| seen.iter().any(|&(o, n, _)| o <= at && at < o + n as u64);
        assert!(covers(3 << 20) && covers((3 << 20) + 4999) && covers((64 << 20) - 1));
    }

    #[test]
    fn errors_of_the_callback_and_of_reads_stop_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        let f = File::open(&p).unwrap();
        let mut calls = 0;
        let r = for_each_data_chunk::<std::io::Error>(&f, 1 << 20, |_, _| {
            calls += 1;
            Err(std::io::Error::other("stop"))
        });
        assert!(r.is_err() && calls == 1);
        // The file shrinks under the reader: an error, not a short disk.
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let r = for_each_data_chunk::<std::io::Error>(&f, 1 << 20, |_, _| {
            w.set_len(1 << 20)?;
            Ok(())
        });
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
