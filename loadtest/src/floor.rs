//! `floor`: the least a server can do for the same sockets, to hold the
//! controller's CPU against. It accepts, answers the upgrade with 101,
//! answers each text frame (the registration) with a canned JSON-RPC
//! result that carries the request's id, answers client pings, and pings
//! every connection once per interval, spread over 100 ms ticks, counting
//! the pongs. Nothing else: no registry, no discovery, no timers per
//! connection, no deadlines, no buffering past what a frame needs, no
//! audit or metrics beyond four counters.
//!
//! Like the controller it runs one thread per shard, each with its own fd
//! table and its own SO_REUSEPORT listener (the same backlog), on
//! level-triggered epoll. The scenarios run it as a process
//! (`tether-loadtest floor …`) against the same swarms, in the same run,
//! and report the controller's cost as a ratio to it.
//!
//! Not a server to use: sends that would block are dropped (an idle
//! control socket never fills its send buffer with these few bytes) and
//! a connection that breaks the protocol is closed without a word.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tether::engine::{epoll, listen, sys};

#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    /// host:port to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Threads, each with its own listener and fd table.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Ping every connection this often (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub ping_interval: Duration,
}

static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static ANSWERED: AtomicU64 = AtomicU64::new(0);
static PINGS: AtomicU64 = AtomicU64::new(0);
static PONGS: AtomicU64 = AtomicU64::new(0);
/// Failed accepts other than "none left" (EMFILE…). Level-triggered, the
/// listener then stays ready and the thread spins: sized like the
/// controller (≤ 15,000 per thread) it never should, and the status line
/// shows it if it does.
static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);

const TICK: Duration = Duration::from_millis(100);
const LISTENER: u64 = u64::MAX;
/// An upgrade request longer than this is refused (the swarm's are ~250 B).
const MAX_REQUEST: usize = 8192;

/// Prints `floor ready on ADDR`, then a status line each second, until killed.
pub fn run(args: FloorArgs) -> anyhow::Result<()> {
    let (fds, bound) = listen::open_listeners(args.listen, args.threads.max(1))?;
    sys::raise_nofile_limit()?;
    let interval = args.ping_interval;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (i, fd) in fds.iter().copied().enumerate() {
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || {
                // An fd table of its own (a copy holding the listeners), as
                // each controller shard has.
                let setup = sys::unshare_fd_table().and_then(|()| epoll::Epoll::new(1024));
                match setup {
                    Ok(ep) => {
                        let _ = ready.send(Ok(()));
                        Thread::new(fd, ep, interval).run()
                    }
                    Err(e) => drop(ready.send(Err(e))),
                }
            })?;
    }
    for _ in &fds {
        ready_rx.recv()??;
    }
    println!("floor ready on {bound}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
        println!("{}", status_line());
    }
}

pub fn status_line() -> String {
    format!(
        "floor: accepted={} answered={} pings={} pongs={} accept_errors={}",
        ACCEPTED.load(Relaxed),
        ANSWERED.load(Relaxed),
        PINGS.load(Relaxed),
        PONGS.load(Relaxed),
        ACCEPT_ERRORS.load(Relaxed)
    )
}

/// The counter `name` of a status line.
pub fn counter(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split(' ').next()?.parse().ok()
}

#[derive(Default)]
struct Conn {
    /// Input not yet acted on: a partial request or frame.
    partial: Vec<u8>,
    upgraded: bool,
    /// Position in `Thread::open` once upgraded.
    pos: usize,
}

struct Thread {
    listener: RawFd,
    ep: epoll::Epoll,
    /// By fd (each thread has its own table, so fds are small).
    conns: Vec<Option<Conn>>,
    /// Upgraded connections, pinged in turn.
    open: Vec<RawFd>,
    interval: Duration,
    tick: u64,
    out: Vec<u8>,
    answered: u64,
}

impl Thread {
    fn new(listener: RawFd, ep: epoll::Epoll, interval: Duration) -> Thread {
        Thread {
            listener,
            ep,
            conns: Vec::new(),
            open: Vec::new(),
            interval,
            tick: 0,
            out: Vec::with_capacity(256),
            answered: 0,
        }
    }

    fn run(mut self) {
        if self
            .ep
            .add(self.listener, epoll::READABLE, LISTENER)
            .is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_tick = Instant::now() + TICK;
        let mut ready: Vec<u64> = Vec::with_capacity(1024);
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            ready.clear();
            match self.ep.wait(wait.as_millis() as i32 + 1) {
                Ok(events) => ready.extend(events.map(|(_, token)| token)),
                Err(_) => continue,
            }
            for &token in &ready {
                if token == LISTENER {
                    self.accept_all();
                } else {
                    self.read(token as RawFd, &mut buf);
                }
            }
            if Instant::now() >= next_tick {
                next_tick += TICK;
                self.ping_slice();
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match sys::accept(self.listener) {
                Ok((fd, _)) => {
                    let _ = sys::set_nodelay(fd);
                    let i = fd as usize;
                    if self.conns.len() <= i {
                        self.conns.resize_with(i + 1, || None);
                    }
                    self.conns[i] = Some(Conn::default());
                    if self
                        .ep
                        .add(fd, epoll::READABLE | epoll::HANGUP, i as u64)
                        .is_err()
                    {
                        self.close(fd);
                    }
                    ACCEPTED.fetch_add(1, Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    ACCEPT_ERRORS.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }

    fn read(&mut self, fd: RawFd, buf: &mut [u8]) {
        let n = match sys::recv(fd, buf) {
            Ok(0) => return self.close(fd),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => return self.close(fd),
        };
        let Some(conn) = self.conns.get_mut(fd as usize).and_then(Option::as_mut) else {
            return;
        };
        // Act on whole units straight from `buf` when nothing is pending.
        let mut partial = std::mem::take(&mut conn.partial);
        let input: &mut [u8] = if partial.is_empty() {
            &mut buf[..n]
        } else {
            partial.extend_from_slice(&buf[..n]);
            &mut partial
        };
        match self.consume(fd, input) {
            Some(used) => {
                let rest = input[used..].to_vec();
                if let Some(conn) = self.conns.get_mut(fd as usize).and_then(Option::as_mut) {
                    conn.partial = rest;
                }
            }
            None => self.close(fd),
        }
    }

    /// Acts on what `input` holds; returns the bytes used, None to close.
    fn consume(&mut self, fd: RawFd, input: &mut [u8]) -> Option<usize> {
        let mut used = 0;
        let upgraded = self.conns[fd as usize].as_ref()?.upgraded;
        if !upgraded {
            let Some(end) = find(input, b"\r\n\r\n") else {
                return (input.len() <= MAX_REQUEST).then_some(0);
            };
            let key = header(&input[..end], "sec-websocket-key")?;
            let accept = tungstenite::handshake::derive_accept_key(key);
            self.out.clear();
            self.out.extend_from_slice(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
            );
            self.out.extend_from_slice(accept.as_bytes());
            self.out.extend_from_slice(b"\r\n\r\n");
            let _ = sys::send(fd, &self.out);
            let pos = self.open.len();
            self.open.push(fd);
            let conn = self.conns[fd as usize].as_mut()?;
            conn.upgraded = true;
            conn.pos = pos;
            used = end + 4;
        }
        while let Some((opcode, payload, len)) = frame(&mut input[used..])? {
            match opcode {
                0x1 => self.answer(fd, &input[used + payload.0..used + payload.1]),
                0x9 => {
                    let body = input[used + payload.0..used + payload.1].to_vec();
                    self.send_frame(fd, 0xA, &body);
                }
                0xA => {
                    PONGS.fetch_add(1, Relaxed);
                }
                0x8 => {
                    let body = input[used + payload.0..used + payload.1].to_vec();
                    self.send_frame(fd, 0x8, &body[..body.len().min(2)]);
                    return None;
                }
                _ => {}
            }
            used += len;
        }
        Some(used)
    }

    /// A JSON-RPC request: a result with its id (what a registration needs).
    fn answer(&mut self, fd: RawFd, text: &[u8]) {
        let Some(id) = request_id(text) else {
            return; // a response or a notification: nothing to say
        };
        self.answered += 1;
        let reply = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{\"runtimeInstanceId\":\"00000000-0000-7000-8000-{:012x}\",\"status\":\"registered\"}}}}",
            String::from_utf8_lossy(id),
            (fd as u64) << 24 | (self.answered & 0xff_ffff)
        );
        self.send_frame(fd, 0x1, reply.as_bytes());
        ANSWERED.fetch_add(1, Relaxed);
    }

    fn send_frame(&mut self, fd: RawFd, opcode: u8, payload: &[u8]) {
        self.out.clear();
        self.out.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => self.out.push(n as u8),
            n if n <= 0xffff => {
                self.out.push(126);
                self.out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                self.out.push(127);
                self.out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.out.extend_from_slice(payload);
        let _ = sys::send(fd, &self.out);
    }

    /// This tick's share of the connections: each is pinged once per interval.
    fn ping_slice(&mut self) {
        self.tick += 1;
        if self.interval.is_zero() || self.open.is_empty() {
            return;
        }
        let ticks = (self.interval.as_millis() / TICK.as_millis()).max(1) as u64;
        let slot = self.tick % ticks;
        let len = self.open.len() as u64;
        let (from, to) = (slot * len / ticks, (slot + 1) * len / ticks);
        for i in from..to {
            let fd = self.open[i as usize];
            // 16 bytes, as the controller's stamped pings are.
            let stamp = [(self.tick as u8); 16];
            self.send_frame(fd, 0x9, &stamp);
            PINGS.fetch_add(1, Relaxed);
        }
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(conn) = self.conns.get_mut(fd as usize).and_then(Option::take)
            && conn.upgraded
        {
            let last = self.open.pop().expect("an open connection is listed");
            if last != fd {
                self.open[conn.pos] = last;
                if let Some(moved) = self.conns[last as usize].as_mut() {
                    moved.pos = conn.pos;
                }
            }
        }
        // Closing removes it from the epoll set.
        sys::close(fd);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A header's value in a request head (name matched without case).
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        if !line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
            return None;
        }
        Some(line[colon + 1..].trim_ascii())
    })
}

/// One whole client frame at the start of `input`, unmasked in place:
/// (opcode, payload range, frame length); Ok(None) if incomplete, None
/// (outer) if it is not a masked client frame or too big.
#[allow(clippy::type_complexity)]
fn frame(input: &mut [u8]) -> Option<Option<(u8, (usize, usize), usize)>> {
    if input.len() < 2 {
        return Some(None);
    }
    let opcode = input[0] & 0x0f;
    if input[1] & 0x80 == 0 {
        return None; // clients must mask
    }
    let (len, mut at) = match input[1] & 0x7f {
        126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as usize, 4),
        127 => return None, // nothing the swarm sends is this big
        126 => return Some(None),
        n => (n as usize, 2),
    };
    if input.len() < at + 4 + len {
        return Some(None);
    }
    let mask = [input[at], input[at + 1], input[at + 2], input[at + 3]];
    at += 4;
    for (i, b) in input[at..at + len].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Some(Some((opcode, (at, at + len), at + len)))
}

/// The `id` of a JSON-RPC request (one with a `method`), as its JSON text.
fn request_id(text: &[u8]) -> Option<&[u8]> {
    find(text, b"\"method\"")?;
    let at = find(text, b"\"id\"")? + 4;
    let rest = &text[at..];
    let colon = rest.iter().position(|&b| b == b':')? + 1;
    let value = rest[colon..].trim_ascii_start();
    let end = if value.first() == Some(&b'"') {
        1 + value[1..].iter().position(|&b| b == b'"')? + 1
    } else {
        value
            .iter()
            .position(|&b| b == b',' || b == b'}' || b.is_ascii_whitespace())?
    };
    Some(&value[..end])
}

/// A floor process, started as the scenarios start a controller.
pub struct Floor {
    pub proc: crate::procs::Proc,
    pub listen: String,
}

impl Floor {
    pub fn start(threads: usize, ping_interval: &str) -> anyhow::Result<Floor> {
        let port = crate::procs::free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["floor", "--listen", &listen])
            .args(["--threads", &threads.to_string()])
            .args(["--ping-interval", ping_interval]);
        let mut proc = crate::procs::Proc::spawn("floor", cmd)?;
        proc.wait_line(Duration::from_secs(20), |l| l.starts_with("floor ready on"))?;
        Ok(Floor { proc, listen })
    }

    /// Waits for a status line printed after now, and reads it.
    pub fn fresh_counter(&mut self, name: &str) -> anyhow::Result<u64> {
        self.proc.lines_so_far();
        let line = self
            .proc
            .wait_line(Duration::from_secs(5), |l| l.starts_with("floor: "))?;
        counter(&line, name).ok_or_else(|| anyhow::anyhow!("no {name} in {line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_request_s_id_and_nothing_in_a_response() {
        let req = br#"{"jsonrpc":"2.0","id":7,"method":"service/register","params":{}}"#;
        assert_eq!(request_id(req), Some(&b"7"[..]));
        let req = br#"{"jsonrpc":"2.0","method":"x","id": "a-1" }"#;
        assert_eq!(request_id(req), Some(&br#""a-1""#[..]));
        assert_eq!(request_id(br#"{"jsonrpc":"2.0","id":7,"result":{}}"#), None);
    }

    #[test]
    fn unmasks_a_client_frame_and_waits_for_a_partial_one() {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | 3, 1, 2, 3, 4];
        f.extend(b"abc".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        assert_eq!(frame(&mut f[..5]), Some(None));
        let (op, (a, b), len) = frame(&mut f).unwrap().unwrap();
        assert_eq!((op, &f[a..b], len), (1, &b"abc"[..], 9));
        assert_eq!(frame(&mut [0x81, 3, b'a', b'b', b'c']), None, "unmasked");
    }

    #[test]
    fn reads_counters_back_from_its_status_line() {
        let line = "floor: accepted=3 answered=2 pings=10 pongs=9";
        assert_eq!(counter(line, "pings"), Some(10));
        assert_eq!(counter(line, "accepted"), Some(3));
        assert_eq!(counter(line, "nope"), None);
    }
}
