//! The event log: every state change of an instance, numbered by a
//! sequence that only grows within an epoch. The epoch is drawn at random
//! when the log is made (once per controller start): a resume point from
//! another epoch names other events, so it is refused, never replayed. Kept in a bounded replay ring and fanned out
//! to subscribers through bounded sinks; a subscriber whose sink is full is
//! cut (its sink is dropped, so its receiver sees the end) and must resync
//! from a snapshot and a sequence number. Nothing here grows without a bound.
//!
//! Subscribers are std channels on purpose: events are published on shard
//! threads, which have fd tables of their own, so waking anything that
//! signals through a file descriptor (an async runtime's waker) from there
//! would write to the wrong file. A std channel wakes through a futex.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Weak};

use uuid::Uuid;

#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Registered,
    Updated,
    Down,
    Deregistered,
    Superseded,
    /// Two live registrants kept superseding one identity: the newest is
    /// refused (`registry::conflicts`). The reason names both peers.
    #[serde(rename = "identity_conflict")]
    IdentityConflict,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Registered,
        EventKind::Updated,
        EventKind::Down,
        EventKind::Deregistered,
        EventKind::Superseded,
        EventKind::IdentityConflict,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EventKind::Registered => "registered",
            EventKind::Updated => "updated",
            EventKind::Down => "down",
            EventKind::Deregistered => "deregistered",
            EventKind::Superseded => "superseded",
            EventKind::IdentityConflict => "identity_conflict",
        }
    }
}

/// One run of the event log: sequence numbers mean something only within
/// it. Shown as 16 hex digits (a string in JSON: JavaScript numbers do not
/// hold 64 bits).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

impl Epoch {
    /// A fresh epoch, never 0.
    pub fn random() -> Epoch {
        Epoch(fastrand::u64(1..))
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = String;

    fn from_str(s: &str) -> Result<Epoch, String> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("an epoch is 16 hex digits, not {s:?}"));
        }
        Ok(Epoch(u64::from_str_radix(s, 16).expect("16 hex digits")))
    }
}

impl serde::Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a subscriber left off: the last event it saw, of which epoch.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub epoch: Epoch,
    pub seq: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
    pub runtime_instance_id: Uuid,
    pub service_id: Arc<str>,
    /// Why (e.g. the deregister reason, "disconnected", "no pong …").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Arc<str>>,
}

pub struct EventLog {
    epoch: Epoch,
    next_seq: u64,
    ring: VecDeque<Event>,
    ring_capacity: usize,
    /// Each with a token its `Subscription` holds: a dropped subscription is
    /// pruned at once, not only when the next event fails to reach it.
    subscribers: Vec<(SyncSender<Event>, Weak<()>)>,
    subscriber_capacity: usize,
    max_subscribers: usize,
    cut: u64,
    counts: [u64; EventKind::ALL.len()],
}

/// Why a subscription could not be served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "events after seq {since} are no longer kept (oldest kept is {oldest}); take a snapshot"
    )]
    Gone { since: u64, oldest: u64 },
    #[error(
        "seq {since} is ahead of this log (last is {last}): the controller restarted; take a snapshot"
    )]
    Ahead { since: u64, last: u64 },
    #[error(
        "epoch {asked} is not this log's ({current}): the controller restarted, and its sequence numbers name other events; take a snapshot"
    )]
    OtherEpoch { asked: Epoch, current: Epoch },
    #[error("{0} event subscribers already; the limit is reached")]
    TooManySubscribers(usize),
}

impl EventLog {
    pub fn new(
        ring_capacity: usize,
        subscriber_capacity: usize,
        max_subscribers: usize,
    ) -> EventLog {
        EventLog {
            epoch: Epoch::random(),
            next_seq: 1,
            ring: VecDeque::with_capacity(ring_capacity.min(4096)),
            ring_capacity: ring_capacity.max(1),
            subscribers: Vec::new(),
            subscriber_capacity: subscriber_capacity.max(1),
            max_subscribers,
            cut: 0,
            counts: [0; EventKind::ALL.len()],
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The sequence number the last event received (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Subscribers cut so far for falling behind.
    pub fn cut_count(&self) -> u64 {
        self.cut
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .iter()
            .filter(|(_, alive)| alive.strong_count() > 0)
            .count()
    }

    /// Events published so far of `kind`.
    pub fn count(&self, kind: EventKind) -> u64 {
        self.counts[kind as usize]
    }

    pub fn publish(
        &mut self,
        at_ms: u64,
        kind: EventKind,
        id: Uuid,
        service: Arc<str>,
        reason: Option<Arc<str>>,
    ) {
        let event = Event {
            seq: self.next_seq,
            at_ms,
            kind,
            runtime_instance_id: id,
            service_id: service,
            reason,
        };
        self.next_seq += 1;
        self.counts[kind as usize] += 1;
        let before = self.subscribers.len();
        self.subscribers
            .retain(|(tx, alive)| alive.strong_count() > 0 && tx.try_send(event.clone()).is_ok());
        self.cut += (before - self.subscribers.len()) as u64;
        if self.ring.len() == self.ring_capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(event);
    }

    /// Subscribes from `since` (exclusive): the kept events after it are
    /// queued first, then live ones. `None` starts at the next event.
    /// Returns the last sequence number before live events, and the queue.
    pub fn subscribe(&mut self, since: Option<Resume>) -> Result<(u64, Subscription), ReplayError> {
        if let Some(Resume { epoch, .. }) = since
            && epoch != self.epoch
        {
            return Err(ReplayError::OtherEpoch {
                asked: epoch,
                current: self.epoch,
            });
        }
        let since = since.map(|r| r.seq);
        self.subscribers
            .retain(|(_, alive)| alive.strong_count() > 0);
        if self.subscribers.len() >= self.max_subscribers {
            return Err(ReplayError::TooManySubscribers(self.subscribers.len()));
        }
        let last = self.last_seq();
        let replay: Vec<&Event> = match since {
            None => Vec::new(),
            Some(since) if since > last => return Err(ReplayError::Ahead { since, last }),
            Some(since) => {
                let oldest = self.ring.front().map_or(self.next_seq, |e| e.seq);
                if since.saturating_add(1) < oldest && since < last {
                    return Err(ReplayError::Gone { since, oldest });
                }
                self.ring.iter().filter(|e| e.seq > since).collect()
            }
        };
        let (tx, rx) = sync_channel(self.subscriber_capacity + replay.len());
        for event in replay {
            tx.try_send(event.clone()).expect("sized for the replay");
        }
        let alive = Arc::new(());
        self.subscribers.push((tx, Arc::downgrade(&alive)));
        Ok((
            last,
            Subscription {
                events: rx,
                _alive: alive,
            },
        ))
    }
}

/// A subscriber's queue; dropping it ends the subscription.
#[derive(Debug)]
pub struct Subscription {
    events: Receiver<Event>,
    _alive: Arc<()>,
}

impl std::ops::Deref for Subscription {
    type Target = Receiver<Event>;

    fn deref(&self) -> &Receiver<Event> {
        &self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(log: &EventLog, seq: u64) -> Option<Resume> {
        Some(Resume {
            epoch: log.epoch(),
            seq,
        })
    }

    fn publish(log: &mut EventLog, n: usize) {
        for _ in 0..n {
            log.publish(0, EventKind::Registered, Uuid::nil(), Arc::from("s"), None);
        }
    }

    #[test]
    fn sequence_grows_and_replay_resumes_without_gaps() {
        let mut log = EventLog::new(10, 100, 4);
        publish(&mut log, 5);
        let (at, rx) = log.subscribe(at(&log, 2)).unwrap();
        assert_eq!(at, 5);
        publish(&mut log, 2);
        let seqs: Vec<u64> = rx.try_iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5, 6, 7]);
        assert_eq!(log.count(EventKind::Registered), 7);
        assert_eq!(log.count(EventKind::Down), 0);
    }

    #[test]
    fn a_dropped_subscription_frees_its_place_at_once() {
        let mut log = EventLog::new(10, 10, 1);
        let (_, first) = log.subscribe(None).unwrap();
        assert_eq!(
            log.subscribe(None).unwrap_err(),
            ReplayError::TooManySubscribers(1)
        );
        drop(first);
        assert_eq!(log.subscriber_count(), 0);
        assert!(log.subscribe(None).is_ok());
    }

    #[test]
    fn a_since_ahead_of_the_log_is_refused() {
        let mut log = EventLog::new(10, 10, 4);
        publish(&mut log, 3);
        assert_eq!(
            log.subscribe(at(&log, 5000)).unwrap_err(),
            ReplayError::Ahead {
                since: 5000,
                last: 3
            }
        );
        assert_eq!(
            log.subscribe(at(&log, u64::MAX)).unwrap_err(),
            ReplayError::Ahead {
                since: u64::MAX,
                last: 3
            }
        );
        assert!(log.subscribe(at(&log, 3)).is_ok());
    }

    #[test]
    fn a_resume_point_from_another_epoch_is_refused_whatever_its_seq() {
        let mut before = EventLog::new(100, 100, 4);
        publish(&mut before, 60);
        let left_at = at(&before, 60).unwrap();
        // The controller restarts: a new log, further along than 60.
        let mut after = EventLog::new(100, 100, 4);
        publish(&mut after, 80);
        assert_ne!(before.epoch(), after.epoch());
        assert_eq!(
            after.subscribe(Some(left_at)).unwrap_err(),
            ReplayError::OtherEpoch {
                asked: before.epoch(),
                current: after.epoch()
            }
        );
        assert!(after.subscribe(at(&after, 60)).is_ok());
        // Shown and read back as 16 hex digits.
        let text = after.epoch().to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(text.parse::<Epoch>(), Ok(after.epoch()));
        assert!("12".parse::<Epoch>().is_err());
        assert!("+00000000000000f".parse::<Epoch>().is_err());
        assert!("zzzzzzzzzzzzzzzz".parse::<Epoch>().is_err());
    }

    #[test]
    fn replay_past_the_ring_is_refused() {
        let mut log = EventLog::new(3, 100, 4);
        publish(&mut log, 10);
        assert_eq!(
            log.subscribe(at(&log, 2)).unwrap_err(),
            ReplayError::Gone {
                since: 2,
                oldest: 8
            }
        );
        assert!(log.subscribe(at(&log, 7)).is_ok());
    }

    #[test]
    fn a_full_subscriber_is_cut_and_others_continue() {
        let mut log = EventLog::new(100, 2, 4);
        let (_, slow) = log.subscribe(None).unwrap();
        let (_, fast) = log.subscribe(None).unwrap();
        publish(&mut log, 2);
        assert_eq!(fast.try_iter().count(), 2);
        publish(&mut log, 1);
        assert_eq!(log.cut_count(), 1);
        assert_eq!(log.subscriber_count(), 1);
        assert_eq!(slow.try_iter().count(), 2);
        assert!(
            slow.recv().is_err(),
            "the slow subscriber's channel is closed"
        );
        assert_eq!(fast.try_iter().count(), 1);
    }
}
