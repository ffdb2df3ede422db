//! The admin plane over real HTTP and WebSockets: listings over a swarm,
//! commands and fan-out, events, metrics, MCP, audit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tether::admin::access::AdminKey;
use tether::admin::audit::AuditConfig;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::parse_source_ips;
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::controller::Controller;

struct Plane {
    ctl: Controller,
    admin: AdminServer,
}

impl Plane {
    fn start(shards: usize, tweak: impl FnOnce(&mut AdminConfig)) -> Plane {
        Plane::with(config(shards), tweak)
    }

    fn with(
        ctl_config: tether::controller::ControllerConfig,
        tweak: impl FnOnce(&mut AdminConfig),
    ) -> Plane {
        let ctl = start(ctl_config);
        let mut config = AdminConfig::new("127.0.0.1:0".parse().unwrap());
        config.key = AdminKey::new(KEY.as_bytes());
        tweak(&mut config);
        let admin = AdminServer::start(ctl.api(), config).unwrap();
        Plane { ctl, admin }
    }

    fn ws(
        &self,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> tungstenite::WebSocket<std::net::TcpStream> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}{path}", self.admin.local_addr())
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", BEARER.parse().unwrap());
        for (k, v) in headers {
            request.headers_mut().insert(*k, v.parse().unwrap());
        }
        let stream = std::net::TcpStream::connect(self.admin.local_addr()).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        tungstenite::client(request, stream).unwrap().0
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.local_addr())
    }

    fn swarm(&self, n: usize, distinct: usize) -> Swarm {
        let url = format!("ws://{}/ws/microservice", self.ctl.local_addr())
            .parse()
            .unwrap();
        let mut config = SwarmConfig::new(url, n);
        config.service_id = "svc".into();
        config.distinct_ids = distinct;
        config.sources = parse_source_ips("127.0.0.2-127.0.0.3").unwrap();
        config.run_for = Some(Duration::from_secs(120));
        let swarm = Swarm::start(config).unwrap();
        assert!(swarm.wait_registered(n as u64, Duration::from_secs(60)));
        swarm
    }
}

/// The admin key these tests' planes are given.
const KEY: &str = "a test admin key, 32 bytes long.";
const BEARER: &str = "Bearer a test admin key, 32 bytes long.";

/// Every request carries the admin key.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .middleware(
            |mut req: ureq::http::Request<ureq::SendBody>,
             next: ureq::middleware::MiddlewareNext| {
                req.headers_mut()
                    .insert("authorization", BEARER.parse().unwrap());
                next.handle(req)
            },
        )
        .build()
        .into()
}

fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn post(url: &str, body: &Value, scopes: Option<&str>) -> (u16, Value) {
    let mut req = agent()
        .post(url)
        .header("x-tether-user", "alice")
        .header("content-type", "application/json");
    if let Some(s) = scopes {
        req = req.header("x-tether-scopes", s);
    }
    let mut r = req.send(body.to_string()).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn fanout_to_500_accounts_for_every_instance() {
    let plane = Plane::start(2, |_| {});
    let _swarm = plane.swarm(500, 1);
    let started = Instant::now();
    let (status, body) = post(
        &plane.url("/commands"),
        &json!({"name": "check", "serviceId": "svc"}),
        None,
    );
    eprintln!("fan-out to 500 took {:?}", started.elapsed());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 500);
    assert_eq!(body["outcomes"], json!({"ok": 500}));
    let results = body["results"].as_array().unwrap();
    let mut ids: Vec<&str> = results
        .iter()
        .map(|r| r["runtimeInstanceId"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 500);
    assert!(
        results
            .iter()
            .all(|r| r["result"] == json!({"result": "OK"}))
    );
}

fn ws_json(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> Value {
    loop {
        match ws.read().expect("a message") {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tungstenite::Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

#[test]
fn list_filter_and_page_over_2000_swarm_services() {
    let plane = Plane::start(2, |_| {});
    let _swarm = plane.swarm(2_000, 20);
    let (status, all) = get(&plane.url("/services?limit=500"));
    assert_eq!(status, 200);
    assert_eq!(all["total"], 2_000);
    // Walk every page: each instance exactly once.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/services?limit=300&cursor={c}"),
            None => "/services?limit=300".to_string(),
        };
        let (_, page) = get(&plane.url(&path));
        for item in page["items"].as_array().unwrap() {
            assert!(seen.insert(item["runtimeInstanceId"].as_str().unwrap().to_string()));
            assert_eq!(item["status"], "up");
        }
        cursor = page["nextCursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 2_000);
    let (_, one_service) = get(&plane.url("/services?serviceId=svc-7&limit=1000"));
    assert_eq!(one_service["total"], 100);
    assert!(
        one_service["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["serviceId"] == "svc-7")
    );
    let (_, by_q) = get(&plane.url("/services?q=10.0.0.1&limit=1000"));
    assert_eq!(by_q["total"], 111, "10.0.0.1, 10.0.0.10-19, 10.0.0.100-199");
    let (_, env) = get(&plane.url("/services?envTag=prod&status=up&limit=1"));
    assert_eq!(
        (env["total"].clone(), env["items"].as_array().unwrap().len()),
        (json!(2000), 1)
    );
    assert_eq!(get(&plane.url("/services?status=sideways")).0, 400);
    assert_eq!(get(&plane.url("/services?cursor=abc")).0, 400);
    let (status, bad) = get(&plane.url("/services?sort=color"));
    assert_eq!((status, &bad["error"]), (400, &json!("bad_sort")), "{bad}");

    // Sorted, descending, over pages: each instance once, in order.
    let mut sorted = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/services?limit=300&sort=-serviceId&status=up".to_string();
        if let Some(c) = &cursor {
            path += &format!("&cursor={c}");
        }
        let (status, page) = get(&plane.url(&path));
        assert_eq!((status, &page["total"]), (200, &json!(2000)), "{page}");
        for item in page["items"].as_array().unwrap() {
            sorted.push((
                item["serviceId"].as_str().unwrap().to_string(),
                item["runtimeInstanceId"].as_str().unwrap().to_string(),
            ));
        }
        cursor = page["nextCursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(sorted.len(), 2_000);
    assert!(sorted.windows(2).all(|w| w[0].0 >= w[1].0), "descending");
    let distinct: std::collections::HashSet<_> = sorted.iter().map(|(_, id)| id).collect();
    assert_eq!(distinct.len(), 2_000, "no instance twice");
    assert_eq!(sorted[0].0, "svc-9", "text order: svc-9 > svc-19 > svc-10");

    let id = all["items"][0]["runtimeInstanceId"].as_str().unwrap();
    let (status, item) = get(&plane.url(&format!("/services/{id}")));
    assert_eq!(
        (status, item["runtimeInstanceId"].as_str()),
        (200, Some(id))
    );
    // The swarm names its address; a light-4j client that names none shows
    // "peer" (tests/compat.rs).
    assert_eq!(item["addressSource"], "registered", "{item}");
    assert_eq!(
        get(&plane.url(&format!("/services/{}", uuid::Uuid::now_v7()))).0,
        404
    );

    let (_, summary) = get(&plane.url("/summary"));
    assert_eq!(summary["byStatus"], json!({"up": 2000, "down": 0}));
    assert_eq!(summary["distinctServices"], 20);
    assert_eq!(
        summary["node"],
        serde_json::Value::Null,
        "alone: no node name"
    );
    let held: u64 = summary["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["admitted"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 2000);
    assert_eq!(get(&plane.url("/healthz")).0, 200);
    assert_eq!(get(&plane.url("/readyz")).0, 200);
}

#[test]
fn an_instance_shows_its_last_ping_round_trip() {
    let mut ctl_config = config(1);
    ctl_config.engine.ping_interval = Duration::from_millis(300);
    let plane = Plane::with(ctl_config, |_| {});
    let _swarm = plane.swarm(20, 2);
    let deadline = std::time::Instant::now() + WAIT;
    let rtts = loop {
        let (_, page) = get(&plane.url("/services?limit=100&sort=rttMs"));
        let rtts: Vec<f64> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["rttMs"].as_f64())
            .collect();
        if rtts.len() == 20 || std::time::Instant::now() > deadline {
            break rtts;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rtts.len(), 20, "every pinged instance has an RTT: {rtts:?}");
    // On loopback a round trip is well under the pong timeout.
    assert!(rtts.iter().all(|&ms| ms > 0.0 && ms < 1000.0), "{rtts:?}");
    assert!(rtts.windows(2).all(|w| w[0] <= w[1]), "sorted: {rtts:?}");
}

#[test]
fn a_client_that_trickles_its_headers_is_cut_from_the_admin_plane() {
    let plane = Plane::start(1, |c| c.header_timeout = Duration::from_secs(1));
    assert_a_trickling_client_is_cut(plane.admin.local_addr());
    // Others are served meanwhile and after.
    assert_eq!(get(&plane.url("/healthz")).0, 200);
}

/// Each audit line's (phase, tool, outcome or "-").
fn phases(lines: &[Value]) -> Vec<(&str, &str, &str)> {
    lines
        .iter()
        .map(|l| {
            (
                l["phase"].as_str().unwrap(),
                l["tool"].as_str().unwrap(),
                l["outcome"].as_str().unwrap_or("-"),
            )
        })
        .collect()
}

#[test]
fn commands_need_the_write_scope_to_mutate_and_are_audited() {
    let dir = std::env::temp_dir().join(format!("tether-admin-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let audit_path = path.clone();
    let plane = Plane::start(1, move |c| c.audit = Some(AuditConfig::new(audit_path)));
    let (mut svc, id) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", 1);
    let url = plane.url(&format!("/services/{id}/commands"));
    let server = std::thread::spawn(move || {
        let req = svc.recv_json();
        assert_eq!(
            req["params"],
            json!({"name": "get_service_info", "arguments": {"verbose": true}})
        );
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {"serviceId": "user"}}));
        let req = svc.recv_json();
        assert_eq!(req["params"]["name"], "shutdown");
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "error": {"code": -32603, "message": "refused"}}));
        svc
    });
    let (status, body) = post(
        &url,
        &json!({"name": "get_service_info", "arguments": {"verbose": true}}),
        None,
    );
    assert_eq!(
        (status, body["outcome"].as_str(), body["result"].clone()),
        (200, Some("ok"), json!({"serviceId": "user"}))
    );
    let (status, body) = post(&url, &json!({"name": "shutdown"}), Some("portal.r"));
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = post(
        &url,
        &json!({"name": "shutdown"}),
        Some("portal.r portal.w"),
    );
    assert_eq!(
        (status, body["outcome"].as_str()),
        (502, Some("failed")),
        "{body}"
    );
    let svc = server.join().unwrap();
    let unknown = plane.url(&format!("/services/{}/commands", uuid::Uuid::now_v7()));
    assert_eq!(post(&unknown, &json!({"name": "check"}), None).0, 404);
    assert_eq!(post(&url, &json!({"nope": 1}), None).0, 400);
    drop(svc);
    // Every command, the refused one too, is in the audit file.
    drop(plane);
    let lines = json_lines(&path);
    let phases = phases(&lines);
    assert_eq!(
        phases,
        vec![
            ("sent", "get_service_info", "-"),
            ("result", "get_service_info", "ok"),
            ("result", "shutdown", "forbidden"),
            ("sent", "shutdown", "-"),
            ("result", "shutdown", "failed"),
            ("sent", "check", "-"),
            ("result", "check", "not_found")
        ]
    );
    // Each command's two lines share its id.
    for pair in [(0, 1), (3, 4), (5, 6)] {
        assert_eq!(lines[pair.0]["id"], lines[pair.1]["id"]);
    }
    assert_ne!(lines[0]["id"], lines[3]["id"]);
    assert!(
        lines
            .iter()
            .all(|l| l["who"] == "alice" && l["time"].as_str().unwrap().ends_with('Z'))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// No key, no access: the identity headers of a caller without the admin
/// key are never read; a foreign Host (DNS rebinding) or Origin is refused
/// even with the key; the probes stay open, on their own port too.
#[test]
fn the_admin_plane_trusts_no_one_without_its_key_host_and_origin() {
    let plane = Plane::start(1, |c| {
        c.health_listen = Some("127.0.0.1:0".parse().unwrap());
        c.allowed_origins = vec!["https://portal.example".into()];
    });
    let bare: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let status = |req: ureq::RequestBuilder<ureq::typestate::WithoutBody>| {
        let mut r = req.call().unwrap();
        let www = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.body_mut().read_to_string().unwrap();
        (r.status().as_u16(), www, body)
    };
    let services = plane.url("/services");
    // No key: the identity headers claim an admin with every scope.
    let (code, www, body) = status(
        bare.get(&services)
            .header("x-tether-user", "mallory")
            .header("x-tether-scopes", "portal.r portal.w"),
    );
    assert_eq!((code, www.as_deref()), (401, Some("Bearer")), "{body}");
    let (code, _, _) = status(
        bare.get(&services)
            .header("authorization", "Bearer not-the-key"),
    );
    assert_eq!(code, 401);
    // A mutating command without the key never reaches a service.
    let (mut svc, id) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", 1);
    let mut r = bare
        .post(&plane.url(&format!("/services/{id}/commands")))
        .header("x-tether-scopes", "portal.w")
        .header("content-type", "application/json")
        .send(json!({"name": "shutdown"}).to_string())
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    assert!(
        svc.next_frame(Duration::from_millis(200)).is_none(),
        "nothing was sent"
    );
    // DNS rebinding: the page's own host name, key or not.
    for with_key in [false, true] {
        let mut req = bare.get(&services).header(
            "host",
            &format!("evil.example:{}", plane.admin.local_addr().port()),
        );
        if with_key {
            req = req.header("authorization", BEARER);
        }
        let (code, _, body) = status(req);
        assert_eq!(code, 421, "{body}");
        assert!(body.contains("host_not_allowed"), "{body}");
    }
    // A foreign Origin, with the right Host and the key: refused, for
    // plain requests as for WebSockets; an allowed one passes.
    let (code, _, body) = status(
        bare.get(&services)
            .header("authorization", BEARER)
            .header("origin", "https://evil.example"),
    );
    assert_eq!(code, 403, "{body}");
    let (code, _, _) = status(
        bare.get(&services)
            .header("authorization", BEARER)
            .header("origin", "https://portal.example"),
    );
    assert_eq!(code, 200);
    // With the key and a localhost Host, the headers are trusted.
    assert_eq!(get(&services).0, 200);
    // The probes need nothing, on the admin port and on their own.
    let probes = plane.admin.health_addr().unwrap();
    for base in [
        format!("http://{}", plane.admin.local_addr()),
        format!("http://{probes}"),
    ] {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (code, _, body) = status(bare.get(&format!("{base}{path}")));
            assert_eq!(code, 200, "{base}{path}: {body}");
        }
    }
    // The probes' port serves nothing else, key or not.
    let (code, _, _) = status(
        bare.get(&format!("http://{probes}/services"))
            .header("authorization", BEARER),
    );
    assert_eq!(code, 404);
}

/// A mutating command leaves only once its `sent` line is on disk; while
/// the file cannot be written, mutating commands are refused, /readyz
/// fails, and the held lines are written once it can be.
#[test]
fn audit_lines_reach_the_disk_before_the_command_and_a_failing_file_stops_mutations() {
    let dir = std::env::temp_dir().join(format!("tether-audit-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = dir.join("audit.real");
    let path = dir.join("audit.jsonl");
    // The audit path is a link to /dev/full: every write fails (ENOSPC).
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let audit_path = path.clone();
    let plane = Plane::start(1, move |c| c.audit = Some(AuditConfig::new(audit_path)));
    let (mut svc, id) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", 1);
    let url = plane.url(&format!("/services/{id}/commands"));
    let writer = Some("portal.r portal.w");
    // A read is audited too (its lines wait), but it is not held back.
    let server = std::thread::spawn(move || {
        let req = svc.recv_json();
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {"ok": true}}));
        svc
    });
    assert_eq!(
        post(&url, &json!({"name": "get_service_info"}), writer).0,
        200
    );
    let mut svc = server.join().unwrap();
    eventually("the write failed", || get(&plane.url("/readyz")).0 == 503);
    let (status, body) = post(&url, &json!({"name": "shutdown"}), writer);
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("audit_unavailable")),
        "{body}"
    );
    let (status, _) = post(
        &plane.url("/commands"),
        &json!({"name": "shutdown", "serviceId": "user"}),
        writer,
    );
    assert_eq!(status, 503);
    assert!(
        svc.next_frame(Duration::from_millis(300)).is_none(),
        "nothing was sent"
    );
    let (_, metrics) = get(&plane.url("/metrics"));
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("tether_audit_failing 1"), "{metrics}");
    assert!(
        !metrics.contains("tether_audit_write_errors_total 0"),
        "{metrics}"
    );

    // The disk is back: the held lines are written, and mutations resume.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    eventually("readyz passes again", || {
        get(&plane.url("/readyz")).0 == 200
    });
    let audit_file = real.clone();
    let server = std::thread::spawn(move || {
        let req = svc.recv_json();
        assert_eq!(req["params"]["name"], "shutdown");
        // The sent line is on disk by the time the command arrives.
        let text = std::fs::read_to_string(&audit_file).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (last["phase"].as_str(), last["tool"].as_str()),
            (Some("sent"), Some("shutdown"))
        );
        svc.send_json(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {}}));
        (svc, last["id"].clone())
    });
    assert_eq!(post(&url, &json!({"name": "shutdown"}), writer).0, 200);
    let (_svc, shutdown_id) = server.join().unwrap();
    drop(plane);
    let lines = json_lines(&real);
    let seen = phases(&lines);
    // Nothing held was lost: the read's pair and the refused shutdowns'
    // lines came through the outage.
    assert!(
        seen.starts_with(&[
            ("sent", "get_service_info", "-"),
            ("result", "get_service_info", "ok")
        ]),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("result", "shutdown", "not_sent")),
        "{seen:?}"
    );
    let done: Vec<&Value> = lines.iter().filter(|l| l["id"] == shutdown_id).collect();
    assert_eq!(done.len(), 2, "{done:?}");
    assert_eq!(done[1]["outcome"], "ok");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn events_arrive_in_order_without_gaps_and_resume_with_since() {
    let mut config = config(2);
    config.engine.ping_interval = Duration::from_millis(500);
    config.engine.pong_timeout = Duration::from_millis(300);
    config.registry.down_retention_ms = 500;
    let plane = Plane::with(config, |_| {});
    let mut stream = plane.ws("/events", &[]);
    let hello = ws_json(&mut stream);
    assert_eq!(hello["type"], "hello");
    let start = hello["seq"].as_u64().unwrap();
    let epoch = hello["epoch"].as_str().unwrap().to_string();

    // A zombie: registers, never answers pings, goes down, expires.
    let (zombie, zombie_id) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", 1);
    let mut got = Vec::new();
    while got.len() < 3 {
        let e = ws_json(&mut stream);
        if e["runtimeInstanceId"] == json!(zombie_id) {
            got.push(e);
        }
    }
    let kinds: Vec<&str> = got.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["registered", "down", "deregistered"]);
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![start + 1, start + 2, start + 3], "no gaps");
    assert!(got.iter().all(|e| e["epoch"] == json!(epoch)), "{got:?}");
    assert_eq!(got[2]["reason"], "down record expired");
    drop(zombie);

    // Resume after the first one: the rest are replayed.
    let mut resumed = plane.ws(&format!("/events?since={}&epoch={epoch}", start + 1), &[]);
    assert_eq!(ws_json(&mut resumed)["type"], "hello");
    assert_eq!(ws_json(&mut resumed)["seq"], start + 2);
    assert_eq!(ws_json(&mut resumed)["seq"], start + 3);

    // SSE for curl users, resuming from Last-Event-ID.
    let mut sse = agent()
        .get(&plane.url("/events"))
        .header("last-event-id", &format!("{epoch}:{start}"))
        .call()
        .unwrap();
    let mut reader = std::io::BufReader::new(sse.body_mut().as_reader());
    let mut text = String::new();
    while !text.contains("down record expired") {
        std::io::BufRead::read_line(&mut reader, &mut text).unwrap();
    }
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let expected: Vec<String> = (start + 1..=start + 3)
        .map(|s| format!("{epoch}:{s}"))
        .collect();
    assert_eq!(
        ids, expected,
        "hello has no id; each event's id is its epoch:seq:\n{text}"
    );
    assert!(text.starts_with("event: hello"), "{text}");
}

#[test]
fn a_since_older_than_the_ring_gets_410() {
    let mut config = config(1);
    config.registry.event_ring = 4;
    let plane = Plane::with(config, |_| {});
    for port in 1..=10 {
        let (c, _) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", port);
        drop(c);
    }
    eventually("events published", || {
        plane.ctl.counts().last_event_seq >= 20
    });
    let epoch = plane.ctl.events_epoch();
    let (status, body) = get(&plane.url(&format!("/events?since=1&epoch={epoch}")));
    assert_eq!((status, body["error"].as_str()), (410, Some("gone")));
}

/// Publishes `n` events (a register and a deregister each two) and waits
/// until the log holds at least `n`.
fn churn(plane: &Plane, n: u64) {
    let from = plane.ctl.counts().last_event_seq;
    for port in 1..=(n as u16).div_ceil(2) {
        let (c, _) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", port);
        drop(c);
    }
    eventually("events published", || {
        plane.ctl.counts().last_event_seq >= from + n
    });
}

#[test]
fn after_a_restart_a_resume_point_of_the_old_run_gets_410_not_other_events() {
    let before = Plane::start(1, |_| {});
    churn(&before, 20);
    let (_, summary) = get(&before.url("/summary"));
    let old_epoch = summary["eventEpoch"].as_str().unwrap().to_string();
    let left_at = summary["lastEventSeq"].as_u64().unwrap();
    drop(before);

    // The controller restarts and goes further than the old resume point.
    let after = Plane::start(1, |_| {});
    churn(&after, left_at + 10);
    let (status, body) = get(&after.url(&format!("/events?since={left_at}&epoch={old_epoch}")));
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("gone")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("restarted"),
        "{body}"
    );
    // The same through an EventSource's Last-Event-ID.
    let refused = agent()
        .get(&after.url("/events"))
        .header("last-event-id", &format!("{old_epoch}:{left_at}"))
        .call()
        .unwrap();
    assert_eq!(refused.status(), 410);
    // A since without its epoch cannot tell runs apart: refused.
    let (status, body) = get(&after.url(&format!("/events?since={left_at}")));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_resume_point"))
    );
    // The client takes a snapshot and resumes in the new epoch.
    let (_, summary) = get(&after.url("/summary"));
    let epoch = summary["eventEpoch"].as_str().unwrap();
    assert_ne!(epoch, old_epoch);
    let mut stream = after.ws(&format!("/events?since={left_at}&epoch={epoch}"), &[]);
    let hello = ws_json(&mut stream);
    assert_eq!(hello["epoch"], epoch);
    let first = ws_json(&mut stream);
    assert_eq!(first["seq"], left_at + 1);
    assert_eq!(first["epoch"], epoch);
}

#[test]
fn a_stalled_subscriber_is_cut_while_others_continue() {
    let mut config = config(2);
    config.registry.event_subscriber_queue = 2048;
    let plane = Plane::with(config, |_| {});
    // The stalled one: a tiny receive buffer and it never reads.
    let stalled = {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&plane.admin.local_addr().into()).unwrap();
        let stream: std::net::TcpStream = socket.into();
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/events", plane.admin.local_addr())
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", BEARER.parse().unwrap());
        tungstenite::client(request, stream).unwrap().0
    };
    let mut live = plane.ws("/events", &[]);
    let start = ws_json(&mut live)["seq"].as_u64().unwrap();
    // The live one reads as events come, and must see all 6,000 in order.
    let reader = std::thread::spawn(move || {
        for expected in start + 1..=start + 6_000 {
            assert_eq!(ws_json(&mut live)["seq"], expected);
        }
    });
    // 6,000 events in bursts of 1,000: more than the stalled one's queue,
    // socket buffers and bridge can hold.
    for _ in 0..3 {
        let swarm = plane.swarm(1_000, 1);
        swarm.stop();
        eventually("all gone", || plane.ctl.counts().up == 0);
    }
    reader.join().expect("the live subscriber saw every event");
    eventually("the stalled subscriber was cut", || {
        plane.ctl.counts().events_cut >= 1
    });
    let (_, metrics) = get(&plane.url("/metrics"));
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tether_event_subscribers_cut_total 1")
    );
    drop(stalled);
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_the_swarm() {
    let plane = Plane::start(2, |_| {});
    let _swarm = plane.swarm(300, 3);
    let text = agent()
        .get(&plane.url("/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("tether_connections", &[("state", "admitted")]), 300.0);
    assert_eq!(value("tether_services", &[("status", "up")]), 300.0);
    assert_eq!(
        value("tether_registry_events_total", &[("kind", "registered")]),
        300.0
    );
    assert!(value("tether_accepted_total", &[]) >= 300.0);
    assert_eq!(value("tether_bad_input_total", &[]), 0.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "tether_pong_rtt_seconds"),
        "the histogram is there"
    );
    assert!(scrape.docs.contains_key("tether_commands_total"));
}

#[test]
fn mcp_lists_and_calls_the_admin_tools() {
    let plane = Plane::start(1, |_| {});
    let (_svc, id) = registered(plane.ctl.local_addr(), "user", "10.0.0.1", 1);
    let mut mcp = plane.ws(
        "/ctrl/mcp",
        &[("x-tether-user", "ui"), ("x-tether-scopes", "portal.r")],
    );
    let mut call = |msg: Value| {
        mcp.send(tungstenite::Message::Text(msg.to_string().into()))
            .unwrap();
        ws_json(&mut mcp)
    };
    let init = call(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}}}));
    assert_eq!(init["result"]["serverInfo"]["name"], "tether");
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    let tools = call(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"list_services") && names.contains(&"send_command"));
    let listed = call(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                             "params": {"name": "list_services", "arguments": {"serviceId": "user"}}}));
    assert_eq!(listed["result"]["isError"], false);
    assert_eq!(
        listed["result"]["structuredContent"]["items"][0]["runtimeInstanceId"],
        json!(id)
    );
    let refused = call(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                              "params": {"name": "send_command", "arguments": {"runtimeInstanceId": id, "name": "clear_cache"}}}));
    assert_eq!(
        refused["result"]["isError"], true,
        "portal.r cannot clear caches"
    );
    let unknown = call(
        json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "nope"}}),
    );
    assert_eq!(unknown["error"]["code"], -32602);
}

#[test]
fn a_since_ahead_of_the_log_gets_410_and_browsers_need_an_allowed_origin() {
    let plane = Plane::start(1, |c| {
        c.allowed_origins = vec!["https://portal.example".into()]
    });
    let epoch = plane.ctl.events_epoch();
    assert_eq!(
        get(&plane.url(&format!("/events?since=5000&epoch={epoch}"))).0,
        410,
        "a log behind the client"
    );
    let stream = std::net::TcpStream::connect(plane.admin.local_addr()).unwrap();
    let refused = tungstenite::client(
        tungstenite::http::Request::builder()
            .uri(format!("ws://{}/events", plane.admin.local_addr()))
            .header("origin", "https://evil.example")
            .header("authorization", BEARER)
            .header("host", "localhost")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header(
                "sec-websocket-key",
                tungstenite::handshake::client::generate_key(),
            )
            .body(())
            .unwrap(),
        stream,
    );
    match refused {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 403)
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let mut allowed = plane.ws("/events", &[("origin", "https://portal.example")]);
    assert_eq!(ws_json(&mut allowed)["type"], "hello");
}

#[test]
fn fanouts_are_bounded_names_are_checked_and_a_dropped_request_is_still_audited() {
    let dir = std::env::temp_dir().join(format!("tether-admin-drop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let audit_path = path.clone();
    let plane = Plane::start(1, move |c| {
        c.max_concurrent_fanouts = 1;
        c.audit = Some(AuditConfig::new(audit_path));
    });
    // A service that never answers.
    let (_silent, id) = registered(plane.ctl.local_addr(), "slow", "10.0.0.1", 1);
    let url = plane.url("/commands");
    let first = std::thread::spawn(move || {
        post(
            &url,
            &json!({"name": "check", "serviceId": "slow", "timeoutMs": 1500}),
            None,
        )
    });
    eventually("the first fan-out is running", || {
        plane.ctl.commands_in_flight() == 1
    });
    let (status, body) = post(
        &plane.url("/commands"),
        &json!({"name": "check", "serviceId": "slow"}),
        None,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_fanouts"))
    );
    assert_eq!(first.join().unwrap().1["outcomes"], json!({"timeout": 1}));
    let one = plane.url(&format!("/services/{id}/commands"));
    assert_eq!(post(&one, &json!({"name": "check now"}), None).0, 400);

    // The client gives up after 100 ms; the command still ends and is audited.
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(100)))
        .build()
        .into();
    let sent = impatient
        .post(&one)
        .header("authorization", BEARER)
        .header("content-type", "application/json")
        .send(json!({"name": "get_loggers", "timeoutMs": 600}).to_string());
    assert!(sent.is_err(), "the client timed out");
    eventually("the abandoned command is audited", || {
        std::fs::read_to_string(&path)
            .is_ok_and(|t| t.contains("\"tool\":\"get_loggers\",\"outcome\":\"timeout\""))
    });
    drop(plane);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `tools/list` reaches the service as `tools/list` (not as a tools/call
/// named so), over REST and MCP, and its answer comes back as it said it.
#[test]
fn a_services_tools_are_listed_by_asking_it() {
    use std::sync::Arc;
    use tether::agent::{Agent, Backoff, ServiceSpec, Tools};

    struct Billing;
    impl Tools for Billing {
        fn list(&self) -> Vec<Value> {
            vec![
                json!({"name": "rebill", "description": "re-run billing", "inputSchema": {"type": "object"}}),
            ]
        }
    }
    let plane = Plane::start(1, |_| {});
    let url = format!("ws://{}/ws/microservice", plane.ctl.local_addr());
    let agent = Agent::start(
        url.parse().unwrap(),
        ServiceSpec::new("billing", "10.0.0.5", 7000),
        Arc::new(Billing),
        Backoff::default(),
    )
    .unwrap();
    let id = agent.wait_registered(WAIT).expect("registers");
    let (status, body) = get(&plane.url(&format!("/services/{id}/tools")));
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    let names: Vec<&str> = body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"rebill") && names.contains(&"check"),
        "{names:?}"
    );

    // A service that knows no tools/list: "unsupported", not a failure.
    let (mut raw, raw_id) = registered(plane.ctl.local_addr(), "legacy", "10.0.0.6", 1);
    let server = std::thread::spawn(move || {
        let req = raw.recv_json();
        assert_eq!(
            (req["method"].as_str(), req.get("params")),
            (Some("tools/list"), None)
        );
        raw.send_json(&json!({"jsonrpc": "2.0", "id": req["id"],
                              "error": {"code": -32601, "message": "Method not found"}}));
        raw
    });
    let (status, body) = get(&plane.url(&format!("/services/{raw_id}/tools")));
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("unsupported")),
        "{body}"
    );
    drop(server.join().unwrap());
    let missing = plane.url(&format!("/services/{}/tools", uuid::Uuid::now_v7()));
    assert_eq!(get(&missing).0, 404);

    // The same through MCP.
    let mut mcp = plane.ws(
        "/ctrl/mcp",
        &[("x-tether-user", "ui"), ("x-tether-scopes", "portal.r")],
    );
    let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "list_service_tools", "arguments": {"runtimeInstanceId": id}}});
    mcp.send(tungstenite::Message::Text(msg.to_string().into()))
        .unwrap();
    let listed = ws_json(&mut mcp);
    assert_eq!(listed["result"]["isError"], false, "{listed}");
    let tools = &listed["result"]["structuredContent"]["result"]["tools"];
    assert!(
        tools
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "rebill")),
        "{listed}"
    );
    agent.stop();
}

/// Issue 10, finding 7: stalled event streams. Clients that open
/// `/events` as SSE and never read are bounded in number, pin no thread,
/// are dropped by the kernel once they take nothing for the send timeout
/// (freeing their places), and meanwhile `GET /services` and `/readyz`
/// answer.
#[test]
fn stalled_event_streams_are_bounded_and_dropped() {
    use socket2::{Domain, Socket, Type};
    use std::io::Write;
    let plane = Plane::start(2, |c| {
        c.max_event_streams = 8;
        c.stream_send_timeout = Duration::from_secs(2);
    });
    let admin = plane.admin.local_addr();
    let stalled: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&admin.into()).unwrap();
            let mut s: std::net::TcpStream = s.into();
            s.write_all(
                format!(
                    "GET /events HTTP/1.1\r\nHost: localhost\r\nAuthorization: {BEARER}\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    // The status of a new `GET /events` (read from its first line only: a
    // 200 is a stream that does not end).
    let events_status = || {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.write_all(
            format!("GET /events HTTP/1.1\r\nHost: localhost\r\nAuthorization: {BEARER}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut head = [0u8; 12];
        std::io::Read::read_exact(&mut s, &mut head)
            .ok()
            .and_then(|()| std::str::from_utf8(&head[9..12]).ok()?.parse::<u16>().ok())
    };
    eventually("the 8 streams open", || {
        plane.ctl.counts().event_subscribers == 8
    });
    // Their places are taken: a ninth is refused.
    assert_eq!(events_status(), Some(503));
    // ~1,500 events (each ~200 bytes of SSE): more than their windows and
    // send buffers hold.
    let addr = plane.ctl.local_addr();
    for i in 0..750 {
        let (c, _) = registered(addr, "churn", &format!("10.9.{}.{}", i / 250, i % 250), 1);
        drop(c);
    }
    // Meanwhile the plane serves.
    let started = Instant::now();
    let (status, page) = get(&plane.url("/services?limit=1"));
    assert_eq!(status, 200, "{page}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(get(&plane.url("/readyz")).0, 200);
    // The stalled ones are dropped, and their places free.
    eventually("a new stream can open", || events_status() == Some(200));
    drop(stalled);
}

/// Issue 10, finding 8: a fan-out keeps at most `max_fanout_bytes` of
/// results; past them each result is a note of its size.
#[test]
fn fanout_results_are_bounded_in_total() {
    let plane = Plane::start(1, |c| {
        c.max_fanout_bytes = 200 << 10;
    });
    let addr = plane.ctl.local_addr();
    let services: Vec<std::thread::JoinHandle<()>> = (0..10)
        .map(|i| {
            let mut c = Client::connect(addr, "/ws/microservice");
            c.register("blob", &format!("10.0.0.{i}"), 1);
            std::thread::spawn(move || {
                // Answers one tool call with 60 KB, then leaves.
                let m = c.recv_json();
                let id = m["id"].clone();
                c.send_json(&json!({"jsonrpc": "2.0", "id": id,
                                    "result": {"blob": "x".repeat(60_000)}}));
                c.sees_eof(Duration::from_secs(2));
            })
        })
        .collect();
    let (status, body) = post(
        &plane.url("/commands"),
        &json!({"name": "get_service_info", "serviceId": "blob"}),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 10);
    let kept = results
        .iter()
        .filter(|r| r["result"]["blob"].is_string())
        .count();
    let noted = results
        .iter()
        .filter(|r| r["result"]["truncated"] == true)
        .count();
    assert_eq!((kept, noted), (3, 7), "200 KiB holds three 60 KB results");
    for s in services {
        s.join().unwrap();
    }
}
