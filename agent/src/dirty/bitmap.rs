//! A concurrent bitmap of guest pages.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per guest page, settable from any thread.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBitmap {
    /// An empty bitmap of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Marks `page`; pages past the end are ignored (and reported false).
    pub fn set(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        true
    }

    /// Whether `page` is marked.
    pub fn get(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// ORs in a KVM-style bitmap (bit i of word j is page 64j + i).
    pub fn or_words(&self, words: &[u64]) {
        for (w, &v) in self.words.iter().zip(words) {
            if v != 0 {
                w.fetch_or(v, Ordering::Relaxed);
            }
        }
    }

    /// Takes every marked page, in ascending order, clearing them.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (j, w) in self.words.iter().enumerate() {
            let mut v = w.swap(0, Ordering::Relaxed);
            while v != 0 {
                let i = v.trailing_zeros() as u64;
                out.push(j as u64 * 64 + i);
                v &= v - 1;
            }
        }
        out
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_take_and_bounds() {
        let b = PageBitmap::new(130);
        assert!(b.set(0));
        assert!(b.set(64));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert!(b.get(64) && !b.get(63));
        assert_eq!(b.count(), 3);
        assert_eq!(b.take(), vec![0, 64, 129]);
        assert_eq!(b.count(), 0);
        b.or_words(&[0b101, 0, 1]);
        assert_eq!(b.take(), vec![0, 2, 128]);
    }
}
