//! The page bitmap of `Postcopy` and `Resumed`: one bit per guest page, least significant bit
//! first, in `ceil(pages / 64)` little-endian words. The one codec of page sets on the wire.

use serde::{Deserialize, Serialize};

use super::WireError;

/// A set of guest pages as it travels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bitmap(Vec<u64>);

impl Bitmap {
    /// The bitmap of a `pages`-page guest marking `set` (every index below `pages`).
    pub fn of(pages: u64, set: impl IntoIterator<Item = u64>) -> Bitmap {
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        for p in set {
            assert!(p < pages, "page {p} outside a {pages}-page guest");
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        Bitmap(words)
    }

    /// A bitmap of no words (`Resumed` of a completed session: nothing is missing).
    pub fn empty() -> Bitmap {
        Bitmap(Vec::new())
    }

    /// Whether it has no words at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The marked pages, ascending, after checking the bitmap fits a `pages`-page guest
    /// (its length, and no bit past the last page).
    pub fn pages(&self, pages: u64) -> Result<Vec<u64>, WireError> {
        let bad_tail =
            !pages.is_multiple_of(64) && self.0.last().is_some_and(|w| w >> (pages % 64) != 0);
        if self.0.len() as u64 != pages.div_ceil(64) || bad_tail {
            return Err(WireError::BadBitmap {
                words: self.0.len(),
                pages,
            });
        }
        let mut out = Vec::new();
        for (i, &w) in self.0.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip() {
        let b = Bitmap::of(130, [0, 63, 64, 129]);
        assert_eq!(b.pages(130).unwrap(), vec![0, 63, 64, 129]);
        assert_eq!(b.0.len(), 3);
        assert!(Bitmap::of(0, []).pages(0).unwrap().is_empty());
    }

    #[test]
    fn a_bitmap_that_does_not_fit_the_guest_is_refused() {
        let b = Bitmap::of(130, [129]);
        assert!(
            matches!(b.pages(129), Err(WireError::BadBitmap { .. })),
            "bit past the end"
        );
        assert!(b.pages(200).is_err(), "too few words");
        assert!(b.pages(64).is_err(), "too many words");
        assert!(Bitmap::empty().pages(1).is_err());
    }
}
