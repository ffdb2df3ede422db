//! The client event loop: one thread, its own fd table, an epoll set, and
//! any number of service sessions, each reconnecting on its own with
//! backoff. The swarm runs several workers; the SDK runs one with one
//! session and a control mailbox.
//!
//! Bounded: connects per second (so a ramp does not overflow the
//! controller's listen queue), unsent output per session, requests waiting
//! per session. Every worker stops at its deadline or its stop flag.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::session::{Phase, Session, SessionEvent};
use super::{Backoff, ControllerUrl, ServiceSpec, Tools};
use crate::engine::epoll::{EDGE, Epoll, HANGUP, READABLE, WRITABLE};
use crate::engine::mailbox::Mailbox;
use crate::engine::{io, sys};
use crate::metrics::{dec, inc};

const MAX_UNSENT: usize = 32 << 20;
const CONTROL: u64 = u64::MAX;
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
}

#[derive(Clone)]
pub struct WorkerConfig {
    pub controller: ControllerUrl,
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
    /// A reconnect timer is pending for this slot.
    reconnect_scheduled: bool,
    /// The probe in flight: its request id and when it left.
    probing: Option<(u64, Instant)>,
}

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Reconnect,
    RegisterTimeout,
    ClientPing,
    Probe,
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
    timers: BinaryHeap<Reverse<(Instant, usize, u32, Timer)>>,
    connect_queue: VecDeque<usize>,
    tokens: f64,
    last_refill: Instant,
    scratch: Vec<u8>,
    out: Vec<u8>,
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
                reconnect_scheduled: false,
                probing: None,
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
            timers: BinaryHeap::new(),
            scratch: vec![0; 64 << 10],
            out: Vec::new(),
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
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse((at, ..))| at.saturating_duration_since(now));
            let mut wait = next_timer
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_millis(100));
            if !self.connect_queue.is_empty() {
                wait = wait.min(Duration::from_millis(5));
            }
            match self.epoll.wait(wait.as_millis().max(1) as i32) {
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

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, slot, generation, timer))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let s = &self.slots[slot];
            match timer {
                Timer::Reconnect if s.state == State::Waiting && s.reconnect_scheduled => {
                    self.slots[slot].reconnect_scheduled = false;
                    // Not paced: each simulated service backs off on its
                    // own, as real ones do (the pacing is the first ramp's).
                    self.connect(slot);
                }
                Timer::RegisterTimeout
                    if s.generation == generation && s.state == State::Open && !s.registered =>
                {
                    self.fail(slot)
                }
                Timer::Probe
                    if s.generation == generation && s.state == State::Open && s.registered =>
                {
                    if let Some(probe) = self.config.probe.clone() {
                        if self.slots[slot].probing.is_none() {
                            let mut out = std::mem::take(&mut self.out);
                            out.clear();
                            let filter = serde_json::json!({"serviceId": PROBE_SERVICE});
                            if let Some(id) = self.slots[slot].session.request(
                                "discovery/lookup",
                                filter,
                                &mut out,
                            ) {
                                self.slots[slot].probing = Some((id, now));
                            }
                            self.send(slot, &out);
                            self.out = out;
                        }
                        self.timers.push(Reverse((
                            now + probe.every,
                            slot,
                            generation,
                            Timer::Probe,
                        )));
                    }
                }
                Timer::ClientPing if s.generation == generation && s.state == State::Open => {
                    let mut out = std::mem::take(&mut self.out);
                    out.clear();
                    self.slots[slot].session.ping(&mut out);
                    self.send(slot, &out);
                    self.out = out;
                    if let Some(every) = self.config.client_ping {
                        self.timers.push(Reverse((
                            now + every,
                            slot,
                            generation,
                            Timer::ClientPing,
                        )));
                    }
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self, slot: usize) {
        if self.slots[slot].fd >= 0 {
            return;
        }
        inc(&self.stats.connect_attempts);
        let addr = self.config.controller.addr;
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
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let url = &self.config.controller;
        self.slots[slot].session.start(
            &url.host,
            &url.path,
            self.config.authorization.as_deref(),
            &mut out,
        );
        self.send(slot, &out);
        self.out = out;
        self.timers.push(Reverse((
            now + self.config.register_timeout,
            slot,
            generation,
            Timer::RegisterTimeout,
        )));
        if let Some(every) = self.config.client_ping {
            self.timers
                .push(Reverse((now + every, slot, generation, Timer::ClientPing)));
        }
        // Data may already be waiting; edge-triggered epoll will not repeat it.
        self.read(slot, true);
    }

    /// Reads until drained; with `hangup`, until EOF or EAGAIN (a short
    /// read does not prove the EOF behind it was seen).
    fn read(&mut self, slot: usize, hangup: bool) {
        loop {
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
                    let s = &mut self.slots[slot];
                    s.session
                        .on_input(&self.scratch[..n], &*self.tools, &mut out, &mut events);
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
    }

    fn on_event(&mut self, slot: usize, event: SessionEvent) {
        self.observer.event(slot, &event);
        match event {
            SessionEvent::Registered(_) => {
                self.slots[slot].registered = true;
                self.slots[slot].probing = None;
                inc(&self.stats.registered);
                inc(&self.stats.registrations);
                if let Some(probe) = &self.config.probe
                    && (self.first_index + slot).is_multiple_of(probe.one_in.max(1))
                {
                    // Spread the first probes over the period.
                    let first = probe.every.mul_f64(fastrand::f64());
                    let generation = self.slots[slot].generation;
                    self.timers.push(Reverse((
                        Instant::now() + first,
                        slot,
                        generation,
                        Timer::Probe,
                    )));
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
                self.fail(slot);
            }
            SessionEvent::Closed { code, .. } => {
                if code.is_some() {
                    inc(&self.stats.closed_by_controller);
                }
                self.fail(slot);
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
                    let _ = tx.try_send(outcome.is_ok());
                    if self.slots[slot].registered {
                        self.slots[slot].registered = false;
                        dec(&self.stats.registered);
                    }
                }
            }
            SessionEvent::Notification { .. } => {}
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

    /// Sends or keeps what the socket will not take.
    fn send(&mut self, slot: usize, bytes: &[u8]) {
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
        self.replies.retain(|(i, _), _| *i != slot);
        self.deregistering.retain(|(i, _), _| *i != slot);
    }

    /// The connection failed or ended: reconnect after the backoff.
    fn fail(&mut self, slot: usize) {
        self.disconnect(slot);
        self.schedule_reconnect(slot);
    }

    /// Schedules one reconnect (a second request while one is pending is
    /// ignored, so a failure reported twice backs off once).
    fn schedule_reconnect(&mut self, slot: usize) {
        let now = Instant::now();
        let s = &mut self.slots[slot];
        if s.reconnect_scheduled {
            return;
        }
        s.reconnect_scheduled = true;
        if now.duration_since(s.opened_at) > STABLE_AFTER {
            s.attempts = 0;
        }
        let delay = self.config.backoff.delay(s.attempts);
        s.attempts = s.attempts.saturating_add(1);
        s.state = State::Waiting;
        self.timers
            .push(Reverse((now + delay, slot, s.generation, Timer::Reconnect)));
    }
}
