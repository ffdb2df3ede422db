//! `abuse`: the attacks of issue 10's findings, one after another, against
//! one controller holding a swarm of services, with a few healthy
//! registered bystanders that look up every 200 ms throughout. For each
//! attack: the controller's RSS before, at its peak and after, what the
//! controller cut or refused (from its metrics), and whether the
//! bystanders were served (cut, and their lookup latency).
//!
//! Only loopback; every attack is bounded in connections and in time.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tether::engine::ws::{self, OpCode, Role};

use crate::{observe, procs, topology};

#[derive(clap::Args)]
pub struct AbuseArgs {
    /// Services of the swarm ("big"): a lookup of them is the snapshot the
    /// attackers ask for.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// How long each attack lasts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Extra controller flags (e.g. "--memory-budget 2GiB").
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    pub controller_args: Vec<String>,
    #[arg(long)]
    pub tether: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AttackRun {
    pub attack: String,
    pub finding: String,
    pub connections: usize,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_mib: f64,
    /// Counter increases over the attack, by metric and label.
    pub cut_slow_consumer: f64,
    pub cut_over_budget: f64,
    pub cut_evicted_unadmitted: f64,
    pub cut_message_timeout: f64,
    pub refused_source: f64,
    pub rate_limited: f64,
    /// Bystanders cut meanwhile (of `bystanders`).
    pub bystanders_cut: u64,
    pub bystander_lookup_p50_ms: f64,
    pub bystander_lookup_p99_ms: f64,
    pub bystander_lookups: usize,
    /// What the attack itself saw (e.g. how many of its sockets were closed).
    pub note: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AbuseReport {
    pub services: usize,
    pub shards: usize,
    pub io: String,
    pub bystanders: usize,
    pub seconds_per_attack: f64,
    pub runs: Vec<AttackRun>,
}

const BYSTANDERS: usize = 6;

/// A plain TCP connection from `source` (when given) with a receive
/// buffer of `rcvbuf` bytes (when given: a slow reader's window).
fn tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf: Option<usize>,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    socket.set_tcp_nodelay(true)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

fn upgrade_request(path: &str) -> Vec<u8> {
    let mut req = Vec::new();
    ws::write_upgrade_request(&mut req, "localhost", path, &ws::new_client_key(), None);
    req
}

/// Sends the upgrade and reads the 101.
fn upgrade(s: &mut TcpStream, path: &str) -> std::io::Result<()> {
    s.write_all(&upgrade_request(path))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 || head.len() > 4096 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"HTTP/1.1 101") {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ))
    }
}

/// Attacker `i`'s socket, upgraded on `path`: from 127.0.<group>.(2 + i
/// mod `sources`), with a receive buffer of `rcvbuf` bytes when given.
/// None if the controller refused it.
fn attacker(
    ctx: &Ctx,
    group: u8,
    sources: usize,
    i: usize,
    rcvbuf: Option<usize>,
    path: &str,
) -> Option<TcpStream> {
    let source = IpAddr::from([127, 0, group, 2 + (i % sources) as u8]);
    let mut s = tcp(ctx.addr, Some(source), rcvbuf).ok()?;
    upgrade(&mut s, path).ok()?;
    Some(s)
}

fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ws::encode_fragment(&mut out, opcode, fin, payload, Some([7, 1, 3, 9]));
    out
}

fn text(payload: &str) -> Vec<u8> {
    frame(OpCode::Text, true, payload.as_bytes())
}

fn lookup(id: u64, service: &str) -> Vec<u8> {
    text(
        &json!({"jsonrpc": "2.0", "id": id, "method": "discovery/lookup",
                 "params": {"serviceId": service}})
        .to_string(),
    )
}

/// Reads frames until a text message arrives (answering pings); false on
/// EOF, error or 5 s.
fn read_text(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 65536];
    loop {
        while let Ok(Some(h)) = ws::decode_header(buf, Role::Client) {
            let end = h.header_len + h.payload_len as usize;
            if buf.len() < end {
                break;
            }
            let payload = buf[h.header_len..end].to_vec();
            buf.drain(..end);
            match h.opcode {
                OpCode::Text => return true,
                OpCode::Ping if s.write_all(&frame(OpCode::Pong, true, &payload)).is_err() => {
                    return false;
                }
                OpCode::Close => return false,
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Healthy registered services that look themselves up every 200 ms and
/// time it; a cut one counts.
struct Bystanders {
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<u64>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Bystanders {
    fn start(addr: SocketAddr) -> anyhow::Result<Bystanders> {
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for i in 0..BYSTANDERS {
            let mut s = tcp(addr, Some(IpAddr::from([127, 0, 9, 2])), None)?;
            upgrade(&mut s, "/ws/microservice")?;
            s.write_all(&text(
                &json!({"jsonrpc": "2.0", "id": 1, "method": "service/register", "params": {
                    "serviceId": "bystander", "version": "1", "protocol": "https",
                    "address": format!("10.99.0.{i}"), "port": 8443, "envTag": "prod"}})
                .to_string(),
            ))?;
            let mut buf = Vec::new();
            anyhow::ensure!(
                read_text(&mut s, &mut buf),
                "a bystander could not register"
            );
            let (stop, cut, latencies) = (stop.clone(), cut.clone(), latencies.clone());
            threads.push(std::thread::spawn(move || {
                let mut id = 2;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let ok = s.write_all(&lookup(id, "bystander")).is_ok()
                        && read_text(&mut s, &mut buf);
                    if !ok {
                        cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    latencies
                        .lock()
                        .unwrap()
                        .push(started.elapsed().as_micros() as u64);
                    id += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }));
        }
        Ok(Bystanders {
            stop,
            cut,
            latencies,
            threads,
        })
    }

    /// Lookup latencies since the last call: (p50 ms, p99 ms, count).
    fn take_latencies(&self) -> (f64, f64, usize) {
        let mut v = std::mem::take(&mut *self.latencies.lock().unwrap());
        v.sort_unstable();
        let q = |q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        (q(0.5), q(0.99), v.len())
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// An attack: its name, the finding it replays, and a function that runs
/// it until `until` with its own sockets, returning its connection count
/// and a note.
type Attack = fn(&Ctx, Instant) -> (usize, String);

struct Ctx {
    addr: SocketAddr,
    admin: String,
}

/// Finding 1 (and 5): /ws/discovery connections that ask for the big
/// snapshot over and over and never read.
fn slow_lookups(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 36;
    let closed = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for i in 0..n {
            let closed = &closed;
            scope.spawn(move || {
                let Some(mut s) = attacker(ctx, 10, 4, i, Some(4096), "/ws/discovery") else {
                    return;
                };
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let mut id = 0;
                while Instant::now() < until {
                    // Within the request rate: one lookup per 100 ms.
                    // A full window times the write out (the frame may be
                    // torn: send no more, hold); a cut ends it.
                    match s.write_all(&lookup(id, "big")) {
                        Ok(()) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            std::thread::sleep(until.saturating_duration_since(Instant::now()));
                            break;
                        }
                        Err(_) => break,
                    }
                    id += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                if ended(&s) {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (
        n,
        format!(
            "{} of {n} attackers saw their socket end",
            closed.load(Ordering::Relaxed)
        ),
    )
}

/// Finding 2: unregistered connections that begin a 2 MiB message and
/// hold it open.
fn unregistered_partial(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 150;
    let mut held = Vec::new();
    for i in 0..n {
        let Some(mut s) = attacker(ctx, 11, 8, i, None, "/ws/microservice") else {
            continue;
        };
        // A text frame header announcing 2 MiB, then 60 KiB of it.
        let mut head = vec![0x81, 0x80 | 127];
        head.extend_from_slice(&(2u64 << 20).to_be_bytes());
        head.extend_from_slice(&[7, 1, 3, 9]);
        head.extend(std::iter::repeat_n(b'a', 60 << 10));
        let _ = s.write_all(&head);
        held.push(s);
    }
    let sent = held.len();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let ended = held.iter().filter(|s| ended(s)).count();
    (
        n,
        format!("{sent} began a message; {ended} of them were closed by the end"),
    )
}

/// Finding 2: /ws/discovery connections that keep a fragmented message
/// open with empty continuation frames.
fn fragment_hold(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 100;
    let mut held = Vec::new();
    for i in 0..n {
        let Some(mut s) = attacker(ctx, 12, 8, i, None, "/ws/discovery") else {
            continue;
        };
        let _ = s.write_all(&frame(OpCode::Text, false, &vec![b'{'; 32 << 10]));
        held.push(s);
    }
    while Instant::now() < until {
        for s in &mut held {
            let _ = s.write_all(&frame(OpCode::Continuation, false, b""));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let ended = held.iter().filter(|s| ended(s)).count();
    (
        n,
        format!("{ended} of {} were closed by the end", held.len()),
    )
}

/// Finding 4: many subscribers to one service, and its instance's
/// metadata updated as fast as the rate limit lets.
fn subscription_flood(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 400;
    let mut subscribers = Vec::new();
    for i in 0..n {
        let Some(mut s) = attacker(ctx, 13, 8, i, None, "/ws/discovery") else {
            continue;
        };
        for k in 0..64 {
            let sub = json!({"jsonrpc": "2.0", "id": k, "method": "discovery/subscribe",
                             "params": {"serviceId": "hot", "envTag": format!("e{k}")}});
            let _ = s.write_all(&text(&sub.to_string()));
        }
        subscribers.push(s);
    }
    let updates = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // Subscribers read (and drop) what they are sent.
        for s in &mut subscribers {
            scope.spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 65536];
                while Instant::now() < until {
                    if let Ok(0) = s.read(&mut buf) {
                        return;
                    }
                }
            });
        }
        let updates = &updates;
        scope.spawn(move || {
            // From 127.0.13.20, beside the subscribers.
            let Some(mut s) = attacker(ctx, 13, 19, 18, None, "/ws/microservice") else {
                return;
            };
            let reg = json!({"jsonrpc": "2.0", "id": 0, "method": "service/register", "params": {
                "serviceId": "hot", "version": "1", "protocol": "https", "address": "10.98.0.1",
                "port": 1, "envTag": "e0"}});
            let _ = s.write_all(&text(&reg.to_string()));
            let mut buf = Vec::new();
            let _ = read_text(&mut s, &mut buf);
            let mut id = 1;
            while Instant::now() < until {
                let upd = json!({"jsonrpc": "2.0", "id": id, "method": "service/update_metadata",
                                 "params": {"metadata": {"n": id}}});
                if s.write_all(&text(&upd.to_string())).is_err() || !read_text(&mut s, &mut buf) {
                    return;
                }
                updates.fetch_add(1, Ordering::Relaxed);
                id += 1;
            }
        });
    });
    (
        n + 1,
        format!("{} updates answered", updates.load(Ordering::Relaxed)),
    )
}

/// Finding 6: half-open upgrades from one address, while services from
/// another register.
fn half_open(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 3_000;
    let mut held = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = tcp(ctx.addr, Some(IpAddr::from([127, 0, 14, 2])), None) else {
            continue;
        };
        let _ = s.write_all(b"GET /ws/microservice HTTP/1.1\r\nHost: x\r\n");
        held.push(s);
        if Instant::now() > until {
            break;
        }
    }
    let mut registered = 0;
    for i in 0..20 {
        // From 127.0.14.3: not the half-open sockets' address.
        let Some(mut s) = attacker(ctx, 14, 2, 1, None, "/ws/microservice") else {
            continue;
        };
        let reg = json!({"jsonrpc": "2.0", "id": 1, "method": "service/register", "params": {
            "serviceId": "late", "version": "1", "protocol": "https",
            "address": format!("10.97.0.{i}"), "port": 1}});
        let mut buf = Vec::new();
        if s.write_all(&text(&reg.to_string())).is_ok() && read_text(&mut s, &mut buf) {
            registered += 1;
        }
    }
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let ended = held.iter().filter(|s| ended(s)).count();
    (
        n,
        format!(
            "{ended} of {} half-open sockets closed; {registered} of 20 services from another address registered meanwhile",
            held.len()
        ),
    )
}

/// Finding 7: SSE subscribers that never read; meanwhile the admin
/// listing must still answer.
fn stalled_sse(ctx: &Ctx, until: Instant) -> (usize, String) {
    let n = 512;
    let admin: SocketAddr = ctx
        .admin
        .trim_start_matches("http://")
        .parse()
        .expect("admin address");
    let bearer = observe::admin_bearer(&ctx.admin).expect("the controller wrote its admin key");
    let mut held = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = tcp(admin, None, Some(4096)) else {
            continue;
        };
        let _ = s.write_all(
            format!("GET /events HTTP/1.1\r\nHost: localhost\r\nAuthorization: {bearer}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        );
        held.push(s);
    }
    let agent = observe::admin_agent(&ctx.admin, Some(Duration::from_secs(5)))
        .expect("the controller wrote its admin key");
    let (mut worst, mut failed) = (Duration::ZERO, 0);
    while Instant::now() < until {
        let started = Instant::now();
        match agent
            .get(&format!("{}/services?limit=100", ctx.admin))
            .call()
        {
            Ok(r) if r.status().is_success() => worst = worst.max(started.elapsed()),
            _ => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    (
        n,
        format!(
            "GET /services meanwhile: slowest {} ms, {failed} failed",
            worst.as_millis()
        ),
    )
}

/// Whether the peer closed `s` (EOF or reset) by now.
fn ended(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 65536];
    let mut r = s;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn rss_mib(pid: u32) -> f64 {
    procs::status_kb(pid, "VmRSS").map_or(0.0, |kb| kb as f64 / 1024.0)
}

fn counters(admin: &str) -> [f64; 6] {
    let Ok(text) = observe::scrape(admin) else {
        return [0.0; 6];
    };
    let cut = |reason: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("tether_connections_cut_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let refused = text
        .lines()
        .filter(|l| {
            l.starts_with("tether_admission_refused_total{") && l.contains("reason=\"source_")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    [
        cut("slow_consumer"),
        cut("over_budget"),
        cut("evicted_unadmitted"),
        cut("message_timeout"),
        refused,
        observe::metric(&text, "tether_rate_limited_total"),
    ]
}

pub fn run(args: AbuseArgs) -> anyhow::Result<AbuseReport> {
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let extra: Vec<&str> = args.controller_args.iter().map(String::as_str).collect();
    let controller = topology::controller_with(&tether, args.shards, &extra)?;
    let (swarms, seconds) = {
        let mut spec = topology::SwarmSpec::new(&controller.listen, args.services);
        spec.service_id = "big";
        topology::start_swarms(&tether, &spec)?
    };
    eprintln!("{} services registered in {seconds:.1} s", args.services);
    let addr: SocketAddr = controller
        .listen
        .parse()
        .context("the controller's address")?;
    let bystanders = Bystanders::start(addr)?;
    let ctx = Ctx {
        addr,
        admin: controller.admin.clone(),
    };
    let pid = controller.proc.pid();
    let attacks: [(&str, &str, Attack); 6] = [
        ("slow_lookups", "1, 3, 5", slow_lookups),
        ("unregistered_partial", "2", unregistered_partial),
        ("fragment_hold", "2", fragment_hold),
        ("subscription_flood", "4", subscription_flood),
        ("half_open", "6", half_open),
        ("stalled_sse", "7", stalled_sse),
    ];
    let mut runs = Vec::new();
    for (name, finding, attack) in attacks {
        std::thread::sleep(Duration::from_secs(2));
        let _ = bystanders.take_latencies();
        let cut_before = bystanders.cut.load(Ordering::Relaxed);
        let before = counters(&ctx.admin);
        let rss_before = rss_mib(pid);
        let peak = Arc::new(Mutex::new(rss_before));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    let now = rss_mib(pid);
                    let mut p = peak.lock().unwrap();
                    *p = p.max(now);
                    drop(p);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        eprintln!("attack {name} for {:?}", args.duration);
        let (connections, note) = attack(&ctx, Instant::now() + args.duration);
        // The attackers' sockets are gone: what the controller keeps.
        std::thread::sleep(Duration::from_secs(2));
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.join();
        let after = counters(&ctx.admin);
        let (p50, p99, lookups) = bystanders.take_latencies();
        let d = |i: usize| after[i] - before[i];
        runs.push(AttackRun {
            attack: name.into(),
            finding: finding.into(),
            connections,
            rss_before_mib: rss_before,
            rss_peak_mib: *peak.lock().unwrap(),
            rss_after_mib: rss_mib(pid),
            cut_slow_consumer: d(0),
            cut_over_budget: d(1),
            cut_evicted_unadmitted: d(2),
            cut_message_timeout: d(3),
            refused_source: d(4),
            rate_limited: d(5),
            bystanders_cut: bystanders.cut.load(Ordering::Relaxed) - cut_before,
            bystander_lookup_p50_ms: p50,
            bystander_lookup_p99_ms: p99,
            bystander_lookups: lookups,
            note,
        });
    }
    bystanders.stop();
    let report = AbuseReport {
        services: args.services,
        shards: args.shards,
        io: controller.io.clone(),
        bystanders: BYSTANDERS,
        seconds_per_attack: args.duration.as_secs_f64(),
        runs,
    };
    topology::stop_all(swarms, controller);
    Ok(report)
}

pub fn print(r: &AbuseReport) {
    println!(
        "abuse: {} services ({}), {} shards, {} bystanders, {} s per attack",
        r.services, r.io, r.shards, r.bystanders, r.seconds_per_attack
    );
    println!(
        "{:<22} {:>7} {:>5} {:>10} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9}",
        "attack",
        "finding",
        "conns",
        "rss before",
        "rss peak",
        "rss after",
        "slow",
        "budget",
        "evict",
        "msg_to",
        "refused",
        "limited",
        "by cut",
        "by p99 ms"
    );
    for a in &r.runs {
        println!(
            "{:<22} {:>7} {:>5} {:>9.1}M {:>8.1}M {:>8.1}M {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9.2}",
            a.attack,
            a.finding,
            a.connections,
            a.rss_before_mib,
            a.rss_peak_mib,
            a.rss_after_mib,
            a.cut_slow_consumer,
            a.cut_over_budget,
            a.cut_evicted_unadmitted,
            a.cut_message_timeout,
            a.refused_source,
            a.rate_limited,
            a.bystanders_cut,
            a.bystander_lookup_p99_ms
        );
        println!("{:<22} {}", "", a.note);
    }
}
