//! The JSON-RPC dispatch fuzz target's harness: a controller's shard
//! handlers on fake clocks (no engine, no socket), fed messages, ticks and
//! closes that the input chooses. Built only with the `fuzzing` feature.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handler::ShardHandler;
use super::{ControllerConfig, ShardMsg, Shared};
use crate::engine::mailbox::Mailbox;
use crate::engine::ws::UpgradeRequest;
use crate::engine::{CloseCause, ConnRef, Effect, EngineConfig, Handler, Recorder, ShardId};
use crate::metrics::ShardStats;

const PATHS: [&str; 4] = [
    "/ws/microservice",
    "/ws/microservice",
    "/ws/discovery",
    "/ws/discovery",
];

pub struct Dispatch {
    shared: Arc<Shared>,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    shards: Vec<ShardHandler>,
    clocks: Vec<Recorder>,
    /// Four connections, over two shards: two service sockets, two
    /// discovery ones; one that closes is replaced.
    conns: [ConnRef; 4],
    next_key: u32,
}

impl Default for Dispatch {
    fn default() -> Dispatch {
        Dispatch::new()
    }
}

impl Dispatch {
    pub fn new() -> Dispatch {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut engine = EngineConfig::new(listen, 2);
        engine.max_conns_per_shard = 16;
        let mut config = ControllerConfig::new(engine);
        config.host_id = "fuzz-host".into();
        config.registry.max_down_retained = 16;
        let shared = Arc::new(Shared::new(config, None));
        let mailboxes: Arc<[Mailbox<ShardMsg>]> = (0..2)
            .map(|_| Mailbox::new(64).expect("an eventfd"))
            .collect::<Vec<_>>()
            .into();
        let stats: Arc<[ShardStats]> = (0..2).map(|_| ShardStats::default()).collect();
        let start = Instant::now();
        let shards = (0..2)
            .map(|i| {
                ShardHandler::new(ShardId(i), shared.clone(), mailboxes.clone(), stats.clone())
            })
            .collect();
        let clocks = (0..2)
            .map(|i| Recorder::new(ShardId(i), start, 1_795_413_540_000))
            .collect();
        let placeholder = ConnRef {
            shard: ShardId(0),
            key: u32::MAX,
            generation: 0,
        };
        let mut d = Dispatch {
            shared,
            mailboxes,
            shards,
            clocks,
            conns: [placeholder; 4],
            next_key: 0,
        };
        for slot in 0..4 {
            d.open(slot);
        }
        d
    }

    fn open(&mut self, slot: usize) {
        let shard = slot % 2;
        let conn = ConnRef {
            shard: ShardId(shard as u16),
            key: self.next_key,
            generation: 1,
        };
        self.next_key += 1;
        let request = UpgradeRequest {
            path: PATHS[slot],
            key: "dGhlIHNhbXBsZSBub25jZQ==",
            authorization: None,
            origin: None,
        };
        self.shards[shard]
            .on_upgrade(conn, &request)
            .unwrap_or_else(|r| panic!("the upgrade of a known path is refused: {}", r.message));
        let peer: SocketAddr = format!("127.0.0.{}:4{slot}000", slot + 2)
            .parse()
            .expect("an address");
        self.clocks[shard].set_peer(Some(peer));
        self.shards[shard].on_open(&mut self.clocks[shard].cx(), conn);
        self.conns[slot] = conn;
        self.settle(shard);
    }

    /// Checks what shard `shard` asked for, and carries out its closes.
    fn settle(&mut self, shard: usize) {
        let effects = self.clocks[shard].take();
        let mut closed = Vec::new();
        for effect in effects {
            match effect {
                Effect::Text { text, .. } => {
                    let v: serde_json::Value =
                        serde_json::from_str(&text).expect("the handler writes JSON");
                    assert_eq!(v["jsonrpc"], "2.0", "{text}");
                }
                Effect::Close { conn, code, reason } => {
                    assert!(crate::engine::ws::is_valid_close_code(code), "{code}");
                    assert!(reason.len() <= 123, "a close reason fits a control frame");
                    closed.push((conn, code));
                }
                Effect::Admit(_) => {}
            }
        }
        for (conn, code) in closed {
            if let Some(slot) = self.conns.iter().position(|c| *c == conn) {
                self.close(slot, CloseCause::Closed(code));
            }
        }
    }

    fn close(&mut self, slot: usize, cause: CloseCause) {
        let conn = self.conns[slot];
        let shard = conn.shard.0 as usize;
        self.shards[shard].on_closed(&mut self.clocks[shard].cx(), conn, cause);
        // What a close makes a handler do goes to the others.
        let _ = self.clocks[shard].take();
        self.open(slot);
    }

    fn tick(&mut self, by: Duration) {
        let mut inbox = std::collections::VecDeque::new();
        for shard in 0..2 {
            self.clocks[shard].advance(by);
            self.mailboxes[shard].take_all(&mut inbox);
            for msg in inbox.drain(..) {
                self.shards[shard].on_message(&mut self.clocks[shard].cx(), msg);
            }
            self.shards[shard].on_tick(&mut self.clocks[shard].cx());
            self.settle(shard);
        }
    }

    /// A listing of the registry, as the admin API asks for one.
    pub fn page(
        &self,
        query: &crate::registry::Query,
        cursor: u32,
        limit: usize,
    ) -> crate::registry::Page {
        self.shared.registry().page(query, cursor, limit)
    }

    /// One input: lines, each a selector byte and a message. The selector
    /// picks the connection and what happens: a text message, a tick, a
    /// peer's close, a missed pong.
    pub fn run(&mut self, data: &[u8]) {
        for line in data.split(|b| *b == b'\n').take(256) {
            let Some((&op, rest)) = line.split_first() else {
                continue;
            };
            let slot = (op & 3) as usize;
            match op >> 5 {
                0..=4 => {
                    let text = String::from_utf8_lossy(rest);
                    let conn = self.conns[slot];
                    let shard = conn.shard.0 as usize;
                    self.shards[shard].on_text(&mut self.clocks[shard].cx(), conn, &text);
                    self.settle(shard);
                }
                5 => self.tick(Duration::from_millis(150)),
                6 => self.tick(Duration::from_secs(11)),
                _ => self.close(slot, CloseCause::PeerGone),
            }
        }
        self.tick(Duration::from_secs(1));
        // The registry's invariants hold after whatever came.
        let registry = self.shared.registry();
        registry.check_invariants();
    }
}
