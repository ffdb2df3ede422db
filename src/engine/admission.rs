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

    /// A new socket from `key`, in its handshake: counted, or refused.
    pub fn open(&self, key: u128) -> Result<(), Refused> {
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
        Ok(())
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

/// How long a shard's clients take from accept to admission: the slow end
/// of it, so that a connection not admitted yet is evicted only once it is
/// slower than the clients that do register. It rises at once toward a
/// slower registration and falls slowly (1/32 of the way per faster one);
/// until `WARM` clients have registered it is unknown, and nothing is
/// evicted before it could have timed out (a restarted node's first herd).
#[derive(Default)]
pub struct Pace {
    /// Ticks × 32.
    slow_x32: u64,
    seen: u32,
}

impl Pace {
    const WARM: u32 = 16;

    /// A connection was admitted `took` ticks after its accept.
    pub fn record(&mut self, took: Tick) {
        let took = u64::from(took) * 32;
        if self.seen == 0 {
            self.slow_x32 = took;
        } else if took > self.slow_x32 {
            self.slow_x32 += (took - self.slow_x32) / 2;
        } else {
            self.slow_x32 -= (self.slow_x32 - took) / 32;
        }
        self.seen = self.seen.saturating_add(1);
    }

    /// How old a connection not admitted yet must be to be evicted: four
    /// times the slow pace, at least `least`, at most `most` (the admit
    /// timeout), which is also the answer until the pace is known.
    pub fn grace(&self, least: Tick, most: Tick) -> Tick {
        if self.seen < Self::WARM {
            return most.max(least);
        }
        let four = (4 * self.slow_x32 / 32).min(u64::from(most)) as Tick;
        four.max(least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_follows_the_slow_clients_and_forgets_them_slowly() {
        let mut pace = Pace::default();
        // Unknown until 16 have registered: the admit timeout.
        for _ in 0..15 {
            pace.record(1);
        }
        assert_eq!(pace.grace(20, 100), 100);
        pace.record(1);
        // Fast clients: the configured least.
        assert_eq!(pace.grace(20, 100), 20);
        // One slow registration (15 ticks) moves it halfway at once.
        pace.record(15);
        assert_eq!(pace.grace(20, 100), 4 * 8);
        // Fast ones wear it down slowly: 32 of them take it below 4 ticks.
        for _ in 0..10 {
            pace.record(1);
        }
        assert!(pace.grace(0, 100) > 16, "{}", pace.grace(0, 100));
        for _ in 0..60 {
            pace.record(1);
        }
        assert!(pace.grace(20, 100) == 20);
        // Never past the most.
        for _ in 0..4 {
            pace.record(90);
        }
        assert_eq!(pace.grace(20, 100), 100);
    }

    fn key(s: &str) -> u128 {
        source_key(s.parse().unwrap())
    }

    #[test]
    fn handshakes_are_bounded_per_source_and_freed_on_admission() {
        let sources = Sources::new(2, 0).unwrap();
        let a = key("127.0.0.5:1000");
        assert_eq!(sources.open(a), Ok(()));
        assert_eq!(sources.open(a), Ok(()));
        assert_eq!(sources.open(a), Err(Refused::Handshakes));
        // Another source is not affected.
        assert_eq!(sources.open(key("127.0.0.6:1000")), Ok(()));
        sources.admitted(a);
        assert_eq!(sources.open(a), Ok(()));
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
        assert_eq!(sources.open(a), Ok(()));
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
