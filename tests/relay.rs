//! The chained relay (the anti-pattern): services registered through it
//! work, and it shows what the design note warns of: a frozen service
//! stays "alive" behind it, and its restart drops every service at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tether::controller::CommandOutcome;
use tether::engine::ws::OpCode;
use tether::registry::events::EventKind;
use tether::relay::{Relay, RelayConfig, snapshot};

fn fast_pings() -> tether::controller::Controller {
    let mut config = config(2);
    config.engine.ping_interval = Duration::from_millis(500);
    config.engine.pong_timeout = Duration::from_millis(300);
    start(config)
}

fn relay_to(ctl: &tether::controller::Controller) -> Relay {
    Relay::start(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: ctl.local_addr(),
        upstream_sources: Vec::new(),
        threads: 2,
    })
    .unwrap()
}

#[test]
fn services_behind_the_relay_register_look_up_and_answer_commands() {
    let ctl = fast_pings();
    let relay = relay_to(&ctl);
    let (mut svc, id) = registered(relay.local_addr(), "user", "10.0.0.1", 1);
    let lookup = svc.call("discovery/lookup", json!({"serviceId": "user"}));
    assert_eq!(
        lookup["result"]["nodes"][0]["runtimeInstanceId"],
        id.to_string()
    );
    let server = std::thread::spawn(move || {
        let req = svc.recv_json();
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {"via": "relay"}}));
        svc
    });
    match ctl.call_tool(id, "check", json!({})) {
        CommandOutcome::Ok(r) => assert_eq!(r.get(), r#"{"via":"relay"}"#),
        other => panic!("{other:?}"),
    }
    let _svc = server.join().unwrap();
    // Two sockets for one service: the relay holds the pair.
    assert_eq!(snapshot(relay.stats())[0], ("pairs", 1));
}

#[test]
fn a_frozen_service_behind_the_relay_is_never_marked_down() {
    let ctl = fast_pings();
    let relay = relay_to(&ctl);
    let (_events_at, events) = ctl.subscribe_events(None).unwrap();
    // Registers, then never reads or answers again.
    let (mut frozen, id) = registered(relay.local_addr(), "user", "10.0.0.1", 1);
    frozen.auto_pong = false;
    // Directly, this would be down within 0.5 + 0.3 + 0.1 s; wait 6 times that.
    std::thread::sleep(Duration::from_millis(5_000));
    assert!(
        events.try_iter().all(|e| e.kind != EventKind::Down),
        "the relay answered the pings"
    );
    assert_eq!(ctl.node(&id).unwrap().status, tether::registry::Status::Up);
    let answered = snapshot(relay.stats())[3].1;
    assert!(
        answered >= 5,
        "the relay answered {answered} pings for the frozen service"
    );
    drop(frozen);
}

#[test]
fn restarting_the_relay_drops_every_service_at_once() {
    let ctl = fast_pings();
    let relay = relay_to(&ctl);
    let addr = relay.local_addr();
    let mut services: Vec<Client> = (0..30u16)
        .map(|i| registered(addr, "user", "10.0.0.1", i + 1).0)
        .collect();
    assert_eq!(ctl.counts().up, 30);
    let (_at, events) = ctl.subscribe_events(None).unwrap();
    let stopped = Instant::now();
    relay.stop();
    eventually("every service is gone at the controller", || {
        ctl.counts().up == 0
    });
    let gone = events
        .try_iter()
        .filter(|e| e.kind == EventKind::Deregistered)
        .count();
    assert_eq!(gone, 30, "one false departure per healthy service");
    eprintln!("30 healthy services lost in {:?}", stopped.elapsed());
    // The services themselves see their socket end.
    for s in &mut services {
        assert!(s.sees_eof(WAIT));
    }
    // Pings still flow to services connected directly (a control).
    let (mut direct, _) = registered(ctl.local_addr(), "direct", "10.0.0.2", 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut pinged = false;
    while Instant::now() < deadline && !pinged {
        if let Some(Frame::Ping(p)) = direct.next_frame(Duration::from_millis(50)) {
            direct.send_frame(OpCode::Pong, &p);
            pinged = true;
        }
    }
    assert!(pinged);
}
