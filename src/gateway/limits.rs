//! Per-caller bounds: a token bucket of requests (a user's name once
//! authenticated, the peer's address before), and WebSockets open at once.
//! The tables are bounded: idle buckets are dropped when they fill.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys tracked before idle ones are swept.
const MAX_KEYS: usize = 100_000;

#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub rate: f64,
    /// Requests that may come at once.
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Limiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `key`'s; `Err(wait)` when none is left.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let RateLimit { rate, burst } = self.limit;
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            // A bucket refilled to the brim says nothing: drop those.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_KEYS {
                return Err(Duration::from_secs(1));
            }
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

impl Limiter {
    /// How long `key` must wait before its next request, if it has used
    /// its burst up (takes nothing).
    pub fn exhausted(&self, key: &str) -> Option<Duration> {
        let RateLimit { rate, burst } = self.limit;
        let buckets = self.buckets.lock().unwrap();
        let b = buckets.get(key)?;
        let tokens = (b.tokens + b.at.elapsed().as_secs_f64() * rate).min(burst);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / rate))
    }
}

/// WebSockets open per user, at most `max` each.
pub struct SocketCounts {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open socket; counted until dropped.
pub struct SocketSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl SocketCounts {
    pub fn new(max: usize) -> SocketCounts {
        SocketCounts {
            max,
            open: Arc::default(),
        }
    }

    pub fn open(&self, key: &str) -> Option<SocketSlot> {
        let mut open = self.open.lock().unwrap();
        let n = open.entry(key.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SocketSlot {
            key: key.to_string(),
            open: self.open.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = Limiter::new(RateLimit {
            rate: 10.0,
            burst: 3.0,
        });
        for _ in 0..3 {
            assert!(limiter.take("u").is_ok());
        }
        let wait = limiter.take("u").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.take("v").is_ok(), "buckets are per key");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take("u").is_ok(), "refilled");
    }

    #[test]
    fn sockets_are_counted_per_user_until_dropped() {
        let counts = SocketCounts::new(2);
        let a = counts.open("u").unwrap();
        let _b = counts.open("u").unwrap();
        assert!(counts.open("u").is_none());
        assert!(counts.open("w").is_some());
        drop(a);
        assert!(counts.open("u").is_some());
    }
}
