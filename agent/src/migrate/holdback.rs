//! Hot-page holdback: pages written again within the last rounds are not sent again before
//! stop-and-copy.
//!
//! A page that a round finds dirty although an earlier round (at most `window - 1` rounds
//! before) found it dirty too is hot: sending it once more during pre-copy would most likely be
//! wasted, since the guest writes it again before the end. From then on it is held back: it
//! stays in the pending set (so the predicted downtime counts it, and stop-and-copy or the
//! post-copy switch sends it) but no pre-copy round sends it. `window` 0 turns holdback off.

/// The holdback state of one migration.
#[derive(Debug)]
pub struct Holdback {
    window: u32,
    /// Per page: the last round whose harvest found it dirty (0: none yet).
    last_dirty: Vec<u32>,
    /// Per page: held back until stop-and-copy.
    held: Vec<bool>,
    held_count: u64,
}

impl Holdback {
    /// Holdback over `pages` guest pages; a page dirty in two harvests at most `window - 1`
    /// rounds apart is held. `window` 0 (or 1) turns it off.
    pub fn new(window: u32, pages: u64) -> Self {
        let on = window >= 2;
        Self {
            window,
            last_dirty: if on {
                vec![0; pages as usize]
            } else {
                Vec::new()
            },
            held: if on {
                vec![false; pages as usize]
            } else {
                Vec::new()
            },
            held_count: 0,
        }
    }

    fn on(&self) -> bool {
        self.window >= 2
    }

    /// The pages of `pending` a pre-copy round sends: all but the held ones.
    pub fn sendable(&self, pending: &[u64]) -> Vec<u64> {
        if !self.on() {
            return pending.to_vec();
        }
        pending
            .iter()
            .copied()
            .filter(|&p| !self.held[p as usize])
            .collect()
    }

    /// How many pages of `pending` a pre-copy round would send.
    pub fn sendable_count(&self, pending: &[u64]) -> u64 {
        if !self.on() {
            return pending.len() as u64;
        }
        pending.iter().filter(|&&p| !self.held[p as usize]).count() as u64
    }

    /// Records round `round`'s harvest (`dirty`, ascending) and returns the new pending set:
    /// `dirty` plus every held page, ascending.
    pub fn after_harvest(&mut self, round: u32, dirty: Vec<u64>) -> Vec<u64> {
        if !self.on() {
            return dirty;
        }
        for &p in &dirty {
            let i = p as usize;
            let last = self.last_dirty[i];
            if last != 0 && round - last < self.window && !self.held[i] {
                self.held[i] = true;
                self.held_count += 1;
            }
            self.last_dirty[i] = round;
        }
        let mut pending = dirty;
        pending.extend(
            self.held
                .iter()
                .enumerate()
                .filter(|&(_, &h)| h)
                .map(|(i, _)| i as u64),
        );
        pending.sort_unstable();
        pending.dedup();
        pending
    }

    /// Pages held back so far.
    pub fn held(&self) -> u64 {
        self.held_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_sends_everything_and_holds_nothing() {
        let mut h = Holdback::new(0, 8);
        assert_eq!(h.sendable(&[1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(h.after_harvest(1, vec![1, 2]), vec![1, 2]);
        assert_eq!(h.after_harvest(2, vec![1, 2]), vec![1, 2]);
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn pages_dirty_again_within_the_window_are_held_until_the_end() {
        let mut h = Holdback::new(2, 8);
        // Round 1 finds 1, 2, 3 dirty: first time, all sendable.
        let p = h.after_harvest(1, vec![1, 2, 3]);
        assert_eq!(h.sendable(&p), vec![1, 2, 3]);
        // Round 2 finds 2, 3 again (hot) and 5 (new).
        let p = h.after_harvest(2, vec![2, 3, 5]);
        assert_eq!(p, vec![2, 3, 5]);
        assert_eq!(h.sendable(&p), vec![5]);
        assert_eq!(h.sendable_count(&p), 1);
        assert_eq!(h.held(), 2);
        // Round 3 finds nothing: the held pages stay pending, and still unsent.
        let p = h.after_harvest(3, vec![]);
        assert_eq!(p, vec![2, 3]);
        assert!(h.sendable(&p).is_empty());
        // Round 4 finds 5 again, two rounds after round 2: outside a window of 2.
        let p = h.after_harvest(4, vec![5]);
        assert_eq!(h.sendable(&p), vec![5]);
        assert_eq!(h.held(), 2);
    }

    #[test]
    fn a_wider_window_remembers_longer() {
        let mut h = Holdback::new(3, 8);
        h.after_harvest(1, vec![4]);
        h.after_harvest(2, vec![]);
        let p = h.after_harvest(3, vec![4]);
        assert!(h.sendable(&p).is_empty(), "dirty in rounds 1 and 3");
        assert_eq!(h.held(), 1);
    }
}
