//! A hashed timer wheel with intrusive links: one deadline per entry, O(1)
//! insert and cancel, and `advance` visits only the slots whose tick has
//! passed.
//!
//! The wheel owns only the slot heads. The links live in the entries
//! themselves (a `Link` inside each connection's slab entry), reached
//! through the `Links` trait, so a timer costs no allocation and no
//! separate table.
//!
//! Invariants:
//! - An entry is linked iff its `Link::deadline != 0` (deadlines are always
//!   `>= now + 1 >= 1`); it is then in the list of slot `deadline % SLOTS`,
//!   and `prev`/`next` are keys of entries in the same list (or `NIL`).
//! - `now` is the last tick `advance` processed. Every linked deadline is
//!   `> now`: `insert` clamps earlier deadlines to `now + 1`, so nothing
//!   can land in a slot that was already swept.
//! - A deadline more than `SLOTS` ticks ahead stays in its slot across
//!   sweeps until its tick comes (compared by value, not by slot).

/// A tick of the shard clock (100 ms by default): 13 years fit in a u32.
pub type Tick = u32;

const SLOTS: usize = 1024;
const NIL: u32 = u32::MAX;

/// The intrusive part an entry carries: 12 bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Link {
    prev: u32,
    next: u32,
    deadline: Tick,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            prev: NIL,
            next: NIL,
            deadline: 0,
        }
    }
}

impl Link {
    pub fn is_linked(&self) -> bool {
        self.deadline != 0
    }

    fn slot(&self) -> usize {
        self.deadline as usize % SLOTS
    }

    pub fn deadline(&self) -> Option<Tick> {
        self.is_linked().then_some(self.deadline)
    }
}

/// Gives the wheel access to the links stored in the entries.
pub trait Links {
    fn link(&mut self, key: u32) -> &mut Link;
}

pub struct Wheel {
    heads: Box<[u32; SLOTS]>,
    now: Tick,
    len: usize,
}

impl Wheel {
    pub fn new(now: Tick) -> Wheel {
        Wheel {
            heads: Box::new([NIL; SLOTS]),
            now,
            len: 0,
        }
    }

    pub fn now(&self) -> Tick {
        self.now
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Links `key` with `deadline` (moved to `now + 1` if earlier). An entry
    /// that was linked is moved.
    pub fn insert<L: Links>(&mut self, links: &mut L, key: u32, deadline: Tick) {
        self.cancel(links, key);
        let deadline = deadline.max(self.now + 1);
        debug_assert!(deadline != 0, "tick overflow");
        let link = Link {
            prev: NIL,
            next: self.heads[deadline as usize % SLOTS],
            deadline,
        };
        let (slot, head) = (link.slot(), link.next);
        *links.link(key) = link;
        if head != NIL {
            links.link(head).prev = key;
        }
        self.heads[slot] = key;
        self.len += 1;
    }

    /// Unlinks `key` if it is linked.
    pub fn cancel<L: Links>(&mut self, links: &mut L, key: u32) {
        let link = *links.link(key);
        if !link.is_linked() {
            return;
        }
        if link.prev == NIL {
            debug_assert_eq!(self.heads[link.slot()], key);
            self.heads[link.slot()] = link.next;
        } else {
            links.link(link.prev).next = link.next;
        }
        if link.next != NIL {
            links.link(link.next).prev = link.prev;
        }
        *links.link(key) = Link::default();
        self.len -= 1;
    }

    /// Sweeps every tick up to and including `now`, unlinking the entries
    /// whose deadline has come and appending their keys to `expired`.
    pub fn advance<L: Links>(&mut self, links: &mut L, now: Tick, expired: &mut Vec<u32>) {
        while self.now < now {
            // Once every linked entry is known to be far ahead, skip whole
            // rotations instead of sweeping empty slots.
            if self.len == 0 {
                self.now = now;
                return;
            }
            self.now += 1;
            let slot = self.now as usize % SLOTS;
            let mut key = self.heads[slot];
            while key != NIL {
                let link = *links.link(key);
                if link.deadline <= self.now {
                    self.cancel(links, key);
                    expired.push(key);
                }
                key = link.next;
            }
        }
    }

    /// Ticks until the earliest possible expiry: 1 when anything is linked
    /// (the next slot may hold it), `None` when the wheel is empty.
    pub fn next_expiry(&self) -> Option<Tick> {
        (self.len > 0).then_some(self.now + 1)
    }

    /// The first tick within `within` ticks whose slot holds an entry: no
    /// deadline comes before it (one there may belong to a later rotation,
    /// so it is a time to look, never a promise). `None` if none does. For
    /// a loop that would rather sleep than wake every tick; O(`within`).
    pub fn next_busy(&self, within: Tick) -> Option<Tick> {
        if self.len == 0 {
            return None;
        }
        (self.now + 1..=self.now.saturating_add(within.min(SLOTS as Tick)))
            .find(|t| self.heads[*t as usize % SLOTS] != NIL)
    }
}

impl Links for Vec<Link> {
    fn link(&mut self, key: u32) -> &mut Link {
        &mut self[key as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(n: usize) -> (Wheel, Vec<Link>) {
        (Wheel::new(0), vec![Link::default(); n])
    }

    #[test]
    fn fires_exactly_at_the_deadline() {
        let (mut wheel, mut links) = fixture(4);
        wheel.insert(&mut links, 0, 5);
        wheel.insert(&mut links, 1, 5);
        wheel.insert(&mut links, 2, 6);
        let mut out = Vec::new();
        wheel.advance(&mut links, 4, &mut out);
        assert!(out.is_empty());
        wheel.advance(&mut links, 5, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 1]);
        assert!(!links[0].is_linked());
        out.clear();
        wheel.advance(&mut links, 100, &mut out);
        assert_eq!(out, vec![2]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn cancel_and_reinsert_move_the_entry() {
        let (mut wheel, mut links) = fixture(3);
        wheel.insert(&mut links, 0, 10);
        wheel.insert(&mut links, 1, 10);
        wheel.insert(&mut links, 2, 10);
        wheel.cancel(&mut links, 1);
        wheel.insert(&mut links, 0, 20);
        assert_eq!(wheel.len(), 2);
        let mut out = Vec::new();
        wheel.advance(&mut links, 10, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        wheel.advance(&mut links, 20, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let (mut wheel, mut links) = fixture(1);
        let mut out = Vec::new();
        wheel.advance(&mut links, 50, &mut out);
        wheel.insert(&mut links, 0, 3);
        assert_eq!(links[0].deadline(), Some(51));
        wheel.advance(&mut links, 51, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn deadlines_beyond_one_rotation_wait_their_turn() {
        let (mut wheel, mut links) = fixture(2);
        wheel.insert(&mut links, 0, 7 + SLOTS as Tick * 3);
        wheel.insert(&mut links, 1, 7);
        let mut out = Vec::new();
        wheel.advance(&mut links, 7 + SLOTS as Tick * 2, &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        wheel.advance(&mut links, 7 + SLOTS as Tick * 3, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn next_busy_never_skips_a_deadline() {
        let (mut wheel, mut links) = fixture(3);
        assert_eq!(wheel.next_busy(100), None);
        wheel.insert(&mut links, 0, 40);
        wheel.insert(&mut links, 1, 40 + SLOTS as Tick);
        assert_eq!(wheel.next_busy(10), None, "nothing within 10 ticks");
        assert_eq!(wheel.next_busy(100), Some(40));
        let mut out = Vec::new();
        wheel.advance(&mut links, 40, &mut out);
        assert_eq!(out, vec![0]);
        // Entry 1 sits in the same slot one rotation later: looked at, not fired.
        assert_eq!(wheel.next_busy(SLOTS as Tick), Some(40 + SLOTS as Tick));
        wheel.insert(&mut links, 2, 45);
        assert_eq!(wheel.next_busy(100), Some(45));
    }

    /// A model check: random inserts, cancels and advances against a plain
    /// list of deadlines.
    #[test]
    fn agrees_with_a_naive_model() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut wheel, mut links) = fixture(64);
        let mut model: Vec<Option<Tick>> = vec![None; 64];
        let mut now = 0;
        for _ in 0..20_000 {
            let key = rng.u32(..64);
            match rng.u8(..10) {
                0..=4 => {
                    let deadline = now + rng.u32(0..3000);
                    wheel.insert(&mut links, key, deadline);
                    model[key as usize] = Some(deadline.max(now + 1));
                }
                5 => {
                    wheel.cancel(&mut links, key);
                    model[key as usize] = None;
                }
                _ => {
                    now += rng.u32(0..40);
                    let mut fired = Vec::new();
                    wheel.advance(&mut links, now, &mut fired);
                    fired.sort();
                    let mut expected: Vec<u32> = (0..64)
                        .filter(|&k| model[k as usize].is_some_and(|d| d <= now))
                        .collect();
                    expected.sort();
                    for k in &expected {
                        model[*k as usize] = None;
                    }
                    assert_eq!(fired, expected);
                }
            }
            assert_eq!(wheel.len(), model.iter().flatten().count());
        }
    }
}
