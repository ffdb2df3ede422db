//! The protocol handler on a fake clock, with no engine and no socket: a
//! `Pair`-like harness (after quinn-proto's tests) holds a controller's
//! shard handlers, hands their callbacks `Cx`s from `Recorder`s, and
//! delivers what they post to each other's mailboxes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::controller::commands::{CommandOutcome, CommandRequest, Permit};
use crate::controller::{ControllerConfig, ShardMsg, Shared};
use crate::engine::{Effect, EngineConfig, Recorder};
use crate::registry::Status;

/// Wall-clock start of every test: 2026-11-23T05:59:00Z.
const WALL_START_MS: u64 = 1_795_413_540_000;

struct Harness {
    shared: Arc<Shared>,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    stats: Arc<[ShardStats]>,
    shards: Vec<ShardHandler>,
    clocks: Vec<Recorder>,
    next_key: u32,
}

impl Harness {
    fn new(shards: usize) -> Harness {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut engine = EngineConfig::new(listen, shards);
        engine.max_conns_per_shard = 1_000;
        let mut config = ControllerConfig::new(engine);
        config.host_id = "test-host".into();
        Harness::with_config(config)
    }

    fn with_config(config: ControllerConfig) -> Harness {
        let shards = config.engine.shards;
        let shared = Arc::new(Shared::new(config, None));
        let mailboxes: Arc<[Mailbox<ShardMsg>]> = (0..shards)
            .map(|_| Mailbox::new(64).expect("an eventfd"))
            .collect::<Vec<_>>()
            .into();
        let stats: Arc<[ShardStats]> = (0..shards).map(|_| ShardStats::default()).collect();
        let start = Instant::now();
        Harness {
            shards: (0..shards)
                .map(|i| {
                    let id = ShardId(i as u16);
                    ShardHandler::new(id, shared.clone(), mailboxes.clone(), stats.clone())
                })
                .collect(),
            clocks: (0..shards)
                .map(|i| Recorder::new(ShardId(i as u16), start, WALL_START_MS))
                .collect(),
            shared,
            mailboxes,
            stats,
            next_key: 0,
        }
    }

    /// An upgraded connection on `shard` to `path` (accepted, opened).
    fn connect(&mut self, shard: usize, path: &str) -> (ConnRef, Vec<Effect>) {
        let conn = ConnRef {
            shard: ShardId(shard as u16),
            key: self.next_key,
            generation: 1,
        };
        self.next_key += 1;
        let request = UpgradeRequest {
            path,
            key: "dGhlIHNhbXBsZSBub25jZQ==",
            authorization: None,
            origin: None,
        };
        self.shards[shard]
            .on_upgrade(conn, &request)
            .unwrap_or_else(|r| panic!("upgrade refused: {}", r.message));
        let clock = &mut self.clocks[shard];
        self.shards[shard].on_open(&mut clock.cx(), conn);
        let effects = clock.take();
        (conn, effects)
    }

    /// Delivers one text message from `conn`; returns what its shard did.
    fn text(&mut self, conn: ConnRef, text: &str) -> Vec<Effect> {
        let shard = conn.shard.0 as usize;
        let clock = &mut self.clocks[shard];
        self.shards[shard].on_text(&mut clock.cx(), conn, text);
        clock.take()
    }

    fn send(&mut self, conn: ConnRef, message: Value) -> Vec<Effect> {
        self.text(conn, &message.to_string())
    }

    /// A request from `conn`; returns its one answer (and the other effects).
    fn call(&mut self, conn: ConnRef, method: &str, params: Value) -> (Value, Vec<Effect>) {
        let effects = self.send(
            conn,
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
        );
        let answer = texts_to(&effects, conn)
            .into_iter()
            .find(|m| m.get("id") == Some(&json!(1)))
            .unwrap_or_else(|| panic!("no answer to {method}: {effects:?}"));
        (answer, effects)
    }

    fn register(&mut self, conn: ConnRef, service: &str, port: u16) -> Uuid {
        let (answer, effects) = self.call(conn, "service/register", registration(service, port));
        assert!(effects.contains(&Effect::Admit(conn)), "{effects:?}");
        assert_eq!(answer["result"]["status"], "registered", "{answer}");
        answer["result"]["runtimeInstanceId"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("a UUID")
    }

    /// Moves every shard's clock by `by`, delivers posted messages, runs
    /// each shard's tick; returns each shard's effects.
    fn tick(&mut self, by: Duration) -> Vec<Vec<Effect>> {
        let mut inbox = std::collections::VecDeque::new();
        (0..self.shards.len())
            .map(|i| {
                let clock = &mut self.clocks[i];
                clock.advance(by);
                self.mailboxes[i].take_all(&mut inbox);
                for msg in inbox.drain(..) {
                    self.shards[i].on_message(&mut clock.cx(), msg);
                }
                self.shards[i].on_tick(&mut clock.cx());
                clock.take()
            })
            .collect()
    }

    fn closed(&mut self, conn: ConnRef, cause: CloseCause) {
        let shard = conn.shard.0 as usize;
        let clock = &mut self.clocks[shard];
        self.shards[shard].on_closed(&mut clock.cx(), conn, cause);
        assert_eq!(clock.take(), []);
    }

    fn bad(&self, kind: BadInput) -> u64 {
        self.stats
            .iter()
            .map(|s| s.bad_input[kind as usize].load(Relaxed))
            .sum()
    }

    fn status(&self, id: &Uuid) -> Option<Status> {
        self.shared.registry().get(id).map(|i| i.status)
    }

    /// Posts a command to `instance` on `conn`'s shard, as `Api::call` does.
    fn command(
        &mut self,
        conn: ConnRef,
        instance: Uuid,
        timeout: Duration,
    ) -> (mpsc::Receiver<CommandOutcome>, Vec<Effect>) {
        let (tx, rx) = mpsc::channel();
        let request = CommandRequest {
            instance,
            target: conn,
            method: "tools/call".into(),
            params: Some(crate::controller::tool_call_params("check", &json!({}))),
            timeout,
            reply: Box::new(move |outcome| drop(tx.send(outcome))),
        };
        let permit = Permit::try_take(&self.shared.inflight, 16).expect("a permit");
        let shard = conn.shard.0 as usize;
        let clock = &mut self.clocks[shard];
        self.shards[shard].on_message(
            &mut clock.cx(),
            ShardMsg::Command(Box::new(request), permit),
        );
        (rx, clock.take())
    }
}

fn registration(service: &str, port: u16) -> Value {
    json!({"serviceId": service, "version": "1.0.0", "protocol": "https",
           "address": "10.0.0.7", "port": port, "envTag": "prod"})
}

/// The JSON messages among `effects` that went to `conn`.
fn texts_to(effects: &[Effect], conn: ConnRef) -> Vec<Value> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Text { conn: to, text } if *to == conn => {
                Some(serde_json::from_str(text).expect("the handler writes JSON"))
            }
            _ => None,
        })
        .collect()
}

fn error_code(answer: &Value) -> i64 {
    answer["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
}

#[test]
fn register_admits_answers_and_records_the_instance() {
    let mut h = Harness::new(1);
    let (conn, opened) = h.connect(0, MICROSERVICE_PATH);
    assert_eq!(opened, [], "a service socket is admitted only by register");
    let id = h.register(conn, "billing", 8443);
    assert_eq!(h.status(&id), Some(Status::Up));
    let registry = h.shared.registry();
    let instance = registry.get(&id).unwrap();
    assert_eq!(
        instance.connected_at_ms, WALL_START_MS,
        "timestamps come from the Cx"
    );
    assert_eq!(instance.owner, owner_of(conn));
    drop(registry);
    // A second register on the same connection is refused, and counted.
    let (answer, _) = h.call(conn, "service/register", registration("billing", 8444));
    assert_eq!(error_code(&answer), -32600);
    assert_eq!(h.bad(BadInput::InvalidRequest), 1);
}

#[test]
fn every_refusal_is_answered_with_its_code_and_counted() {
    let mut h = Harness::new(1);
    let (conn, _) = h.connect(0, MICROSERVICE_PATH);
    let (answer, _) = h.call(conn, "discovery/lookup", json!({"serviceId": "x"}));
    assert_eq!(error_code(&answer), -32001);
    assert_eq!(h.bad(BadInput::NotRegistered), 1);
    let (answer, _) = h.call(conn, "service/explode", json!({}));
    assert_eq!(error_code(&answer), -32601);
    assert_eq!(h.bad(BadInput::MethodNotFound), 1);
    let (answer, _) = h.call(
        conn,
        "service/register",
        json!({"serviceId": "x", "port": 0}),
    );
    assert_eq!(error_code(&answer), -32602);
    assert_eq!(h.bad(BadInput::InvalidParams), 1);

    let effects = h.text(conn, "{not json");
    let answers = texts_to(&effects, conn);
    assert_eq!(
        (error_code(&answers[0]), &answers[0]["id"]),
        (-32700, &Value::Null)
    );
    assert_eq!(h.bad(BadInput::InvalidJson), 1);
    let effects = h.text(conn, r#"{"jsonrpc":"1.0","id":9,"method":"x"}"#);
    let answers = texts_to(&effects, conn);
    assert_eq!(
        (error_code(&answers[0]), &answers[0]["id"]),
        (-32600, &json!(9))
    );

    // /ws/discovery serves discovery only, and needs no registration.
    let (watcher, opened) = h.connect(0, DISCOVERY_PATH);
    assert_eq!(opened, [Effect::Admit(watcher)]);
    let (answer, _) = h.call(watcher, "service/register", registration("x", 1));
    assert_eq!(error_code(&answer), -32601);
    let (answer, _) = h.call(watcher, "discovery/lookup", json!({"serviceId": "x"}));
    assert_eq!(answer["result"]["nodes"], json!([]));
    // None of this closed a connection.
    assert_eq!(h.bad(BadInput::Unauthorized), 0);
}

#[test]
fn a_second_registration_supersedes_the_first_on_the_same_shard() {
    let mut h = Harness::new(1);
    let (first, _) = h.connect(0, MICROSERVICE_PATH);
    let old = h.register(first, "billing", 8443);
    let (second, _) = h.connect(0, MICROSERVICE_PATH);
    let (answer, effects) = h.call(second, "service/register", registration("billing", 8443));
    let new: Uuid = answer["result"]["runtimeInstanceId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(old, new);
    assert!(effects.contains(&Effect::Close {
        conn: first,
        code: 4000,
        reason: "superseded".into()
    }));
    // The old connection's end must not remove its successor.
    h.closed(first, CloseCause::Closed(4000));
    assert_eq!(h.status(&new), Some(Status::Up));
    assert!(
        h.shared
            .registry()
            .get(&old)
            .is_none_or(|i| i.status != Status::Up)
    );
}

#[test]
fn a_supersede_crosses_shards_through_the_mailbox() {
    let mut h = Harness::new(2);
    let (first, _) = h.connect(0, MICROSERVICE_PATH);
    h.register(first, "billing", 8443);
    let (second, _) = h.connect(1, MICROSERVICE_PATH);
    let (_, effects) = h.call(second, "service/register", registration("billing", 8443));
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Close { .. })),
        "shard 1 cannot close shard 0's socket: {effects:?}"
    );
    let ticked = h.tick(Duration::from_millis(100));
    assert!(ticked[0].contains(&Effect::Close {
        conn: first,
        code: 4000,
        reason: "superseded".into()
    }));
}

#[test]
fn deregister_is_idempotent_and_guarded_by_the_connection() {
    let mut h = Harness::new(1);
    let (conn, _) = h.connect(0, MICROSERVICE_PATH);
    let id = h.register(conn, "billing", 8443);
    let (other, _) = h.connect(0, MICROSERVICE_PATH);
    let not_mine = h.register(other, "billing", 9000);
    let (answer, _) = h.call(
        conn,
        "service/deregister",
        json!({"runtimeInstanceId": not_mine, "reason": "programmatic"}),
    );
    assert_eq!(error_code(&answer), -32602);
    assert_eq!(h.status(&not_mine), Some(Status::Up));
    let params = json!({"runtimeInstanceId": id, "reason": "terminate"});
    let (answer, effects) = h.call(conn, "service/deregister", params.clone());
    assert_eq!(answer["result"]["status"], "deregistered", "{answer}");
    // The ack, then close 1000 (light-fabric's graceful shutdown).
    let ack = effects
        .iter()
        .position(|e| matches!(e, Effect::Text { conn: c, .. } if *c == conn));
    let close = effects.iter().position(|e| {
        *e == Effect::Close {
            conn,
            code: 1000,
            reason: "deregistered".into(),
        }
    });
    assert!(
        ack.is_some() && close.is_some() && ack < close,
        "{effects:?}"
    );
    assert_ne!(h.status(&id), Some(Status::Up));
    // Were a repeat to reach the handler (the engine drops what follows
    // its close), it is acknowledged again: idempotent. Anything else is
    // "not registered".
    let (answer, _) = h.call(conn, "service/deregister", params);
    assert_eq!(answer["result"]["status"], "deregistered", "{answer}");
    // Only for that very id: another one that shares its slot bytes (the
    // last four) is not this connection's.
    let mut lookalike = *id.as_bytes();
    lookalike[0] ^= 0xff;
    let lookalike = uuid::Uuid::from_bytes(lookalike);
    let (answer, _) = h.call(
        conn,
        "service/deregister",
        json!({"runtimeInstanceId": lookalike, "reason": "terminate"}),
    );
    assert_eq!(error_code(&answer), -32602, "{answer}");
    let (answer, _) = h.call(conn, "discovery/lookup", json!({"serviceId": "billing"}));
    assert_eq!(error_code(&answer), -32001);
}

#[test]
fn discovery_changes_are_coalesced_per_subscription_on_the_fake_clock() {
    let mut h = Harness::new(1);
    let (service, _) = h.connect(0, MICROSERVICE_PATH);
    h.register(service, "billing", 8443);
    let (watcher, _) = h.connect(0, DISCOVERY_PATH);
    let (answer, _) = h.call(
        watcher,
        "discovery/subscribe",
        json!({"serviceId": "billing"}),
    );
    assert_eq!(answer["result"]["nodes"].as_array().map(Vec::len), Some(1));
    let changed = |effects: &[Effect]| -> Vec<Value> {
        texts_to(effects, watcher)
            .into_iter()
            .filter(|m| m["method"] == "discovery/changed")
            .collect()
    };
    let update = |h: &mut Harness, version: &str| {
        let effects = h.send(
            service,
            json!({"jsonrpc": "2.0", "method": "service/update_metadata", "params": {"version": version}}),
        );
        assert_eq!(effects, [], "a notification gets no answer");
    };
    update(&mut h, "2");
    let sent = changed(&h.tick(Duration::from_millis(100))[0]);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["params"]["nodes"][0]["version"], "2");
    // Two more changes within the 100 ms window: held, then one snapshot.
    update(&mut h, "3");
    assert_eq!(
        changed(&h.tick(Duration::from_millis(30))[0]),
        Vec::<Value>::new()
    );
    update(&mut h, "4");
    assert_eq!(
        changed(&h.tick(Duration::from_millis(30))[0]),
        Vec::<Value>::new()
    );
    let sent = changed(&h.tick(Duration::from_millis(50))[0]);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["params"]["nodes"][0]["version"], "4");
    // A service that leaves is a change too; once unsubscribed, nothing.
    h.closed(service, CloseCause::PongMissed);
    let sent = changed(&h.tick(Duration::from_millis(200))[0]);
    assert_eq!(sent[0]["params"]["nodes"], json!([]));
    let (answer, _) = h.call(
        watcher,
        "discovery/unsubscribe",
        json!({"serviceId": "billing"}),
    );
    assert_eq!(answer["result"]["status"], "unsubscribed");
    let (again, _) = h.connect(0, MICROSERVICE_PATH);
    h.register(again, "billing", 8443);
    assert_eq!(
        changed(&h.tick(Duration::from_millis(200))[0]),
        Vec::<Value>::new()
    );
}

#[test]
fn a_missed_pong_marks_down_and_a_plain_close_disconnects() {
    let mut h = Harness::new(1);
    let (frozen, _) = h.connect(0, MICROSERVICE_PATH);
    let frozen_id = h.register(frozen, "billing", 8443);
    let (leaving, _) = h.connect(0, MICROSERVICE_PATH);
    let leaving_id = h.register(leaving, "billing", 8444);
    h.clocks[0].advance(Duration::from_secs(30));
    h.closed(frozen, CloseCause::PongMissed);
    h.closed(leaving, CloseCause::PeerGone);
    assert_eq!(h.status(&frozen_id), Some(Status::Down));
    let (watcher, _) = h.connect(0, DISCOVERY_PATH);
    let (answer, _) = h.call(watcher, "discovery/lookup", json!({"serviceId": "billing"}));
    assert_eq!(
        answer["result"]["nodes"],
        json!([]),
        "neither is discoverable"
    );
    assert_ne!(h.status(&leaving_id), Some(Status::Up));
}

#[test]
fn commands_are_answered_and_time_out_on_the_fake_clock() {
    let mut h = Harness::new(1);
    let (conn, _) = h.connect(0, MICROSERVICE_PATH);
    let id = h.register(conn, "billing", 8443);
    let timeout = Duration::from_secs(5);

    let (answered, effects) = h.command(conn, id, timeout);
    let sent = texts_to(&effects, conn);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["method"], "tools/call");
    assert_eq!(sent[0]["params"]["name"], "check");
    let reply = json!({"jsonrpc": "2.0", "id": sent[0]["id"], "result": {"result": "OK"}});
    assert_eq!(h.send(conn, reply), []);
    match answered.try_recv() {
        Ok(CommandOutcome::Ok(result)) => assert_eq!(result.get(), r#"{"result":"OK"}"#),
        other => panic!("expected the service's result, got {other:?}"),
    }
    // A reply nobody asked for is counted, not trusted.
    let stray = json!({"jsonrpc": "2.0", "id": 999, "result": {}});
    h.send(conn, stray);
    assert_eq!(h.bad(BadInput::UnknownReplyId), 1);

    let (unanswered, effects) = h.command(conn, id, timeout);
    assert_eq!(texts_to(&effects, conn).len(), 1);
    h.tick(timeout - Duration::from_millis(100));
    assert!(unanswered.try_recv().is_err(), "not before its deadline");
    h.tick(Duration::from_millis(200));
    assert!(matches!(unanswered.try_recv(), Ok(CommandOutcome::Timeout)));

    // To an instance that is not this connection's: not found, nothing sent.
    let (missing, effects) = h.command(conn, Uuid::now_v7(), timeout);
    assert_eq!(effects, []);
    assert!(matches!(missing.try_recv(), Ok(CommandOutcome::NotFound)));

    // A missed pong waits for a command in flight, until its deadline.
    let (_running, _) = h.command(conn, id, timeout);
    let now = h.clocks[0].now();
    let until = h.shards[0].on_pong_missed(conn, now);
    assert_eq!(
        until,
        Some(now + timeout),
        "kept until the command's deadline"
    );
    h.tick(timeout + Duration::from_millis(100));
    assert_eq!(
        h.shards[0].on_pong_missed(conn, h.clocks[0].now()),
        None,
        "idle: down"
    );

    // A command in flight when the connection ends is answered "gone".
    let (cut, _) = h.command(conn, id, timeout);
    h.closed(conn, CloseCause::PeerGone);
    assert!(matches!(cut.try_recv(), Ok(CommandOutcome::Gone)));
}

#[test]
fn register_without_address_takes_the_peers_or_says_why_not() {
    let mut h = Harness::new(1);
    let params = json!({"serviceId": "java", "port": 8443, "tags": {}});
    // The socket cannot say (the recorder knows no peer): -32602, counted
    // as bad params, and the connection stays unregistered.
    let (conn, _) = h.connect(0, MICROSERVICE_PATH);
    let (answer, effects) = h.call(conn, "service/register", params.clone());
    assert_eq!(error_code(&answer), -32602, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("peer address is unknown"),
        "{answer}"
    );
    assert!(!effects.contains(&Effect::Admit(conn)));
    // With a peer: its address (an IPv4-mapped one unwrapped), marked as
    // derived, and the registered event says so.
    h.clocks[0].set_peer(Some("[::ffff:10.9.8.7]:40000".parse().unwrap()));
    let (answer, effects) = h.call(conn, "service/register", params);
    assert_eq!(answer["result"]["status"], "registered", "{answer}");
    assert!(effects.contains(&Effect::Admit(conn)));
    let id: Uuid = answer["result"]["runtimeInstanceId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let node = h.shared.registry().node_of(&id).unwrap();
    assert_eq!(
        (node.address.to_string().as_str(), node.address_derived),
        ("10.9.8.7", true)
    );
    let mut registry = h.shared.registry();
    let epoch = registry.events.epoch();
    let (_, events) = registry
        .events
        .subscribe(Some(crate::registry::events::Resume { epoch, seq: 0 }))
        .unwrap();
    drop(registry);
    let event = events.try_recv().expect("the registered event");
    assert_eq!(event.runtime_instance_id, id);
    assert!(
        event
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("peer address"),
        "{event:?}"
    );
}

/// Two live processes with one identity: after a few supersedes within a
/// minute the next registration is refused (-32003, close 1013 with a retry
/// hint), the holder keeps the identity, one identity_conflict event names
/// both peers, and every refusal is counted. Once the holder is gone, the
/// other registers at once.
#[test]
fn supersede_ping_pong_is_a_conflict_and_the_loser_is_slowed_down() {
    use crate::registry::conflicts::MAX_SUPERSEDES;
    use crate::registry::events::EventKind;
    let mut h = Harness::new(1);
    let peers: [SocketAddr; 2] = [
        "127.0.0.2:40001".parse().unwrap(),
        "127.0.0.3:40002".parse().unwrap(),
    ];
    let (_, events) = h.shared.registry().events.subscribe(None).unwrap();
    let mut holder = None;
    for i in 0..=MAX_SUPERSEDES as usize {
        h.clocks[0].set_peer(Some(peers[i % 2]));
        let (conn, _) = h.connect(0, MICROSERVICE_PATH);
        let id = h.register(conn, "billing", 8443);
        holder = Some((conn, id));
        h.clocks[0].advance(Duration::from_secs(2));
    }
    let (holder_conn, holder_id) = holder.unwrap();
    let loser_peer = peers[(MAX_SUPERSEDES as usize + 1) % 2];
    h.clocks[0].set_peer(Some(loser_peer));
    for attempt in 0..2 {
        let (conn, _) = h.connect(0, MICROSERVICE_PATH);
        let (answer, effects) = h.call(conn, "service/register", registration("billing", 8443));
        assert_eq!(error_code(&answer), -32003, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("identity conflict") && message.contains("Retry after 30 s"));
        assert!(
            effects.contains(&Effect::Close {
                conn,
                code: 1013,
                reason: "identity conflict; retry after 30s".into()
            }),
            "attempt {attempt}: {effects:?}"
        );
        assert!(!effects.contains(&Effect::Admit(conn)));
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::Close { conn: c, .. } if *c == holder_conn)),
            "the holder is not superseded"
        );
        h.clocks[0].advance(Duration::from_secs(5));
    }
    assert_eq!(h.status(&holder_id), Some(Status::Up));
    let conflicts: Vec<_> = events
        .try_iter()
        .filter(|e| e.kind == EventKind::IdentityConflict)
        .collect();
    assert_eq!(conflicts.len(), 1, "one event per conflict: {conflicts:?}");
    let reason = conflicts[0].reason.as_deref().unwrap();
    assert_eq!(conflicts[0].runtime_instance_id, holder_id);
    assert!(
        reason.contains(&peers[MAX_SUPERSEDES as usize % 2].to_string())
            && reason.contains(&loser_peer.to_string()),
        "names both peers: {reason}"
    );
    assert_eq!(
        h.stats[0].identity_conflict_refusals.load(Relaxed),
        2,
        "each refusal counted"
    );
    assert_eq!(
        h.bad(BadInput::InvalidParams),
        0,
        "not the peer's bad input"
    );
    // The holder goes away: its record is down, and the other process's
    // registration supersedes nothing, so it goes through.
    h.closed(holder_conn, CloseCause::PeerGone);
    let (conn, _) = h.connect(0, MICROSERVICE_PATH);
    h.register(conn, "billing", 8443);
}

/// Lookups, subscriptions and updates come out of one bucket per
/// connection: a burst passes, then -32003 (not counted as bad input),
/// and the bucket refills with time.
#[test]
fn requests_past_the_connection_rate_are_refused_then_refill() {
    let mut h = Harness::new(1);
    let burst = h.shared.config.request_burst as usize;
    let rate = h.shared.config.requests_per_second as usize;
    let (conn, _) = h.connect(0, DISCOVERY_PATH);
    let lookup = json!({"serviceId": "x"});
    for i in 0..burst {
        let (answer, _) = h.call(conn, "discovery/lookup", lookup.clone());
        assert!(answer.get("result").is_some(), "request {i}: {answer}");
    }
    let (answer, _) = h.call(conn, "discovery/subscribe", lookup.clone());
    assert_eq!(error_code(&answer), -32003, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limited")
    );
    assert_eq!(h.stats[0].rate_limited.load(Relaxed), 1);
    assert_eq!(
        h.bad(BadInput::InvalidRequest) + h.bad(BadInput::InvalidParams),
        0
    );
    // One second later: `rate` more.
    h.clocks[0].advance(Duration::from_secs(1));
    for i in 0..rate {
        let (answer, _) = h.call(conn, "discovery/lookup", lookup.clone());
        assert!(answer.get("result").is_some(), "after refill {i}: {answer}");
    }
    let (answer, _) = h.call(conn, "discovery/lookup", lookup);
    assert_eq!(error_code(&answer), -32003);
    // Another connection has a bucket of its own.
    let (other, _) = h.connect(0, DISCOVERY_PATH);
    let (answer, _) = h.call(other, "discovery/lookup", json!({"serviceId": "x"}));
    assert!(answer.get("result").is_some());
}
