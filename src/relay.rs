//! The chained relay: what routing service WebSockets through a gateway
//! looks like, built only to be measured against the direct topology. It
//! is not part of the gateway (the admin BFF, which never carries service
//! sockets); `tether gateway --chained` runs it for the load test.
//!
//! For every service connection it accepts on `/ws/microservice` it opens
//! one of its own to the controller and relays text messages both ways.
//! Like the terminating proxies it stands for, it answers pings on both
//! sides itself: the controller's pings get the relay's pongs, so a service
//! that froze looks alive to the controller for as long as the relay
//! lives; and when the relay restarts, every service it carried drops at
//! once. Either side closing closes the other.
//!
//! Threads with their own fd tables (several, on one SO_REUSEPORT port)
//! hold the pairs, two sockets each. Bounded: unsent bytes per side, bytes
//! buffered while the upstream connects, upstream connect time.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::engine::conn::{Conn, Event, Fed, Flow, Limits, Timing};
use crate::engine::epoll::{EDGE, Epoll, HANGUP, READABLE, WRITABLE};
use crate::engine::wheel::{Link, Links, Tick, Wheel};
use crate::engine::{io, listen, sys, ws};
use crate::metrics::{dec, inc};

const MICROSERVICE_PATH: &str = "/ws/microservice";
/// Pairs one relay thread holds (two sockets each, in its own fd table).
pub const PAIRS_PER_THREAD: usize = 9_000;
/// Unsent bytes one side may hold before the pair is cut.
const MAX_UNSENT: usize = 4 << 20;
/// Bytes from a service held while its upstream connects.
const MAX_EARLY: usize = 1 << 20;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
const LISTENER: u64 = u64::MAX;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// The controller's service endpoint (host:port).
    pub upstream: SocketAddr,
    /// Source addresses for upstream connections (spread like a swarm's).
    pub upstream_sources: Vec<IpAddr>,
    pub threads: usize,
}

/// What the relay counts; `pairs` is a gauge.
#[derive(Default)]
pub struct RelayStats {
    pub pairs: AtomicU64,
    pub accepted: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub pings_answered: AtomicU64,
    pub messages_relayed: AtomicU64,
}

pub struct Relay {
    stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Relay {
    pub fn start(config: RelayConfig) -> Result<Relay, listen::ListenError> {
        let threads = config.threads.max(1);
        let (listeners, local_addr) = listen::open_listeners(config.listen, threads)?;
        let stats = Arc::new(RelayStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut group = io::StartGroup::default();
        for (i, &listener) in listeners.iter().enumerate() {
            let (config, stats, stop) = (config.clone(), stats.clone(), stop.clone());
            group.spawn(format!("tether-relay-{i}"), move |ready| {
                let setup = Worker::new(config, listener, i, stats, stop);
                ready.then_run(setup, |mut w| w.run());
            });
        }
        let (handles, started) = group.wait();
        let relay = Relay {
            stats,
            stop,
            threads: handles,
            local_addr,
        };
        listeners.into_iter().for_each(sys::close);
        match started {
            Ok(()) => Ok(relay),
            Err((_, message)) => Err(listen::ListenError::Other {
                addr: config.listen,
                source: std::io::Error::other(message),
            }),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The upstream side of a pair: a client WebSocket to the controller.
enum Up {
    Connecting,
    Upgrading { key: String },
    Open,
}

struct Pair {
    generation: u32,
    down: Conn,
    up_fd: RawFd,
    up: Up,
    /// Upstream bytes received but not yet a whole frame (or the 101).
    up_partial: Vec<u8>,
    /// Upstream unsent bytes.
    up_unsent: Vec<u8>,
    /// Service messages that arrived before the upstream was open.
    early: Vec<u8>,
    authorization: Option<String>,
    started: Instant,
}

struct Worker {
    config: RelayConfig,
    listener: RawFd,
    epoll: Epoll,
    pairs: Slab<Pair>,
    stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    next_generation: u32,
    scratch: Box<[u8]>,
    timing: Timing,
    limits: Limits,
    /// Pairs whose upstream is not open yet, at their upstream deadline
    /// (linked through the service side's `Conn::link`).
    wheel: Wheel,
    epoch: Instant,
    expired: Vec<u32>,
    /// Sides whose read budget ran out with data possibly left.
    read_again: io::ReadAgain,
    next_source: usize,
}

impl Links for Slab<Pair> {
    fn link(&mut self, key: u32) -> &mut Link {
        &mut self[key as usize].down.link
    }
}

/// The relay's wheel ticks: only the upstream deadline uses them.
const TICK: Duration = Duration::from_millis(100);

/// An `io::token` whose key is the pair's key and its side (low bit:
/// upstream).
fn token(key: u32, generation: u32, upstream: bool) -> u64 {
    io::token(key << 1 | upstream as u32, generation)
}

impl Worker {
    fn new(
        config: RelayConfig,
        listener: RawFd,
        index: usize,
        stats: Arc<RelayStats>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Worker> {
        io::own_fd_table(&[listener])?;
        let epoll = Epoll::new(1024)?;
        epoll.add(listener, READABLE | EDGE, LISTENER)?;
        Ok(Worker {
            config,
            listener,
            epoll,
            pairs: Slab::with_capacity(PAIRS_PER_THREAD),
            stats,
            stop,
            next_generation: 1,
            scratch: vec![0; 64 << 10].into_boxed_slice(),
            // The relay does no liveness of its own: long deadlines only
            // bound the handshake.
            timing: Timing {
                handshake: 50,
                admit: u32::MAX / 8,
                ping_interval: u32::MAX / 8,
                ping_grace: 0,
                pong_timeout: 1,
                linger: 1,
                message: u32::MAX / 8,
            },
            // It admits nothing: relayed messages get the admitted bound.
            limits: Limits {
                max_message_unadmitted: Limits::default().max_message,
                ..Limits::default()
            },
            wheel: Wheel::new(0),
            epoch: Instant::now(),
            expired: Vec::new(),
            read_again: io::ReadAgain::default(),
            next_source: index,
        })
    }

    fn run(&mut self) {
        let mut ready = Vec::with_capacity(1024);
        while !self.stop.load(Relaxed) {
            let timeout = if self.read_again.is_empty() { 100 } else { 0 };
            match self.epoll.wait(timeout) {
                Ok(events) => ready.extend(events),
                Err(e) => {
                    tracing::error!("relay epoll_wait failed: {e}");
                    break;
                }
            }
            for (events, token) in ready.drain(..) {
                if token == LISTENER {
                    self.accept();
                    continue;
                }
                let (side, generation) = io::untoken(token);
                let (key, upstream) = (side >> 1, side & 1 == 1);
                if self
                    .pairs
                    .get(key as usize)
                    .is_none_or(|p| p.generation != generation)
                {
                    continue;
                }
                if upstream {
                    self.up_event(key, events);
                } else {
                    if events & WRITABLE != 0 {
                        self.flush_down(key);
                    }
                    if events & (READABLE | HANGUP) != 0 && self.pairs.contains(key as usize) {
                        self.read_down(key);
                    }
                }
            }
            for token in self.read_again.take() {
                let (side, generation) = io::untoken(token);
                let (key, upstream) = (side >> 1, side & 1 == 1);
                if self
                    .pairs
                    .get(key as usize)
                    .is_some_and(|p| p.generation == generation)
                {
                    if upstream {
                        self.read_up(key);
                    } else {
                        self.read_down(key);
                    }
                }
            }
            self.expire();
        }
        let keys: Vec<usize> = self.pairs.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drop_pair(key as u32);
        }
    }

    fn accept(&mut self) {
        loop {
            if self.pairs.len() >= PAIRS_PER_THREAD {
                // Full: the backlog keeps the rest; a close makes room, and
                // the listener's next edge resumes.
                return;
            }
            let fd = match io::accept_one(self.listener) {
                io::Accepted::Socket(fd, _) => fd,
                io::Accepted::Drained => return,
                io::Accepted::Failed(e) => {
                    tracing::warn!("relay accept failed: {e}");
                    return;
                }
            };
            let generation = self.next_generation;
            self.next_generation = self.next_generation.wrapping_add(1).max(1);
            let down = Conn::accepted(fd, generation, 0, &self.timing);
            let entry = self.pairs.vacant_entry();
            let key = entry.key() as u32;
            if self
                .epoll
                .add(
                    fd,
                    READABLE | WRITABLE | HANGUP | EDGE,
                    token(key, generation, false),
                )
                .is_err()
            {
                sys::close(fd);
                continue;
            }
            entry.insert(Pair {
                generation,
                down,
                up_fd: -1,
                up: Up::Connecting,
                up_partial: Vec::new(),
                up_unsent: Vec::new(),
                early: Vec::new(),
                authorization: None,
                started: Instant::now(),
            });
            inc(&self.stats.accepted);
            inc(&self.stats.pairs);
            let deadline =
                self.tick() + UPSTREAM_TIMEOUT.as_millis().div_ceil(TICK.as_millis()) as Tick;
            self.wheel.insert(&mut self.pairs, key, deadline);
        }
    }

    fn tick(&self) -> Tick {
        (self.epoch.elapsed().as_nanos() / TICK.as_nanos()) as Tick
    }

    /// Pairs whose upstream never opened are dropped.
    fn expire(&mut self) {
        let mut expired = std::mem::take(&mut self.expired);
        let now = self.tick();
        self.wheel.advance(&mut self.pairs, now, &mut expired);
        for key in expired.drain(..) {
            if !matches!(self.pairs[key as usize].up, Up::Open) {
                inc(&self.stats.upstream_failures);
                self.drop_pair(key);
            }
        }
        self.expired = expired;
    }

    fn drop_pair(&mut self, key: u32) {
        self.wheel.cancel(&mut self.pairs, key);
        let pair = self.pairs.remove(key as usize);
        sys::close(pair.down.handle);
        if pair.up_fd >= 0 {
            sys::close(pair.up_fd);
        }
        dec(&self.stats.pairs);
    }

    // -- downstream (the service) --------------------------------------------

    fn read_down(&mut self, key: u32) {
        for _ in 0..io::READ_BUDGET {
            let Some(pair) = self.pairs.get(key as usize) else {
                return;
            };
            match io::recv_some(pair.down.handle, &mut self.scratch) {
                io::Received::Gone => return self.drop_pair(key),
                io::Received::Drained => return,
                io::Received::Data(n) => {
                    let mut scratch = std::mem::take(&mut self.scratch);
                    let alive = self.feed_down(key, &mut scratch[..n]);
                    self.scratch = scratch;
                    if !alive {
                        return;
                    }
                }
            }
        }
        self.read_later(key, false);
    }

    /// The read budget ran out: the rest of this side waits a turn.
    fn read_later(&mut self, key: u32, upstream: bool) {
        if let Some(pair) = self.pairs.get(key as usize) {
            self.read_again.defer(token(key, pair.generation, upstream));
        }
    }

    /// Parses service bytes; relays text upstream. False if the pair ended.
    fn feed_down(&mut self, key: u32, data: &mut [u8]) -> bool {
        let pair = &mut self.pairs[key as usize];
        let mut reply = Vec::new();
        let mut texts: Vec<Vec<u8>> = Vec::new();
        let mut upgrade: Option<Option<String>> = None;
        let mut refused = false;
        let fed = pair.down.feed(
            0,
            data,
            &self.limits,
            &self.timing,
            &mut reply,
            |event, out| match event {
                Event::Upgrade(req) if req.path != MICROSERVICE_PATH => {
                    ws::write_http_error(out, 404, "this relay serves /ws/microservice only");
                    refused = true;
                    Flow::Stop
                }
                Event::Upgrade(req) => {
                    upgrade = Some(req.authorization.map(str::to_owned));
                    Flow::Continue
                }
                Event::Open | Event::Pong(_) => Flow::Continue,
                Event::Text(t) => {
                    texts.push(t.as_bytes().to_vec());
                    Flow::Continue
                }
            },
        );
        // Pongs the state machine wrote for the service's pings: local.
        if !reply.is_empty() && !self.send_down(key, &reply) {
            return false;
        }
        if refused {
            self.drop_pair(key);
            return false;
        }
        if let Some(authorization) = upgrade {
            self.pairs[key as usize].authorization = authorization;
            self.open_upstream(key);
            if !self.pairs.contains(key as usize) {
                return false;
            }
        }
        for text in texts {
            let mut frame = Vec::with_capacity(text.len() + 14);
            ws::encode_frame(
                &mut frame,
                ws::OpCode::Text,
                &text,
                Some(fastrand::u32(..).to_ne_bytes()),
            );
            inc(&self.stats.messages_relayed);
            if !self.send_up(key, &frame) {
                return false;
            }
        }
        match fed {
            Fed::Open | Fed::Stopped => true,
            // The service closed (or broke the protocol): so does its pair.
            Fed::PeerClosed(_) | Fed::Violation(_) => {
                self.drop_pair(key);
                false
            }
        }
    }

    fn send_down(&mut self, key: u32, bytes: &[u8]) -> bool {
        let pair = &mut self.pairs[key as usize];
        if pair.down.pending_out() > 0 {
            if pair.down.pending_out() + bytes.len() > MAX_UNSENT {
                self.drop_pair(key);
                return false;
            }
            pair.down.queue_out(bytes);
            return true;
        }
        match io::send_some(pair.down.handle, bytes) {
            Ok(sent) => {
                if sent < bytes.len() {
                    pair.down.queue_out(&bytes[sent..]);
                }
                true
            }
            Err(io::Gone) => {
                self.drop_pair(key);
                false
            }
        }
    }

    fn flush_down(&mut self, key: u32) {
        let pair = &mut self.pairs[key as usize];
        let pending = pair.down.take_pending_out();
        if pending.is_empty() {
            return;
        }
        match io::send_some(pair.down.handle, &pending) {
            Ok(sent) => pair.down.restore_out(pending, sent),
            Err(io::Gone) => self.drop_pair(key),
        }
    }

    // -- upstream (the controller) -------------------------------------------

    fn open_upstream(&mut self, key: u32) {
        let sources = &self.config.upstream_sources;
        let source = (!sources.is_empty()).then(|| sources[self.next_source % sources.len()]);
        self.next_source = self.next_source.wrapping_add(self.config.threads.max(1));
        let fd = match io::connect_from(self.config.upstream, source) {
            Ok(fd) => fd,
            Err(_) => {
                inc(&self.stats.upstream_failures);
                return self.drop_pair(key);
            }
        };
        let generation = self.pairs[key as usize].generation;
        self.pairs[key as usize].up_fd = fd;
        if self
            .epoll
            .add(
                fd,
                READABLE | WRITABLE | HANGUP | EDGE,
                token(key, generation, true),
            )
            .is_err()
        {
            self.drop_pair(key);
        }
    }

    fn up_event(&mut self, key: u32, events: u32) {
        if matches!(self.pairs[key as usize].up, Up::Connecting) {
            let fd = self.pairs[key as usize].up_fd;
            if !matches!(sys::take_socket_error(fd), Ok(None))
                || events & HANGUP != 0 && events & READABLE == 0
            {
                inc(&self.stats.upstream_failures);
                return self.drop_pair(key);
            }
            let upgrade_key = ws::new_client_key();
            let mut request = Vec::new();
            let host = self.config.upstream.to_string();
            let pair = &self.pairs[key as usize];
            ws::write_upgrade_request(
                &mut request,
                &host,
                MICROSERVICE_PATH,
                &upgrade_key,
                pair.authorization.as_deref(),
            );
            let pair = &mut self.pairs[key as usize];
            pair.up = Up::Upgrading { key: upgrade_key };
            // A fresh socket takes a few hundred bytes at once.
            if io::send_some(pair.up_fd, &request).is_err() {
                inc(&self.stats.upstream_failures);
                return self.drop_pair(key);
            }
        }
        if events & WRITABLE != 0 {
            self.flush_up(key);
        }
        if events & (READABLE | HANGUP) != 0 && self.pairs.contains(key as usize) {
            self.read_up(key);
        }
    }

    fn read_up(&mut self, key: u32) {
        for _ in 0..io::READ_BUDGET {
            let Some(pair) = self.pairs.get(key as usize) else {
                return;
            };
            match io::recv_some(pair.up_fd, &mut self.scratch) {
                io::Received::Gone => return self.drop_pair(key),
                io::Received::Drained => return,
                io::Received::Data(n) => {
                    let chunk = self.scratch[..n].to_vec();
                    self.pairs[key as usize]
                        .up_partial
                        .extend_from_slice(&chunk);
                    if !self.feed_up(key) {
                        return;
                    }
                }
            }
        }
        self.read_later(key, true);
    }

    /// Parses what the controller sent: the 101, then frames. Text goes to
    /// the service; pings are answered here. False if the pair ended.
    fn feed_up(&mut self, key: u32) -> bool {
        let mut buf = std::mem::take(&mut self.pairs[key as usize].up_partial);
        let mut pos = 0;
        if let Up::Upgrading { key: upgrade_key } = &self.pairs[key as usize].up {
            match ws::parse_upgrade_response(&buf, upgrade_key, 16 << 10) {
                Ok(None) => {
                    self.pairs[key as usize].up_partial = buf;
                    return true;
                }
                Err(_) => {
                    inc(&self.stats.upstream_failures);
                    self.drop_pair(key);
                    return false;
                }
                Ok(Some(used)) => {
                    pos = used;
                    // Open: no deadline left for this pair.
                    self.wheel.cancel(&mut self.pairs, key);
                    let pair = &mut self.pairs[key as usize];
                    pair.up = Up::Open;
                    let early = std::mem::take(&mut pair.early);
                    tracing::trace!(after = ?pair.started.elapsed(), "upstream open");
                    if !early.is_empty() && !self.send_up(key, &early) {
                        return false;
                    }
                }
            }
        }
        loop {
            let rest = &buf[pos..];
            let header = match ws::decode_header(rest, ws::Role::Client) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => {
                    self.drop_pair(key);
                    return false;
                }
            };
            let end = header.header_len + header.payload_len as usize;
            if header.payload_len > (16 << 20) {
                self.drop_pair(key);
                return false;
            }
            if rest.len() < end {
                break;
            }
            let payload = rest[header.header_len..end].to_vec();
            pos += end;
            let mut frame = Vec::with_capacity(payload.len() + 14);
            match header.opcode {
                ws::OpCode::Ping => {
                    // The controller's ping never reaches the service: the
                    // relay answers it, as terminating proxies do.
                    inc(&self.stats.pings_answered);
                    ws::encode_frame(
                        &mut frame,
                        ws::OpCode::Pong,
                        &payload,
                        Some(fastrand::u32(..).to_ne_bytes()),
                    );
                    if !self.send_up(key, &frame) {
                        return false;
                    }
                }
                ws::OpCode::Text | ws::OpCode::Continuation => {
                    inc(&self.stats.messages_relayed);
                    ws::encode_fragment(&mut frame, header.opcode, header.fin, &payload, None);
                    if !self.send_down(key, &frame) {
                        return false;
                    }
                }
                ws::OpCode::Close => {
                    // The controller closed (e.g. 4000 superseded, 1001 shutdown): tell the service.
                    ws::encode_frame(&mut frame, ws::OpCode::Close, &payload, None);
                    let _ = self.send_down(key, &frame);
                    if self.pairs.contains(key as usize) {
                        self.drop_pair(key);
                    }
                    return false;
                }
                ws::OpCode::Pong | ws::OpCode::Binary => {}
            }
        }
        buf.drain(..pos);
        if let Some(pair) = self.pairs.get_mut(key as usize) {
            pair.up_partial = buf;
        }
        true
    }

    /// Sends frames to the controller, or holds them until the upstream
    /// is open.
    fn send_up(&mut self, key: u32, bytes: &[u8]) -> bool {
        let pair = &mut self.pairs[key as usize];
        if !matches!(pair.up, Up::Open) {
            if pair.early.len() + bytes.len() > MAX_EARLY {
                self.drop_pair(key);
                return false;
            }
            pair.early.extend_from_slice(bytes);
            return true;
        }
        if !pair.up_unsent.is_empty() {
            if pair.up_unsent.len() + bytes.len() > MAX_UNSENT {
                self.drop_pair(key);
                return false;
            }
            pair.up_unsent.extend_from_slice(bytes);
            return true;
        }
        match io::send_some(pair.up_fd, bytes) {
            Ok(sent) => {
                pair.up_unsent.extend_from_slice(&bytes[sent..]);
                true
            }
            Err(io::Gone) => {
                self.drop_pair(key);
                false
            }
        }
    }

    fn flush_up(&mut self, key: u32) {
        let pair = &mut self.pairs[key as usize];
        if pair.up_unsent.is_empty() || pair.up_fd < 0 {
            return;
        }
        let pending = std::mem::take(&mut pair.up_unsent);
        match io::send_some(pair.up_fd, &pending) {
            Ok(sent) => pair.up_unsent = pending[sent..].to_vec(),
            Err(io::Gone) => self.drop_pair(key),
        }
    }
}

/// Counts, for tests and the load test's report.
pub fn snapshot(stats: &RelayStats) -> [(&'static str, u64); 5] {
    [
        ("pairs", stats.pairs.load(Relaxed)),
        ("accepted", stats.accepted.load(Relaxed)),
        ("upstream_failures", stats.upstream_failures.load(Relaxed)),
        ("pings_answered", stats.pings_answered.load(Relaxed)),
        ("messages_relayed", stats.messages_relayed.load(Relaxed)),
    ]
}
