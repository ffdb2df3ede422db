//! Controller → service commands: the request a shard sent, who waits for
//! its reply, and when it times out. One table per shard (replies come
//! back on the socket the request left by); the total in flight is bounded
//! by a counter shared by all shards.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::jsonrpc::Code;

use serde_json::value::RawValue;
use uuid::Uuid;

use crate::engine::ConnRef;

/// How a command ended. Exactly one reaches the caller.
#[derive(Debug)]
pub enum CommandOutcome {
    /// The service's `result`.
    Ok(Box<RawValue>),
    /// The service does not know the tool or method (-32601, or a result
    /// with `"supported": false`): not a failure of the controller.
    Unsupported(Box<RawValue>),
    /// The service answered with a JSON-RPC error.
    Failed { code: i64, message: String },
    /// No reply within the timeout.
    Timeout,
    /// No registered, up instance with that id.
    NotFound,
    /// The instance's connection ended before it replied.
    Gone,
    /// Over a bound: 64 in flight for the instance or 4,096 in all
    /// (defaults), or its shard's queue is full.
    Busy(&'static str),
}

impl CommandOutcome {
    /// Every label, in `index` order (metrics contract: do not rename).
    pub const LABELS: [&'static str; 7] = [
        "ok",
        "unsupported",
        "failed",
        "timeout",
        "not_found",
        "gone",
        "busy",
    ];

    pub fn index(&self) -> usize {
        match self {
            CommandOutcome::Ok(_) => 0,
            CommandOutcome::Unsupported(_) => 1,
            CommandOutcome::Failed { .. } => 2,
            CommandOutcome::Timeout => 3,
            CommandOutcome::NotFound => 4,
            CommandOutcome::Gone => 5,
            CommandOutcome::Busy(_) => 6,
        }
    }

    /// A short stable name (for counters and audit lines).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

pub type Reply = Box<dyn FnOnce(CommandOutcome) + Send>;

/// A command on its way to the shard that holds the instance's socket.
pub struct CommandRequest {
    pub instance: Uuid,
    pub target: ConnRef,
    pub method: String,
    pub params: Option<Box<RawValue>>,
    pub timeout: Duration,
    pub reply: Reply,
}

/// The global in-flight bound, held by each command until it ends.
pub struct Permit(Arc<AtomicUsize>);

impl Permit {
    pub fn try_take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        let previous = counter.fetch_add(1, Ordering::AcqRel);
        if previous >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(counter.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Pending {
    conn: ConnRef,
    deadline: Instant,
    reply: Reply,
    permit: Permit,
}

impl Pending {
    /// Frees the in-flight slot first, so whoever hears the outcome sees
    /// the bound already released.
    fn end(self, outcome: CommandOutcome) {
        drop(self.permit);
        (self.reply)(outcome);
    }
}

/// One shard's commands in flight.
#[derive(Default)]
pub struct Commands {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Commands {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records a request about to be sent; returns the wire id to use.
    pub fn start(&mut self, conn: ConnRef, deadline: Instant, reply: Reply, permit: Permit) -> u64 {
        // Heap entries of commands that already ended are dropped lazily; keep
        // the heap bounded by what is in flight even when `expire` finds
        // nothing pending at tick time.
        if self.deadlines.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.deadlines
                .retain(|Reverse((_, id))| pending.contains_key(id));
        }
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(
            id,
            Pending {
                conn,
                deadline,
                reply,
                permit,
            },
        );
        self.deadlines.push(Reverse((deadline, id)));
        id
    }

    /// The latest deadline of the commands waiting on `conn`, if any
    /// (O(commands in flight), at most `max_inflight_total`).
    pub fn latest_deadline(&self, conn: ConnRef) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| p.conn == conn)
            .map(|p| p.deadline)
            .max()
    }

    /// A reply arrived on `conn` for wire id `id`. Returns false if no such
    /// command was waiting on that connection.
    pub fn finish(&mut self, conn: ConnRef, id: u64, outcome: CommandOutcome) -> bool {
        match self.pending.get(&id) {
            Some(p) if p.conn == conn => {
                self.pending.remove(&id).expect("just found").end(outcome);
                true
            }
            _ => false,
        }
    }

    /// Ends every command past its deadline with `Timeout`; returns the
    /// connections they were waiting on (one entry per command).
    pub fn expire(&mut self, now: Instant) -> Vec<ConnRef> {
        let mut conns = Vec::new();
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(p) = self.pending.remove(&id) {
                conns.push(p.conn);
                p.end(CommandOutcome::Timeout);
            }
        }
        conns
    }

    /// The connection ended: every command waiting on it ends with `Gone`.
    pub fn fail_conn(&mut self, conn: ConnRef) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.pending
                .remove(&id)
                .expect("just listed")
                .end(CommandOutcome::Gone);
        }
    }
}

/// Classifies a service's reply to a command.
pub fn outcome_of(reply: Result<&RawValue, &RawValue>) -> CommandOutcome {
    #[derive(serde::Deserialize)]
    struct Supported {
        supported: Option<bool>,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        code: Option<i64>,
        message: Option<String>,
    }
    match reply {
        Ok(result) => {
            let unsupported = serde_json::from_str::<Supported>(result.get())
                .is_ok_and(|s| s.supported == Some(false));
            let owned = result.to_owned();
            if unsupported {
                CommandOutcome::Unsupported(owned)
            } else {
                CommandOutcome::Ok(owned)
            }
        }
        Err(error) => {
            let e = serde_json::from_str::<Error>(error.get()).unwrap_or(Error {
                code: None,
                message: None,
            });
            match e.code {
                Some(code) if code == Code::MethodNotFound.value() => {
                    CommandOutcome::Unsupported(error.to_owned())
                }
                code => CommandOutcome::Failed {
                    code: code.unwrap_or(Code::Internal.value()),
                    message: e.message.unwrap_or_else(|| error.get().to_owned()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ShardId;
    use std::sync::Mutex;

    fn conn(key: u32) -> ConnRef {
        ConnRef {
            shard: ShardId(0),
            key,
            generation: 1,
        }
    }

    fn recorder() -> (Arc<Mutex<Vec<&'static str>>>, impl Fn() -> Reply) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move || {
            let l = l.clone();
            Box::new(move |o: CommandOutcome| l.lock().unwrap().push(o.label())) as Reply
        })
    }

    #[test]
    fn replies_timeouts_and_gone_each_end_a_command_once() {
        let counter = Arc::new(AtomicUsize::new(0));
        let (log, reply) = recorder();
        let mut c = Commands::default();
        let t0 = Instant::now();
        let permit = || Permit::try_take(&counter, 3).unwrap();
        let a = c.start(conn(1), t0 + Duration::from_secs(1), reply(), permit());
        let _b = c.start(conn(1), t0 + Duration::from_secs(2), reply(), permit());
        let _d = c.start(conn(2), t0 + Duration::from_secs(3), reply(), permit());
        assert!(Permit::try_take(&counter, 3).is_none(), "global bound");
        assert!(
            !c.finish(conn(2), a, CommandOutcome::Timeout),
            "reply on the wrong socket"
        );
        let raw: Box<RawValue> = RawValue::from_string("{}".into()).unwrap();
        assert!(c.finish(conn(1), a, CommandOutcome::Ok(raw)));
        assert_eq!(c.expire(t0 + Duration::from_secs(2)), vec![conn(1)]);
        c.fail_conn(conn(2));
        assert!(c.is_empty());
        assert_eq!(*log.lock().unwrap(), vec!["ok", "timeout", "gone"]);
        assert_eq!(counter.load(Ordering::SeqCst), 0, "every permit returned");
    }

    #[test]
    fn the_deadline_heap_stays_bounded_when_replies_beat_every_tick() {
        let counter = Arc::new(AtomicUsize::new(0));
        let (_, reply) = recorder();
        let mut c = Commands::default();
        let later = Instant::now() + Duration::from_secs(60);
        for _ in 0..10_000 {
            let id = c.start(
                conn(1),
                later,
                reply(),
                Permit::try_take(&counter, 10).unwrap(),
            );
            let raw: Box<RawValue> = RawValue::from_string("{}".into()).unwrap();
            assert!(c.finish(conn(1), id, CommandOutcome::Ok(raw)));
        }
        assert!(
            c.deadlines.len() <= 65,
            "{} stale deadlines",
            c.deadlines.len()
        );
    }

    #[test]
    fn unsupported_is_recognised_both_ways() {
        let r: &RawValue =
            serde_json::from_str(r#"{"supported":false,"status":"unsupported"}"#).unwrap();
        assert_eq!(outcome_of(Ok(r)).label(), "unsupported");
        let e: &RawValue =
            serde_json::from_str(r#"{"code":-32601,"message":"Method not found"}"#).unwrap();
        assert_eq!(outcome_of(Err(e)).label(), "unsupported");
        let e: &RawValue =
            serde_json::from_str(r#"{"code":-32602,"message":"Tool not found: x"}"#).unwrap();
        assert!(matches!(
            outcome_of(Err(e)),
            CommandOutcome::Failed { code: -32602, .. }
        ));
    }
}
