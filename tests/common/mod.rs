//! Test support: a controller on loopback with test-sized timings, and a
//! blocking raw WebSocket client that can send anything, well formed or not.
#![allow(dead_code)]

pub mod browser;
pub mod etcd;
pub mod keys;
pub mod oidc;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether::controller::{Controller, ControllerConfig};
use tether::engine::EngineConfig;
use tether::engine::ws::{self, OpCode, Role};
use tether::metrics::{self, BadInput, ShardStats};
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(10);

pub fn config(shards: usize) -> ControllerConfig {
    let mut engine = EngineConfig::new("127.0.0.1:0".parse().unwrap(), shards);
    engine.ping_interval = Duration::from_secs(30);
    engine.pong_timeout = Duration::from_secs(10);
    ControllerConfig::new(engine)
}

pub fn controller(shards: usize) -> Controller {
    start(config(shards))
}

pub fn start(config: ControllerConfig) -> Controller {
    Controller::start(config, None).expect("controller starts on loopback")
}

pub fn bad_count(stats: &[ShardStats], kind: BadInput) -> u64 {
    metrics::total(stats, |s| &s.bad_input[kind as usize])
}

/// Polls `f` until it is true or `WAIT` passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
    Binary(Vec<u8>),
    /// The server closed the TCP connection (EOF or reset).
    Eof,
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
    /// Answer pings automatically while waiting for something else.
    pub auto_pong: bool,
}

impl Client {
    /// TCP connect only.
    pub fn tcp(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).expect("connect to the controller"))
    }

    pub fn over(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
            next_id: 0,
            auto_pong: true,
        }
    }

    /// TCP connect from `source` (another loopback address: what the
    /// controller then sees as the peer).
    pub fn tcp_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        socket
            .connect(&addr.into())
            .expect("connect to the controller");
        Client::over(socket.into())
    }

    /// Connects and upgrades on `path`.
    pub fn connect(addr: SocketAddr, path: &str) -> Client {
        let mut c = Client::tcp(addr);
        let status = c.upgrade(path, None);
        assert_eq!(status, 101, "upgrade on {path}");
        c
    }

    /// Sends the upgrade request; returns the HTTP status of the answer.
    pub fn upgrade(&mut self, path: &str, authorization: Option<&str>) -> u16 {
        let key = ws::new_client_key();
        let mut req = Vec::new();
        ws::write_upgrade_request(&mut req, "localhost", path, &key, authorization);
        self.send_raw(&req);
        self.read_http_status()
    }

    /// Reads an HTTP response head; returns its status (0 on EOF).
    pub fn read_http_status(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..end + 4);
                if let Some(len) = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                }) {
                    while self.buf.len() < len && self.fill(deadline) {}
                    self.buf.drain(..len.min(self.buf.len()));
                }
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
            if !self.fill(deadline) {
                return 0;
            }
        }
    }

    /// Reads more bytes; false on EOF/reset or deadline.
    fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut out = Vec::new();
        ws::encode_frame(&mut out, opcode, payload, Some([0x11, 0x22, 0x33, 0x44]));
        self.send_raw(&out);
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(OpCode::Text, text.as_bytes());
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    /// The next frame, within `timeout` (None if nothing came).
    pub fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) =
                ws::decode_header(&self.buf, Role::Client).expect("server frames are valid")
            {
                let end = h.header_len + h.payload_len as usize;
                if self.buf.len() >= end {
                    let payload = self.buf[h.header_len..end].to_vec();
                    self.buf.drain(..end);
                    return Some(match h.opcode {
                        OpCode::Text => {
                            Frame::Text(String::from_utf8(payload).expect("server text is UTF-8"))
                        }
                        OpCode::Ping => Frame::Ping(payload),
                        OpCode::Pong => Frame::Pong(payload),
                        OpCode::Close => {
                            Frame::Close(ws::parse_close(&payload).unwrap().map(|(c, _)| c))
                        }
                        OpCode::Binary | OpCode::Continuation => Frame::Binary(payload),
                    });
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            if !self.fill(deadline) {
                return if Instant::now() >= deadline {
                    None
                } else {
                    Some(Frame::Eof)
                };
            }
        }
    }

    /// The next text message (answering pings on the way if `auto_pong`).
    pub fn recv_json(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Some(Frame::Text(t)) => {
                    return serde_json::from_str(&t).expect("server sends JSON");
                }
                Some(Frame::Ping(p)) if self.auto_pong => self.send_frame(OpCode::Pong, &p),
                Some(Frame::Ping(_)) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Waits for the close frame (and then EOF); returns its code.
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Some(Frame::Close(code)) => return code,
                Some(Frame::Eof) => panic!("connection ended without a close frame"),
                None => panic!("no close frame within {WAIT:?}"),
                Some(_) => {}
            }
        }
    }

    /// True if the server ended the TCP connection within `timeout`.
    pub fn sees_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_frame(deadline.saturating_duration_since(Instant::now())) {
                Some(Frame::Eof) => return true,
                None => return false,
                Some(_) => {}
            }
        }
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends a request and returns the response with the same id (other
    /// messages on the way are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id();
        self.send_json(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let msg = self.recv_json();
            if msg["id"] == json!(id) {
                return msg;
            }
        }
    }

    pub fn register(&mut self, service: &str, address: &str, port: u16) -> Uuid {
        let reply = self.call("service/register", register_params(service, address, port));
        assert_eq!(reply["result"]["status"], "registered", "{reply}");
        reply["result"]["runtimeInstanceId"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

pub fn register_params(service: &str, address: &str, port: u16) -> Value {
    json!({"serviceId": service, "version": "1.0.0", "protocol": "https", "address": address,
           "port": port, "tags": {"zone": "a"}, "envTag": "prod"})
}

/// A registered service on `/ws/microservice`.
pub fn registered(addr: SocketAddr, service: &str, address: &str, port: u16) -> (Client, Uuid) {
    let mut c = Client::connect(addr, "/ws/microservice");
    let id = c.register(service, address, port);
    (c, id)
}

/// The JSON lines of an audit (or access) log file; none if it is missing.
pub fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Opens a connection to `addr` that sends half a request's headers and
/// never the rest, and asserts the server cuts it (a 408 at most) well
/// within 10 s (the servers under test are given a 1 s header timeout).
pub fn assert_a_trickling_client_is_cut(addr: std::net::SocketAddr) {
    use std::io::{Read, Write};
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = slow.read_to_end(&mut got);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "held for {waited:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// A port nothing listens on now on loopback (the kernel's pick, let go at
/// once): for addresses that must be known before their server starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
