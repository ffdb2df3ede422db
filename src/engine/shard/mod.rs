//! One shard: a thread with its own fd table, an event loop, a slab of
//! connections and a timer wheel. Nothing here is shared with other
//! shards except the mailboxes (to receive), the counters (to write) and
//! the stop flag.
//!
//! This file is the driver-agnostic core: it takes received bytes
//! (`feed`: `deliver` them to the connection machine and the handler, then
//! `settle` the outcome), writes what they produced, carries out the
//! handler's actions, re-links each connection in the wheel at the
//! deadline it asks for, and on each tick fires the wheel's deadlines
//! (handshake, admit, ping, pong, linger) and calls `on_tick`. It reaches
//! sockets only through a `Driver`. Two event loops drive it, each in a
//! file of its own: `epoll_loop` (readiness: accept and recv there, into
//! one scratch buffer) and `uring_loop` (completions: one-shot accepts
//! kept armed into direct descriptors, each telling its peer; multishot
//! recv from provided buffers; sends in flight one per connection).
//!
//! TLS (`super::tls`, when the listener has it) sits between a driver's
//! bytes and `deliver` on the way in (`feed`), and between `write` and
//! `Driver::transmit` on the way out; the connection machine and the
//! handler never see ciphertext. A connection's session lives beside it
//! (`sessions`, by key): its handshake, then only its keys.
//!
//! Never does: block, allocate per idle connection, or read more than a
//! bounded amount from one connection before serving the others.

mod epoll_loop;
mod uring_loop;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use slab::Slab;

use super::admission::{self, Refused, Sources};
use super::conn::{Conn, Due, Event, Fed, Flow, Phase, Timing, Violation};
use super::mailbox::Mailbox;
use super::wheel::{Link, Links, Tick, Wheel};
use super::{
    Action, Actions, CloseCause, ConnRef, Cx, EngineConfig, Handler, IoDriver, OVER_CAP_GRACE,
    Peer, ShardId, io, sys, ws,
};
use crate::metrics::{self, BadInput, ShardStats};
use epoll_loop::EpollIo;
use uring_loop::UringIo;

/// A dropped connection that held this much makes the shard hand freed
/// memory back to the OS at its next tick (after an attack's cuts, RSS
/// falls back instead of staying at its peak).
const COLLECT_AFTER: usize = 1 << 20;
/// About what one TLS handshake's rustls state held (freed when it ends).
const HANDSHAKE_STATE: usize = 4 << 10;
const COLLECT_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Setup<M: Send + 'static> {
    pub id: ShardId,
    pub listener: RawFd,
    /// Fds this shard's table keeps besides stdio; the rest are closed.
    pub keep: Vec<RawFd>,
    pub config: Arc<EngineConfig>,
    pub mailboxes: Arc<[Mailbox<M>]>,
    pub stats: Arc<[ShardStats]>,
    pub stop: Arc<AtomicBool>,
    /// Per-source counts, shared by the shards (none without limits).
    pub sources: Option<Arc<Sources>>,
    pub epoch: Instant,
    pub io: IoDriver,
}

/// What the core needs of an I/O driver: to hand bytes to a socket, to end
/// one, and to hear that there is room to accept again. The event loops
/// feed the core from the other side (`feed`, `lost`, `flush`, `tick`).
pub(super) trait Driver {
    /// Takes `bytes` for the socket: how many it took (sent, or handed to a
    /// send in flight), or `Gone` if the peer is.
    fn transmit(
        &mut self,
        conn: &mut Conn,
        key: u32,
        bytes: &[u8],
        stats: &ShardStats,
    ) -> Result<usize, io::Gone>;
    /// Best effort, outside the ordered stream (a last close frame).
    fn send_last(&mut self, conn: &Conn, key: u32, bytes: &[u8]);
    fn shutdown_write(&mut self, handle: RawFd);
    fn close(&mut self, handle: RawFd);
    /// The connection bound has room again.
    fn resume_accept(&mut self);
    /// The socket's peer address (a system call; asked only by a handler
    /// that needs it).
    fn peer_addr(&mut self, handle: RawFd) -> Option<SocketAddr>;
    /// Bytes held by sends in flight, all connections together.
    fn in_flight(&self) -> usize;
    /// The most one connection's send in flight holds.
    fn in_flight_bound(&self) -> usize;
}

pub(super) fn run<H: Handler>(setup: Setup<H::Msg>, handler: H, ready: io::Ready) {
    if let Err(e) = io::own_fd_table(&setup.keep) {
        return ready.fail(e);
    }
    match setup.io {
        IoDriver::Epoll => ready.then_run(EpollIo::new(&setup), |driver| {
            guarded(Shard::new(setup, handler, driver), Shard::run_epoll)
        }),
        IoDriver::Uring => ready.then_run(UringIo::new(&setup), |driver| {
            guarded(Shard::new(setup, handler, driver), Shard::run_uring)
        }),
    }
}

/// Runs a shard's loop. A shard that died would leave its sockets'
/// instances registered and its queued commands unanswered: better the
/// whole process stops and the service manager restarts it.
fn guarded<H: Handler, D: Driver>(mut shard: Shard<H, D>, run: fn(&mut Shard<H, D>)) {
    let index = shard.id.0;
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut shard)));
    if ran.is_err() {
        tracing::error!(
            shard = index,
            "shard panicked; aborting the controller so it can be restarted"
        );
        std::process::abort();
    }
}

/// Consecutive slots that share a ping phase.
const PING_BLOCK: u32 = 32;

/// Ticks from admission (at `now`) to a connection's first ping, in
/// 1..=interval. Slots come in blocks of `PING_BLOCK` that share a phase
/// of the interval, whenever each was admitted, and the blocks' phases
/// spread evenly over it (a Weyl sequence): a ramp of registrations never
/// turns into a burst of pings, and each tick's pings go to neighbouring
/// slots. Those were mostly accepted one after the other, so their kernel
/// sockets, fds and slab entries sit side by side on both ends: a tick's
/// pings then share cache lines instead of each missing on its own (at
/// 100,000 services with a hash of the slot, the controller's send and
/// receive paths cost ~20 % more than the same syscalls in key order).
pub(super) fn first_ping_offset(key: u32, now: Tick, interval: Tick) -> Tick {
    let interval = interval.max(1) as u64;
    let block = (key / PING_BLOCK) as u64;
    let fraction = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let phase = (fraction * interval) >> 32;
    let offset = (phase + interval - now as u64 % interval) % interval;
    if offset == 0 {
        interval as Tick
    } else {
        offset as Tick
    }
}

/// What a ping carries, so that only its own echo times a round trip: the
/// shard clock's nanoseconds at sending, and a tag keyed by a secret of the
/// shard over those nanoseconds and the connection. A pong with any other
/// payload (the peer's own pings' answers, or one crafted to skew the RTT
/// histogram) is counted but not timed; one older than the pong timeout
/// (a replay of an earlier echo) neither.
pub(super) struct PingStamp {
    secret: std::hash::RandomState,
}

/// Bytes of a ping's payload: nanoseconds, then the tag.
pub(super) const PING_PAYLOAD: usize = 16;

impl PingStamp {
    pub(super) fn new() -> PingStamp {
        PingStamp {
            secret: std::hash::RandomState::new(),
        }
    }

    fn tag(&self, sent_ns: u64, key: u32, generation: u32) -> u64 {
        use std::hash::BuildHasher;
        self.secret.hash_one((sent_ns, key, generation))
    }

    pub(super) fn payload(&self, sent_ns: u64, key: u32, generation: u32) -> [u8; PING_PAYLOAD] {
        let mut p = [0u8; PING_PAYLOAD];
        p[..8].copy_from_slice(&sent_ns.to_be_bytes());
        p[8..].copy_from_slice(&self.tag(sent_ns, key, generation).to_be_bytes());
        p
    }

    /// The round trip a pong's payload times, if it is the echo of a ping
    /// this shard sent to this connection within `max`.
    pub(super) fn round_trip(
        &self,
        payload: &[u8],
        key: u32,
        generation: u32,
        now: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let p = <[u8; PING_PAYLOAD]>::try_from(payload).ok()?;
        let sent_ns = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
        let tag = u64::from_be_bytes(p[8..].try_into().expect("8 bytes"));
        if tag != self.tag(sent_ns, key, generation) {
            return None;
        }
        let rtt = Duration::from_nanos((now.as_nanos() as u64).checked_sub(sent_ns)?);
        (rtt <= max).then_some(rtt)
    }
}

impl Links for Slab<Conn> {
    fn link(&mut self, key: u32) -> &mut Link {
        &mut self[key as usize].link
    }
}

struct Shard<H: Handler, D: Driver> {
    id: ShardId,
    config: Arc<EngineConfig>,
    timing: Timing,
    conns: Slab<Conn>,
    wheel: Wheel,
    handler: H,
    driver: D,
    listener: RawFd,
    mailboxes: Arc<[Mailbox<H::Msg>]>,
    all_stats: Arc<[ShardStats]>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    now: Tick,
    clock: Instant,
    /// The wall clock read with `clock`, in ms since the Unix epoch.
    wall_ms: u64,
    /// Frames for the connection being fed.
    out: Vec<u8>,
    actions: Actions,
    expired: Vec<u32>,
    inbox: VecDeque<H::Msg>,
    /// Heap bytes this shard's connections hold for input and for output
    /// (allocated sizes; the sends in flight are the driver's to count).
    held_in: usize,
    held_out: usize,
    /// This shard's slice of the buffer budget.
    budget: usize,
    /// Connections not admitted yet, oldest first (entries of connections
    /// admitted or gone since are skipped, and pruned), and their number.
    unadmitted: VecDeque<(u32, u32, Tick)>,
    unadmitted_count: usize,
    /// How long this shard's clients take from accept to admission: how old
    /// a connection not admitted yet must be before it can be evicted.
    pace: admission::Pace,
    /// Per-source counts shared with the other shards, if limits are set.
    sources: Option<Arc<Sources>>,
    /// The peer of each connection in its handshake (and of every one when
    /// connections per source are counted), from accept: its source's key
    /// to release, and `Cx::peer_addr`'s answer without a system call.
    peers: hashbrown::HashMap<u32, SocketAddr>,
    /// A connection that held much was dropped: give freed memory back to
    /// the OS at the next tick.
    collect_freed: bool,
    collected_at: Tick,
    /// `make_room` is running (a cut's handler may write, and come back).
    making_room: bool,
    next_generation: u32,
    /// At the connection bound or out of fds: accept again when room frees.
    accept_paused: bool,
    last_accept_warning: Option<Instant>,
    stamp: PingStamp,
    /// Each connection's TLS session, by key (empty without TLS, which is
    /// `config.tls`).
    sessions: Vec<Option<super::tls::Session>>,
    /// Partial TLS input the sessions hold (in `held`).
    held_tls: usize,
    /// Scratch: plaintext opened from records, records to send.
    tls_plain: Vec<u8>,
    tls_wire: Vec<u8>,
    tls_sealed: Vec<u8>,
    /// TLS handshakes finished since the last collect: each freed its
    /// rustls state (a few KiB), which a ramp leaves scattered.
    handshakes_freed: usize,
}

impl<H: Handler, D: Driver> Shard<H, D> {
    fn new(setup: Setup<H::Msg>, handler: H, driver: D) -> Shard<H, D> {
        let timing = setup.config.timing();
        let now = 0;
        Shard {
            id: setup.id,
            timing,
            conns: Slab::with_capacity(setup.config.max_conns_per_shard + OVER_CAP_GRACE),
            wheel: Wheel::new(now),
            handler,
            driver,
            listener: setup.listener,
            mailboxes: setup.mailboxes,
            all_stats: setup.stats,
            stop: setup.stop,
            epoch: setup.epoch,
            now,
            clock: Instant::now(),
            wall_ms: super::wall_clock_ms(),
            out: Vec::with_capacity(4096),
            actions: Actions::default(),
            expired: Vec::new(),
            inbox: VecDeque::new(),
            held_in: 0,
            held_out: 0,
            unadmitted: VecDeque::new(),
            unadmitted_count: 0,
            pace: admission::Pace::new(setup.config.timing().admit),
            making_room: false,
            collect_freed: false,
            collected_at: 0,
            sources: setup.sources.clone(),
            peers: hashbrown::HashMap::new(),
            budget: (setup.config.buffer_budget / setup.config.shards.max(1)).max(1),
            next_generation: 1,
            accept_paused: false,
            last_accept_warning: None,
            stamp: PingStamp::new(),
            sessions: Vec::new(),
            held_tls: 0,
            tls_plain: Vec::new(),
            tls_wire: Vec::new(),
            tls_sealed: Vec::new(),
            handshakes_freed: 0,
            config: setup.config,
        }
    }

    fn stats(&self) -> &ShardStats {
        &self.all_stats[self.id.0 as usize]
    }

    fn tick_of(&self, at: Instant) -> Tick {
        (at.duration_since(self.epoch).as_nanos() / self.config.tick.as_nanos()) as Tick
    }

    /// Once per loop turn: everything this turn does is at this moment.
    fn read_clocks(&mut self) {
        self.clock = Instant::now();
        self.wall_ms = super::wall_clock_ms();
    }

    fn until_next_tick(&self) -> Duration {
        let next_tick = self.epoch + self.config.tick * (self.now + 1);
        next_tick.saturating_duration_since(Instant::now())
    }

    fn live(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }

    fn cref(&self, key: u32) -> ConnRef {
        ConnRef {
            shard: self.id,
            key,
            generation: self.conns[key as usize].generation,
        }
    }

    fn warn_accept(&mut self, e: &std::io::Error) {
        metrics::inc(&self.stats().accept_errors);
        let quiet = self
            .last_accept_warning
            .is_some_and(|t| t.elapsed().as_secs() < 10);
        if !quiet {
            self.last_accept_warning = Some(Instant::now());
            tracing::warn!(
                shard = self.id.0,
                open = self.conns.len(),
                "accept failed: {e}; pausing accepts until connections close (raise RLIMIT_NOFILE or add shards)"
            );
        }
    }

    fn at_accept_bound(&self) -> bool {
        self.conns.len() >= self.config.max_conns_per_shard + OVER_CAP_GRACE
    }

    fn drain_mailbox(&mut self) {
        let mut inbox = std::mem::take(&mut self.inbox);
        self.mailboxes[self.id.0 as usize].take_all(&mut inbox);
        for msg in inbox.drain(..) {
            self.call(|h, cx| h.on_message(cx, msg));
        }
        self.inbox = inbox;
    }

    /// Calls the handler outside of any connection's input, then carries
    /// out what it asked.
    fn call(&mut self, f: impl FnOnce(&mut H, &mut Cx<'_>)) {
        let mut cx = Cx {
            shard: self.id,
            now: self.clock,
            wall_ms: self.wall_ms,
            current: None,
            out: None,
            actions: &mut self.actions,
            stop_current: false,
            admit_current: false,
            peer: Peer::None,
        };
        f(&mut self.handler, &mut cx);
        self.apply_actions();
    }

    fn apply_actions(&mut self) {
        // Closing a connection calls `on_closed`, which may ask for more.
        while !self.actions.list.is_empty() {
            let mut actions = std::mem::take(&mut self.actions);
            for action in actions.list.drain(..) {
                match action {
                    Action::Send { conn, frame } => {
                        if self.live(conn.key, conn.generation) && conn.shard == self.id {
                            self.write(conn.key, &actions.bytes[frame]);
                        }
                    }
                    Action::Close { conn, code, reason } => {
                        if self.live(conn.key, conn.generation) && conn.shard == self.id {
                            let reason =
                                String::from_utf8_lossy(&actions.bytes[reason]).into_owned();
                            self.close(conn.key, code, &reason, CloseCause::Closed(code));
                        }
                    }
                    Action::Admit(conn) => {
                        if self.live(conn.key, conn.generation) && conn.shard == self.id {
                            self.admit(conn.key);
                        }
                    }
                }
            }
            actions.clear();
            if self.actions.list.is_empty() {
                self.actions = actions;
            }
        }
    }

    fn admit(&mut self, key: u32) {
        let interval = self.timing.ping_interval;
        let conn = &mut self.conns[key as usize];
        let spread = first_ping_offset(key, self.now, interval);
        let accepted_at = conn.accepted_at();
        if conn.admit(self.now, spread) {
            if let Some(at) = accepted_at {
                let took = self.now.saturating_sub(at).min(self.timing.admit);
                self.pace.record(self.now, took);
            }
            self.unadmitted_count -= 1;
            self.release_handshake(key);
            self.maybe_resume_accepts();
            self.relink(key);
            metrics::inc(&self.stats().open_admitted);
        }
    }

    /// `key` finished its handshake: its source counts one fewer, and
    /// forgets its peer unless connections are counted.
    fn release_handshake(&mut self, key: u32) {
        let keep = self
            .sources
            .as_ref()
            .is_some_and(|s| s.counts_connections());
        let peer = if keep {
            self.peers.get(&key).copied()
        } else {
            self.peers.remove(&key)
        };
        if let (Some(peer), Some(sources)) = (peer, &self.sources) {
            sources.admitted(admission::source_key(peer));
        }
    }

    /// The shard holds its most connections in their handshakes.
    fn handshakes_full(&self) -> bool {
        self.unadmitted_count >= self.config.max_unadmitted_per_shard
    }

    /// Drops the oldest connection not admitted yet, if it has had its
    /// chance (accepted at least `unadmitted_grace` ago): one still
    /// upgrading silently, an upgraded one with 1013. True if one went.
    /// A young one is never evicted for a newer one: in a reconnect herd
    /// that would evict every socket before it could register, so the
    /// shard stops accepting instead (the listen backlog holds the rest).
    ///
    /// Old enough means `unadmitted_grace`, or four to eight times the 95th
    /// percentile of the recent clients' time to admission if longer (at
    /// most the admit timeout; see `Pace`): in a herd on a busy network the
    /// clients answer slowly, and evicting them only makes each come back
    /// later; a slowloris's sockets still go, as those that do register
    /// keep the pace short.
    fn evict_stale_unadmitted(&mut self) -> bool {
        let least = self.config.ticks(self.config.unadmitted_grace);
        let grace = self.pace.grace(self.now, least, self.timing.admit);
        while let Some(&(key, generation, since)) = self.unadmitted.front() {
            let Some(conn) = self.conns.get(key as usize) else {
                self.unadmitted.pop_front();
                continue;
            };
            if conn.generation != generation || conn.was_admitted() || conn.is_over_cap() {
                self.unadmitted.pop_front();
                continue;
            }
            if self.now < since + grace {
                return false;
            }
            self.unadmitted.pop_front();
            metrics::inc(&self.stats().unadmitted_evicted);
            if conn.is_live() {
                let mut frame = Vec::with_capacity(64);
                let reason = "too many connections not registered yet; try again later";
                ws::encode_close(&mut frame, 1013, reason, None);
                self.notify_closed(key, CloseCause::Evicted);
                self.send_last(key, &frame);
            }
            self.drop_conn(key);
            return true;
        }
        false
    }

    /// Whether to take no new connections for now: at the connection bound,
    /// or with the most in their handshakes and none stale enough to evict.
    fn should_pause_accepts(&mut self) -> bool {
        self.at_accept_bound() || (self.handshakes_full() && !self.evict_stale_unadmitted())
    }

    /// Accepting was paused and there is room again.
    fn maybe_resume_accepts(&mut self) {
        if self.accept_paused && !self.at_accept_bound() && !self.handshakes_full() {
            self.accept_paused = false;
            self.driver.resume_accept();
        }
    }

    /// Puts `key` in the wheel no later than the deadline its connection
    /// asks for (after every input that may have moved it). A deadline that
    /// moved later stays where it is linked and comes early (`Due::Early`,
    /// linked again then): a pong moves the check 20 s on, and moving it
    /// at once would cost a cancel and an insert, three other
    /// connections' links touched, on every pong.
    fn relink(&mut self, key: u32) {
        let conn = &self.conns[key as usize];
        let due = conn.poll_deadline().max(self.wheel.now() + 1);
        if conn.link.deadline().is_none_or(|at| at > due) {
            self.wheel.insert(&mut self.conns, key, due);
        }
    }

    /// Takes an accepted socket (an fd, or a direct-descriptor slot) from
    /// `peer` (if the accept told it). `None` past the accept bound or past
    /// the peer's source limits (the caller closes it).
    fn adopt(&mut self, handle: RawFd, peer: Option<SocketAddr>) -> Option<(u32, u32)> {
        if self.at_accept_bound() {
            self.accept_paused = true;
            return None;
        }
        if let (Some(sources), Some(peer)) = (&self.sources, peer) {
            match sources.open(admission::source_key(peer)) {
                Ok(held) => {
                    let peak = &self.stats().source_handshakes_peak;
                    if u64::from(held) > peak.load(Ordering::Relaxed) {
                        peak.fetch_max(u64::from(held), Ordering::Relaxed);
                    }
                }
                Err(Refused::Handshakes) => {
                    metrics::inc(&self.stats().refused_source_handshakes);
                    return None;
                }
                Err(Refused::Connections) => {
                    metrics::inc(&self.stats().refused_source_conns);
                    return None;
                }
            }
        }
        // At the connection bound the oldest socket still upgrading or
        // registering goes first, if it has had its chance, before anyone
        // is told the shard is full. (Past the handshake bound, accepting
        // pauses: see `should_pause_accepts`.)
        if self.conns.len() >= self.config.max_conns_per_shard {
            self.evict_stale_unadmitted();
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let over_cap = self.conns.len() >= self.config.max_conns_per_shard;
        let mut conn = Conn::accepted(handle, generation, self.now, &self.timing);
        if over_cap {
            conn.mark_over_cap();
        }
        let key = self.conns.insert(conn) as u32;
        if let Some(peer) = peer {
            self.peers.insert(key, peer);
        }
        if let Some(acceptor) = &self.config.tls {
            let slot = key as usize;
            if self.sessions.len() <= slot {
                self.sessions.resize_with(slot + 1, || None);
            }
            match acceptor.session() {
                Ok(session) => self.sessions[slot] = Some(session),
                Err(e) => tracing::warn!("cannot start a TLS session: {e}"),
            }
        }
        self.relink(key);
        if !over_cap {
            self.unadmitted.push_back((key, generation, self.now));
            self.unadmitted_count += 1;
            if self.unadmitted.len() > 2 * self.unadmitted_count + 64 {
                let conns = &self.conns;
                self.unadmitted.retain(|&(k, g, _)| {
                    conns
                        .get(k as usize)
                        .is_some_and(|c| c.generation == g && !c.was_admitted())
                });
            }
        }
        let stats = self.stats();
        metrics::inc(&stats.accepted);
        metrics::inc(&stats.open_connections);
        Some((key, generation))
    }

    // -- input ---------------------------------------------------------------

    /// Feeds received bytes to connection `key` (through its TLS session,
    /// if the listener has TLS) and acts on the outcome.
    fn feed(&mut self, key: u32, data: &mut [u8]) {
        if self.config.tls.is_some() {
            return self.feed_tls(key, data);
        }
        self.feed_plain(key, data);
    }

    /// Opens TLS records: the handshake's answers go out as they are, the
    /// plaintext to `feed_plain`.
    fn feed_tls(&mut self, key: u32, data: &mut [u8]) {
        let Some(mut session) = self.sessions.get_mut(key as usize).and_then(Option::take) else {
            return self.drop_quietly(key);
        };
        let generation = self.conns[key as usize].generation;
        let before = session.held();
        let (mut plain, mut wire) = (
            std::mem::take(&mut self.tls_plain),
            std::mem::take(&mut self.tls_wire),
        );
        plain.clear();
        wire.clear();
        let read = session.read(data, &mut plain, &mut wire);
        self.held_tls = self.held_tls - before + session.held();
        self.sessions[key as usize] = Some(session);
        match read {
            Err(e) => {
                tracing::debug!(shard = self.id.0, "TLS: {e}");
                self.stats().bad(BadInput::Tls);
                // Before the upgrade the handler knows nothing of it.
                self.notify_closed(key, CloseCause::PeerGone);
                self.drop_conn(key);
            }
            Ok(read) => {
                if read.established {
                    self.handshakes_freed += 1;
                    if self.handshakes_freed * HANDSHAKE_STATE >= COLLECT_AFTER {
                        self.handshakes_freed = 0;
                        self.collect_freed = true;
                    }
                }
                let alive = wire.is_empty() || self.write_wire(key, &wire);
                if alive && !plain.is_empty() {
                    self.feed_plain(key, &mut plain);
                }
                if read.peer_closed && self.live(key, generation) {
                    self.lost(key);
                }
            }
        }
        if plain.capacity() > 1 << 20 {
            plain = Vec::new();
        }
        self.tls_plain = plain;
        self.tls_wire = wire;
    }

    /// Drops a connection that never reached the handler.
    fn drop_quietly(&mut self, key: u32) {
        self.notify_closed(key, CloseCause::PeerGone);
        self.drop_conn(key);
    }

    /// Feeds plaintext to connection `key` and acts on the outcome.
    fn feed_plain(&mut self, key: u32, data: &mut [u8]) {
        let before = self.conns[key as usize].buffered();
        let fed = self.deliver(key, data);
        self.recount(key, before);
        self.relink(key);
        self.settle(key, fed);
        // Only now, with this input's answers written and its actions
        // done, so no cut runs the handler in the middle of them.
        if self.held() > self.budget {
            self.make_room();
        }
    }

    /// Delivers bytes to the connection machine, and the events it yields
    /// to the handler. The protocol's own replies (101, pong, close echo)
    /// and the handler's frames for this connection are left in `out`.
    fn deliver(&mut self, key: u32, data: &mut [u8]) -> Fed {
        self.stats()
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let Shard {
            id,
            conns,
            handler,
            out,
            actions,
            config,
            timing,
            now,
            clock,
            wall_ms,
            epoch,
            all_stats,
            driver,
            peers,
            stamp,
            ..
        } = self;
        let stats = &all_stats[id.0 as usize];
        let conn = &mut conns[key as usize];
        let handle = conn.handle;
        let cref = ConnRef {
            shard: *id,
            key,
            generation: conn.generation,
        };
        let over_cap = conn.is_over_cap();
        let mut accepted = false;
        let mut admitted = false;
        out.clear();
        let fed = conn.feed(*now, data, &config.limits, timing, out, |event, out| {
            // The accept told the peer of a socket in its handshake.
            let mut ask = || (peers.get(&key).copied()).or_else(|| driver.peer_addr(handle));
            let mut cx = Cx {
                shard: *id,
                now: *clock,
                wall_ms: *wall_ms,
                current: Some(cref),
                out: None,
                actions,
                stop_current: false,
                admit_current: false,
                peer: Peer::Ask(&mut ask),
            };
            match event {
                Event::Upgrade(_) if over_cap => {}
                Event::Upgrade(req) => match handler.on_upgrade(cref, req) {
                    Ok(()) => accepted = true,
                    Err(refusal) => {
                        if let Some(kind) = refusal.kind {
                            stats.bad(kind);
                        }
                        ws::write_http_error(out, refusal.status, refusal.message);
                        return Flow::Stop;
                    }
                },
                Event::Open if over_cap => {
                    metrics::inc(&stats.rejected_over_cap);
                    ws::encode_close(
                        out,
                        1013,
                        "shard at its connection limit; try again later",
                        None,
                    );
                    return Flow::Stop;
                }
                Event::Open => {
                    cx.out = Some(out);
                    handler.on_open(&mut cx, cref);
                }
                Event::Text(text) => {
                    cx.out = Some(out);
                    handler.on_text(&mut cx, cref, text);
                }
                Event::Pong(payload) => {
                    metrics::inc(&stats.pongs_received);
                    let max = config.pong_timeout + config.tick;
                    let now = clock.duration_since(*epoch);
                    let rtt = stamp.round_trip(payload, key, cref.generation, now, max);
                    if let Some(rtt) = rtt {
                        stats.rtt(rtt.as_micros() as u64);
                    }
                    handler.on_alive(&mut cx, cref, rtt);
                }
            }
            admitted |= cx.admit_current;
            if cx.stop_current {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        if accepted {
            conn.set_live();
            metrics::inc(&stats.open_upgraded);
        }
        // Admitted in this input (a register): before its answers go out,
        // so they get an admitted connection's bounds.
        if admitted {
            self.admit(key);
        }
        fed
    }

    /// Acts on how a delivery ended: writes `out`, then closes, lingers or
    /// drops as the outcome asks, and carries out the handler's actions.
    fn settle(&mut self, key: u32, fed: Fed) {
        let over_cap = self.conns[key as usize].is_over_cap();
        let phase = self.conns[key as usize].phase();
        let out = std::mem::take(&mut self.out);
        let alive = out.is_empty() || self.write(key, &out);
        self.out = out;
        if alive {
            match fed {
                Fed::Open => {}
                // Refused at the upgrade, or told 1013: the answer is out.
                Fed::Stopped if phase == Phase::Handshake || over_cap => self.linger(key),
                // The handler closed it: its Close action follows.
                Fed::Stopped => {}
                Fed::PeerClosed(code) => {
                    metrics::inc(&self.stats().peer_closed);
                    self.notify_closed(key, CloseCause::PeerClosed(code));
                    let conn = &self.conns[key as usize];
                    if conn.pending_out() > 0 || conn.is_sending() {
                        // Our close echo (or what precedes it) is still on
                        // its way: let it go out, then FIN.
                        self.linger(key);
                    } else {
                        self.drop_conn(key);
                    }
                }
                Fed::Violation(v) => {
                    self.stats().bad(v.kind());
                    match v.close_code() {
                        Some(code) => self.close(key, code, &v.reason(), CloseCause::Violation(v)),
                        None => {
                            let Violation::Handshake(e) = v else {
                                unreachable!()
                            };
                            let mut answer = Vec::new();
                            ws::write_http_error(&mut answer, e.status(), &e.to_string());
                            if self.write(key, &answer) {
                                self.linger(key);
                            }
                        }
                    }
                }
            }
        }
        self.apply_actions();
    }

    /// The peer went away without a close frame.
    fn lost(&mut self, key: u32) {
        let conn = &self.conns[key as usize];
        if conn.holds_partial_input() && conn.phase() != Phase::Closing {
            self.stats().bad(BadInput::ResetMidFrame);
        }
        metrics::inc(&self.stats().peer_gone);
        self.notify_closed(key, CloseCause::PeerGone);
        self.drop_conn(key);
    }

    // -- output --------------------------------------------------------------

    /// Hands `bytes` to the driver; returns how many it took (sent, or in
    /// flight), or `Gone` if the peer is.
    fn transmit(&mut self, key: u32, bytes: &[u8]) -> Result<usize, io::Gone> {
        let stats = &self.all_stats[self.id.0 as usize];
        self.driver
            .transmit(&mut self.conns[key as usize], key, bytes, stats)
    }

    /// Sends `bytes` (sealed into TLS records first, on a TLS listener) or
    /// keeps what the driver will not take. Returns false if the
    /// connection is gone (it was dropped here).
    fn write(&mut self, key: u32, bytes: &[u8]) -> bool {
        if self.config.tls.is_none() {
            return self.write_wire(key, bytes);
        }
        // The scratch is taken, not borrowed: a write this one causes (a
        // cut's handler) gets a fresh one.
        let mut sealed = std::mem::take(&mut self.tls_sealed);
        sealed.clear();
        let session = self.sessions.get_mut(key as usize).and_then(Option::as_mut);
        let alive = if session.is_some_and(|s| s.seal(bytes, &mut sealed).is_ok()) {
            self.write_wire(key, &sealed)
        } else {
            // Nothing may go out before the handshake is done.
            self.drop_quietly(key);
            false
        };
        if sealed.capacity() <= 1 << 20 {
            self.tls_sealed = sealed;
        }
        alive
    }

    /// Sends bytes as they are (TLS records, or plaintext without TLS).
    fn write_wire(&mut self, key: u32, bytes: &[u8]) -> bool {
        if self.conns[key as usize].pending_out() > 0 {
            return self.keep_unsent(key, bytes);
        }
        match self.transmit(key, bytes) {
            Err(io::Gone) => {
                self.lost(key);
                false
            }
            Ok(taken) if taken < bytes.len() => self.keep_unsent(key, &bytes[taken..]),
            Ok(_) => true,
        }
    }

    /// Keeps output the socket would not take, within the per-connection
    /// and per-shard bounds; past either the connection is cut as too slow.
    fn keep_unsent(&mut self, key: u32, bytes: &[u8]) -> bool {
        let conn = &self.conns[key as usize];
        // Its own bound first: output for an admitted connection, all it
        // holds for one not admitted yet.
        let own = conn.pending_out() + bytes.len();
        let over = if conn.was_admitted() {
            own > self.config.max_pending_out
        } else {
            own + conn.buffered().0 + self.tls_held(key) > self.config.max_held_unadmitted
        };
        if over {
            return self.cut_slow(key);
        }
        // Queued first: a write the cuts below cause (through the handler)
        // to this same connection then goes after these bytes.
        let generation = conn.generation;
        let before = self.conns[key as usize].buffered();
        self.conns[key as usize].queue_out(bytes);
        self.recount(key, before);
        if self.held() > self.budget {
            self.make_room();
        }
        self.live(key, generation)
    }

    /// Everything this shard holds for its connections, in flight included.
    fn held(&self) -> usize {
        self.held_in + self.held_out + self.held_tls + self.driver.in_flight()
    }

    /// Received bytes connection `key`'s TLS session holds.
    fn tls_held(&self, key: u32) -> usize {
        self.sessions
            .get(key as usize)
            .and_then(Option::as_ref)
            .map_or(0, super::tls::Session::held)
    }

    /// What one connection holds (its send in flight at its bound, and its
    /// TLS session's partial input).
    fn usage(&self, key: u32, conn: &Conn) -> usize {
        let (held_in, held_out) = conn.buffered();
        let in_flight = if conn.is_sending() {
            self.driver.in_flight_bound()
        } else {
            0
        };
        held_in + held_out + in_flight + self.tls_held(key)
    }

    /// Re-counts what `key` holds after a change that began at `before`.
    fn recount(&mut self, key: u32, before: (usize, usize)) {
        let (held_in, held_out) = self.conns[key as usize].buffered();
        self.held_in = self.held_in - before.0 + held_in;
        self.held_out = self.held_out - before.1 + held_out;
    }

    /// Over the budget: cuts the connections holding the most beyond their
    /// fair share, biggest first, until the rest fits. Callers check
    /// whether the connection they were serving is still there.
    fn make_room(&mut self) {
        if self.making_room {
            return; // a cut's handler wrote, and its write came back here
        }
        self.making_room = true;
        let share = self.budget / self.conns.len().max(1);
        let mut offenders: Vec<(usize, u32, u32)> = self
            .conns
            .iter()
            .filter_map(|(key, conn)| {
                let usage = self.usage(key as u32, conn);
                (usage > share).then_some((usage, key as u32, conn.generation))
            })
            .collect();
        offenders.sort_unstable_by(|a, b| b.cmp(a));
        let mut total = self.held();
        for (usage, key, generation) in offenders {
            if total <= self.budget {
                break;
            }
            if !self.live(key, generation) {
                continue; // cut meanwhile, by a handler's reaction
            }
            metrics::inc(&self.stats().budget_cuts);
            self.notify_closed(key, CloseCause::OverBudget);
            if self.live(key, generation) {
                self.drop_conn(key);
            }
            total = total.saturating_sub(usage);
        }
        self.making_room = false;
        if total > self.budget {
            tracing::debug!(
                shard = self.id.0,
                total,
                budget = self.budget,
                "over the buffer budget with every connection within its share"
            );
        }
    }

    /// The socket can take more (epoll: writable; io_uring: a send
    /// completed): send what was kept, and FIN once a closing connection's
    /// last bytes are out.
    fn flush(&mut self, key: u32) {
        let before = self.conns[key as usize].buffered();
        let pending = self.conns[key as usize].take_pending_out();
        if !pending.is_empty() {
            let sent = match self.transmit(key, &pending) {
                Ok(n) => n,
                Err(io::Gone) => {
                    self.recount(key, before);
                    return self.lost(key);
                }
            };
            self.conns[key as usize].restore_out(pending, sent);
        }
        self.recount(key, before);
        let conn = &self.conns[key as usize];
        if conn.pending_out() == 0 && !conn.is_sending() && conn.phase() == Phase::Closing {
            self.shutdown_write(key);
        }
    }

    fn shutdown_write(&mut self, key: u32) {
        // TLS peers expect close_notify before the FIN (best effort).
        if let Some(session) = self.sessions.get_mut(key as usize).and_then(Option::as_mut)
            && session.is_open()
        {
            let mut alert = Vec::with_capacity(32);
            session.close_notify(&mut alert);
            self.driver
                .send_last(&self.conns[key as usize], key, &alert);
        }
        let handle = self.conns[key as usize].handle;
        self.driver.shutdown_write(handle);
    }

    /// Best effort, outside the ordered stream (a last close frame to a
    /// peer we are dropping); skipped if a frame is half sent.
    fn send_last(&mut self, key: u32, bytes: &[u8]) {
        let conn = &self.conns[key as usize];
        if conn.pending_out() > 0 || conn.is_sending() {
            return;
        }
        if self.config.tls.is_none() {
            return self.driver.send_last(conn, key, bytes);
        }
        let mut sealed = Vec::with_capacity(bytes.len() + 64);
        if let Some(session) = self.sessions.get_mut(key as usize).and_then(Option::as_mut)
            && session.seal(bytes, &mut sealed).is_ok()
        {
            self.driver
                .send_last(&self.conns[key as usize], key, &sealed);
        }
    }

    fn cut_slow(&mut self, key: u32) -> bool {
        metrics::inc(&self.stats().slow_consumers_cut);
        self.notify_closed(key, CloseCause::SlowConsumer);
        self.drop_conn(key);
        false
    }

    // -- closing -------------------------------------------------------------

    /// Tells the handler, once, that the connection is over for it.
    fn notify_closed(&mut self, key: u32, cause: CloseCause) {
        // Gone already (a handler's reaction to another cut took it).
        let Some(conn) = self.conns.get_mut(key as usize) else {
            return;
        };
        if !conn.take_live() {
            return;
        }
        metrics::dec(&self.stats().open_upgraded);
        let cref = self.cref(key);
        self.call(|h, cx| h.on_closed(cx, cref, cause));
    }

    /// Starts the close handshake: the handler is told, a close frame goes
    /// out, and the peer has `close_linger` to answer.
    fn close(&mut self, key: u32, code: u16, reason: &str, cause: CloseCause) {
        if !self.conns.contains(key as usize) || self.conns[key as usize].phase() == Phase::Closing
        {
            return;
        }
        let generation = self.conns[key as usize].generation;
        self.notify_closed(key, cause);
        if !self.live(key, generation) {
            return;
        }
        let mut frame = Vec::with_capacity(ws::MAX_CONTROL_PAYLOAD + 4);
        ws::encode_close(&mut frame, code, reason, None);
        if self.write(key, &frame) {
            self.linger(key);
        }
    }

    /// Our last bytes are queued: wait for the peer's close or EOF.
    fn linger(&mut self, key: u32) {
        let before = self.conns[key as usize].buffered();
        self.conns[key as usize].start_closing(self.now, &self.timing);
        self.recount(key, before);
        let conn = &self.conns[key as usize];
        let idle = conn.pending_out() == 0 && !conn.is_sending();
        self.relink(key);
        if idle {
            // Nothing more will be sent: FIN now (else when `flush` drains).
            self.shutdown_write(key);
        }
    }

    fn drop_conn(&mut self, key: u32) {
        if !self.conns.contains(key as usize) {
            return; // dropped already, by a handler's reaction to a cut
        }
        self.wheel.cancel(&mut self.conns, key);
        let conn = self.conns.remove(key as usize);
        debug_assert!(!conn.is_live(), "handler must hear of the end first");
        let (held_in, held_out) = conn.buffered();
        self.held_in -= held_in;
        self.held_out -= held_out;
        if held_in + held_out >= COLLECT_AFTER {
            self.collect_freed = true;
        }
        if !conn.was_admitted() && !conn.is_over_cap() {
            self.unadmitted_count -= 1;
        }
        if let Some(peer) = self.peers.remove(&key)
            && let Some(sources) = &self.sources
        {
            sources.closed(admission::source_key(peer), !conn.was_admitted());
        }
        if let Some(session) = self.sessions.get_mut(key as usize).and_then(Option::take) {
            self.held_tls -= session.held();
        }
        self.driver.close(conn.handle);
        let stats = &self.all_stats[self.id.0 as usize];
        metrics::dec(&stats.open_connections);
        if conn.was_admitted() {
            metrics::dec(&stats.open_admitted);
        }
        self.maybe_resume_accepts();
    }

    // -- time ----------------------------------------------------------------

    fn tick(&mut self) {
        let now = self.tick_of(self.clock);
        if now <= self.now {
            return;
        }
        self.now = now;
        // Paused on handshakes: the stale ones make room, so sockets that
        // never register cannot keep a shard from accepting.
        while self.accept_paused && self.handshakes_full() && self.evict_stale_unadmitted() {}
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(&mut self.conns, now, &mut expired);
        for &key in &expired {
            if self.conns.contains(key as usize) {
                self.deadline(key);
            }
        }
        expired.clear();
        self.expired = expired;
        self.call(|h, cx| h.on_tick(cx));
        let stats = &self.all_stats[self.id.0 as usize];
        let set = |gauge: &std::sync::atomic::AtomicU64, v: usize| {
            gauge.store(v as u64, Ordering::Relaxed);
        };
        set(&stats.held_in_bytes, self.held_in);
        set(&stats.held_out_bytes, self.held_out);
        set(&stats.in_flight_bytes, self.driver.in_flight());
        self.maybe_resume_accepts();
        // At most once a second: a peer that gets itself cut over and
        // over must not make the shard collect on every tick.
        if self.collect_freed && self.now >= self.collected_at + self.config.ticks(COLLECT_EVERY) {
            self.collect_freed = false;
            self.collected_at = self.now;
            // SAFETY: mi_collect only walks this thread's heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Debug builds, once per tick: the shard's totals and gauges agree
    /// with what its connections hold, and every connection waits in the
    /// wheel at or before the deadline it asks for (never after: a missed
    /// pong is found within a tick). O(connections).
    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        let (mut held, mut live, mut admitted) = ((0, 0), 0, 0);
        let mut unadmitted = 0;
        for (key, conn) in self.conns.iter() {
            unadmitted += (!conn.was_admitted() && !conn.is_over_cap()) as usize;
            let (held_in, held_out) = conn.buffered();
            held = (held.0 + held_in, held.1 + held_out);
            live += conn.is_live() as u64;
            admitted += conn.was_admitted() as u64;
            let linked = conn.link.deadline();
            assert!(
                linked.is_some_and(|at| at > self.now
                    && at <= conn.poll_deadline().max(self.now + 1)),
                "connection {key} ({:?}) is linked at {linked:?}, due {} (now {})",
                conn.phase(),
                conn.poll_deadline(),
                self.now
            );
            assert!(
                conn.phase() != Phase::Closing || !conn.is_live(),
                "connection {key} is closing but its handler was not told"
            );
            assert!(conn.phase() != Phase::Admitted || conn.was_admitted());
            assert!(!(conn.is_over_cap() && conn.is_live()));
        }
        assert_eq!(
            held,
            (self.held_in, self.held_out),
            "held bytes vs their totals"
        );
        assert_eq!(unadmitted, self.unadmitted_count, "unadmitted connections");
        assert_eq!(
            self.wheel.len(),
            self.conns.len(),
            "every connection has a deadline"
        );
        let stats = self.stats();
        let gauge = |g: &std::sync::atomic::AtomicU64| g.load(Ordering::Relaxed);
        assert_eq!(gauge(&stats.open_connections), self.conns.len() as u64);
        assert_eq!(gauge(&stats.open_upgraded), live, "upgraded gauge");
        assert_eq!(gauge(&stats.open_admitted), admitted, "admitted gauge");
    }

    fn deadline(&mut self, key: u32) {
        let due = self.conns[key as usize].on_deadline(self.now, &self.timing);
        self.relink(key);
        match due {
            Due::Early => {}
            Due::HandshakeTimeout => {
                self.stats().bad(BadInput::HandshakeTimeout);
                self.drop_conn(key);
            }
            Due::AdmitTimeout => {
                self.stats().bad(BadInput::RegisterTimeout);
                let reason = "service/register did not arrive in time";
                self.close(key, 1008, reason, CloseCause::AdmitTimeout);
            }
            Due::SendPing => {
                let sent_ns = self.clock.duration_since(self.epoch).as_nanos() as u64;
                let generation = self.conns[key as usize].generation;
                let mut frame = [0u8; 2 + PING_PAYLOAD];
                frame[0] = 0x80 | ws::OpCode::Ping as u8;
                frame[1] = PING_PAYLOAD as u8;
                frame[2..].copy_from_slice(&self.stamp.payload(sent_ns, key, generation));
                if self.write(key, &frame) {
                    metrics::inc(&self.stats().pings_sent);
                }
            }
            Due::SkipPing => {
                metrics::inc(&self.stats().pings_skipped);
                let cref = self.cref(key);
                self.call(|h, cx| h.on_alive(cx, cref, None));
            }
            Due::PongMissed if self.pong_deferred(key) => {
                metrics::inc(&self.stats().pongs_deferred);
            }
            Due::PongMissed => {
                metrics::inc(&self.stats().pongs_missed);
                self.notify_closed(key, CloseCause::PongMissed);
                // A frozen peer will not answer a close handshake; tell a
                // half-alive one why, then let the socket go.
                let mut frame = Vec::with_capacity(32);
                ws::encode_close(&mut frame, 1008, "no pong within pong-timeout", None);
                self.send_last(key, &frame);
                self.drop_conn(key);
            }
            Due::LingerOver => self.drop_conn(key),
            Due::MessageTimeout => {
                self.stats().bad(BadInput::MessageTimeout);
                let reason = "message not completed within the message timeout";
                self.close(key, 1008, reason, CloseCause::MessageTimeout);
            }
        }
    }

    /// Asks the handler whether a missed pong may wait; if so, moves the
    /// connection's check to the handler's deadline.
    fn pong_deferred(&mut self, key: u32) -> bool {
        let cref = self.cref(key);
        let Some(until) = self.handler.on_pong_missed(cref, self.clock) else {
            return false;
        };
        let ahead = self
            .config
            .ticks(until.saturating_duration_since(self.clock));
        let until = self.now.saturating_add(ahead);
        let deferred = self.conns[key as usize].defer_pong(until);
        if deferred {
            self.relink(key);
        }
        deferred
    }

    /// Stop: every connection is told 1001 (going away) and released.
    fn close_all(&mut self) {
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        let mut frame = Vec::new();
        ws::encode_close(&mut frame, 1001, "controller shutting down", None);
        for key in keys {
            if self.conns[key as usize].is_live() {
                self.send_last(key, &frame);
            }
            self.notify_closed(key, CloseCause::Shutdown);
            self.drop_conn(key);
        }
    }

    /// The last of a stop, once no connection is left.
    fn finish(&mut self) {
        sys::close(self.listener);
        // Messages posted before the stop still get their answer (commands
        // find their instance gone), so no caller waits forever.
        self.drain_mailbox();
    }
}

#[cfg(test)]
mod tests {
    use super::{PING_BLOCK, PING_PAYLOAD, PingStamp, first_ping_offset};
    use std::time::Duration;

    #[test]
    fn only_a_ping_s_own_echo_times_a_round_trip() {
        let stamp = PingStamp::new();
        let sent = Duration::from_secs(100);
        let max = Duration::from_secs(10);
        let payload = stamp.payload(sent.as_nanos() as u64, 7, 3);
        let now = sent + Duration::from_millis(4);
        assert_eq!(
            stamp.round_trip(&payload, 7, 3, now, max),
            Some(Duration::from_millis(4))
        );
        // Another connection (or another use of the slot) did not get it.
        assert_eq!(stamp.round_trip(&payload, 8, 3, now, max), None);
        assert_eq!(stamp.round_trip(&payload, 7, 4, now, max), None);
        // A crafted timestamp fails the tag.
        let mut forged = payload;
        forged[7] ^= 1;
        assert_eq!(stamp.round_trip(&forged, 7, 3, now, max), None);
        // The old 8-byte form, empty, or any other length: not ours.
        assert_eq!(stamp.round_trip(&payload[..8], 7, 3, now, max), None);
        assert_eq!(stamp.round_trip(&[], 7, 3, now, max), None);
        // Another shard's secret.
        assert_eq!(PingStamp::new().round_trip(&payload, 7, 3, now, max), None);
        // A replayed echo from longer ago than the pong timeout, or one
        // from the future.
        assert_eq!(stamp.round_trip(&payload, 7, 3, sent + max * 2, max), None);
        assert_eq!(stamp.round_trip(&payload, 7, 3, sent / 2, max), None);
        assert_eq!(payload.len(), PING_PAYLOAD);
    }

    #[test]
    fn first_pings_spread_evenly_over_the_interval() {
        // 30 s at 100 ms ticks; consecutive slots, as a ramp fills them.
        let interval = 300;
        for (keys, slack) in [(30_000u32, 200), (3_200, 64)] {
            let mut buckets = [0u32; 10];
            for key in 0..keys {
                let now = 1_000 + key / 50;
                let offset = first_ping_offset(key, now, interval);
                assert!((1..=interval).contains(&offset));
                let phase = (now + offset) % interval;
                buckets[(phase * 10 / interval) as usize] += 1;
            }
            let even = keys / 10;
            for count in buckets {
                assert!(count.abs_diff(even) <= slack, "{keys}: {buckets:?}");
            }
        }
    }

    #[test]
    fn a_block_of_slots_is_pinged_in_the_same_tick_whenever_admitted() {
        let interval = 300;
        let due = |key: u32, now: u32| now + first_ping_offset(key, now, interval);
        for block in [0u32, 1, 77] {
            let first = block * PING_BLOCK;
            let at = due(first, 5_000);
            for (key, now) in (first..first + PING_BLOCK)
                .zip([5_000, 5_001, 5_299, 5_300, 7_123].into_iter().cycle())
            {
                let d = due(key, now);
                assert!(d > now && d <= now + interval);
                assert_eq!(d % interval, at % interval, "key {key} admitted at {now}");
            }
        }
        // Neighbouring blocks are far apart in the interval.
        let (a, b) = (due(0, 0) % interval, due(PING_BLOCK, 0) % interval);
        assert!(a.abs_diff(b) > interval / 10, "{a} {b}");
    }
}
