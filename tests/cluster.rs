//! Several controller nodes on one real etcd (Debian's etcd-server, started
//! here), with swarms split across them: each node sees the others'
//! instances, a node that leaves or is killed leaves the others' view, and
//! an etcd restart loses nothing. Built with `--features cluster`.
#![cfg(feature = "cluster")]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::*;
use serde_json::{Value, json};
use tether::admin::access::AdminKey;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::parse_source_ips;
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::cluster::{Cluster, ClusterConfig, EtcdTls, MAX_TXN_OPS};
use tether::controller::Controller;

const KEY: &str = "a test admin key, 32 bytes long.";

struct Node {
    ctl: Controller,
    admin: AdminServer,
    cluster: Arc<Cluster>,
}

impl Node {
    fn start(etcd: &Etcd, id: &str, ttl: Duration) -> Node {
        Node::with(etcd, id, ttl, config(1))
    }

    fn with(
        etcd: &Etcd,
        id: &str,
        ttl: Duration,
        ctl: tether::controller::ControllerConfig,
    ) -> Node {
        Node::tweaked(etcd, id, ttl, ctl, |_| {})
    }

    fn tweaked(
        etcd: &Etcd,
        id: &str,
        ttl: Duration,
        ctl: tether::controller::ControllerConfig,
        tweak: impl FnOnce(&mut ClusterConfig),
    ) -> Node {
        let ctl = start(ctl);
        let mut config = AdminConfig::new("127.0.0.1:0".parse().unwrap());
        config.key = AdminKey::new(KEY.as_bytes());
        let admin = AdminServer::start(ctl.api(), config).unwrap();
        let mut c = ClusterConfig::new(vec![etcd.endpoint()], id);
        c.lease_ttl = ttl;
        c.flush_interval = Duration::from_millis(50);
        c.admin_url = format!("http://{}", admin.local_addr());
        tweak(&mut c);
        let cluster = Arc::new(Cluster::start(c, ctl.api()).unwrap());
        let _ = admin.cluster().set(cluster.clone());
        Node {
            ctl,
            admin,
            cluster,
        }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        admin_get(&format!("http://{}{path}", self.admin.local_addr()))
    }

    fn status(&self) -> Value {
        self.get("/cluster").1
    }

    fn swarm(&self, service: &str, n: usize, sources: &str) -> Swarm {
        swarm_to(&self.ctl.local_addr().to_string(), service, n, sources)
    }

    /// A swarm whose services follow `first` others of the same name
    /// (distinct addresses: the same identity would supersede).
    fn more(&self, service: &str, first: usize, n: usize, sources: &str) -> Swarm {
        swarm_from(
            &self.ctl.local_addr().to_string(),
            service,
            first,
            n,
            sources,
        )
    }
}

fn admin_get(url: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(url)
        .header("authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn admin_post(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(url)
        .header("authorization", &format!("Bearer {KEY}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut r = request.send(body.to_string()).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn swarm_to(addr: &str, service: &str, n: usize, sources: &str) -> Swarm {
    swarm_from(addr, service, 0, n, sources)
}

fn swarm_from(addr: &str, service: &str, first: usize, n: usize, sources: &str) -> Swarm {
    let url = format!("ws://{addr}/ws/microservice").parse().unwrap();
    let mut config = SwarmConfig::new(url, n);
    config.service_id = service.into();
    config.index_offset = first;
    config.sources = parse_source_ips(sources).unwrap();
    config.run_for = Some(Duration::from_secs(120));
    let swarm = Swarm::start(config).unwrap();
    assert!(swarm.wait_registered(n as u64, Duration::from_secs(60)));
    swarm
}

/// Polls `f` for up to `within`; the time it took, or a panic naming `what`
/// and the last value seen.
fn until(what: &str, within: Duration, mut f: impl FnMut() -> (bool, Value)) -> Duration {
    let started = Instant::now();
    loop {
        let (done, seen) = f();
        if done {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what} within {within:?}: {seen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remote(status: &Value) -> u64 {
    status["remoteInstances"].as_u64().unwrap_or(0)
}

/// `node`'s /metrics, as text.
fn metrics(node: &Node) -> String {
    ureq::get(&format!("http://{}/metrics", node.admin.local_addr()))
        .header("authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// How many event subscribers `node`'s event log has cut.
fn events_cut(node: &Node) -> u64 {
    metrics(node)
        .lines()
        .find_map(|l| l.strip_prefix("tether_event_subscribers_cut_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("tether_event_subscribers_cut_total in /metrics")
}

fn node_names(status: &Value) -> Vec<String> {
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["live"] == true && n["self"] == false)
        .map(|n| n["node"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_node_sees_the_others_and_a_node_that_leaves_is_gone_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let a = Node::start(&etcd, "a", Duration::from_secs(10));
    // b's event queue holds one event, so 200 services leaving at once
    // most likely cut the cluster layer from it (whether it does depends
    // on the scheduler): it must then find what left by itself.
    let mut small = config(1);
    small.registry.event_subscriber_queue = 1;
    let b = Node::with(&etcd, "b", Duration::from_secs(10), small);
    let _on_a = a.swarm("alpha", 300, "127.0.0.2");
    let on_b = b.swarm("beta", 200, "127.0.0.3");
    until("a sees b's 200", WAIT, || {
        let s = a.status();
        (remote(&s) == 200, s)
    });
    until("b sees a's 300", WAIT, || {
        let s = b.status();
        (remote(&s) == 300 && node_names(&s) == ["a"], s)
    });
    // Discovery over the service protocol, on a, shows b's instances as
    // strictly as its own; a subscription is told when they change.
    let mut svc = Client::connect(a.ctl.local_addr(), "/ws/microservice");
    svc.register("gamma", "10.7.0.1", 9000);
    let snap = svc.call("discovery/lookup", json!({"serviceId": "beta"}));
    let nodes = snap["result"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 200, "{snap}");
    for n in nodes {
        assert!(
            n["runtimeInstanceId"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .is_ok()
        );
        assert_eq!(
            (&n["serviceId"], &n["environment"]),
            (&json!("beta"), &json!("prod"))
        );
        assert!(
            n["port"].as_u64().is_some_and(|p| p > 0 && p < 65536),
            "{n}"
        );
        for at in ["connectedAt", "lastSeenAt"] {
            let t = n[at].as_str().unwrap();
            assert!(
                t.ends_with('Z') && t.len() == 24 && t.starts_with("20"),
                "{at}: {t}"
            );
        }
    }
    let own = svc.call(
        "discovery/lookup",
        json!({"serviceId": "alpha", "envTag": "prod"}),
    );
    assert_eq!(own["result"]["nodes"].as_array().unwrap().len(), 300);
    let sub = svc.call(
        "discovery/subscribe",
        json!({"serviceId": "beta", "envTag": "prod"}),
    );
    assert_eq!(sub["result"]["nodes"].as_array().unwrap().len(), 200);

    // Each node's event stream names the node: (node, epoch, seq) tell its
    // events from every other node's; the epoch is the one /cluster shows.
    let hello = {
        use std::io::BufRead;
        let mut r = ureq::get(&format!("http://{}/events", a.admin.local_addr()))
            .header("authorization", &format!("Bearer {KEY}"))
            .call()
            .unwrap();
        let mut lines = std::io::BufReader::new(r.body_mut().as_reader()).lines();
        let data = lines
            .find_map(|l| l.ok()?.strip_prefix("data:").map(|d| d.trim().to_string()))
            .unwrap();
        serde_json::from_str::<Value>(&data).unwrap()
    };
    let epoch_of_a = b.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "a")
        .map(|n| n["epoch"].clone())
        .unwrap();
    assert_eq!(
        (&hello["node"], &hello["epoch"]),
        (&json!("a"), &epoch_of_a),
        "{hello}"
    );

    // One merged stream on a: a's hello, b's hello and b's events, each
    // naming its node.
    let merged = {
        let url = format!("http://{}/events?scope=cluster", a.admin.local_addr());
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut r = ureq::get(&url)
                .header("authorization", &format!("Bearer {KEY}"))
                .call()
                .unwrap();
            for line in std::io::BufReader::new(r.body_mut().as_reader()).lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data:")
                    && tx.send(serde_json::from_str(data.trim()).unwrap()).is_err()
                {
                    return;
                }
            }
        });
        rx
    };
    let next = |what: &str, f: &dyn Fn(&Value) -> bool| loop {
        let m = merged
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no {what}"));
        if f(&m) {
            return m;
        }
    };
    next("b's hello", &|m| m["type"] == "hello" && m["node"] == "b");
    let (_epsilon, epsilon_id) = registered(b.ctl.local_addr(), "epsilon", "10.9.0.1", 7000);
    let event = next("b's event for epsilon", &|m| {
        m["type"] == "event" && m["node"] == "b" && m["serviceId"] == "epsilon"
    });
    assert_eq!(
        event["runtimeInstanceId"],
        epsilon_id.to_string(),
        "{event}"
    );
    assert!(
        event["seq"].as_u64().is_some() && event["epoch"].is_string(),
        "{event}"
    );
    drop(_epsilon);
    until("epsilon gone from a's view", WAIT, || {
        let s = a.status();
        (remote(&s) == 200, s)
    });

    // GET /services?scope=cluster: a's own, then the others', paged.
    let (status, first) = a.get("/services?scope=cluster&serviceId=beta&limit=150");
    assert_eq!((status, &first["total"]), (200, &json!(200)), "{first}");
    let items = first["items"].as_array().unwrap();
    assert!(items.len() == 150 && items.iter().all(|i| i["node"] == "b"));
    let next = first["nextCursor"].as_str().unwrap();
    let (_, second) = a.get(&format!(
        "/services?scope=cluster&serviceId=beta&limit=150&cursor={next}"
    ));
    assert_eq!(second["items"].as_array().unwrap().len(), 50, "{second}");
    assert_eq!(second["nextCursor"], Value::Null);
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["runtimeInstanceId"].to_string())
            .collect()
    };
    let mut all = ids(&first);
    all.extend(ids(&second));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "pages neither repeat nor skip");
    let (_, whole) = a.get("/services?scope=cluster&limit=1000");
    assert_eq!(whole["total"], 501, "300 alpha, gamma, 200 beta");
    let whole = whole["items"].as_array().unwrap();
    assert_eq!(whole.iter().filter(|i| i["node"] == "a").count(), 301);
    assert_eq!(whole[0]["node"], "a", "this node's first");
    let (_, narrowed) = a.get("/services?scope=cluster&q=BETA&limit=1");
    assert_eq!(narrowed["total"], 200, "{narrowed}");
    let (status, _) = a.get("/services?scope=cluster&sort=serviceId");
    assert_eq!(status, 400);

    // Discovery through a's admin API names the node that holds each.
    let (status, page) = a.get("/cluster/services?serviceId=beta&limit=1000");
    assert_eq!((status, &page["total"]), (200, &Value::from(200)), "{page}");
    let items = page["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .all(|i| i["node"] == "b" && i["serviceId"] == "beta")
    );
    assert_eq!(
        a.get("/cluster/services?serviceId=alpha").1["total"],
        0,
        "own ones are /services"
    );
    // A command sent through a reaches a service b holds, and the answer
    // says which node sent it; so do its tools and its record.
    let id = items[0]["runtimeInstanceId"].as_str().unwrap();
    let (status, answer) = admin_post(
        &format!("http://{}/services/{id}/commands", a.admin.local_addr()),
        &serde_json::json!({"name": "get_service_info", "arguments": {}}),
        &[],
    );
    assert_eq!(
        (status, &answer["outcome"]),
        (200, &Value::from("ok")),
        "{answer}"
    );
    assert_eq!(answer["node"], "b", "{answer}");
    assert_eq!(answer["result"]["serviceId"], "beta", "{answer}");
    let (status, tools) = a.get(&format!("/services/{id}/tools"));
    assert_eq!(
        (status, &tools["node"]),
        (200, &Value::from("b")),
        "{tools}"
    );
    let (status, one) = a.get(&format!("/services/{id}"));
    assert_eq!((status, &one["node"]), (200, &Value::from("b")), "{one}");
    // A fan-out through a is split by node: b runs its part, the answer
    // merges both, each result naming its node.
    let (status, fan) = admin_post(
        &format!("http://{}/commands", a.admin.local_addr()),
        &json!({"name": "get_service_info", "concurrency": 64, "timeoutMs": 1000}),
        &[],
    );
    assert_eq!(status, 200, "{fan}");
    // 300 alpha and the raw gamma client (which answers no tool) on a.
    assert_eq!(
        (&fan["total"], &fan["outcomes"]),
        (&json!(501), &json!({"ok": 500, "timeout": 1})),
        "{}",
        fan["nodes"]
    );
    assert_eq!(
        (&fan["nodes"]["a"]["total"], &fan["nodes"]["b"]["total"]),
        (&json!(301), &json!(200))
    );
    let results = fan["results"].as_array().unwrap();
    let from_b = results.iter().filter(|r| r["node"] == "b").count();
    assert_eq!((results.len(), from_b), (501, 200));
    let (_, only_b) = admin_post(
        &format!("http://{}/commands", a.admin.local_addr()),
        &json!({"name": "get_service_info", "serviceId": "beta"}),
        &[],
    );
    assert_eq!(
        (&only_b["total"], &only_b["nodes"]["a"]["total"]),
        (&json!(200), &json!(0)),
        "{only_b}"
    );

    // A request another node forwarded is never forwarded again.
    let (status, _) = admin_post(
        &format!("http://{}/services/{id}/commands", a.admin.local_addr()),
        &serde_json::json!({"name": "get_service_info"}),
        &[("x-tether-forwarded-by", "c")],
    );
    assert_eq!(status, 404);

    // A forged record in etcd cannot collect the admin key: its admin URL
    // names a host no one trusted, and nothing is sent there.
    let forged = uuid::Uuid::now_v7();
    etcd_put(
        &etcd,
        &[
            (
                "/tether/v1/n/mallory".to_string(),
                r#"{"admin":"http://203.0.113.1:8439","epoch":"00","startedAtMs":1}"#.to_string(),
            ),
            (
                format!("/tether/v1/i/mallory/{forged}"),
                r#"["beta","","1","https","10.9.9.9",1,{}]"#.to_string(),
            ),
        ],
    );
    until("a sees the forged record", WAIT, || {
        let s = a.status();
        (remote(&s) == 201, s)
    });
    let (status, refused) = admin_post(
        &format!("http://{}/services/{forged}/commands", a.admin.local_addr()),
        &serde_json::json!({"name": "get_service_info"}),
        &[],
    );
    assert_eq!(
        (status, &refused["error"]),
        (502, &Value::from("peer_not_trusted")),
        "{refused}"
    );
    etcd_delete(&etcd, "/tether/v1/n/mallory");
    etcd_delete(&etcd, &format!("/tether/v1/i/mallory/{forged}"));

    // Writes were coalesced: transactions of at most 128, far fewer than
    // the instances they carried.
    let etcd_a = &a.status()["etcd"];
    let (txns, puts) = (
        etcd_a["txns"].as_u64().unwrap(),
        etcd_a["puts"].as_u64().unwrap(),
    );
    assert!(puts >= 300, "{etcd_a}");
    assert!(
        txns * MAX_TXN_OPS as u64 >= puts && txns < puts / 10,
        "{etcd_a}"
    );
    assert_eq!(a.status()["stale"], false);
    // The summary names the node (the Admin UI asks it whether to show
    // the cluster).
    assert_eq!(a.get("/summary?top=0").1["node"], "a");
    // /metrics says the same.
    let metrics = metrics(&a);
    assert!(
        metrics.contains("tether_cluster_remote_instances 200"),
        "{metrics}"
    );
    assert!(metrics.contains("tether_cluster_stale 0"));

    // b's services go away at once: a's view follows, though b was cut
    // from its event log on the way (it re-syncs: puts what is up, deletes
    // what etcd has of it that is not).
    let resyncs = b.status()["etcd"]["resyncs"].as_u64().unwrap();
    let cuts = events_cut(&b);
    on_b.stop();
    until("a sees b's services gone", WAIT, || {
        let s = a.status();
        (remote(&s) == 0, s)
    });
    // a's subscriber hears of it (through snapshots coalesced on the way).
    loop {
        let m = svc.recv_json();
        if m["method"] == "discovery/changed" && m["params"]["nodes"] == json!([]) {
            break;
        }
    }
    // If the log cut the cluster's subscriber on the way, the cluster
    // layer re-synced (that is how a's view could follow).
    if events_cut(&b) > cuts {
        assert!(
            b.status()["etcd"]["resyncs"].as_u64().unwrap() > resyncs,
            "cut from the event log, yet no resync: {}",
            b.status()
        );
    }
    // b leaves the cluster (its lease revoked): gone from a's view at once,
    // not a TTL later.
    b.cluster.stop();
    let took = until("b gone from a's view", Duration::from_secs(5), || {
        let s = a.status();
        (node_names(&s).is_empty(), s)
    });
    assert!(took < Duration::from_secs(5));
    drop(b);
}

#[test]
fn a_service_that_registers_on_another_node_supersedes_its_old_record() {
    let Some(etcd) = Etcd::start() else { return };
    let a = Node::start(&etcd, "a", Duration::from_secs(10));
    let b = Node::start(&etcd, "b", Duration::from_secs(10));
    // The service's old socket to b stays open (a half-dead path, say)
    // while it registers again, the same identity, on a.
    let (mut old, old_id) = registered(b.ctl.local_addr(), "delta", "10.8.0.1", 7000);
    until("a sees it on b", WAIT, || {
        let s = a.status();
        (remote(&s) == 1, s)
    });
    let (_new, new_id) = registered(a.ctl.local_addr(), "delta", "10.8.0.1", 7000);
    assert_ne!(old_id, new_id);
    // b learns of it through the watch and lets the old one go: 4000.
    assert_eq!(old.expect_close(), Some(4000));
    until("b holds no delta and sees a's", WAIT, || {
        let (_, page) = b.get("/services?serviceId=delta");
        let s = b.status();
        (
            page["total"] == 0 && remote(&s) == 1 && s["supersededByOtherNodes"] == 1,
            s,
        )
    });
    until("a no longer sees b's old record", WAIT, || {
        let s = a.status();
        (remote(&s) == 0, s)
    });
    let mut watcher = Client::connect(b.ctl.local_addr(), "/ws/discovery");
    let snap = watcher.call("discovery/lookup", json!({"serviceId": "delta"}));
    let nodes = snap["result"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{snap}");
    assert_eq!(nodes[0]["runtimeInstanceId"], new_id.to_string());
}

#[test]
fn with_etcd_auth_on_a_node_needs_its_user() {
    let Some(etcd) = Etcd::start() else { return };
    // etcd's auth: root, and a user whose role may use the prefix only.
    etcd_runtime().block_on(async {
        use etcd_client::Permission;
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        c.user_add("root", "root-pw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("tether").await.unwrap();
        let prefix = Permission::read_write("/tether/v1/").with_prefix();
        c.role_grant_permission("tether", prefix).await.unwrap();
        c.user_add("tether", "tether-pw", None).await.unwrap();
        c.user_grant_role("tether", "tether").await.unwrap();
        c.auth_enable().await.unwrap();
    });
    let with_user = |c: &mut ClusterConfig| c.user = Some(("tether".into(), "tether-pw".into()));
    let a = Node::tweaked(&etcd, "a", Duration::from_secs(10), config(1), with_user);
    let b = Node::tweaked(&etcd, "b", Duration::from_secs(10), config(1), with_user);
    let _on_b = b.swarm("beta", 20, "127.0.0.9");
    until("a sees b's 20 through an authenticated etcd", WAIT, || {
        let s = a.status();
        (remote(&s) == 20 && s["stale"] == false, s)
    });
    // Without the user, a node says why it is out of the cluster.
    let anonymous = Node::start(&etcd, "c", Duration::from_secs(10));
    until("the anonymous node says why", WAIT, || {
        let s = anonymous.status();
        let e = s["lastError"].as_str().unwrap_or("");
        (s["stale"] == true && e.contains("--cluster-user"), s)
    });
}

#[test]
fn over_tls_a_node_needs_etcd_s_ca_and_its_own_certificate() {
    let Some(etcd) = Etcd::start_tls() else {
        return;
    };
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    let read = |f: &str| std::fs::read(keys.join(f)).unwrap();
    let full = EtcdTls {
        ca_pem: read("ca.pem"),
        identity: Some((read("client.pem"), read("client.key"))),
    };
    let with = |tls: Option<EtcdTls>| move |c: &mut ClusterConfig| c.tls = tls;
    let ttl = Duration::from_secs(10);
    let a = Node::tweaked(&etcd, "a", ttl, config(1), with(Some(full.clone())));
    let b = Node::tweaked(&etcd, "b", ttl, config(1), with(Some(full.clone())));
    let _on_b = b.swarm("beta", 20, "127.0.0.10");
    until("a sees b's 20 through etcd over TLS", WAIT, || {
        let s = a.status();
        (remote(&s) == 20 && s["stale"] == false, s)
    });
    // etcd asks for a client certificate; one without is out, and says why.
    let no_cert = EtcdTls {
        identity: None,
        ..full.clone()
    };
    let c = Node::tweaked(&etcd, "c", ttl, config(1), with(Some(no_cert)));
    // etcd's certificate not from the CA given: refused, and said so.
    let other_ca = EtcdTls {
        ca_pem: read("server2.pem"),
        ..full.clone()
    };
    let d = Node::tweaked(&etcd, "d", ttl, config(1), with(Some(other_ca)));
    // Plain http to an https etcd.
    let e = Node::tweaked(&etcd, "e", ttl, config(1), |c| {
        c.endpoints = vec![c.endpoints[0].replace("https://", "http://")]
    });
    for (node, hint) in [
        (&c, "--cluster-cert"),
        (&d, "--cluster-ca"),
        (&e, "--cluster-ca"),
    ] {
        until("a node that cannot reach etcd says why", WAIT, || {
            let s = node.status();
            let err = s["lastError"].as_str().unwrap_or("");
            (s["stale"] == true && err.contains(hint), s)
        });
    }
    assert_eq!(remote(&a.status()), 20);
}

#[test]
fn a_node_id_in_use_is_refused_and_taken_once_free() {
    let Some(etcd) = Etcd::start() else { return };
    let watcher = Node::start(&etcd, "w", Duration::from_secs(10));
    let first = Node::start(&etcd, "a", Duration::from_secs(10));
    let _on_first = first.swarm("alpha", 50, "127.0.0.8");
    until("w sees a's 50", WAIT, || {
        let s = watcher.status();
        (remote(&s) == 50, s)
    });
    // A second process given the same id must not take a's keys over (its
    // resync would delete the 50 it does not hold).
    let second = Node::start(&etcd, "a", Duration::from_secs(10));
    until("the second a says why it waits", WAIT, || {
        let e = second.cluster.last_error().unwrap_or_default();
        (e.contains("held by another live node"), Value::from(e))
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = watcher.status();
    assert_eq!(remote(&s), 50, "a's instances untouched: {s}");
    assert_eq!(second.status()["stale"], true);
    // Once the first leaves, the second joins (and publishes its own: 0).
    first.cluster.stop();
    until("the second a in sync", Duration::from_secs(20), || {
        let s = second.status();
        (s["stale"] == false, s)
    });
    until("w sees the second a, holding nothing", WAIT, || {
        let s = watcher.status();
        (remote(&s) == 0 && node_names(&s) == ["a"], s)
    });
}

#[test]
fn a_killed_node_leaves_the_view_within_its_lease_ttl() {
    let Some(etcd) = Etcd::start() else { return };
    let a = Node::start(&etcd, "a", Duration::from_secs(10));
    // b is a real process, killed with SIGKILL: nothing of it revokes.
    let dir = std::env::temp_dir().join(format!("tether-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("admin.key");
    std::fs::write(&key_file, KEY).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["controller", "--listen", "127.0.0.1:0", "--shards", "1"])
        .args(["--admin", "127.0.0.1:0", "--admin-key-file"])
        .arg(&key_file)
        .args(["--cluster", &etcd.url(), "--node-id", "b"])
        .args(["--cluster-lease-ttl", "3s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let ready = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    let listen = ready
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {ready:?}"))
        .to_string();
    // b's services know both nodes, b first: when b dies they move to a.
    let url = format!(
        "ws://{listen}/ws/microservice,ws://{}/ws/microservice",
        a.ctl.local_addr()
    );
    let mut config = SwarmConfig::new(url.parse().unwrap(), 100);
    config.service_id = "beta".into();
    config.first_controller = Some(0);
    config.sources = parse_source_ips("127.0.0.4").unwrap();
    config.run_for = Some(Duration::from_secs(120));
    let on_b = Swarm::start(config).unwrap();
    assert!(on_b.wait_registered(100, Duration::from_secs(60)));
    until("a sees b's 100", WAIT, || {
        let s = a.status();
        (remote(&s) == 100, s)
    });
    let killed = Instant::now();
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    // b's services move to the survivor (within a second of backoff), each
    // registered again there, most before b's lease runs out; discovery
    // on a shows each once meanwhile, not also b's old record.
    until("b's 100 services registered on a", WAIT, || {
        let (_, page) = a.get("/services?serviceId=beta&limit=1");
        (page["total"] == 100, page)
    });
    let mut watcher = Client::connect(a.ctl.local_addr(), "/ws/discovery");
    let snap = watcher.call("discovery/lookup", json!({"serviceId": "beta"}));
    eprintln!(
        "b's services moved to a; a's view still holds {} of b's old records",
        remote(&a.status())
    );
    assert_eq!(
        snap["result"]["nodes"].as_array().unwrap().len(),
        100,
        "{snap}"
    );
    until(
        "b's instances leave a's view",
        Duration::from_secs(10),
        || {
            let s = a.status();
            (remote(&s) == 0 && node_names(&s).is_empty(), s)
        },
    );
    let took = killed.elapsed();
    eprintln!("a's view converged {took:?} after b was killed (lease TTL 3 s)");
    assert!(
        took >= Duration::from_secs(1),
        "the lease, not something else: {took:?}"
    );
    assert!(took < Duration::from_secs(3 + 3), "{took:?}");
    let moved = on_b
        .stats()
        .moved
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(moved, 100, "each moved once");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_etcd_restart_loses_nothing_and_the_view_survives_a_compaction() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let a = Node::start(&etcd, "a", Duration::from_secs(3));
    let b = Node::start(&etcd, "b", Duration::from_secs(3));
    let _first = b.swarm("beta", 100, "127.0.0.5");
    until("a sees b's 100", WAIT, || {
        let s = a.status();
        (remote(&s) == 100, s)
    });
    // etcd goes away: both keep serving their own, a keeps its last view,
    // flagged stale, and says so in /readyz.
    etcd.kill();
    until("a's view turns stale", Duration::from_secs(20), || {
        let s = a.status();
        (s["stale"] == true, s)
    });
    assert_eq!(remote(&a.status()), 100, "the last view is kept");
    let (status, ready) = admin_get(&format!("http://{}/readyz", a.admin.local_addr()));
    assert_eq!(status, 200);
    assert!(
        ready.as_str().unwrap_or("").contains("cluster view stale"),
        "{ready}"
    );
    // Meanwhile b takes on more services, which etcd cannot hear of yet.
    let _second = b.more("beta", 100, 50, "127.0.0.6");
    // Longer than the lease TTL: both leases expire in etcd's eyes.
    std::thread::sleep(Duration::from_secs(4));
    etcd.resume();
    until(
        "a sees all 150 of b's once etcd is back",
        Duration::from_secs(30),
        || {
            let s = a.status();
            (remote(&s) == 150 && s["stale"] == false, s)
        },
    );
    until("b sees a again", WAIT, || {
        let s = b.status();
        (node_names(&s) == ["a"] && s["stale"] == false, s)
    });
    // A compaction of everything so far: the watch goes on, and changes
    // after it still arrive.
    compact(&etcd);
    let _third = b.more("beta", 150, 25, "127.0.0.7");
    until("a sees b's 175 after the compaction", WAIT, || {
        let s = a.status();
        (remote(&s) == 175, s)
    });
}

fn etcd_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Writes keys straight to etcd (as anyone with access to it could).
fn etcd_put(etcd: &Etcd, kvs: &[(String, String)]) {
    etcd_runtime().block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        for (k, v) in kvs {
            client.put(k.as_str(), v.as_str(), None).await.unwrap();
        }
    });
}

fn etcd_delete(etcd: &Etcd, key: &str) {
    etcd_runtime().block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        client.delete(key, None).await.unwrap();
    });
}

/// Compacts etcd's history up to its current revision.
fn compact(etcd: &Etcd) {
    etcd_runtime().block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let revision = client
            .get("/", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        client
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .unwrap();
    });
}

/// The Admin UI through a gateway in front of node a only: it lists a's
/// and b's instances, runs a tool on one of b's, shows both nodes, and its
/// live feed (the merged stream, over a WebSocket) shows what happens on
/// b (ui/e2e/cluster.mjs in headless Chromium).
#[test]
fn the_admin_ui_shows_the_whole_cluster_through_one_node() {
    if !browser::available() {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let a = Node::start(&etcd, "a", Duration::from_secs(10));
    let b = Node::start(&etcd, "b", Duration::from_secs(10));
    let _on_a = a.swarm("alpha", 30, "127.0.0.11");
    let _on_b = b.swarm("beta", 20, "127.0.0.12");
    until("a sees b's 20", WAIT, || {
        let s = a.status();
        (remote(&s) == 20, s)
    });
    let gateway = browser::dev_gateway(a.admin.local_addr(), KEY);
    let mut zeta = None;
    let (ok, steps) = browser::run(
        "e2e/cluster.mjs",
        &[
            gateway.public_origin(),
            &browser::artifacts().display().to_string(),
            "30",
            "20",
        ],
        Duration::from_secs(120),
        |line| {
            if line == "REGISTER on b" {
                zeta = Some(registered(b.ctl.local_addr(), "zeta", "10.9.9.1", 7000));
            }
        },
    );
    assert!(ok, "the browser test failed: {steps:?}");
    assert_eq!(
        browser::names(&steps),
        [
            "logged in",
            "cluster table",
            "b's instances",
            "this node's",
            "remote detail",
            "forwarded tool",
            "cluster overview",
            "b's event live",
            "done"
        ],
        "{steps:?}"
    );
}

/// The etcd-wave load test's writer (the cluster layer's batches and
/// pipeline, paced): every instance put once, in transactions of at most
/// 128, and nothing left once its lease is revoked.
#[test]
fn a_paced_wave_writes_each_instance_once_in_bounded_transactions() {
    use tether::cluster::wave::{WaveConfig, run};
    let Some(etcd) = Etcd::start() else { return };
    let r = run(&WaveConfig {
        endpoint: etcd.endpoint(),
        prefix: "/wave-test/".into(),
        rate: 10_000,
        instances: 5_000,
        in_flight: 4,
        flush: Duration::from_millis(100),
    })
    .unwrap();
    assert_eq!(r.puts, 5_000, "{r:?}");
    assert!(
        r.txns * MAX_TXN_OPS as u64 >= r.puts && r.txns < r.puts / 20,
        "{r:?}"
    );
    assert!(
        r.elapsed >= r.scheduled - Duration::from_millis(150),
        "paced: {r:?}"
    );
    let left = etcd_runtime().block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        c.get("/wave-test/", Some(opts)).await.unwrap().count()
    });
    assert_eq!(left, 0, "the wave's keys go with its lease");
}

/// A merged event stream whose reader goes frees its place in this node's
/// event log at once, on a quiet node too (nothing to send would tell it):
/// page loads of the Admin UI must not use the log's subscribers up.
#[test]
fn a_merged_stream_that_is_left_frees_its_subscription() {
    let Some(etcd) = Etcd::start() else { return };
    let a = Node::start(&etcd, "a", Duration::from_secs(10));
    let _b = Node::start(&etcd, "b", Duration::from_secs(10));
    until("a sees b", WAIT, || {
        let s = a.status();
        (node_names(&s) == ["b"], s)
    });
    let subscribers = || {
        a.get("/summary?top=0").1["eventSubscribers"]
            .as_u64()
            .unwrap()
    };
    let before = subscribers();
    for _ in 0..10 {
        use std::io::BufRead;
        let url = format!("http://{}/events?scope=cluster", a.admin.local_addr());
        let mut r = ureq::get(&url)
            .header("authorization", &format!("Bearer {KEY}"))
            .call()
            .unwrap();
        let mut lines = std::io::BufReader::new(r.body_mut().as_reader()).lines();
        assert!(lines.next().is_some(), "the stream starts with a's hello");
        // Dropped here: the reader goes.
    }
    until("the streams' subscriptions freed", WAIT, || {
        let n = subscribers();
        (n <= before, Value::from(n))
    });
}
