//! Identity conflicts. Two live processes that register one identity (a
//! copy-pasted port, a cloned config) would supersede each other forever:
//! each is closed with 4000, reconnects as clients do on any close, and
//! supersedes the other, flapping discovery for every subscriber.
//!
//! A supersede is normal now and then (a restart whose old socket is not
//! yet seen dead). More than `MAX_SUPERSEDES` of one identity within
//! `WINDOW_MS` is a conflict: the registration that would supersede once
//! more is refused instead, the incumbent keeps the identity, and an
//! `identity_conflict` event names both peers. While the loser keeps
//! trying (within a window of its last try) it is refused with a retry
//! hint; once the incumbent is gone (down, closed, deregistered) its
//! registration supersedes nothing and goes through at once.
//!
//! Tracked only for identities that were superseded, in a bounded map;
//! when it is full of live entries a new identity is not tracked (its
//! supersedes go through as before).

use std::collections::HashMap;
use std::net::SocketAddr;

/// Supersedes of one identity a window allows before it is a conflict.
pub const MAX_SUPERSEDES: u32 = 3;
pub const WINDOW_MS: u64 = 60_000;
/// How long a refused registration is told to wait.
pub const RETRY_AFTER_MS: u64 = 30_000;
/// Identities tracked at once.
const MAX_TRACKED: usize = 4096;

struct Entry {
    window_start_ms: u64,
    supersedes: u32,
    last_ms: u64,
    /// The peer of the registration that holds the identity now.
    holder: Option<SocketAddr>,
    conflicted: bool,
}

/// What to do with a registration that would supersede an up record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Supersede,
    /// Just became a conflict: refuse, and tell the world once.
    Conflict {
        holder: Option<SocketAddr>,
        loser: Option<SocketAddr>,
    },
    /// A conflict still on: refuse.
    Refuse,
}

#[derive(Default)]
pub struct Conflicts {
    entries: HashMap<u64, Entry>,
}

impl Conflicts {
    /// A registration from `peer` would supersede the up record of the
    /// identity whose hash is `identity`.
    pub fn judge(&mut self, identity: u64, now_ms: u64, peer: Option<SocketAddr>) -> Verdict {
        if self.entries.len() >= MAX_TRACKED && !self.entries.contains_key(&identity) {
            self.expire(now_ms);
            if self.entries.len() >= MAX_TRACKED {
                return Verdict::Supersede;
            }
        }
        let e = self.entries.entry(identity).or_insert(Entry {
            window_start_ms: now_ms,
            supersedes: 0,
            last_ms: now_ms,
            holder: None,
            conflicted: false,
        });
        let since_last = now_ms.saturating_sub(e.last_ms);
        if e.conflicted && since_last < WINDOW_MS {
            e.last_ms = now_ms;
            return Verdict::Refuse;
        }
        if e.conflicted || now_ms.saturating_sub(e.window_start_ms) >= WINDOW_MS {
            e.window_start_ms = now_ms;
            e.supersedes = 0;
            e.conflicted = false;
        }
        e.last_ms = now_ms;
        if e.supersedes >= MAX_SUPERSEDES {
            e.conflicted = true;
            return Verdict::Conflict {
                holder: e.holder,
                loser: peer,
            };
        }
        e.supersedes += 1;
        e.holder = peer;
        Verdict::Supersede
    }

    /// Forgets identities quiet for a window.
    pub fn expire(&mut self, now_ms: u64) {
        self.entries
            .retain(|_, e| now_ms.saturating_sub(e.last_ms) < WINDOW_MS);
    }

    pub fn tracked(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> Option<SocketAddr> {
        Some(([127, 0, 0, n], 40_000).into())
    }

    #[test]
    fn a_few_supersedes_pass_then_the_next_is_a_conflict_naming_both() {
        let mut c = Conflicts::default();
        let mut t = 1_000;
        for n in 0..MAX_SUPERSEDES {
            assert_eq!(c.judge(7, t, peer(2 + (n % 2) as u8)), Verdict::Supersede);
            t += 1_000;
        }
        // The last winner was peer(2 + (MAX-1) % 2); the loser is the other.
        let holder = peer(2 + ((MAX_SUPERSEDES - 1) % 2) as u8);
        let loser = peer(2 + (MAX_SUPERSEDES % 2) as u8);
        assert_eq!(c.judge(7, t, loser), Verdict::Conflict { holder, loser });
        // The loser retrying is refused (no second event) ...
        assert_eq!(c.judge(7, t + 20_000, loser), Verdict::Refuse);
        assert_eq!(c.judge(7, t + 70_000, loser), Verdict::Refuse);
        // ... until it has been quiet for a window: then it may supersede
        // again (and the count starts over).
        assert_eq!(
            c.judge(7, t + 70_000 + WINDOW_MS, loser),
            Verdict::Supersede
        );
        // Another identity is judged on its own.
        assert_eq!(c.judge(8, t, peer(9)), Verdict::Supersede);
    }

    #[test]
    fn supersedes_spread_over_windows_are_no_conflict() {
        let mut c = Conflicts::default();
        for i in 0..20 {
            let t = i * (WINDOW_MS / 2);
            assert_eq!(c.judge(1, t, peer(2)), Verdict::Supersede, "at {t}");
        }
    }

    #[test]
    fn the_map_is_bounded_and_forgets_quiet_identities() {
        let mut c = Conflicts::default();
        for id in 0..MAX_TRACKED as u64 {
            c.judge(id, 0, None);
        }
        assert_eq!(c.tracked(), MAX_TRACKED);
        // Full of live entries: a new identity is not tracked.
        assert_eq!(
            c.judge(u64::MAX, 10, None),
            Verdict::Supersede,
            "fails open"
        );
        assert_eq!(c.tracked(), MAX_TRACKED);
        // Once they are quiet for a window, they make room.
        c.judge(u64::MAX, WINDOW_MS, None);
        assert_eq!(c.tracked(), 1);
        c.expire(3 * WINDOW_MS);
        assert_eq!(c.tracked(), 0);
    }
}
