//! Guest memory: one private anonymous `MAP_NORESERVE` mapping (through `vm-memory`), so a
//! large idle VM costs nothing until its pages are touched.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::guest::layout::PAGE_SIZE;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not a multiple of 2 MiB or out of range.
    #[error("guest memory size {0} bytes is invalid (2 MiB multiple between 16 MiB and 16 GiB)")]
    BadSize(u64),
    /// `mmap` failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// An access fell outside guest memory.
    #[error("guest access at {addr:#x} (+{len}) is outside guest memory")]
    OutOfRange {
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Reading `/proc/self/pagemap` failed.
    #[error("cannot read /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
}

/// A page of guest memory, checked to be inside it, borrowing the memory it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct PageRef<'ram> {
    ram: &'ram GuestRam,
    index: u64,
}

impl<'ram> PageRef<'ram> {
    /// Its page index (guest-physical address / 4096).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Whether the page holds only zeros. Reads with volatile loads: the guest may be writing
    /// the page at the same time, and a page changed after this check is dirty again.
    pub fn is_zero(&self) -> bool {
        let p = self.as_ptr() as *const u64;
        (0..(PAGE_SIZE / 8) as usize).all(|i| {
            // SAFETY: `p` points at a whole 4 KiB page inside the live guest mapping (the
            // index was checked when the `PageRef` was made, and the borrow keeps the mapping
            // alive), aligned to 8; a volatile read of guest memory that the guest may write
            // concurrently is the accepted way to sample it.
            unsafe { std::ptr::read_volatile(p.add(i)) == 0 }
        })
    }

    /// The host address of the page's first byte (4 KiB follow, inside the mapping). For the
    /// kernel (an iovec of a send): Rust code reads guest pages by copy, or as a slice from
    /// `vm::Paused`, never through this pointer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ram.page_ptr(self.index)
    }

    /// The memory it belongs to.
    pub fn ram(&self) -> &'ram GuestRam {
        self.ram
    }
}

/// The guest's RAM, guest-physical address 0 to `size`.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    base: usize,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of guest memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        use crate::guest::layout::{MAX_MEMORY, MIN_MEMORY};
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))? as usize;
        Ok(Self { mem, base, size })
    }

    /// The `vm-memory` mapping (for devices that walk guest rings).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host virtual address of guest-physical 0.
    pub fn host_base(&self) -> usize {
        self.base
    }

    /// Host address of page `index`, which must be inside guest memory (checked in every
    /// build: a pointer outside the mapping is never made).
    fn page_ptr(&self, index: u64) -> *mut u8 {
        assert!(
            index < self.pages(),
            "page {index} is outside guest memory ({} pages)",
            self.pages()
        );
        (self.base + (index * PAGE_SIZE) as usize) as *mut u8
    }

    /// Page `index`, checked to be inside guest memory.
    pub fn page(&self, index: u64) -> Result<PageRef<'_>, MemoryError> {
        if index >= self.pages() {
            return Err(MemoryError::OutOfRange {
                addr: index.saturating_mul(PAGE_SIZE),
                len: PAGE_SIZE as usize,
            });
        }
        Ok(PageRef { ram: self, index })
    }

    /// Writes `data` at guest-physical `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: data.len(),
            })
    }

    /// Reads `buf.len()` bytes at guest-physical `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len();
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange { addr, len })
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64 at `addr`.
    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Whether page `index` (inside guest memory: checked) holds only zeros; see
    /// [`PageRef::is_zero`].
    pub fn is_zero_page(&self, index: u64) -> bool {
        PageRef { ram: self, index }.is_zero()
    }

    /// Copies page `index` into `buf`.
    pub fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read(index * PAGE_SIZE, &mut buf[..PAGE_SIZE as usize])
    }

    /// Writes page `index` from `data` (exactly one page).
    pub fn write_page(&self, index: u64, data: &[u8]) -> Result<(), MemoryError> {
        if index >= self.pages() || data.len() != PAGE_SIZE as usize {
            return Err(MemoryError::OutOfRange {
                addr: index.saturating_mul(PAGE_SIZE),
                len: data.len(),
            });
        }
        self.write(index * PAGE_SIZE, data)
    }

    /// Zeroes page `index`.
    pub fn zero_page(&self, index: u64) -> Result<(), MemoryError> {
        self.write_page(index, &[0u8; PAGE_SIZE as usize])
    }

    /// Pages that may hold data: populated (or swapped) in the host, per `/proc/self/pagemap`.
    /// A page never touched since the mapping was made (or dropped) is zero, and costs nothing
    /// to skip: this is what makes a large idle VM cheap to migrate.
    pub fn populated(&self) -> Result<Vec<bool>, MemoryError> {
        let mut f = File::open("/proc/self/pagemap").map_err(MemoryError::Pagemap)?;
        let first = (self.base as u64) / PAGE_SIZE;
        f.seek(SeekFrom::Start(first * 8))
            .map_err(MemoryError::Pagemap)?;
        let pages = self.pages() as usize;
        let mut out = Vec::with_capacity(pages);
        let mut buf = vec![0u8; 8 * 65536];
        while out.len() < pages {
            let n = (pages - out.len()).min(65536);
            f.read_exact(&mut buf[..n * 8])
                .map_err(MemoryError::Pagemap)?;
            for e in buf[..n * 8].chunks_exact(8) {
                let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                // Bit 63: present in RAM; bit 62: swapped.
                out.push(v & (3 << 62) != 0);
            }
        }
        Ok(out)
    }

    /// A BLAKE3 digest of all of guest memory: every non-zero page, with its index. Two
    /// memories with equal digests hold the same bytes in every page.
    pub fn digest(&self) -> Result<String, MemoryError> {
        let populated = self.populated()?;
        let mut h = blake3::Hasher::new();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (i, &maybe) in populated.iter().enumerate() {
            let i = i as u64;
            if !maybe || self.is_zero_page(i) {
                continue;
            }
            self.read_page(i, &mut page)?;
            h.update(&i.to_le_bytes());
            h.update(&page);
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// Drops the given pages (`MADV_DONTNEED`): they become missing (read as zero, or fault
    /// to userfaultfd once registered). `pages` must be ascending; runs are dropped together.
    pub fn discard_pages(&self, pages: &[u64]) -> Result<(), MemoryError> {
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            if first >= self.pages() {
                return Err(MemoryError::OutOfRange {
                    addr: first.saturating_mul(PAGE_SIZE),
                    len: PAGE_SIZE as usize,
                });
            }
            let mut n = 1;
            while i + n < pages.len() && pages[i + n] == first + n as u64 {
                n += 1;
            }
            if first + n as u64 > self.pages() {
                return Err(MemoryError::OutOfRange {
                    addr: first * PAGE_SIZE,
                    len: n * PAGE_SIZE as usize,
                });
            }
            // SAFETY: the range is whole pages inside the live guest mapping (checked above);
            // MADV_DONTNEED on private anonymous memory only drops content, which callers
            // want: no Rust reference into guest memory exists (all access is by copy).
            let r = unsafe {
                libc::madvise(
                    self.page_ptr(first).cast(),
                    n * PAGE_SIZE as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(MemoryError::Map(format!(
                    "madvise(MADV_DONTNEED): {}",
                    std::io::Error::last_os_error()
                )));
            }
            i += n;
        }
        Ok(())
    }

    /// The `vm-memory` view, for the KVM memory slot.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_memory_is_unpopulated_and_zero() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(ram.populated().unwrap().iter().all(|p| !p));
        ram.write_u64(5 * PAGE_SIZE + 8, 42).unwrap();
        let pop = ram.populated().unwrap();
        assert!(pop[5]);
        assert_eq!(pop.iter().filter(|p| **p).count(), 1);
        assert!(!ram.is_zero_page(5));
        assert!(ram.is_zero_page(6));
    }

    #[test]
    fn digest_changes_with_content_and_position() {
        let a = GuestRam::new(16 << 20).unwrap();
        let b = GuestRam::new(16 << 20).unwrap();
        assert_eq!(a.digest().unwrap(), b.digest().unwrap());
        a.write_u64(3 * PAGE_SIZE, 7).unwrap();
        b.write_u64(4 * PAGE_SIZE, 7).unwrap();
        assert_ne!(a.digest().unwrap(), b.digest().unwrap());
        b.zero_page(4).unwrap();
        b.write_u64(3 * PAGE_SIZE, 7).unwrap();
        assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    }

    #[test]
    fn bad_sizes_and_ranges_are_refused() {
        assert!(GuestRam::new(1 << 20).is_err());
        assert!(GuestRam::new((16 << 20) + 4096).is_err());
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(ram.write_page(ram.pages(), &[0u8; 4096]).is_err());
        assert!(ram.write_page(0, &[0u8; 100]).is_err());
        assert!(matches!(
            ram.page(ram.pages()),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert_eq!(ram.page(ram.pages() - 1).unwrap().index(), ram.pages() - 1);
    }
}
