//! Per-source admission: how many sockets one source address may hold,
//! node-wide, in all and still in their handshakes (accepted, and not yet
//! admitted by the handler: the HTTP upgrade or the registration in
//! progress).
//!
//! Counts are shared by the shards (SO_REUSEPORT spreads one source's
//! connections over all of them), in striped maps so shards rarely meet
//! on a lock. A source is counted only while it holds a socket; the
//! handshake count alone is kept unless a connection limit is set, so by
//! default the cost is per handshake, not per connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use hashbrown::HashMap;

use super::wheel::Tick;

const STRIPES: usize = 64;

/// Why a source's new socket was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It has its most sockets in their handshakes.
    Handshakes,
    /// It has its most connections.
    Connections,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    handshakes: u32,
    conns: u32,
}

pub struct Sources {
    stripes: Box<[Mutex<HashMap<u128, Counts>>]>,
    max_handshakes: u32,
    max_conns: u32,
}

/// One key per address: an IPv4 peer and the same peer IPv4-mapped on a
/// dual-stack listener are one source.
pub fn source_key(addr: SocketAddr) -> u128 {
    match addr.ip() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Sources {
    /// `None` when neither limit is set (0 means none).
    pub fn new(max_handshakes: u32, max_conns: u32) -> Option<Sources> {
        if max_handshakes == 0 && max_conns == 0 {
            return None;
        }
        Some(Sources {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            max_handshakes,
            max_conns,
        })
    }

    /// Connections stay counted after their handshake (a connection limit
    /// is set), so the shard must remember every connection's source.
    pub fn counts_connections(&self) -> bool {
        self.max_conns > 0
    }

    fn stripe(&self, key: u128) -> std::sync::MutexGuard<'_, HashMap<u128, Counts>> {
        let folded = (key as u64) ^ ((key >> 64) as u64);
        let index = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % STRIPES;
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new socket from `key`, in its handshake: counted (the answer is
    /// how many of its sockets are in their handshakes now), or refused.
    pub fn open(&self, key: u128) -> Result<u32, Refused> {
        let mut map = self.stripe(key);
        let counts = map.entry(key).or_default();
        if self.max_handshakes > 0 && counts.handshakes >= self.max_handshakes {
            return Err(Refused::Handshakes);
        }
        if self.max_conns > 0 && counts.conns >= self.max_conns {
            return Err(Refused::Connections);
        }
        counts.handshakes += 1;
        counts.conns += 1;
        Ok(counts.handshakes)
    }

    /// One of `key`'s sockets finished its handshake (it was admitted).
    pub fn admitted(&self, key: u128) {
        self.release(key, true, !self.counts_connections());
    }

    /// One of `key`'s sockets closed; `in_handshake` if it was never
    /// admitted. Only sockets still counted may be told here.
    pub fn closed(&self, key: u128, in_handshake: bool) {
        self.release(key, in_handshake, true);
    }

    fn release(&self, key: u128, handshake: bool, conn: bool) {
        let mut map = self.stripe(key);
        let Some(counts) = map.get_mut(&key) else {
            debug_assert!(false, "a source released that was never counted");
            return;
        };
        if handshake {
            counts.handshakes = counts.handshakes.saturating_sub(1);
        }
        if conn {
            counts.conns = counts.conns.saturating_sub(1);
        }
        if counts.handshakes == 0 && (counts.conns == 0 || !self.counts_connections()) {
            map.remove(&key);
        }
    }

    /// Sources counted now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// How long a shard's clients take from accept to admission, over the
/// current and the previous window (windows are the admit timeout long,
/// aligned to multiples of it): the 95th percentile, so that a connection
/// not admitted yet is evicted only once it is slower than nearly all the
/// clients that do register. A herd on a machine that is busy (clients
/// and controller sharing two cores) has a slow tail for seconds while
/// most register in milliseconds: a pace that forgot the slow ones after a
/// few dozen fast ones (as this did before) evicted that tail at the 2 s
/// floor, each evicted client coming back after a longer backoff. A
/// slowloris must make more than one registration in twenty slow to hold
/// its sockets longer, and never past the admit timeout.
///
/// With fewer than `WARM` registrations in the two windows (a quiet node:
/// its services stay connected) the last pace known stands; before any is
/// known, the answer is the admit timeout, so nothing is evicted before it
/// could have timed out (a restarted node's first herd).
pub struct Pace {
    window: Tick,
    /// Where the current window began (a multiple of `window`).
    epoch: Tick,
    /// Registrations by how long they took: bucket 0 under one tick,
    /// bucket i (1..) under 2^i ticks, the last one open.
    current: [u32; PACE_BUCKETS],
    previous: [u32; PACE_BUCKETS],
    /// The 95th percentile's bucket when the windows last held `WARM`.
    known: Option<usize>,
}

const PACE_BUCKETS: usize = 10;

impl Pace {
    /// Registrations the windows must hold for their 95th percentile to
    /// stand: twenty, so one slow client in twenty does not set it.
    const WARM: u32 = 20;

    /// `window`: ticks a window spans (at least one; the admit timeout).
    pub fn new(window: Tick) -> Pace {
        Pace {
            window: window.clamp(1, Tick::MAX / 4),
            epoch: 0,
            current: [0; PACE_BUCKETS],
            previous: [0; PACE_BUCKETS],
            known: None,
        }
    }

    fn rotate(&mut self, now: Tick) {
        let epoch = now - now % self.window;
        if epoch == self.epoch {
            return;
        }
        self.previous = if epoch == self.epoch + self.window {
            self.current
        } else {
            [0; PACE_BUCKETS]
        };
        self.current = [0; PACE_BUCKETS];
        self.epoch = epoch;
    }

    /// A connection was admitted at `now`, `took` ticks after its accept.
    pub fn record(&mut self, now: Tick, took: Tick) {
        self.rotate(now);
        let bucket = ((Tick::BITS - took.leading_zeros()) as usize).min(PACE_BUCKETS - 1);
        self.current[bucket] = self.current[bucket].saturating_add(1);
    }

    /// How old a connection not admitted yet must be at `now` to be
    /// evicted: four times the 95th percentile of the recent clients' time
    /// to admission, taken at the upper end of its power-of-two bucket (so
    /// four to eight times the percentile itself), at least `least`, at
    /// most `most` (the admit timeout), which is also the answer until a
    /// pace is known.
    pub fn grace(&mut self, now: Tick, least: Tick, most: Tick) -> Tick {
        self.rotate(now);
        let count = |i: usize| u64::from(self.current[i]) + u64::from(self.previous[i]);
        let total: u64 = (0..PACE_BUCKETS).map(count).sum();
        if total >= u64::from(Self::WARM) {
            let within = total - total / 20;
            let mut seen = 0;
            let bucket = (0..PACE_BUCKETS)
                .find(|&i| {
                    seen += count(i);
                    seen >= within
                })
                .unwrap_or(PACE_BUCKETS - 1);
            self.known = Some(bucket);
        }
        match self.known {
            Some(bucket) if bucket < PACE_BUCKETS - 1 => {
                let four = (4u64 << bucket).min(u64::from(most)) as Tick;
                four.max(least)
            }
            _ => most.max(least),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_is_the_slow_tail_of_the_recent_registrations() {
        // Windows of 100 ticks (the admit timeout).
        let mut pace = Pace::new(100);
        // Unknown until 20 have registered: the admit timeout.
        for _ in 0..19 {
            pace.record(0, 1);
        }
        assert_eq!(pace.grace(0, 20, 100), 100);
        pace.record(0, 1);
        // Fast clients (under 2 ticks): the configured least.
        assert_eq!(pace.grace(1, 20, 100), 20);
        // A slow tail of more than one in twenty (15 ticks: under 16) sets
        // it to four times 16: 4 slow of 74.
        for _ in 0..4 {
            pace.record(2, 15);
        }
        for _ in 0..50 {
            pace.record(3, 1);
        }
        assert_eq!(pace.grace(3, 20, 100), 64);
        // One in twenty exactly does not: 5 slow of 100.
        pace.record(4, 15);
        for _ in 0..25 {
            pace.record(4, 1);
        }
        assert_eq!(pace.grace(4, 20, 100), 20);
        // Never past the most.
        for _ in 0..40 {
            pace.record(5, 90);
        }
        assert_eq!(pace.grace(5, 20, 100), 100);
        // The next window still counts the previous one...
        for _ in 0..20 {
            pace.record(150, 1);
        }
        assert_eq!(pace.grace(150, 20, 100), 100, "the previous window counts");
        // ...and the one after forgets it.
        for _ in 0..20 {
            pace.record(260, 1);
        }
        assert_eq!(pace.grace(260, 20, 100), 20);
        // A quiet node keeps the pace it last knew: a flood of half-open
        // sockets long after the last registrations is still evicted at
        // the least, not held to the admit timeout.
        assert_eq!(pace.grace(5_000, 20, 100), 20);
        pace.record(5_001, 90);
        assert_eq!(pace.grace(5_002, 20, 100), 20, "one slow one is not a pace");
    }

    #[test]
    fn the_pace_windows_are_aligned_so_nothing_counts_past_two() {
        let mut pace = Pace::new(100);
        // 20 slow at the end of window 0, 20 fast early in window 1.
        for _ in 0..20 {
            pace.record(99, 90);
        }
        for _ in 0..20 {
            pace.record(100, 0);
        }
        assert_eq!(pace.grace(150, 20, 100), 100);
        // Window 2 begins at 200: the slow ones (tick 99) are gone, the
        // fast ones (under one tick) are the pace.
        assert_eq!(pace.grace(200, 2, 100), 4);
    }

    fn key(s: &str) -> u128 {
        source_key(s.parse().unwrap())
    }

    #[test]
    fn handshakes_are_bounded_per_source_and_freed_on_admission() {
        let sources = Sources::new(2, 0).unwrap();
        let a = key("127.0.0.5:1000");
        assert_eq!(sources.open(a), Ok(1));
        assert_eq!(sources.open(a), Ok(2));
        assert_eq!(sources.open(a), Err(Refused::Handshakes));
        // Another source is not affected.
        assert_eq!(sources.open(key("127.0.0.6:1000")), Ok(1));
        sources.admitted(a);
        assert_eq!(sources.open(a), Ok(2));
        sources.closed(a, true);
        sources.closed(a, true);
        sources.closed(key("127.0.0.6:1"), true);
        // Only admitted connections are left, and they are not counted.
        assert_eq!(sources.tracked(), 0);
    }

    #[test]
    fn connections_are_bounded_per_source_until_they_close() {
        let sources = Sources::new(0, 2).unwrap();
        let a = key("10.0.0.1:5");
        sources.open(a).unwrap();
        sources.admitted(a);
        sources.open(a).unwrap();
        assert_eq!(sources.open(a), Err(Refused::Connections));
        sources.closed(a, false);
        assert_eq!(sources.open(a), Ok(2));
        sources.closed(a, true);
        sources.closed(a, true);
        assert_eq!(sources.tracked(), 0);
    }

    #[test]
    fn a_mapped_v4_peer_is_the_same_source() {
        assert_eq!(key("127.0.0.1:1"), key("[::ffff:127.0.0.1]:2"));
        assert_ne!(key("127.0.0.1:1"), key("[::1]:1"));
        assert!(Sources::new(0, 0).is_none());
    }
}
