//! The registry protocol end to end, real sockets on loopback.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tether::controller::CommandOutcome;
use tether::registry::Filter;
use tether::registry::events::EventKind;

fn node_ids(snapshot: &Value) -> Vec<String> {
    let mut ids: Vec<String> = snapshot["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["runtimeInstanceId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn register_lookup_subscribe_sees_arrivals_and_departures_then_deregister() {
    let ctl = controller(2);
    let addr = ctl.local_addr();
    let (mut watcher, _) = registered(addr, "watcher", "10.0.0.100", 9000);
    let (mut first, first_id) = registered(addr, "user", "10.0.0.1", 8443);

    let lookup = watcher.call("discovery/lookup", json!({"serviceId": "user"}));
    let snapshot = &lookup["result"];
    assert_eq!(snapshot["serviceId"], "user");
    assert_eq!(node_ids(snapshot), vec![first_id.to_string()]);
    let node = &snapshot["nodes"][0];
    assert_eq!(node["environment"], "prod");
    assert_eq!(node["envTag"], "prod");
    assert_eq!(node["address"], "10.0.0.1");
    assert_eq!(node["port"], 8443);
    assert_eq!(node["tags"], json!({"zone": "a"}));
    assert_eq!(node["connected"], true);
    for field in ["connectedAt", "lastSeenAt"] {
        let at = node[field].as_str().unwrap();
        assert!(
            humantime::parse_rfc3339(at).is_ok() && at.ends_with('Z'),
            "{field}: {at}"
        );
    }

    let sub = watcher.call(
        "discovery/subscribe",
        json!({"serviceId": "user", "envTag": "prod"}),
    );
    assert_eq!(node_ids(&sub["result"]), vec![first_id.to_string()]);
    assert_eq!(sub["result"]["envTag"], "prod", "the filter is echoed");

    // A second instance arrives: one discovery/changed with both.
    let (_second, second_id) = registered(addr, "user", "10.0.0.2", 8443);
    let changed = watcher.recv_json();
    assert_eq!(changed["method"], "discovery/changed");
    assert_eq!(changed["params"]["envTag"], "prod");
    let mut both = vec![first_id.to_string(), second_id.to_string()];
    both.sort();
    assert_eq!(node_ids(&changed["params"]), both);

    // A third arrives and leaves (socket closed without deregister).
    let (third, third_id) = registered(addr, "user", "10.0.0.3", 8443);
    loop {
        let changed = watcher.recv_json();
        if node_ids(&changed["params"]).contains(&third_id.to_string()) {
            break;
        }
    }
    drop(third);
    loop {
        let changed = watcher.recv_json();
        let ids = node_ids(&changed["params"]);
        if !ids.contains(&third_id.to_string()) {
            assert_eq!(ids, both);
            break;
        }
    }

    // Deregister: confirmed, then closed, and the instance leaves discovery.
    let params = json!({"runtimeInstanceId": first_id, "reason": "programmatic"});
    let reply = first.call("service/deregister", params);
    assert_eq!(
        reply["result"],
        json!({"runtimeInstanceId": first_id.to_string(), "status": "deregistered"})
    );
    // Then the controller closes with 1000 (the ack came first).
    assert_eq!(first.expect_close(), Some(1000));
    let unsub = watcher.call(
        "discovery/unsubscribe",
        json!({"serviceId": "user", "envTag": "prod"}),
    );
    assert_eq!(
        unsub["result"],
        json!({"status": "unsubscribed", "serviceId": "user", "envTag": "prod"})
    );
    let lookup = watcher.call("discovery/lookup", json!({"serviceId": "user"}));
    assert_eq!(node_ids(&lookup["result"]), vec![second_id.to_string()]);
}

#[test]
fn same_identity_supersedes_the_older_connection_with_4000() {
    let ctl = controller(2);
    let addr = ctl.local_addr();
    let (_events_at, events) = ctl.subscribe_events(None).unwrap();
    let (mut old, old_id) = registered(addr, "user", "10.0.0.1", 8443);
    // Several connections so the successor likely lands on another shard too.
    let (mut new, new_id) = registered(addr, "user", "10.0.0.1", 8443);
    assert_ne!(old_id, new_id);
    assert_eq!(old.expect_close(), Some(4000));
    // The old socket closing must not remove its successor.
    drop(old);
    std::thread::sleep(Duration::from_millis(300));
    let lookup = new.call("discovery/lookup", json!({"serviceId": "user"}));
    assert_eq!(node_ids(&lookup["result"]), vec![new_id.to_string()]);
    let kinds: Vec<EventKind> = events.try_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::Registered,
            EventKind::Superseded,
            EventKind::Registered
        ]
    );
}

#[test]
fn supersede_across_shards() {
    // With many shards, repeat until the two connections sit on different shards.
    let ctl = controller(4);
    let addr = ctl.local_addr();
    let mut successors = Vec::new();
    for port in 1..=20u16 {
        let (mut old, _) = registered(addr, "svc", "10.1.1.1", port);
        successors.push(registered(addr, "svc", "10.1.1.1", port));
        assert_eq!(old.expect_close(), Some(4000), "port {port}");
    }
    assert_eq!(ctl.counts().up, 20);
}

#[test]
fn update_metadata_reaches_discovery_and_subscribers() {
    let ctl = controller(1);
    let addr = ctl.local_addr();
    let (mut svc, id) = registered(addr, "user", "10.0.0.1", 8443);
    let mut watcher = Client::connect(addr, "/ws/discovery");
    watcher.call("discovery/subscribe", json!({"serviceId": "user"}));
    svc.send_json(
        &json!({"jsonrpc": "2.0", "method": "service/update_metadata",
                          "params": {"version": "2.0.0", "tags": {"zone": "b"}}}),
    );
    let changed = watcher.recv_json();
    assert_eq!(changed["method"], "discovery/changed");
    assert_eq!(changed["params"]["nodes"][0]["version"], "2.0.0");
    assert_eq!(changed["params"]["nodes"][0]["tags"], json!({"zone": "b"}));
    assert_eq!(
        changed["params"]["nodes"][0]["runtimeInstanceId"],
        id.to_string()
    );
}

#[test]
fn an_update_to_a_port_another_instance_holds_is_refused_but_the_rest_applies() {
    let ctl = controller(1);
    let addr = ctl.local_addr();
    let (mut a, a_id) = registered(addr, "user", "10.0.0.1", 1);
    let (_b, _) = registered(addr, "user", "10.0.0.1", 2);
    let reply = a.call(
        "service/update_metadata",
        json!({"port": 2, "version": "9"}),
    );
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let node = tether::controller::rpc::node_json(&ctl.node(&a_id).unwrap());
    assert_eq!(
        (node["port"].clone(), node["version"].clone()),
        (json!(1), json!("9"))
    );
    assert_eq!(
        a.call("service/update_metadata", json!({"port": 3}))["result"]["status"],
        "updated"
    );
}

#[test]
fn notification_watches_are_bounded_and_freed_when_dropped() {
    let mut config = config(1);
    config.max_watchers = 2;
    let ctl = start(config);
    let (_svc, id) = registered(ctl.local_addr(), "user", "10.0.0.1", 1);
    let first = ctl.watch_notifications(id).unwrap();
    let _second = ctl.watch_notifications(id).unwrap();
    assert!(
        ctl.watch_notifications(id).is_err(),
        "the third is over the bound"
    );
    drop(first);
    assert!(
        ctl.watch_notifications(id).is_ok(),
        "a dropped watch frees its place"
    );
}

#[test]
fn discovery_endpoint_serves_only_discovery() {
    let ctl = controller(1);
    let addr = ctl.local_addr();
    let (_svc, _) = registered(addr, "user", "10.0.0.1", 8443);
    let mut d = Client::connect(addr, "/ws/discovery");
    assert_eq!(
        d.call("discovery/lookup", json!({"serviceId": "user"}))["result"]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let reply = d.call("service/register", register_params("x", "10.0.0.9", 1));
    assert_eq!(reply["error"]["code"], -32601);
}

#[test]
fn commands_round_trip_time_out_and_report_unsupported() {
    let mut config = config(2);
    config.command_timeout = Duration::from_millis(500);
    let ctl = start(config);
    let addr = ctl.local_addr();
    let (mut svc, id) = registered(addr, "user", "10.0.0.1", 8443);

    // The service answers this one.
    let server = std::thread::spawn(move || {
        let req = svc.recv_json();
        assert_eq!(req["method"], "tools/call");
        assert_eq!(req["params"]["name"], "get_service_info");
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "method": null, "result": {"serviceId": "user"}}));
        let unknown = svc.recv_json();
        svc.send_json(&json!({"jsonrpc": "2.0", "id": unknown["id"],
                              "error": {"code": -32601, "message": "Method not found"}}));
        let ignored = svc.recv_json();
        assert_eq!(ignored["params"]["name"], "check");
        svc // keep the socket open, never answering the last one
    });
    match ctl.call_tool(id, "get_service_info", json!({})) {
        CommandOutcome::Ok(result) => assert_eq!(result.get(), r#"{"serviceId":"user"}"#),
        other => panic!("expected a result, got {other:?}"),
    }
    assert!(matches!(
        ctl.call_tool(id, "no_such_tool", json!({})),
        CommandOutcome::Unsupported(_)
    ));
    assert!(matches!(
        ctl.call_tool(id, "check", json!({})),
        CommandOutcome::Timeout
    ));
    let mut svc = server.join().unwrap();
    assert_eq!(ctl.commands_in_flight(), 0);

    // A late reply to the timed-out command is an unknown id: counted, harmless.
    svc.send_json(&json!({"jsonrpc": "2.0", "id": 3, "result": {}}));
    eventually("unknown reply counted", || {
        bad_count(ctl.stats(), tether::metrics::BadInput::UnknownReplyId) == 1
    });
    assert!(matches!(
        ctl.call_tool(uuid::Uuid::now_v7(), "check", json!({})),
        CommandOutcome::NotFound
    ));

    // The instance goes away while a command waits: Gone.
    let (tx, rx) = std::sync::mpsc::channel();
    ctl.call(
        id,
        "tools/list",
        None,
        Some(Duration::from_secs(5)),
        Box::new(move |o| tx.send(o.label()).unwrap()),
    );
    assert_eq!(svc.recv_json()["method"], "tools/list");
    drop(svc);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "gone");
}

#[test]
fn per_instance_command_bound_is_enforced() {
    let mut config = config(1);
    config.max_inflight_per_instance = 2;
    config.command_timeout = Duration::from_secs(2);
    let ctl = start(config);
    let (svc, id) = registered(ctl.local_addr(), "user", "10.0.0.1", 8443);
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..3 {
        let tx = tx.clone();
        ctl.call(
            id,
            "tools/list",
            None,
            None,
            Box::new(move |o| tx.send(o.label()).unwrap()),
        );
    }
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "busy");
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "timeout");
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "timeout");
    drop(svc);
}

#[test]
fn service_notifications_are_relayed_to_watchers_only() {
    let ctl = controller(1);
    let (mut svc, id) = registered(ctl.local_addr(), "user", "10.0.0.1", 8443);
    let log = json!({"jsonrpc": "2.0", "method": "notifications/log",
                     "params": {"timestamp": 1, "level": "INFO", "logger": "app", "message": "hello"}});
    let mut unwatched = log.clone();
    unwatched["params"]["message"] = json!("nobody listens");
    svc.send_json(&unwatched); // nobody watches: dropped
    // Messages on one socket are handled in order: after this round trip
    // the first log has been dealt with.
    svc.call("discovery/lookup", json!({"serviceId": "user"}));
    let watch = ctl.watch_notifications(id).unwrap();
    svc.send_json(&log);
    let got = watch.recv_timeout(WAIT).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&got).unwrap()["params"]["message"],
        "hello"
    );
    assert!(watch.try_recv().is_err(), "the first one was not kept");
}

#[test]
fn agent_sdk_registers_looks_up_subscribes_and_deregisters() {
    use std::sync::{Arc, Mutex};
    use tether::agent::{Agent, Backoff, ControllerUrl, NoTools, ServiceSpec};
    let ctl = controller(2);
    let url: ControllerUrl = format!("ws://{}/ws/microservice", ctl.local_addr())
        .parse()
        .unwrap();
    let agent = Agent::start(
        url.clone().into(),
        ServiceSpec::new("billing", "10.0.0.5", 7000),
        Arc::new(NoTools),
        Backoff::default(),
    )
    .unwrap();
    let id = agent.wait_registered(WAIT).expect("registers");
    let snap = agent.lookup("billing", None, WAIT).unwrap();
    assert_eq!(snap["nodes"][0]["runtimeInstanceId"], id.to_string());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    agent.on_change(move |snap| {
        s.lock()
            .unwrap()
            .push(snap["nodes"].as_array().unwrap().len())
    });
    agent.subscribe("billing", None, WAIT).unwrap();
    let other = Agent::start(
        url.into(),
        ServiceSpec::new("billing", "10.0.0.6", 7000),
        Arc::new(NoTools),
        Backoff::default(),
    )
    .unwrap();
    other.wait_registered(WAIT).unwrap();
    eventually("subscriber sees two", || seen.lock().unwrap().contains(&2));
    // Built-in tools answer commands.
    match ctl.call_tool(id, "check", json!({})) {
        CommandOutcome::Ok(r) => assert_eq!(r.get(), r#"{"result":"OK"}"#),
        o => panic!("{o:?}"),
    }
    assert!(other.deregister("programmatic", WAIT));
    eventually("subscriber sees one", || {
        seen.lock().unwrap().last() == Some(&1)
    });
    // The controller closed it with 1000 after the ack; a deregistered
    // agent stays away (its backoff would have brought it back by now).
    std::thread::sleep(Duration::from_millis(2500));
    let filter = Filter {
        service_id: "billing".into(),
        env_tag: None,
        protocol: None,
    };
    assert_eq!(ctl.lookup(&filter).nodes.len(), 1);
    agent.stop();
    other.stop();
}

/// An agent given several controller nodes, the first of which is down,
/// registers with the next; when that one closes, it moves on round the
/// list, and counts the move.
#[test]
fn an_agent_with_several_controllers_moves_past_a_dead_one() {
    use std::sync::Arc;
    use tether::agent::{Agent, Backoff, Controllers, NoTools, ServiceSpec};
    let ctl = controller(1);
    let dead = free_port();
    let urls: Controllers = format!(
        "ws://127.0.0.1:{dead}/ws/microservice,ws://{}/ws/microservice",
        ctl.local_addr()
    )
    .parse()
    .unwrap();
    for _ in 0..2 {
        // The first tried is random: either way it ends on the live one.
        let agent = Agent::start(
            urls.clone(),
            ServiceSpec::new("billing", "10.0.0.5", 7000),
            Arc::new(NoTools),
            Backoff::default(),
        )
        .unwrap();
        let id = agent
            .wait_registered(Duration::from_secs(15))
            .expect("registers");
        let filter = Filter {
            service_id: "billing".into(),
            env_tag: None,
            protocol: None,
        };
        let nodes = ctl.lookup(&filter).nodes;
        assert_eq!(
            nodes
                .iter()
                .map(|n| n.runtime_instance_id)
                .collect::<Vec<_>>(),
            [id]
        );
        agent.stop();
        eventually("the instance leaves", || {
            ctl.lookup(&filter).nodes.is_empty()
        });
    }
    // The same, the dead one tried first for certain.
    let mut config = tether::agent::swarm::SwarmConfig::new(urls, 3);
    config.first_controller = Some(0);
    let swarm = tether::agent::swarm::Swarm::start(config).unwrap();
    assert!(swarm.wait_registered(3, Duration::from_secs(15)));
    let stats = swarm.stats();
    assert!(
        stats
            .connect_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    assert_eq!(stats.moved.load(std::sync::atomic::Ordering::Relaxed), 0);
    swarm.stop();
}

/// light-4j builds `portalUrl + basePath + /ws/microservice`: behind a
/// path-routing ingress the endpoints live under a prefix.
#[test]
fn a_base_path_prefixes_both_service_endpoints() {
    let mut config = config(1);
    config.base_path = "/controller".into();
    let ctl = start(config);
    let addr = ctl.local_addr();
    let mut service = Client::connect(addr, "/controller/ws/microservice");
    let id = service.register("billing", "10.0.0.7", 8443);
    let mut watcher = Client::connect(addr, "/controller/ws/discovery");
    let snapshot = watcher.call("discovery/lookup", json!({"serviceId": "billing"}));
    assert_eq!(node_ids(&snapshot["result"]), vec![id.to_string()]);
    // Without the prefix (or with only part of it) there is nothing.
    for path in [
        "/ws/microservice",
        "/ws/discovery",
        "/controller",
        "/controllerx/ws/microservice",
    ] {
        let mut c = Client::tcp(addr);
        assert_eq!(c.upgrade(path, None), 404, "{path}");
    }
}

/// A graceful drain: every service hears `session/draining` with the
/// deadline, then is closed with 1001, the closes spread over the drain
/// period (not all at once); new upgrades are refused meanwhile, and the
/// drain reports its end.
#[test]
fn a_drain_tells_services_then_spreads_the_closes() {
    let ctl = controller(2);
    let addr = ctl.local_addr();
    let mut services: Vec<Client> = (0..20)
        .map(|i| registered(addr, "svc", &format!("10.0.0.{i}"), 1).0)
        .collect();
    let started = std::time::Instant::now();
    ctl.drain(Duration::from_secs(1));
    let handles: Vec<std::thread::JoinHandle<Duration>> = services
        .drain(..)
        .map(|mut c| {
            std::thread::spawn(move || {
                let told = c.recv_json();
                assert_eq!(told["method"], "session/draining", "{told}");
                assert_eq!(told["params"]["deadlineMs"], 1000);
                // 20 services at the default rate: the 1 s floor.
                assert_eq!(told["params"]["reconnectWindowMs"], 1000);
                assert_eq!(c.expect_close(), Some(1001));
                started.elapsed()
            })
        })
        .collect();
    let mut closed: Vec<Duration> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    closed.sort();
    let (first, last) = (closed[0], closed[closed.len() - 1]);
    assert!(
        last - first >= Duration::from_millis(400),
        "spread over the period, not all at once: {closed:?}"
    );
    assert!(
        last < Duration::from_secs(3),
        "within the period: {closed:?}"
    );
    eventually("the drain is over", || ctl.drain_left() == 0);
    let mut late = Client::tcp(addr);
    assert_eq!(late.upgrade("/ws/microservice", None), 503);
}
