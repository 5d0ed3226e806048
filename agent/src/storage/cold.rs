//! The files of a stopped VM on the move (cold migration, storage move): which files a VM
//! folder holds, reading one in chunks with its digest, and writing one back with its holes.
//!
//! Every file's digest is the per-block BLAKE3 [`BlockDigest`] of the whole file (blocks of
//! [`DISK_BLOCK`]), computed by the reader from the bytes it sends and by the writer from the
//! bytes it writes: equal digests mean equal files, holes included.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::{for_each_aligned_data_chunk, BlockDigest, ImageWriter, DISK_BLOCK};
use crate::inventory::{DEFINITION, DISK, LOG, NVRAM};

/// Pieces are read and sent in chunks of this size (a multiple of [`DISK_BLOCK`]).
pub const CHUNK: usize = 1 << 20;

/// A file of a VM folder: its name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFile {
    /// Plain name inside the folder.
    pub name: String,
    /// Bytes.
    pub size: u64,
}

/// Whether `name` is a file a VM folder carries: the definition, NVRAM, disk, log and the
/// rotated logs (`vm.log.1`, `vm.log.2`...). Dot files (`.owner`, markers) stay behind.
pub fn is_vm_file(name: &str) -> bool {
    [DEFINITION, NVRAM, DISK, LOG].contains(&name)
        || name
            .strip_prefix("vm.log.")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() <= 6)
}

/// The files of the VM folder `dir`, in the order they travel: definition, NVRAM, disk, log,
/// rotated logs by number. The definition must be there.
pub fn vm_files(dir: &Path) -> std::io::Result<Vec<VmFile>> {
    let mut rotated = Vec::new();
    let mut files = Vec::new();
    for name in [DEFINITION, NVRAM, DISK, LOG] {
        match fs::metadata(dir.join(name)) {
            Ok(m) => files.push(VmFile {
                name: name.into(),
                size: m.len(),
            }),
            Err(e) if name == DEFINITION => return Err(e),
            Err(_) => {}
        }
    }
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("vm.log.").filter(|_| is_vm_file(&name)) {
            let num: u32 = n.parse().unwrap_or(u32::MAX);
            rotated.push((num, name.clone(), e.metadata()?.len()));
        }
    }
    rotated.sort();
    files.extend(
        rotated
            .into_iter()
            .map(|(_, name, size)| VmFile { name, size }),
    );
    Ok(files)
}

/// Reads `file` in chunks holding data (holes and all-zero chunks skipped), calling
/// `f(offset, data)` for each; returns the file's digest.
pub fn read_file<E: From<std::io::Error>>(
    file: &File,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<String, E> {
    let size = file.metadata()?.len();
    let mut digest = BlockDigest::new(size, DISK_BLOCK);
    for_each_aligned_data_chunk(file, CHUNK, DISK_BLOCK, |off, data| {
        digest.update(off, data).map_err(std::io::Error::other)?;
        f(off, data)
    })?;
    Ok(digest.digest())
}

/// The digest of the file at `path`.
pub fn digest_of(path: &Path) -> std::io::Result<String> {
    BlockDigest::of_file(&File::open(path)?, DISK_BLOCK)
}

/// A piece that does not fit the file it is for.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Past the end, or not whole blocks.
    #[error("a piece of {file} at {offset} ({len} bytes) does not fit its {size}-byte file")]
    Misfit {
        /// File.
        file: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// File size.
        size: u64,
    },
    /// Writing or syncing failed.
    #[error("{path}: {cause}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
}

/// A file being written from pieces: created sparse at its full size, each piece recorded in
/// the digest and written where it goes by an [`ImageWriter`] (bypassing the page cache, so
/// that the `fsync` before the registration finds nothing to do).
#[derive(Debug)]
pub struct FileSink {
    name: String,
    path: PathBuf,
    writer: ImageWriter,
    size: u64,
    digest: BlockDigest,
    /// Payload bytes written.
    pub written: u64,
}

impl FileSink {
    /// Creates (or truncates) `dir/name` with `size` bytes, all holes.
    pub fn create(dir: &Path, name: &str, size: u64) -> Result<Self, SinkError> {
        let path = dir.join(name);
        let io = |cause| SinkError::Io {
            path: path.clone(),
            cause,
        };
        let writer = ImageWriter::create(&path, size).map_err(io)?;
        Ok(Self {
            name: name.into(),
            path,
            writer,
            size,
            digest: BlockDigest::new(size, DISK_BLOCK),
            written: 0,
        })
    }

    /// Writes one piece (whole blocks, but the file's last).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let misfit = || SinkError::Misfit {
            file: self.name.clone(),
            offset,
            len: data.len(),
            size: self.size,
        };
        self.digest.update(offset, data).map_err(|_| misfit())?;
        self.writer
            .write(offset, data)
            .map_err(|cause| SinkError::Io {
                path: self.path.clone(),
                cause,
            })?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// The digest of what was written.
    pub fn digest(&self) -> String {
        self.digest.digest()
    }

    /// Waits for every piece to be written, then `fdatasync`s the file.
    pub fn sync(&mut self) -> Result<(), SinkError> {
        self.writer.sync().map_err(|cause| SinkError::Io {
            path: self.path.clone(),
            cause,
        })
    }
}

/// Copies `src/name` to `dst/name` with its holes, synced; returns (source digest, copy's
/// digest, bytes copied), calling `progress(bytes)` as it goes.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    name: &str,
    mut progress: impl FnMut(u64),
) -> Result<(String, String, u64), SinkError> {
    let path = src.join(name);
    let io = |cause| SinkError::Io {
        path: path.clone(),
        cause,
    };
    let file = File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut sink = FileSink::create(dst, name, size)?;
    let from = read_file::<SinkWrap>(&file, |off, data| {
        sink.write(off, data)?;
        progress(data.len() as u64);
        Ok(())
    })
    .map_err(|w| w.0)?;
    sink.sync()?;
    Ok((from, sink.digest(), sink.written))
}

/// [`SinkError`] as the error of a chunk walk (which also yields I/O errors).
struct SinkWrap(SinkError);

impl From<std::io::Error> for SinkWrap {
    fn from(cause: std::io::Error) -> Self {
        SinkWrap(SinkError::Io {
            path: PathBuf::new(),
            cause,
        })
    }
}

impl From<SinkError> for SinkWrap {
    fn from(e: SinkError) -> Self {
        SinkWrap(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_vm_folder_copies_whole_with_its_holes_and_rotated_logs() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join(DEFINITION), b"name = 'x'").unwrap();
        fs::write(src.join(LOG), b"log").unwrap();
        fs::write(src.join("vm.log.10"), b"ten").unwrap();
        fs::write(src.join("vm.log.2"), b"two").unwrap();
        fs::write(src.join(".owner"), b"hostA").unwrap();
        fs::write(src.join("vm.log.x"), b"no").unwrap();
        let disk = File::create(src.join(DISK)).unwrap();
        disk.set_len(32 << 20).unwrap();
        disk.write_all_at(&[7; 100_000], 5 << 20).unwrap();
        disk.write_all_at(&[9; 3], (32 << 20) - 3).unwrap();
        let names: Vec<String> = vm_files(&src)
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(
            names,
            ["vm.toml", "disk.img", "vm.log", "vm.log.2", "vm.log.10"]
        );
        for n in &names {
            let (a, b, _) = copy_file(&src, &dst, n, |_| {}).unwrap();
            assert_eq!(a, b, "{n}");
            assert_eq!(digest_of(&dst.join(n)).unwrap(), a, "{n}");
        }
        let (_, _, copied) = copy_file(&src, &dst, DISK, |_| {}).unwrap();
        assert!(copied < 2 << 20, "holes are not copied: {copied}");
        assert_eq!(fs::metadata(dst.join(DISK)).unwrap().len(), 32 << 20);
        // A piece past the end, or misaligned, is refused.
        let mut s = FileSink::create(&dst, "x", 100).unwrap();
        assert!(matches!(
            s.write(99, &[1, 2]),
            Err(SinkError::Misfit { .. })
        ));
        assert!(matches!(s.write(1, &[1]), Err(SinkError::Misfit { .. })));
        s.write(0, &[5; 100]).unwrap();
    }
}
