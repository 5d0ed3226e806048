//! A fixed-size bitmap with one bit per guest page, safe to share between threads: the one
//! page bitmap of the workspace (the agent's dirty tracking and post-copy use it too).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, set or read from any thread.
///
/// Used for the `known` set handed to [`PostcopyMemory::register`](crate::PostcopyMemory::register)
/// and for the pages present in the mapping.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }

    /// A bitmap with the pages whose entry is `true` set.
    pub fn from_bools(bits: &[bool]) -> Self {
        let map = Self::new(bits.len() as u64);
        for (index, _) in bits.iter().enumerate().filter(|(_, bit)| **bit) {
            map.set(index as u64);
        }
        map
    }

    /// Number of pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether page `index` is set; pages past the end read as unset.
    pub fn get(&self, index: u64) -> bool {
        if index >= self.pages {
            return false;
        }
        let (word, bit) = Self::position(index);
        self.words[word].load(Ordering::Acquire) & bit != 0
    }

    /// Sets page `index` and says whether it was unset before (this call set it).
    ///
    /// # Panics
    /// If `index` is past the end.
    pub fn set(&self, index: u64) -> bool {
        assert!(index < self.pages, "page {index} past {}", self.pages);
        let (word, bit) = Self::position(index);
        self.words[word].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Sets page `index` if it is inside the bitmap; says whether it is. For indices from an
    /// untrusted source (a kernel ring entry): a page past the end is ignored.
    pub fn set_within(&self, index: u64) -> bool {
        if index >= self.pages {
            return false;
        }
        self.set(index);
        true
    }

    /// ORs in a KVM-style bitmap (bit i of word j is page 64 j + i); bits past the last page
    /// are dropped.
    pub fn or_words(&self, words: &[u64]) {
        let last = self.words.len().saturating_sub(1);
        let tail = match self.pages % 64 {
            0 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        for (j, (w, &v)) in self.words.iter().zip(words).enumerate() {
            let v = if j == last { v & tail } else { v };
            if v != 0 {
                w.fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    /// Takes every set page, in ascending order, clearing them.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (j, w) in self.words.iter().enumerate() {
            let mut v = w.swap(0, Ordering::AcqRel);
            while v != 0 {
                out.push(j as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        out
    }

    /// Number of pages set.
    pub fn count_set(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The first unset page at or after `from`, if any.
    pub fn next_unset(&self, from: u64) -> Option<u64> {
        let mut index = from;
        while index < self.pages {
            let (word, _) = Self::position(index);
            let shift = index % 64;
            let unset = !self.words[word].load(Ordering::Acquire) >> shift;
            if unset != 0 {
                let found = index + u64::from(unset.trailing_zeros());
                return (found < self.pages).then_some(found);
            }
            index += 64 - shift;
        }
        None
    }

    /// Every unset page, in ascending order.
    pub fn unset_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut next = self.next_unset(0);
        while let Some(index) = next {
            out.push(index);
            next = self.next_unset(index + 1);
        }
        out
    }

    fn position(index: u64) -> (usize, u64) {
        ((index / 64) as usize, 1u64 << (index % 64))
    }
}

impl Clone for PageBitmap {
    fn clone(&self) -> Self {
        let words = self
            .words
            .iter()
            .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
            .collect();
        Self {
            words,
            pages: self.pages,
        }
    }
}

impl From<&[bool]> for PageBitmap {
    fn from(bits: &[bool]) -> Self {
        Self::from_bools(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_first_setter_only() {
        let map = PageBitmap::new(100);
        assert!(map.set(70));
        assert!(!map.set(70));
        assert!(map.get(70));
        assert!(!map.get(69));
        assert_eq!(map.count_set(), 1);
    }

    /// Moved from the agent's former `dirty::bitmap` (its dirty-log use).
    #[test]
    fn set_take_and_bounds() {
        let b = PageBitmap::new(130);
        assert!(b.set_within(0));
        assert!(b.set_within(64));
        assert!(b.set_within(129));
        assert!(!b.set_within(130));
        assert!(b.get(64) && !b.get(63));
        assert_eq!(b.count_set(), 3);
        assert_eq!(b.take(), vec![0, 64, 129]);
        assert_eq!(b.count_set(), 0);
        b.or_words(&[0b101, 0, 1]);
        assert_eq!(b.take(), vec![0, 2, 128]);
        b.or_words(&[0, 0, 1 << 2]);
        assert!(b.take().is_empty(), "a bit past the last page is dropped");
    }

    #[test]
    fn next_unset_skips_full_words_and_stops_at_the_end() {
        let map = PageBitmap::new(130);
        for i in 0..129 {
            map.set(i);
        }
        assert_eq!(map.next_unset(0), Some(129));
        map.set(129);
        assert_eq!(map.next_unset(0), None);
        assert!(map.unset_pages().is_empty());
    }

    #[test]
    fn unset_pages_lists_holes_in_order() {
        let bits: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();
        let map = PageBitmap::from_bools(&bits);
        let expected: Vec<u64> = (0..200).filter(|i| i % 3 == 0).collect();
        assert_eq!(map.unset_pages(), expected);
        assert_eq!(map.count_set(), 200 - expected.len() as u64);
    }
}
