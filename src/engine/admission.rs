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
/// last one to two windows (a window is the admit timeout): the 95th
/// percentile, so that a connection not admitted yet is evicted only once
/// it is slower than nearly all the clients that do register. A herd on a
/// machine that is busy (clients and controller sharing two cores) has a
/// slow tail for seconds while most register in milliseconds: a pace that
/// forgot the slow ones after a few dozen fast ones (as this did before)
/// evicted that tail at the 2 s floor, each evicted client coming back
/// after a longer backoff. A slowloris must make one registration in
/// twenty slow to hold its sockets longer, and never past the admit
/// timeout. With fewer than `WARM` registrations in the windows the pace
/// is unknown and nothing is evicted before it could have timed out (a
/// restarted node's first herd).
pub struct Pace {
    window: Tick,
    since: Tick,
    /// Registrations by how long they took: bucket 0 under one tick,
    /// bucket i (1..) under 2^i ticks, the last one open.
    current: [u32; PACE_BUCKETS],
    previous: [u32; PACE_BUCKETS],
}

const PACE_BUCKETS: usize = 10;

impl Pace {
    const WARM: u32 = 16;

    /// `window`: ticks a window spans (at least one).
    pub fn new(window: Tick) -> Pace {
        Pace {
            window: window.max(1),
            since: 0,
            current: [0; PACE_BUCKETS],
            previous: [0; PACE_BUCKETS],
        }
    }

    fn rotate(&mut self, now: Tick) {
        if now < self.since.saturating_add(self.window) {
            return;
        }
        self.previous = if now < self.since.saturating_add(2 * self.window) {
            self.current
        } else {
            [0; PACE_BUCKETS]
        };
        self.current = [0; PACE_BUCKETS];
        self.since = now;
    }

    /// A connection was admitted at `now`, `took` ticks after its accept.
    pub fn record(&mut self, now: Tick, took: Tick) {
        self.rotate(now);
        let bucket = (Tick::BITS - took.leading_zeros()) as usize;
        self.current[bucket.min(PACE_BUCKETS - 1)] += 1;
    }

    /// How old a connection not admitted yet must be at `now` to be
    /// evicted: four times the 95th percentile of the recent clients' time
    /// to admission (the upper end of its bucket), at least `least`, at
    /// most `most` (the admit timeout), which is also the answer until the
    /// pace is known.
    pub fn grace(&mut self, now: Tick, least: Tick, most: Tick) -> Tick {
        self.rotate(now);
        let count = |i: usize| self.current[i] + self.previous[i];
        let total: u32 = (0..PACE_BUCKETS).map(count).sum();
        if total < Self::WARM {
            return most.max(least);
        }
        let within = total - total / 20;
        let mut seen = 0;
        let bucket = (0..PACE_BUCKETS)
            .find(|&i| {
                seen += count(i);
                seen >= within
            })
            .unwrap_or(PACE_BUCKETS - 1);
        if bucket == PACE_BUCKETS - 1 {
            return most.max(least);
        }
        let slow = 1u64 << bucket;
        let four = (4 * slow).min(u64::from(most)) as Tick;
        four.max(least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_is_the_slow_tail_of_the_recent_registrations() {
        // Windows of 100 ticks (the admit timeout).
        let mut pace = Pace::new(100);
        // Unknown until 16 have registered: the admit timeout.
        for _ in 0..15 {
            pace.record(0, 1);
        }
        assert_eq!(pace.grace(0, 20, 100), 100);
        pace.record(0, 1);
        // Fast clients (under 2 ticks): the configured least.
        assert_eq!(pace.grace(1, 20, 100), 20);
        // A slow tail of more than one in twenty (15 ticks: under 16) sets
        // it, however many fast ones register after: four times 16.
        for _ in 0..4 {
            pace.record(2, 15);
        }
        for _ in 0..50 {
            pace.record(3, 1);
        }
        assert_eq!(pace.grace(3, 20, 100), 64);
        // One slow one in twenty or fewer does not.
        for _ in 0..30 {
            pace.record(4, 1);
        }
        assert_eq!(pace.grace(4, 20, 100), 20);
        // Never past the most.
        for _ in 0..40 {
            pace.record(5, 90);
        }
        assert_eq!(pace.grace(5, 20, 100), 100);
        // Two windows on, the slow ones are forgotten...
        for _ in 0..20 {
            pace.record(150, 1);
        }
        assert_eq!(
            pace.grace(150, 20, 100),
            100,
            "the previous window still counts"
        );
        for _ in 0..20 {
            pace.record(260, 1);
        }
        assert_eq!(pace.grace(260, 20, 100), 20);
        // ...and after a quiet spell the pace is unknown again.
        assert_eq!(pace.grace(500, 20, 100), 100);
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
