//! wss://: the service listener with TLS, driven by a real rustls client
//! over real sockets, in process and as the `tether` binary (SIGHUP).

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tether::engine::tls::{TlsAcceptor, TlsFiles};
use tether::metrics::{self, BadInput};
use tungstenite::Message;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn client_config() -> Arc<rustls::ClientConfig> {
    let roots = tether::engine::tls::load_roots(&keys().join("ca.pem")).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A WebSocket over TLS to `path`, upgraded.
fn wss(addr: SocketAddr, path: &str) -> tungstenite::WebSocket<Tls> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn =
        rustls::ClientConnection::new(client_config(), "localhost".try_into().unwrap()).unwrap();
    let url = format!("wss://localhost:{}{path}", addr.port());
    tungstenite::client(url, rustls::StreamOwned::new(conn, tcp))
        .unwrap()
        .0
}

/// The next text message (pings are answered by tungstenite as it reads).
fn next_json(ws: &mut tungstenite::WebSocket<Tls>) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

fn call(ws: &mut tungstenite::WebSocket<Tls>, id: u64, method: &str, params: Value) -> Value {
    let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    ws.send(Message::Text(request.to_string().into())).unwrap();
    next_json(ws)
}

/// The subject of the certificate the server showed.
fn shown_certificate(ws: &tungstenite::WebSocket<Tls>) -> String {
    let cert = &ws.get_ref().conn.peer_certificates().unwrap()[0];
    String::from_utf8_lossy(cert.as_ref()).into_owned()
}

#[test]
fn wss_registers_answers_pings_discovers_and_closes_cleanly() {
    let mut config = config(2);
    config.engine.ping_interval = Duration::from_millis(300);
    config.engine.pong_timeout = Duration::from_millis(1000);
    config.engine.tick = Duration::from_millis(50);
    config.engine.tls = Some(Arc::new(
        TlsAcceptor::new(TlsFiles {
            cert: keys().join("server.pem"),
            key: keys().join("server.key"),
            client_ca: None,
        })
        .unwrap(),
    ));
    let ctl = start(config);
    let addr = ctl.local_addr();
    let mut ws = wss(addr, "/ws/microservice");
    let reply = call(
        &mut ws,
        1,
        "service/register",
        register_params("billing", "10.0.0.1", 8443),
    );
    assert_eq!(reply["result"]["status"], "registered", "{reply}");
    let id = reply["result"]["runtimeInstanceId"]
        .as_str()
        .unwrap()
        .to_string();
    // Pinged over TLS and answered (tungstenite pongs as it reads): the
    // round trip is timed, and the service stays up.
    let until = Instant::now() + Duration::from_secs(5);
    ws.get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while metrics::total(ctl.stats(), |s| &s.rtt_count) < 3 && Instant::now() < until {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let _ = ws.flush();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        metrics::total(ctl.stats(), |s| &s.rtt_count) >= 3,
        "pongs timed"
    );
    assert_eq!(metrics::total(ctl.stats(), |s| &s.pongs_missed), 0);
    ws.get_ref().sock.set_read_timeout(Some(WAIT)).unwrap();
    // Discovery over TLS, on its own endpoint.
    let mut watcher = wss(addr, "/ws/discovery");
    let snapshot = call(
        &mut watcher,
        1,
        "discovery/lookup",
        json!({"serviceId": "billing"}),
    );
    assert_eq!(
        snapshot["result"]["nodes"][0]["runtimeInstanceId"],
        json!(id)
    );
    // A big message each way: a 200 KB tag set is refused or answered
    // whole, through records of at most 16 KiB.
    let big = "x".repeat(200_000);
    let reply = call(
        &mut watcher,
        2,
        "discovery/lookup",
        json!({"serviceId": big}),
    );
    assert!(
        reply.get("error").is_some() || reply.get("result").is_some(),
        "{reply}"
    );
    // Deregister: the ack, close 1000, then close_notify and EOF (a
    // rustls client reports an EOF without close_notify as an error).
    let reply = call(
        &mut ws,
        2,
        "service/deregister",
        json!({"runtimeInstanceId": id, "reason": "terminate"}),
    );
    assert_eq!(reply["result"]["status"], "deregistered");
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("expected a clean close, got {e}"),
        }
    }
    // Plain HTTP on the TLS port: refused, and counted.
    let mut plain = Client::tcp(addr);
    plain.send_raw(b"GET /ws/microservice HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.sees_eof(WAIT));
    assert!(bad_count(ctl.stats(), BadInput::Tls) >= 1);
}

/// Reads every connection in turn for `at_least` (once at least), so
/// tungstenite answers their pings; a connection that breaks fails.
fn keep_answering(conns: &mut [tungstenite::WebSocket<Tls>], at_least: Duration) {
    let until = Instant::now() + at_least;
    loop {
        for ws in conns.iter_mut() {
            ws.get_ref()
                .sock
                .set_read_timeout(Some(Duration::from_millis(2)))
                .unwrap();
            match ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(_)) => {
                    let _ = ws.flush();
                }
                Err(e) => panic!("a service connection broke: {e}"),
            }
            ws.get_ref().sock.set_read_timeout(Some(WAIT)).unwrap();
        }
        if Instant::now() >= until {
            return;
        }
    }
}

fn hangup(pid: &str) {
    let sent = Command::new("kill").args(["-HUP", pid]).status().unwrap();
    assert!(sent.success());
}

/// The `tether` binary serving wss:// with a copy of the test certificate
/// (which a test may replace before a SIGHUP).
struct TlsController {
    running: Running,
    addr: SocketAddr,
    line: String,
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsController {
    fn start(name: &str, extra: &[&str]) -> TlsController {
        let dir = std::env::temp_dir().join(format!("tether-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::copy(keys().join("server.pem"), &cert).unwrap();
        std::fs::copy(keys().join("server.key"), &key).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["controller", "--listen", "127.0.0.1:0", "--shards", "2"])
            .args(extra)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.split_whitespace().nth(5).unwrap().parse().unwrap();
        TlsController {
            running: Running(child),
            addr,
            line,
            dir,
            cert,
            key,
        }
    }

    /// The served certificate and key become the second test pair.
    fn replace_certificate(&self) {
        std::fs::copy(keys().join("server2.pem"), &self.cert).unwrap();
        std::fs::copy(keys().join("server2.key"), &self.key).unwrap();
    }
}

impl Drop for TlsController {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sighup_reloads_the_certificate_while_connected_services_stay() {
    let tls = TlsController::start(
        "reload",
        &[
            "--no-admin",
            "--ping-interval",
            "500ms",
            "--pong-timeout",
            "1s",
        ],
    );
    let addr = tls.addr;
    assert!(tls.line.contains("(TLS, 2 shards"), "{}", tls.line);

    let mut before = Vec::new();
    for i in 0..20 {
        let mut ws = wss(addr, "/ws/microservice");
        let reply = call(
            &mut ws,
            1,
            "service/register",
            register_params("billing", "10.0.0.1", 1000 + i),
        );
        assert_eq!(reply["result"]["status"], "registered", "{reply}");
        before.push(ws);
        keep_answering(&mut before, Duration::ZERO);
    }
    assert!(!shown_certificate(&before[0]).contains("reloaded"));

    tls.replace_certificate();
    let pid = tls.running.0.id().to_string();
    hangup(&pid);
    // New handshakes get the new certificate (once the signal is seen).
    let until = Instant::now() + WAIT;
    while !shown_certificate(&wss(addr, "/ws/discovery")).contains("reloaded") {
        assert!(Instant::now() < until, "the reload was not seen");
        keep_answering(&mut before, Duration::from_millis(50));
    }
    // Meanwhile the 20 kept answering pings; after three ping intervals
    // they are all still registered, each still able to talk.
    keep_answering(&mut before, Duration::from_millis(1600));
    let mut after = wss(addr, "/ws/discovery");
    assert!(shown_certificate(&after).contains("reloaded"));
    let snapshot = call(
        &mut after,
        1,
        "discovery/lookup",
        json!({"serviceId": "billing"}),
    );
    assert_eq!(
        snapshot["result"]["nodes"].as_array().unwrap().len(),
        20,
        "{snapshot}"
    );
    let snapshot = call(
        &mut before[7],
        2,
        "discovery/lookup",
        json!({"serviceId": "billing"}),
    );
    assert_eq!(snapshot["result"]["nodes"].as_array().unwrap().len(), 20);

    // A broken certificate file on the next SIGHUP: the one in use stays.
    std::fs::write(&tls.key, "not a key").unwrap();
    hangup(&pid);
    std::thread::sleep(Duration::from_millis(300));
    let ws = wss(addr, "/ws/discovery");
    assert!(shown_certificate(&ws).contains("reloaded"));
}

/// The swarm speaks wss too: 5,000 services register over TLS, a SIGHUP
/// reloads the certificate, and none of them is dropped or reconnects.
#[test]
fn a_wss_swarm_of_5000_stays_connected_through_a_certificate_reload() {
    let admin_key =
        std::env::temp_dir().join(format!("tether-tls-swarm-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&admin_key);
    let admin_key_arg = admin_key.to_string_lossy().into_owned();
    let tls = TlsController::start(
        "swarm",
        &[
            "--admin",
            "127.0.0.1:0",
            "--admin-key-file",
            &admin_key_arg,
            "--ping-interval",
            "1s",
            "--pong-timeout",
            "2s",
        ],
    );
    let addr = tls.addr;
    let admin = tls
        .line
        .rsplit("admin on ")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let summary = || {
        let key =
            tether::admin::access::AdminKey::for_url(&format!("http://{admin}"), Some(&admin_key))
                .unwrap();
        let mut r = ureq::get(&format!("http://{admin}/summary"))
            .header("authorization", &key.bearer())
            .call()
            .unwrap();
        serde_json::from_str::<Value>(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    let swarm = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "agent",
            "--controller",
            &format!("wss://localhost:{}/ws/microservice", addr.port()),
        ])
        .arg("--tls-ca")
        .arg(keys().join("ca.pem"))
        .args([
            "--service-id",
            "tls",
            "--swarm",
            "5000",
            "--distinct-ids",
            "10",
        ])
        .args([
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--exit-after",
            "120s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut swarm = Running(swarm);
    let mut lines = BufReader::new(swarm.0.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("all 5000 registered")),
        "the swarm registered over wss"
    );
    // Settled: every service up, and the events so far (a few may have
    // registered twice during the ramp, after a register timeout).
    std::thread::sleep(Duration::from_secs(2));
    let s = summary();
    assert_eq!(s["byStatus"]["up"], 5000, "{s}");
    let events_before = s["lastEventSeq"].as_u64().unwrap();
    tls.replace_certificate();
    hangup(&tls.running.0.id().to_string());
    let until = Instant::now() + WAIT;
    while !shown_certificate(&wss(addr, "/ws/discovery")).contains("reloaded") {
        assert!(Instant::now() < until, "the reload was not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Three ping rounds later: all still up, and no registration was
    // made again (a dropped connection would have re-registered).
    std::thread::sleep(Duration::from_secs(3));
    let s = summary();
    assert_eq!(s["byStatus"]["up"], 5000, "{s}");
    assert_eq!(s["byStatus"]["down"], 0, "{s}");
    let events = s["lastEventSeq"].as_u64().unwrap();
    assert_eq!(events, events_before, "no event since the reload: {s}");
    drop(swarm);
    let _ = std::fs::remove_file(&admin_key);
}

/// An agent for an https:// admin API: the test CA trusted, and the test
/// client certificate shown when `with_cert`.
fn https_agent(with_cert: bool) -> ureq::Agent {
    let pem = |name: &str| std::fs::read(keys().join(name)).unwrap();
    let certs = |name: &str| {
        ureq::tls::parse_pem(&pem(name))
            .filter_map(|i| match i.unwrap() {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let mut tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs("ca.pem")));
    if with_cert {
        let key = ureq::tls::PrivateKey::from_pem(&pem("client.key")).unwrap();
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(
            &certs("client.pem"),
            key,
        )));
    }
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls.build())
        .build()
        .into()
}

#[test]
fn the_admin_api_over_https_takes_the_key_or_the_gateway_s_client_certificate() {
    use tether::admin::{AdminConfig, AdminServer, AdminTls, access::AdminKey};
    let ctl = start(config(1));
    let mut admin = AdminConfig::new("127.0.0.1:0".parse().unwrap());
    admin.key = AdminKey::new(b"an admin key for the https test");
    admin.health_listen = Some("127.0.0.1:0".parse().unwrap());
    admin.tls = Some(Arc::new(
        AdminTls::https(TlsFiles {
            cert: keys().join("server.pem"),
            key: keys().join("server.key"),
            client_ca: Some(keys().join("ca.pem")),
        })
        .unwrap(),
    ));
    let server = AdminServer::start(ctl.api(), admin).unwrap();
    let url = format!("https://localhost:{}/summary", server.local_addr().port());
    let status = |agent: &ureq::Agent, key: Option<&str>| {
        let mut req = agent.get(&url);
        if let Some(key) = key {
            req = req.header("authorization", &format!("Bearer {key}"));
        }
        req.call().map(|r| r.status().as_u16())
    };
    // The key over TLS.
    assert_eq!(
        status(&https_agent(false), Some("an admin key for the https test")).unwrap(),
        200
    );
    // Neither key nor certificate: 401; a wrong key: 401.
    assert_eq!(status(&https_agent(false), None).unwrap(), 401);
    assert_eq!(status(&https_agent(false), Some("wrong")).unwrap(), 401);
    // The gateway's client certificate stands in for the key, and its
    // identity headers are then read.
    assert_eq!(status(&https_agent(true), None).unwrap(), 200);
    // Plain HTTP to the TLS port gets no answer it could read.
    let plain = format!("http://127.0.0.1:{}/summary", server.local_addr().port());
    let answered = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .new_agent()
        .get(&plain)
        .header("authorization", "Bearer an admin key for the https test")
        .call()
        .is_ok_and(|r| r.status() == 200);
    assert!(!answered);
    // The probes' own listener stays plain and open.
    let probes = format!("http://{}/readyz", server.health_addr().unwrap());
    assert_eq!(ureq::get(&probes).call().unwrap().status(), 200);
}

/// mTLS on the service listener, over sockets: a client without a
/// certificate the CA signed cannot complete the handshake; one with it
/// registers.
#[test]
fn with_a_client_ca_services_must_show_a_certificate_it_signed() {
    let mut config = config(1);
    config.engine.tls = Some(Arc::new(
        TlsAcceptor::new(TlsFiles {
            cert: keys().join("server.pem"),
            key: keys().join("server.key"),
            client_ca: Some(keys().join("ca.pem")),
        })
        .unwrap(),
    ));
    let ctl = start(config);
    let addr = ctl.local_addr();
    let connect = |client: Arc<rustls::ClientConfig>| {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let conn = rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
        let url = format!("wss://localhost:{}/ws/microservice", addr.port());
        tungstenite::client(url, rustls::StreamOwned::new(conn, tcp))
            .map(|(ws, _)| ws)
            .map_err(|e| e.to_string())
    };
    assert!(connect(client_config()).is_err(), "no client certificate");
    let certs = CertificateDer::pem_file_iter(keys().join("client.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(keys().join("client.key")).unwrap();
    let roots = tether::engine::tls::load_roots(&keys().join("ca.pem")).unwrap();
    let with_cert = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap(),
    );
    let mut ws = connect(with_cert).unwrap();
    let reply = call(
        &mut ws,
        1,
        "service/register",
        register_params("billing", "10.0.0.1", 1),
    );
    assert_eq!(reply["result"]["status"], "registered", "{reply}");
    assert!(
        bad_count(ctl.stats(), BadInput::Tls) >= 1,
        "the refused handshake is counted"
    );
}
