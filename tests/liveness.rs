//! Liveness: pings, pongs, and how fast a silent service is marked down.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tether::engine::ws::OpCode;
use tether::metrics;
use tether::registry::Status;
use tether::registry::events::EventKind;

const INTERVAL: Duration = Duration::from_millis(1000);
const PONG_TIMEOUT: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(100);

fn fast_pings(shards: usize) -> tether::controller::Controller {
    let mut config = config(shards);
    config.engine.ping_interval = INTERVAL;
    config.engine.pong_timeout = PONG_TIMEOUT;
    config.engine.tick = TICK;
    start(config)
}

#[test]
fn a_silent_service_is_marked_down_within_interval_plus_timeout_plus_a_tick() {
    let ctl = fast_pings(2);
    let addr = ctl.local_addr();
    let (_, events) = ctl.subscribe_events(None).unwrap();
    let mut watcher = Client::connect(addr, "/ws/discovery");
    watcher.call("discovery/subscribe", json!({"serviceId": "user"}));
    let (mut healthy, healthy_id) = registered(addr, "user", "10.0.0.1", 1);
    // The zombie registers and then never reads again: no pongs.
    let (mut zombie, zombie_id) = registered(addr, "user", "10.0.0.2", 1);
    let silent_since = Instant::now();

    // Keep the healthy one answering while waiting for the zombie's down.
    let bound = INTERVAL + PONG_TIMEOUT + TICK;
    let mut down_after = None;
    let mut pings_seen = 0;
    while silent_since.elapsed() < bound + Duration::from_secs(3) && down_after.is_none() {
        if let Some(common::Frame::Ping(p)) = healthy.next_frame(Duration::from_millis(10)) {
            pings_seen += 1;
            healthy.send_frame(OpCode::Pong, &p);
        }
        if let Some(common::Frame::Ping(p)) = watcher.next_frame(Duration::from_millis(10)) {
            watcher.send_frame(OpCode::Pong, &p);
        }
        for e in events.try_iter() {
            if e.kind == EventKind::Down && e.runtime_instance_id == zombie_id {
                down_after = Some(silent_since.elapsed());
            }
        }
    }
    let down_after = down_after.expect("the zombie is marked down");
    eprintln!("zombie detected after {down_after:?} (bound {bound:?})");
    // Scheduling noise on a shared machine gets a small grace.
    assert!(
        down_after <= bound + Duration::from_millis(400),
        "down after {down_after:?}, bound {bound:?}"
    );

    // It left discovery, is kept as down, and its socket was closed.
    assert_eq!(ctl.node(&zombie_id).unwrap().status, Status::Down);
    assert_eq!(ctl.node(&healthy_id).unwrap().status, Status::Up);
    assert!(zombie.sees_eof(WAIT), "the zombie's socket is closed");
    let lookup = watcher.call("discovery/lookup", json!({"serviceId": "user"}));
    assert_eq!(lookup["result"]["nodes"].as_array().unwrap().len(), 1);

    // The healthy one was pinged and is still fine a while later.
    let until = Instant::now() + INTERVAL * 2;
    while Instant::now() < until {
        if let Some(common::Frame::Ping(p)) = healthy.next_frame(Duration::from_millis(10)) {
            pings_seen += 1;
            healthy.send_frame(OpCode::Pong, &p);
        }
        if let Some(common::Frame::Ping(p)) = watcher.next_frame(Duration::from_millis(10)) {
            watcher.send_frame(OpCode::Pong, &p);
        }
    }
    assert!(
        pings_seen >= 2,
        "pinged every interval ({pings_seen} pings)"
    );
    assert_eq!(ctl.node(&healthy_id).unwrap().status, Status::Up);
    assert_eq!(metrics::total(ctl.stats(), |s| &s.pongs_missed), 1);
    assert!(
        metrics::total(ctl.stats(), |s| &s.rtt_count) >= 2,
        "pong round trips are measured"
    );
}

#[test]
fn any_frame_counts_as_life() {
    let ctl = fast_pings(1);
    let (mut c, id) = registered(ctl.local_addr(), "user", "10.0.0.1", 1);
    // Never answer pings, but keep talking.
    c.auto_pong = false;
    let until = Instant::now() + (INTERVAL + PONG_TIMEOUT) * 3;
    while Instant::now() < until {
        c.send_json(&json!({"jsonrpc": "2.0", "method": "notifications/log", "params": {"message": "tick"}}));
        while c.next_frame(Duration::from_millis(1)).is_some() {}
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ctl.node(&id).unwrap().status, Status::Up);
    assert_eq!(metrics::total(ctl.stats(), |s| &s.pongs_missed), 0);
}

#[test]
fn crafted_pongs_do_not_skew_the_round_trip_times() {
    let ctl = fast_pings(1);
    let (mut c, _) = registered(ctl.local_addr(), "user", "10.0.0.1", 1);
    let rtt = |ctl: &tether::controller::Controller| {
        (
            metrics::total(ctl.stats(), |s| &s.rtt_count),
            metrics::total(ctl.stats(), |s| &s.rtt_sum_us),
        )
    };
    // Unsolicited pongs: our old 8-byte stamp form at a time near the
    // shard's clock and at 0, a 16-byte one with a made-up tag, empty.
    let near = 1_000_000u64.to_be_bytes();
    for payload in [&near[..], &[0u8; 8][..], &[7u8; 16][..], &[][..]] {
        for _ in 0..50 {
            c.send_frame(OpCode::Pong, payload);
        }
    }
    // Then the real ping, answered.
    let until = Instant::now() + INTERVAL * 3;
    let mut echoed = None;
    while echoed.is_none() && Instant::now() < until {
        if let Some(common::Frame::Ping(p)) = c.next_frame(Duration::from_millis(50)) {
            c.send_frame(OpCode::Pong, &p);
            echoed = Some(p);
        }
    }
    let echoed = echoed.expect("a ping within three intervals");
    eventually("the echo is timed", || rtt(&ctl).0 == 1);
    // The same echo replayed once it is older than the pong timeout.
    std::thread::sleep(PONG_TIMEOUT + TICK * 3);
    c.send_frame(OpCode::Pong, &echoed);
    // A frame that is answered proves the replay was read before it.
    c.send_frame(OpCode::Ping, b"after");
    loop {
        match c.next_frame(WAIT) {
            Some(common::Frame::Pong(p)) if p == b"after" => break,
            // Later pings stay unanswered: their echoes would be timed.
            Some(_) => {}
            None => panic!("no pong for our ping"),
        }
    }
    let (count, sum_us) = rtt(&ctl);
    assert_eq!(count, 1, "only the real echo is timed");
    assert!(
        sum_us < 500_000,
        "a loopback round trip, not a crafted one: {sum_us} µs"
    );
    assert!(metrics::total(ctl.stats(), |s| &s.pongs_received) >= 202);
}

#[test]
fn pings_from_services_are_answered_at_once() {
    let ctl = fast_pings(1);
    let (mut c, _) = registered(ctl.local_addr(), "user", "10.0.0.1", 1);
    c.send_frame(OpCode::Ping, b"hello");
    loop {
        match c.next_frame(WAIT) {
            Some(common::Frame::Pong(p)) => {
                assert_eq!(p, b"hello");
                break;
            }
            Some(common::Frame::Ping(_)) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn a_closed_service_leaves_and_lastseen_advances() {
    let ctl = fast_pings(1);
    let (mut c, id) = registered(ctl.local_addr(), "user", "10.0.0.1", 1);
    let first_seen = ctl.node(&id).unwrap().last_seen_ms;
    let until = Instant::now() + INTERVAL * 2;
    while Instant::now() < until {
        if let Some(common::Frame::Ping(p)) = c.next_frame(Duration::from_millis(20)) {
            c.send_frame(OpCode::Pong, &p);
        }
    }
    assert!(
        ctl.node(&id).unwrap().last_seen_ms > first_seen,
        "lastSeenAt moves on pongs"
    );
    drop(c);
    eventually("removed on close", || ctl.node(&id).is_none());
}

/// light-fabric runs a tool inside its read loop, so it answers no ping
/// while the tool runs. A missed pong then waits for the command's own
/// deadline; once the command ends, silence marks the service down again.
#[test]
fn a_service_busy_with_a_command_is_not_marked_down_before_its_deadline() {
    let ctl = fast_pings(1);
    let addr = ctl.local_addr();
    let (mut busy, id) = registered(addr, "tooling", "10.0.0.3", 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let params = tether::controller::tool_call_params("slow_tool", &json!({}));
    ctl.call(
        id,
        "tools/call",
        Some(params),
        Some(Duration::from_secs(6)),
        Box::new(move |outcome| drop(tx.send(outcome))),
    );
    // The service reads the command, then is silent for three times the
    // ping interval plus the pong timeout: a ping goes unanswered.
    let command = busy.recv_json();
    assert_eq!(command["method"], "tools/call");
    std::thread::sleep(3 * (INTERVAL + PONG_TIMEOUT));
    assert_eq!(
        ctl.node(&id).unwrap().status,
        Status::Up,
        "marked down mid-command"
    );
    let deferred = metrics::total(ctl.stats(), |s| &s.pongs_deferred);
    assert!(deferred >= 1, "no deferral counted");
    busy.send_json(&json!({"jsonrpc": "2.0", "id": command["id"], "result": {"done": true}}));
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(tether::controller::CommandOutcome::Ok(r)) => assert_eq!(r.get(), r#"{"done":true}"#),
        other => panic!("the command's answer was lost: {other:?}"),
    }
    // No command in flight now: silence is a missed pong again.
    busy.auto_pong = false;
    eventually("down once idle and silent", || {
        let _ = busy.next_frame(Duration::from_millis(20));
        ctl.node(&id).is_some_and(|n| n.status == Status::Down)
    });
}

/// Passive liveness: services that ping the controller themselves every
/// interval (as light-fabric does) are not pinged; one that only answers is
/// pinged every interval; a frozen self-pinging service is down within the
/// interval, the grace and the pong timeout.
#[test]
fn services_that_ping_on_their_own_are_not_pinged_and_still_detected_when_frozen() {
    use tether::agent::swarm::{Swarm, SwarmConfig};
    let ctl = fast_pings(2);
    let addr = ctl.local_addr();
    let url = format!("ws://{addr}/ws/microservice").parse().unwrap();
    let mut config = SwarmConfig::new(url, 50);
    config.client_ping = Some(INTERVAL);
    config.run_for = Some(Duration::from_secs(20));
    let swarm = Swarm::start(config).unwrap();
    eventually("the swarm registered", || ctl.counts().up == 50);
    let count = |f: fn(&tether::metrics::ShardStats) -> &std::sync::atomic::AtomicU64| {
        metrics::total(ctl.stats(), f)
    };
    // Each is pinged once after it is admitted (it has shown no life of
    // its own yet); from then on its own pings spare it ours.
    std::thread::sleep(INTERVAL * 2);
    let (sent0, skipped0) = (count(|s| &s.pings_sent), count(|s| &s.pings_skipped));
    std::thread::sleep(INTERVAL * 5);
    let (sent, skipped) = (
        count(|s| &s.pings_sent) - sent0,
        count(|s| &s.pings_skipped) - skipped0,
    );
    eprintln!("over 5 intervals: {sent} pings sent, {skipped} skipped");
    assert!(
        skipped >= 200,
        "about one check per service per interval: {skipped}"
    );
    assert!(
        sent * 10 <= sent + skipped,
        "at least 90% of the checks sent no ping: {sent} sent, {skipped} skipped"
    );
    assert_eq!(count(|s| &s.pongs_missed), 0);

    // A service that pings on its own, then freezes (stops sending and
    // reading): down within interval + grace + pong timeout (+ a tick).
    let (_, events) = ctl.subscribe_events(None).unwrap();
    let (mut frozen, frozen_id) = registered(addr, "frozen", "10.0.0.9", 1);
    let own_ping_at = Instant::now();
    frozen.send_frame(OpCode::Ping, b"mine");
    let grace = (INTERVAL / 100).max(TICK * 2);
    let bound = INTERVAL + grace + PONG_TIMEOUT + TICK;
    let down_after = loop {
        if let Ok(e) = events.recv_timeout(bound * 3) {
            if e.kind == EventKind::Down && e.runtime_instance_id == frozen_id {
                break own_ping_at.elapsed();
            }
        } else {
            panic!("the frozen service was never marked down");
        }
    };
    eprintln!("frozen service down after {down_after:?} (bound {bound:?})");
    assert!(
        down_after <= bound + Duration::from_millis(400),
        "{down_after:?}"
    );
    swarm.stop();
}
