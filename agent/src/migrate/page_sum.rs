//! The page sum: an order-independent digest of guest memory that follows a memory as its
//! pages are placed and overwritten.

/// An order-independent digest of guest memory as (index, content) pairs: the sum, modulo
/// 2^256, of BLAKE3(index ‖ page) over every non-zero page.
///
/// Post-copy places pages in whatever order faults and the push produce, and the destination
/// runs while they arrive, so it cannot hash its memory at one instant. Each side adds one
/// term per page instead: the source over its paused memory, the destination over the pages it
/// kept at the switch (before running) plus every page as it is placed. The index inside each
/// term catches a page at the wrong place; a sum (unlike XOR) does not cancel equal terms; and
/// the state is 32 bytes whatever the guest size (a per-page table would be 32 bytes a page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSum([u64; 4]);

impl PageSum {
    /// Adds the page `index` with `data` (all-zero pages add nothing).
    pub fn add(&mut self, index: u64, data: &[u8]) {
        self.add_term(&Self::term(index, data));
    }

    /// Takes the page `index` with `data` out of the sum again (all-zero pages take nothing):
    /// `add` then `sub` of the same page leaves the sum as it was, so a sum can follow a
    /// memory whose pages are overwritten.
    pub fn sub(&mut self, index: u64, data: &[u8]) {
        self.sub_term(&Self::term(index, data));
    }

    /// The term page `index` with `data` adds to a sum: BLAKE3(index ‖ data), or all zeros
    /// (which adds nothing) for an all-zero page. Keeping a page's term lets a sum take the
    /// page out again without reading or hashing its old content.
    pub fn term(index: u64, data: &[u8]) -> [u8; 32] {
        if data.iter().all(|b| *b == 0) {
            return [0; 32];
        }
        let mut h = blake3::Hasher::new();
        h.update(&index.to_le_bytes());
        h.update(data);
        *h.finalize().as_bytes()
    }

    /// Adds a page's [`term`](Self::term).
    pub fn add_term(&mut self, h: &[u8; 32]) {
        let mut carry = 0u128;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let v = u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let sum = *limb as u128 + v as u128 + carry;
            *limb = sum as u64;
            carry = sum >> 64;
        }
    }

    /// Takes a page's [`term`](Self::term) out.
    pub fn sub_term(&mut self, h: &[u8; 32]) {
        let mut borrow = 0u128;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let v = u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let d = (*limb as u128).wrapping_sub(v as u128 + borrow);
            *limb = d as u64;
            borrow = (d >> 64) & 1;
        }
    }

    /// Combines two partial sums.
    pub fn merge(&mut self, other: &PageSum) {
        let mut b = [0u8; 32];
        for (i, limb) in other.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        self.add_term(&b);
    }

    /// Hex, most significant limb first.
    pub fn hex(&self) -> String {
        self.0.iter().rev().map(|l| format!("{l:016x}")).collect()
    }

    /// The sum over every non-zero page of `ram` for which `include(index)` holds. Reads
    /// only pages populated in the host, so it never touches a missing page.
    pub fn of_ram(
        ram: &crate::vm::memory::GuestRam,
        include: impl Fn(u64) -> bool,
    ) -> Result<PageSum, crate::vm::memory::MemoryError> {
        let populated = ram.populated()?;
        let mut sum = PageSum::default();
        let mut page = vec![0u8; crate::guest::layout::PAGE_SIZE as usize];
        for (i, &p) in populated.iter().enumerate() {
            let i = i as u64;
            if !p || !include(i) || ram.is_zero_page(i) {
                continue;
            }
            ram.read_page(i, &mut page)?;
            sum.add(i, &page);
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::PageSum;

    fn page(b: u8) -> Vec<u8> {
        vec![b; 4096]
    }

    #[test]
    fn a_sum_follows_pages_as_they_are_overwritten() {
        // Memory that ends holding page 3 = 7s and page 9 = 1s...
        let mut live = PageSum::default();
        live.add(3, &page(5));
        live.add(9, &page(1));
        live.sub(3, &page(5));
        live.add(3, &page(7));
        // ...and a page written then zeroed...
        live.add(12, &page(2));
        live.sub(12, &page(2));
        // ...equals the sum of its final contents, in any order.
        let mut at_end = PageSum::default();
        at_end.add(9, &page(1));
        at_end.add(3, &page(7));
        assert_eq!(live, at_end);
        assert_eq!(live.hex(), at_end.hex());
        // A page at the wrong index, or a stale content, differs.
        let mut wrong = PageSum::default();
        wrong.add(9, &page(1));
        wrong.add(4, &page(7));
        assert_ne!(live, wrong);
        let mut stale = PageSum::default();
        stale.add(9, &page(1));
        stale.add(3, &page(5));
        assert_ne!(live, stale);
    }

    #[test]
    fn taking_out_what_was_never_added_wraps_and_zero_pages_count_for_nothing() {
        let mut s = PageSum::default();
        s.sub(1, &page(9));
        assert_ne!(s, PageSum::default());
        s.add(1, &page(9));
        assert_eq!(s, PageSum::default(), "the sum wraps modulo 2^256");
        let mut z = PageSum::default();
        z.add(5, &page(0));
        z.sub(6, &page(0));
        assert_eq!(z, PageSum::default());
    }
}
