//! The client event loop: one thread, its own fd table, an epoll set, and
//! any number of service sessions, each reconnecting on its own with
//! backoff. The swarm runs several workers; the SDK runs one with one
//! session and a control mailbox.
//!
//! Bounded: connects per second (so a ramp does not overflow the
//! controller's listen queue), unsent output per session, requests waiting
//! per session. Every worker stops at its deadline or its stop flag.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::session::{Phase, Session, SessionEvent};
use super::{Backoff, ControllerUrl, Controllers, ServiceSpec, Tools, retry_hint};
use crate::engine::epoll::{EDGE, Epoll, HANGUP, READABLE, WRITABLE};
use crate::engine::mailbox::Mailbox;
use crate::engine::wheel::{Link, Links, Tick, Wheel};
use crate::engine::{io, sys};
use crate::metrics::{dec, inc};

const MAX_UNSENT: usize = 32 << 20;
const CONTROL: u64 = u64::MAX;
/// The timers' resolution: fine enough that full-jitter reconnects stay
/// spread (a coarser tick would bunch a reconnect wave into bursts).
const TICK: Duration = Duration::from_millis(10);
/// The longest the loop sleeps: how soon a stop or a deadline is noticed.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// A connection that lived this long resets the backoff (PROTOCOL.md).
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Counters a swarm reports; gauges are `open` and `registered`.
#[derive(Default)]
pub struct SwarmStats {
    pub target: AtomicU64,
    pub open: AtomicU64,
    pub registered: AtomicU64,
    pub registrations: AtomicU64,
    pub connect_attempts: AtomicU64,
    pub connect_failures: AtomicU64,
    pub refused: AtomicU64,
    pub closed_by_controller: AtomicU64,
    /// Registrations on another controller node than the service's last
    /// one (it moved: the node closed, was drained or could not be reached).
    pub moved: AtomicU64,
}

#[derive(Clone)]
pub struct WorkerConfig {
    /// The nodes to connect to; a service moves to the next one whenever
    /// its connection fails or ends.
    pub controllers: Controllers,
    /// The node each service tries first: None spreads the services over
    /// the list by index; Some(i) starts every one at the `i`th.
    pub first_controller: Option<usize>,
    pub authorization: Option<String>,
    pub sources: Vec<IpAddr>,
    pub backoff: Backoff,
    /// New connections per second this worker opens on its first ramp
    /// (reconnects follow each service's own backoff, unpaced).
    pub connect_rate: f64,
    /// The registration must be answered within this, else reconnect.
    pub register_timeout: Duration,
    /// Send a ping this often (None: only answer the controller's).
    pub client_ping: Option<Duration>,
    pub stop: Arc<AtomicBool>,
    pub deadline: Option<Instant>,
    /// Give the worker thread its own fd table, so one process can hold more
    /// sockets than RLIMIT_NOFILE (the swarm). Callbacks then run in that
    /// table and must not touch fds opened elsewhere, so the SDK keeps the
    /// process's table.
    pub own_fd_table: bool,
    /// Every `every`, one session in `one_in` times a `discovery/lookup`
    /// round trip (the whole path, relays included) into `probes`.
    pub probe: Option<Probe>,
}

/// Latency probes: sampled sessions time a request that must reach the
/// controller and come back.
#[derive(Clone)]
pub struct Probe {
    pub every: Duration,
    pub one_in: usize,
    pub probes: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>,
}

/// The serviceId probes look up: one nobody registers, so answers are tiny.
pub const PROBE_SERVICE: &str = "__tether_probe__";

/// What another thread asks a worker to do (the SDK's calls).
pub enum Control {
    Request {
        method: &'static str,
        params: Value,
        reply: SyncSender<Result<Value, Value>>,
    },
    Deregister {
        reason: String,
        reply: SyncSender<bool>,
    },
}

/// Hears every session event (the SDK's state and subscriptions).
pub trait Observer: Send {
    fn event(&mut self, slot: usize, event: &SessionEvent);

    /// Requests to send right after each (re-)registration, e.g. to renew
    /// discovery subscriptions; their replies are not reported.
    fn after_register(&mut self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
}

pub struct NoObserver;

impl Observer for NoObserver {
    fn event(&mut self, _: usize, _: &SessionEvent) {}
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Connecting,
    Open,
}

struct Slot {
    session: Session,
    fd: RawFd,
    generation: u32,
    state: State,
    unsent: Vec<u8>,
    attempts: u32,
    opened_at: Instant,
    source: Option<IpAddr>,
    registered: bool,
    /// Deregistered: the controller closes after its ack, and the service
    /// stays away (no reconnect).
    deregistered: bool,
    /// The probe in flight: its request id and when it left.
    probing: Option<(u64, Instant)>,
    /// The reconnect window a `session/draining` asked for, in ms (0:
    /// none): the next first reconnect is spread over it.
    drain_window_ms: u32,
    /// The controller (an index into the config's list) this slot connects
    /// to, and the one it was last registered with (u16::MAX: none yet).
    target: u16,
    registered_with: u16,
    /// The next reconnect goes to the same node (it refused the
    /// registration: another would only hide the reason).
    stay: bool,
    /// The slot's place in the worker's wheel, at its earliest timer.
    link: Link,
    timers: Timers,
    /// For wss://: the connection's TLS (rustls' buffered client; a
    /// client's memory is not what is measured).
    tls: Option<Box<rustls::ClientConnection>>,
}

/// A slot's timers, as ticks of the worker's clock (0: not set). The
/// connection's own (register, ping, probe) are cleared when it ends, so
/// none fires for a later connection of the same slot.
#[derive(Copy, Clone, Default)]
struct Timers {
    reconnect: Tick,
    register_by: Tick,
    client_ping: Tick,
    probe: Tick,
}

impl Timers {
    /// The earliest one set.
    fn next(&self) -> Option<Tick> {
        [
            self.reconnect,
            self.register_by,
            self.client_ping,
            self.probe,
        ]
        .into_iter()
        .filter(|&t| t != 0)
        .min()
    }

    /// Clears the timer and says whether it was due at `now`.
    fn take_due(timer: &mut Tick, now: Tick) -> bool {
        let due = *timer != 0 && *timer <= now;
        if due {
            *timer = 0;
        }
        due
    }
}

impl Links for Vec<Slot> {
    fn link(&mut self, key: u32) -> &mut Link {
        &mut self[key as usize].link
    }
}

pub struct Worker<O: Observer> {
    config: WorkerConfig,
    first_index: usize,
    slots: Vec<Slot>,
    tools: Arc<dyn Tools>,
    observer: O,
    stats: Arc<SwarmStats>,
    control: Option<Arc<Mailbox<Control>>>,
    epoll: Epoll,
    /// Every slot with a timer set, at its earliest (the controller's
    /// wheel, at a finer tick).
    wheel: Wheel,
    /// Tick 1 of the worker's clock (0 means "no timer").
    epoch: Instant,
    expired: Vec<u32>,
    /// Sessions whose read budget ran out with data possibly left.
    read_again: io::ReadAgain,
    connect_queue: VecDeque<usize>,
    tokens: f64,
    last_refill: Instant,
    scratch: Vec<u8>,
    out: Vec<u8>,
    /// Scratch for wss:// sessions: plaintext opened, records to send.
    plain: Vec<u8>,
    wire: Vec<u8>,
    events: Vec<SessionEvent>,
    replies: HashMap<(usize, u64), SyncSender<Result<Value, Value>>>,
    deregistering: HashMap<(usize, u64), SyncSender<bool>>,
}

impl<O: Observer> Worker<O> {
    /// Must be called on the thread that will run it: it takes that
    /// thread's own fd table.
    pub fn new(
        config: WorkerConfig,
        specs: Vec<Arc<ServiceSpec>>,
        first_index: usize,
        tools: Arc<dyn Tools>,
        observer: O,
        stats: Arc<SwarmStats>,
        control: Option<Arc<Mailbox<Control>>>,
    ) -> std::io::Result<Worker<O>> {
        if config.own_fd_table {
            let keep: Vec<RawFd> = control.iter().map(|c| c.wake_fd()).collect();
            io::own_fd_table(&keep)?;
        }
        let epoll = Epoll::new(1024)?;
        if let Some(c) = &control {
            epoll.add(c.wake_fd(), READABLE, CONTROL)?;
        }
        let now = Instant::now();
        let sources = config.sources.clone();
        let slots = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| Slot {
                session: Session::new(spec),
                fd: -1,
                generation: 0,
                state: State::Waiting,
                unsent: Vec::new(),
                attempts: 0,
                opened_at: now,
                source: (!sources.is_empty()).then(|| sources[(first_index + i) % sources.len()]),
                registered: false,
                deregistered: false,
                probing: None,
                drain_window_ms: 0,
                target: (config.first_controller.unwrap_or(first_index + i)
                    % config.controllers.len()) as u16,
                registered_with: u16::MAX,
                stay: false,
                link: Link::default(),
                timers: Timers::default(),
                tls: None,
            })
            .collect::<Vec<_>>();
        Ok(Worker {
            first_index,
            connect_queue: (0..slots.len()).collect(),
            tokens: 1.0,
            last_refill: now,
            config,
            slots,
            tools,
            observer,
            stats,
            control,
            epoll,
            wheel: Wheel::new(1),
            epoch: now,
            expired: Vec::new(),
            read_again: io::ReadAgain::default(),
            scratch: vec![0; 64 << 10],
            out: Vec::new(),
            plain: Vec::new(),
            wire: Vec::new(),
            events: Vec::new(),
            replies: HashMap::new(),
            deregistering: HashMap::new(),
        })
    }

    fn stopping(&self) -> bool {
        self.config.stop.load(Relaxed) || self.config.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub fn run(mut self) {
        let mut ready = Vec::with_capacity(1024);
        while !self.stopping() {
            let now = Instant::now();
            self.connect_some(now);
            self.fire_timers(now);
            let within = (MAX_WAIT.as_nanos() / TICK.as_nanos()) as Tick;
            let next_timer = self
                .wheel
                .next_busy(within)
                .map(|tick| self.instant_of(tick).saturating_duration_since(now));
            let mut wait = next_timer.unwrap_or(MAX_WAIT).min(MAX_WAIT);
            if !self.connect_queue.is_empty() {
                wait = wait.min(Duration::from_millis(5));
            }
            if !self.read_again.is_empty() {
                wait = Duration::ZERO;
            }
            let timeout = if wait.is_zero() {
                0
            } else {
                wait.as_millis().max(1) as i32
            };
            match self.epoll.wait(timeout) {
                Ok(events) => ready.extend(events),
                Err(e) => {
                    tracing::error!("agent epoll_wait failed: {e}");
                    break;
                }
            }
            for (events, token) in ready.drain(..) {
                if token == CONTROL {
                    self.drain_control();
                    continue;
                }
                let (slot, generation) = io::untoken(token);
                let slot = slot as usize;
                if self
                    .slots
                    .get(slot)
                    .is_none_or(|s| s.generation != generation || s.fd < 0)
                {
                    continue;
                }
                if self.slots[slot].state == State::Connecting {
                    self.finish_connect(slot);
                    continue;
                }
                if events & WRITABLE != 0 {
                    self.flush(slot);
                }
                if events & (READABLE | HANGUP) != 0 {
                    self.read(slot, events & HANGUP != 0);
                }
            }
            for token in self.read_again.take() {
                let (slot, generation) = io::untoken(token);
                let s = &self.slots[slot as usize];
                if s.generation == generation && s.fd >= 0 && s.state == State::Open {
                    self.read(slot as usize, true);
                }
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].fd >= 0 {
                self.out.clear();
                let mut out = std::mem::take(&mut self.out);
                self.slots[slot].session.close(1001, &mut out);
                let _ = sys::send(self.slots[slot].fd, &out);
                self.out = out;
                self.disconnect(slot);
            }
        }
    }

    fn connect_some(&mut self, now: Instant) {
        let rate = self.config.connect_rate.max(1.0);
        let elapsed = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate / 10.0 + 1.0);
        while self.tokens >= 1.0 {
            let Some(slot) = self.connect_queue.pop_front() else {
                break;
            };
            self.tokens -= 1.0;
            self.connect(slot);
        }
    }

    /// The tick a deadline at `at` falls in (rounded up: never early).
    fn tick_of(&self, at: Instant) -> Tick {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        (1 + nanos.div_ceil(TICK.as_nanos())).min(Tick::MAX as u128 / 2) as Tick
    }

    /// The tick `now` is in (rounded down).
    fn current_tick(&self, now: Instant) -> Tick {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        (1 + nanos / TICK.as_nanos()).min(Tick::MAX as u128 / 2) as Tick
    }

    fn instant_of(&self, tick: Tick) -> Instant {
        self.epoch + TICK * tick.saturating_sub(1)
    }

    /// Puts the slot in the wheel at its earliest timer (or takes it out).
    fn relink(&mut self, slot: usize) {
        match self.slots[slot].timers.next() {
            None => self.wheel.cancel(&mut self.slots, slot as u32),
            Some(next) if self.slots[slot].link.deadline() != Some(next) => {
                self.wheel.insert(&mut self.slots, slot as u32, next)
            }
            Some(_) => {}
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        let tick = self.current_tick(now);
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(&mut self.slots, tick, &mut expired);
        for slot in expired.drain(..) {
            self.fire(slot as usize, now, tick);
        }
        self.expired = expired;
    }

    /// The slot's earliest timer came: runs every one of its timers that is
    /// due, then re-links it at the next.
    fn fire(&mut self, slot: usize, now: Instant, tick: Tick) {
        let timers = &mut self.slots[slot].timers;
        let reconnect = Timers::take_due(&mut timers.reconnect, tick);
        let register_by = Timers::take_due(&mut timers.register_by, tick);
        let client_ping = Timers::take_due(&mut timers.client_ping, tick);
        let probe = Timers::take_due(&mut timers.probe, tick);
        if reconnect && self.slots[slot].state == State::Waiting {
            // Not paced: each simulated service backs off on its own, as
            // real ones do (the pacing is the first ramp's).
            self.connect(slot);
        }
        let s = &self.slots[slot];
        if register_by && s.state == State::Open && !s.registered {
            self.fail(slot);
        }
        let s = &self.slots[slot];
        if probe
            && s.state == State::Open
            && s.registered
            && let Some(every) = self.config.probe.as_ref().map(|p| p.every)
        {
            if s.probing.is_none() {
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                let filter = serde_json::json!({"serviceId": PROBE_SERVICE});
                if let Some(id) =
                    self.slots[slot]
                        .session
                        .request("discovery/lookup", filter, &mut out)
                {
                    self.slots[slot].probing = Some((id, now));
                }
                self.send(slot, &out);
                self.out = out;
            }
            self.slots[slot].timers.probe = self.tick_of(now + every);
        }
        if client_ping
            && self.slots[slot].state == State::Open
            && let Some(every) = self.config.client_ping
        {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            self.slots[slot].session.ping(&mut out);
            self.send(slot, &out);
            self.out = out;
            self.slots[slot].timers.client_ping = self.tick_of(now + every);
        }
        self.relink(slot);
    }

    fn connect(&mut self, slot: usize) {
        if self.slots[slot].fd >= 0 {
            return;
        }
        inc(&self.stats.connect_attempts);
        let addr = self.controller(slot).addr;
        let source = self.slots[slot].source;
        match io::connect_from(addr, source) {
            Ok(fd) => {
                let s = &mut self.slots[slot];
                s.generation = s.generation.wrapping_add(1);
                s.fd = fd;
                s.state = State::Connecting;
                if let Err(e) = self.epoll.add(
                    fd,
                    READABLE | WRITABLE | HANGUP | EDGE,
                    io::token(slot as u32, s.generation),
                ) {
                    tracing::warn!("cannot watch a socket: {e}");
                    self.fail(slot);
                }
            }
            Err(e) => {
                tracing::debug!("connect to {addr} failed: {e}");
                inc(&self.stats.connect_failures);
                self.schedule_reconnect(slot);
            }
        }
    }

    fn finish_connect(&mut self, slot: usize) {
        match sys::take_socket_error(self.slots[slot].fd) {
            Ok(None) => {}
            _ => {
                inc(&self.stats.connect_failures);
                return self.fail(slot);
            }
        }
        let now = Instant::now();
        let generation = self.slots[slot].generation;
        {
            let s = &mut self.slots[slot];
            s.state = State::Open;
            s.opened_at = now;
        }
        inc(&self.stats.open);
        if let Some(config) = &self.controller(slot).tls {
            let name = self.controller(slot).server_name();
            match name.and_then(|n| {
                rustls::ClientConnection::new(config.clone(), n).map_err(|e| e.to_string())
            }) {
                Ok(conn) => self.slots[slot].tls = Some(Box::new(conn)),
                Err(e) => {
                    tracing::warn!("cannot start TLS: {e}");
                    return self.fail(slot);
                }
            }
        }
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let url = self.config.controllers.get(self.slots[slot].target.into());
        self.slots[slot].session.start(
            &url.host,
            &url.path,
            self.config.authorization.as_deref(),
            &mut out,
        );
        self.send(slot, &out);
        self.out = out;
        if self.slots[slot].generation != generation || self.slots[slot].fd < 0 {
            return; // the first send found the peer gone
        }
        let register_by = self.tick_of(now + self.config.register_timeout);
        // The first at a random point of the period: services started
        // together still ping at phases of their own, as real ones do.
        let client_ping = self.config.client_ping.map_or(0, |e| {
            self.tick_of(now + e.mul_f64(fastrand::f64().max(0.01)))
        });
        let timers = &mut self.slots[slot].timers;
        timers.register_by = register_by;
        timers.client_ping = client_ping;
        self.relink(slot);
        // Data may already be waiting; edge-triggered epoll will not repeat it.
        self.read(slot, true);
    }

    /// Reads until drained; with `hangup`, until EOF or EAGAIN (a short
    /// read does not prove the EOF behind it was seen). Past the read
    /// budget the rest waits for the next turn.
    fn read(&mut self, slot: usize, hangup: bool) {
        for _ in 0..io::READ_BUDGET {
            if self.slots[slot].fd < 0 {
                return;
            }
            match io::recv_some(self.slots[slot].fd, &mut self.scratch) {
                io::Received::Gone => return self.fail(slot),
                io::Received::Drained => return,
                io::Received::Data(n) => {
                    let mut out = std::mem::take(&mut self.out);
                    let mut events = std::mem::take(&mut self.events);
                    out.clear();
                    let mut plain = std::mem::take(&mut self.plain);
                    let input = if self.slots[slot].tls.is_some() {
                        plain.clear();
                        if self.open_tls(slot, n, &mut plain).is_err() {
                            self.plain = plain;
                            self.out = out;
                            self.events = events;
                            return self.fail(slot);
                        }
                        &plain[..]
                    } else {
                        &self.scratch[..n]
                    };
                    let s = &mut self.slots[slot];
                    s.session
                        .on_input(input, &*self.tools, &mut out, &mut events);
                    self.plain = plain;
                    if !out.is_empty() {
                        self.send(slot, &out);
                    }
                    self.out = out;
                    for event in events.drain(..) {
                        // Once an event ended the connection, the rest of
                        // this read belongs to it and is moot.
                        if self.slots[slot].fd >= 0 {
                            self.on_event(slot, event);
                        }
                    }
                    self.events = events;
                    if n < self.scratch.len() && !hangup {
                        return;
                    }
                }
            }
        }
        if self.slots[slot].fd >= 0 {
            let generation = self.slots[slot].generation;
            self.read_again.defer(io::token(slot as u32, generation));
        }
    }

    fn on_event(&mut self, slot: usize, event: SessionEvent) {
        self.observer.event(slot, &event);
        match event {
            SessionEvent::Registered(_) => {
                let s = &mut self.slots[slot];
                if s.registered_with != u16::MAX && s.registered_with != s.target {
                    inc(&self.stats.moved);
                }
                s.registered_with = s.target;
                s.stay = false;
                self.slots[slot].registered = true;
                self.slots[slot].probing = None;
                inc(&self.stats.registered);
                inc(&self.stats.registrations);
                if let Some(probe) = &self.config.probe
                    && (self.first_index + slot).is_multiple_of(probe.one_in.max(1))
                {
                    // Spread the first probes over the period.
                    let first = probe.every.mul_f64(fastrand::f64());
                    self.slots[slot].timers.probe = self.tick_of(Instant::now() + first);
                    self.relink(slot);
                }
                let renewals = self.observer.after_register();
                if !renewals.is_empty() {
                    let mut out = std::mem::take(&mut self.out);
                    out.clear();
                    for (method, params) in renewals {
                        self.slots[slot].session.request(method, params, &mut out);
                    }
                    self.send(slot, &out);
                    self.out = out;
                }
            }
            SessionEvent::Refused { code, message } => {
                inc(&self.stats.refused);
                tracing::debug!(code, "registration refused: {message}");
                // Rate limited with a wait named (an identity conflict):
                // no sooner than that.
                let hint = retry_hint(&message).filter(|_| code == -32003);
                // Refused by this node (an identity conflict, a bad token):
                // another node is no answer, so the service stays.
                self.slots[slot].stay = true;
                self.fail_after(slot, hint);
            }
            SessionEvent::Closed { code, reason } => {
                if code.is_some() {
                    inc(&self.stats.closed_by_controller);
                }
                // A controller that asks for a wait (1013 "… retry after
                // 30s") gets at least that.
                let hint = retry_hint(&reason).filter(|_| code == Some(1013));
                self.fail_after(slot, hint);
            }
            SessionEvent::Reply { id, outcome } => {
                if let Some((probe_id, sent)) = self.slots[slot].probing
                    && probe_id == id
                {
                    self.slots[slot].probing = None;
                    if let Some(probe) = &self.config.probe {
                        let micros = sent.elapsed().as_micros().max(1) as u64;
                        let _ = probe
                            .probes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(micros);
                    }
                } else if let Some(tx) = self.replies.remove(&(slot, id)) {
                    let _ = tx.try_send(outcome);
                } else if let Some(tx) = self.deregistering.remove(&(slot, id)) {
                    self.slots[slot].deregistered |= outcome.is_ok();
                    let _ = tx.try_send(outcome.is_ok());
                    if self.slots[slot].registered {
                        self.slots[slot].registered = false;
                        dec(&self.stats.registered);
                    }
                }
            }
            SessionEvent::Notification { method, params } => {
                if method == "session/draining"
                    && let Some(ms) = params.get("reconnectWindowMs").and_then(Value::as_u64)
                {
                    let max = super::MAX_RECONNECT_WINDOW.as_millis() as u64;
                    self.slots[slot].drain_window_ms = ms.min(max) as u32;
                }
            }
        }
    }

    fn drain_control(&mut self) {
        let Some(control) = self.control.clone() else {
            return;
        };
        let mut inbox = VecDeque::new();
        control.take_all(&mut inbox);
        for msg in inbox {
            // The SDK runs one session: slot 0.
            let slot = 0;
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            let usable = self.slots[slot].state == State::Open;
            match msg {
                Control::Request {
                    method,
                    params,
                    reply,
                } => {
                    let registered = self.slots[slot].session.phase() == Phase::Registered;
                    // Only a usable session may take the request: a refused
                    // one must not leave an entry waiting for a reply.
                    let sent = if usable && registered {
                        self.slots[slot].session.request(method, params, &mut out)
                    } else {
                        None
                    };
                    match sent {
                        Some(id) => {
                            self.replies.insert((slot, id), reply);
                        }
                        None => {
                            let _ = reply.try_send(Err(
                                serde_json::json!({"message": "not connected and registered"}),
                            ));
                            out.clear();
                        }
                    }
                }
                Control::Deregister { reason, reply } => {
                    let sent = if usable {
                        self.slots[slot].session.deregister(&reason, &mut out)
                    } else {
                        None
                    };
                    match sent {
                        Some(id) => {
                            self.deregistering.insert((slot, id), reply);
                        }
                        _ => {
                            let _ = reply.try_send(false);
                            out.clear();
                        }
                    }
                }
            }
            if !out.is_empty() {
                self.send(slot, &out);
            }
            self.out = out;
        }
    }

    /// Hands `n` received bytes in `scratch` to the slot's TLS: the
    /// plaintext into `plain`, and sends what TLS has to send (its
    /// handshake, and plaintext queued before it completed).
    fn open_tls(&mut self, slot: usize, n: usize, plain: &mut Vec<u8>) -> Result<(), ()> {
        let tls = self.slots[slot].tls.as_mut().expect("a TLS slot");
        let mut input = &self.scratch[..n];
        while !input.is_empty() {
            tls.read_tls(&mut input).map_err(drop)?;
            let state = tls.process_new_packets().map_err(|e| {
                tracing::debug!("TLS: {e}");
            })?;
            let start = plain.len();
            plain.resize(start + state.plaintext_bytes_to_read(), 0);
            std::io::Read::read_exact(&mut tls.reader(), &mut plain[start..]).map_err(drop)?;
            if state.peer_has_closed() {
                break;
            }
        }
        self.send_tls(slot);
        Ok(())
    }

    /// Sends the records the slot's TLS has ready.
    fn send_tls(&mut self, slot: usize) {
        let Some(tls) = self.slots[slot].tls.as_mut() else {
            return;
        };
        let mut wire = std::mem::take(&mut self.wire);
        wire.clear();
        while tls.wants_write() {
            if tls.write_tls(&mut wire).is_err() {
                break;
            }
        }
        if !wire.is_empty() {
            self.send_wire(slot, &wire);
        }
        self.wire = wire;
    }

    /// Sends or keeps what the socket will not take (sealed first for a
    /// wss:// session).
    fn send(&mut self, slot: usize, bytes: &[u8]) {
        if let Some(tls) = self.slots[slot].tls.as_mut() {
            // Before the handshake is done rustls keeps it for later.
            if std::io::Write::write_all(&mut tls.writer(), bytes).is_err() {
                return self.fail(slot);
            }
            return self.send_tls(slot);
        }
        self.send_wire(slot, bytes);
    }

    /// Sends bytes as they are, or keeps what the socket will not take.
    fn send_wire(&mut self, slot: usize, bytes: &[u8]) {
        let s = &mut self.slots[slot];
        if s.fd < 0 {
            return;
        }
        if !s.unsent.is_empty() {
            if s.unsent.len() + bytes.len() > MAX_UNSENT {
                return self.fail(slot);
            }
            s.unsent.extend_from_slice(bytes);
            return;
        }
        match io::send_some(s.fd, bytes) {
            Ok(sent) => s.unsent.extend_from_slice(&bytes[sent..]),
            Err(io::Gone) => self.fail(slot),
        }
    }

    fn flush(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let Ok(sent) = io::send_some(s.fd, &s.unsent) else {
            return self.fail(slot);
        };
        s.unsent.drain(..sent);
        if s.unsent.is_empty() {
            s.unsent = Vec::new();
        }
    }

    fn disconnect(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.fd >= 0 {
            sys::close(s.fd);
            s.fd = -1;
        }
        if s.state == State::Open {
            dec(&self.stats.open);
        }
        if s.registered {
            s.registered = false;
            dec(&self.stats.registered);
        }
        s.state = State::Waiting;
        s.unsent = Vec::new();
        s.tls = None;
        s.timers = Timers {
            reconnect: s.timers.reconnect,
            ..Timers::default()
        };
        self.relink(slot);
        self.replies.retain(|(i, _), _| *i != slot);
        self.deregistering.retain(|(i, _), _| *i != slot);
    }

    /// The controller `slot` connects to.
    fn controller(&self, slot: usize) -> &ControllerUrl {
        self.config.controllers.get(self.slots[slot].target.into())
    }

    /// The connection failed or ended: reconnect after the backoff.
    fn fail(&mut self, slot: usize) {
        self.fail_after(slot, None);
    }

    /// The same, no sooner than a wait the controller asked for, plus up
    /// to a quarter of it (so those it told at once do not come back at
    /// once).
    fn fail_after(&mut self, slot: usize, hint: Option<Duration>) {
        self.disconnect(slot);
        if !self.slots[slot].deregistered {
            let at_least = hint.map_or(Duration::ZERO, |h| h + h.mul_f64(fastrand::f64() / 4.0));
            self.schedule_reconnect_after(slot, at_least);
        }
    }

    /// Schedules one reconnect (a second request while one is pending is
    /// ignored, so a failure reported twice backs off once).
    fn schedule_reconnect(&mut self, slot: usize) {
        self.schedule_reconnect_after(slot, Duration::ZERO);
    }

    /// The same, no sooner than `at_least` from now (a wait the controller
    /// asked for); a pending reconnect is pushed back to it if earlier.
    fn schedule_reconnect_after(&mut self, slot: usize, at_least: Duration) {
        let now = Instant::now();
        let earliest = self.tick_of(now + at_least);
        let s = &self.slots[slot];
        if s.timers.reconnect != 0 {
            if !at_least.is_zero() && s.timers.reconnect < earliest {
                self.slots[slot].timers.reconnect = earliest;
                self.relink(slot);
            }
            return;
        }
        let s = &mut self.slots[slot];
        // The next attempt goes to the next node: this one failed, closed
        // or drained the connection (a lone node is tried again), unless it
        // refused the registration itself.
        if !std::mem::take(&mut s.stay) {
            s.target = ((usize::from(s.target) + 1) % self.config.controllers.len()) as u16;
        }
        let lived = now.duration_since(s.opened_at) > STABLE_AFTER;
        if lived {
            s.attempts = 0;
        }
        let hint = std::mem::take(&mut s.drain_window_ms);
        let hint = (hint > 0).then(|| Duration::from_millis(hint.into()));
        if hint.is_some() {
            // A planned close: the first reconnect, however young the connection.
            s.attempts = 0;
        }
        // The configured window spreads only the first reconnect after a
        // connection that lived (not a new service's first failures); a
        // controller's hint may lengthen it, never shorten it.
        let configured = self.config.backoff.first_window.filter(|_| lived);
        let window = match (hint, configured) {
            (Some(h), Some(c)) => Some(h.max(c)),
            (h, c) => h.or(c),
        };
        let delay = self.config.backoff.delay_within(s.attempts, window);
        s.attempts = s.attempts.saturating_add(1);
        s.state = State::Waiting;
        self.slots[slot].timers.reconnect = self.tick_of(now + delay).max(earliest);
        self.relink(slot);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::thread::JoinHandle;

    use super::*;
    use crate::agent::NoTools;

    /// One service against `addr`, on a thread of its own until `stop`.
    fn start(
        addr: SocketAddr,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> (JoinHandle<()>, Arc<SwarmStats>, Arc<AtomicBool>) {
        start_observed(addr, tune, NoObserver)
    }

    fn start_observed<O: Observer + 'static>(
        addr: SocketAddr,
        tune: impl FnOnce(&mut WorkerConfig),
        observer: O,
    ) -> (JoinHandle<()>, Arc<SwarmStats>, Arc<AtomicBool>) {
        let stop = Arc::new(AtomicBool::new(false));
        let mut config = WorkerConfig {
            controllers: format!("ws://{addr}/ws/microservice").parse().unwrap(),
            first_controller: None,
            authorization: None,
            sources: Vec::new(),
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(100),
                jitter: false,
                first_window: None,
            },
            connect_rate: 100.0,
            register_timeout: Duration::from_secs(10),
            client_ping: None,
            stop: stop.clone(),
            deadline: Some(Instant::now() + Duration::from_secs(20)),
            own_fd_table: false,
            probe: None,
        };
        tune(&mut config);
        let stats = Arc::new(SwarmStats::default());
        let counted = stats.clone();
        let thread = std::thread::spawn(move || {
            let spec = Arc::new(ServiceSpec::new("timers", "10.0.0.1", 8080));
            let tools = Arc::new(NoTools);
            let worker = Worker::new(config, vec![spec], 0, tools, observer, counted, None);
            worker.expect("a worker").run();
        });
        (thread, stats, stop)
    }

    #[test]
    fn an_unanswered_upgrade_times_out_and_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (thread, stats, stop) = start(listener.local_addr().unwrap(), |c| {
            c.register_timeout = Duration::from_millis(200);
        });
        // Accept and hold every connection; never answer the upgrade.
        listener.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while held.len() < 4 && Instant::now() < deadline {
            match listener.accept() {
                Ok((socket, _)) => held.push(socket),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        stop.store(true, Relaxed);
        thread.join().unwrap();
        assert_eq!(
            held.len(),
            4,
            "the register deadline never fired a reconnect"
        );
        assert!(stats.connect_attempts.load(Relaxed) >= 4);
        assert_eq!(stats.registered.load(Relaxed), 0);
    }

    #[test]
    fn client_pings_go_out_at_their_interval() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (thread, _stats, stop) = start(listener.local_addr().unwrap(), |c| {
            c.client_ping = Some(Duration::from_millis(100));
        });
        let (socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut ws = tungstenite::accept(socket).expect("the agent's upgrade");
        let (mut pings, started) = (0, Instant::now());
        while started.elapsed() < Duration::from_millis(1500) {
            match ws.read() {
                Ok(tungstenite::Message::Ping(_)) => pings += 1,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Relaxed);
        thread.join().unwrap();
        // ~15 at 100 ms; far fewer means no timer, far more a storm.
        assert!((3..=30).contains(&pings), "{pings} client pings in 1.5 s");
    }

    /// Closes `ws` with `code`, then waits (up to 10 s) for the agent's
    /// next connection on `listener`: how long after the close it came.
    fn close_then_time_reconnect(
        listener: &TcpListener,
        ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
        code: u16,
        reason: &str,
    ) -> Option<Duration> {
        ws.close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::from(code),
            reason: reason.to_string().into(),
        }))
        .unwrap();
        let closed = Instant::now();
        let _ = ws.flush();
        listener.set_nonblocking(true).unwrap();
        let deadline = closed + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok(_) => return Some(closed.elapsed()),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return None,
            }
        }
    }

    /// A 1013 whose reason names a wait ("retry after 1s", as the
    /// controller's identity-conflict refusal says) holds the reconnect
    /// back at least that long, though the backoff alone would retry at
    /// once (50 ms here).
    #[test]
    fn a_retry_hint_in_a_1013_holds_the_reconnect_back() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (thread, stats, stop) = start(listener.local_addr().unwrap(), |_| {});
        let (socket, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(socket).expect("the agent's upgrade");
        // Its register, then the refusal's close.
        let _ = ws.read().expect("a register");
        let again = close_then_time_reconnect(
            &listener,
            &mut ws,
            1013,
            "identity conflict; retry after 1s",
        );
        stop.store(true, Relaxed);
        thread.join().unwrap();
        let again = again.expect("it reconnects after the wait");
        assert!(
            again >= Duration::from_secs(1),
            "reconnected after {again:?}"
        );
        assert_eq!(stats.closed_by_controller.load(Relaxed), 1);
    }

    /// A drain's `reconnectWindowMs` spreads the first reconnect over that
    /// window (exactly the window here: the test's backoff has no jitter),
    /// though the backoff alone would retry after 50 ms.
    #[test]
    fn a_drain_s_reconnect_window_holds_the_first_reconnect_back() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (thread, _stats, stop) = start(listener.local_addr().unwrap(), |_| {});
        let (socket, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(socket).expect("the agent's upgrade");
        let _ = ws.read().expect("a register");
        ws.send(tungstenite::Message::text(
            r#"{"jsonrpc":"2.0","method":"session/draining","params":{"deadlineMs":0,"reason":"test","reconnectWindowMs":1500}}"#,
        ))
        .unwrap();
        let again = close_then_time_reconnect(&listener, &mut ws, 1001, "draining");
        stop.store(true, Relaxed);
        thread.join().unwrap();
        let again = again.expect("it reconnects after the window");
        assert!(
            (Duration::from_millis(1400)..Duration::from_secs(5)).contains(&again),
            "reconnected after {again:?}"
        );
    }

    /// Records the size of every notification a session hears.
    struct Sizes(std::sync::mpsc::Sender<usize>);

    impl Observer for Sizes {
        fn event(&mut self, _: usize, event: &SessionEvent) {
            if let SessionEvent::Notification { params, .. } = event {
                let _ = self.0.send(params.as_str().map_or(0, str::len));
            }
        }
    }

    /// A message of many reads (3 MiB, more than one read budget of 16
    /// reads of 64 KiB) arrives whole, across turns. Whether a budget runs
    /// out with bytes left depends on how fast they arrive, so this does
    /// not force the read-again path; it guards delivery around it.
    #[test]
    fn a_message_of_many_reads_arrives_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (thread, _stats, stop) =
            start_observed(listener.local_addr().unwrap(), |_| {}, Sizes(tx));
        let (socket, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(socket).expect("the agent's upgrade");
        let big = "x".repeat(3 << 20);
        let message = serde_json::json!({"jsonrpc": "2.0", "method": "big", "params": big});
        ws.send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10));
        stop.store(true, Relaxed);
        thread.join().unwrap();
        assert_eq!(got, Ok(3 << 20), "the 3 MiB message did not arrive whole");
    }
}
