//! One shard: a thread with its own fd table, an event loop, a slab of
//! connections and a timer wheel. Nothing here is shared with other
//! shards except the mailboxes (to receive), the counters (to write) and
//! the stop flag.
//!
//! The core is driver-agnostic: it takes received bytes (`feed`), feeds the
//! connection state machine, hands messages to the handler, writes what it
//! produced, carries out its actions, and on each tick fires the wheel's
//! deadlines (handshake, admit, ping, pong, linger) and calls `on_tick`.
//! Two event loops drive it: epoll (readiness: accept and recv here, into
//! one scratch buffer) and io_uring (completions: multishot accept into
//! direct descriptors, multishot recv from provided buffers, sends in
//! flight one per connection).
//!
//! Never does: block, allocate per idle connection, or read more than a
//! bounded amount from one connection before serving the others.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use slab::Slab;

use super::conn::{Conn, Due, Event, Fed, Flow, Phase, Timing, Violation};
use super::epoll::{EDGE, Epoll, HANGUP, READABLE, WRITABLE};
use super::mailbox::Mailbox;
use super::uring::{Completion, Op, SendDone, Uring};
use super::wheel::{Link, Links, Tick, Wheel};
use super::{
    Action, Actions, CloseCause, ConnRef, Cx, EngineConfig, Handler, IoDriver, OVER_CAP_GRACE,
    ShardId, sys, ws,
};
use crate::metrics::{self, BadInput, ShardStats};

/// The epoll driver's read buffer: every connection reads into it.
const SCRATCH: usize = 64 << 10;
/// Reads from one connection per readiness event before the others' turn.
const READ_BUDGET: usize = 16;
/// Accepts per listener event before the others' turn.
const ACCEPT_BUDGET: usize = 512;
const EVENTS: usize = 1024;
const LISTENER: u64 = u64::MAX;
const MAILBOX: u64 = u64::MAX - 1;
/// Direct-descriptor slots beyond the connection bound, for sockets whose
/// close is still in flight.
const SLOT_SLACK: usize = 32;

pub(super) struct Setup<M: Send + 'static> {
    pub id: ShardId,
    pub listener: RawFd,
    /// Fds this shard's table keeps besides stdio; the rest are closed.
    pub keep: Vec<RawFd>,
    pub config: Arc<EngineConfig>,
    pub mailboxes: Arc<[Mailbox<M>]>,
    pub stats: Arc<[ShardStats]>,
    pub stop: Arc<AtomicBool>,
    pub epoch: Instant,
    pub io: IoDriver,
}

fn token(key: u32, generation: u32) -> u64 {
    (generation as u64) << 32 | key as u64
}

/// Takes this thread's own fd table and keeps only the fds named in `keep`
/// (plus stdio): copies of other threads' sockets would otherwise stay open
/// here and keep those sockets alive after their owners close them.
fn own_fd_table(keep: &[RawFd]) -> std::io::Result<()> {
    sys::unshare_fd_table()?;
    for fd in sys::open_fds()? {
        if fd > 2 && !keep.contains(&fd) {
            sys::close(fd);
        }
    }
    Ok(())
}

/// The epoll driver's state.
struct EpollIo {
    epoll: Epoll,
    scratch: Box<[u8]>,
    /// Connections whose read budget ran out with data possibly left.
    resume: Vec<u64>,
    resume_next: Vec<u64>,
    /// Accept again before waiting (budget spent, or room freed).
    accept_now: bool,
}

/// The io_uring driver's state.
struct UringIo {
    ring: Uring,
    /// After an accept error, accept again no sooner than this tick.
    accept_retry: Tick,
    /// Receives that ended (no buffer was free) and must be armed again.
    rearm: Vec<(u32, u32)>,
    completions: Vec<Completion>,
}

// One per shard, and reached on every operation: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Io {
    Epoll(EpollIo),
    Uring(UringIo),
}

fn prepare(setup: &Setup<impl Send>) -> std::io::Result<Io> {
    own_fd_table(&setup.keep)?;
    let index = setup.id.0 as usize;
    let wake_fd = setup.mailboxes[index].wake_fd();
    Ok(match setup.io {
        IoDriver::Epoll => {
            let epoll = Epoll::new(EVENTS)?;
            epoll.add(setup.listener, READABLE | EDGE, LISTENER)?;
            epoll.add(wake_fd, READABLE, MAILBOX)?;
            Io::Epoll(EpollIo {
                epoll,
                scratch: vec![0; SCRATCH].into_boxed_slice(),
                resume: Vec::new(),
                resume_next: Vec::new(),
                accept_now: true,
            })
        }
        IoDriver::Uring => {
            let nofile = sys::nofile_limit().unwrap_or(1024) as usize;
            let slots =
                (setup.config.max_conns_per_shard + OVER_CAP_GRACE + SLOT_SLACK).min(nofile) as u32;
            let mut ring = Uring::new(slots, setup.config.uring_recv_buffers)?;
            ring.watch(wake_fd);
            ring.accept(setup.listener);
            Io::Uring(UringIo {
                ring,
                accept_retry: 0,
                rearm: Vec::new(),
                completions: Vec::with_capacity(4096),
            })
        }
    })
}

pub(super) fn run<H: Handler>(
    setup: Setup<H::Msg>,
    handler: H,
    ready: Sender<(usize, Result<(), String>)>,
) {
    let index = setup.id.0 as usize;
    let io = match prepare(&setup) {
        Ok(io) => io,
        Err(e) => {
            let _ = ready.send((index, Err(e.to_string())));
            return;
        }
    };
    let _ = ready.send((index, Ok(())));
    drop(ready);
    let mut shard = Shard::new(setup, handler, io);
    // A shard that died would leave its sockets' instances registered and
    // its queued commands unanswered: better the whole process stops and
    // the service manager restarts it.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run()));
    if ran.is_err() {
        tracing::error!(
            shard = index,
            "shard panicked; aborting the controller so it can be restarted"
        );
        std::process::abort();
    }
}

/// Ticks from admission to a connection's first ping: a hash of its slot
/// spread over the interval (1..=interval), so a ramp of registrations
/// never turns into a burst of pings and later rounds stay spread.
pub(super) fn first_ping_offset(key: u32, generation: u32, interval: Tick) -> Tick {
    let h = (key.wrapping_mul(2_654_435_761) ^ generation.wrapping_mul(40_503))
        .wrapping_mul(2_246_822_519);
    (h >> 7) % interval.max(1) + 1
}

impl Links for Slab<Conn> {
    fn link(&mut self, key: u32) -> &mut Link {
        &mut self[key as usize].link
    }
}

struct Shard<H: Handler> {
    id: ShardId,
    config: Arc<EngineConfig>,
    timing: Timing,
    conns: Slab<Conn>,
    wheel: Wheel,
    handler: H,
    io: Io,
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
    /// Unsent output held by all of this shard's connections.
    pending_total: usize,
    next_generation: u32,
    /// At the connection bound or out of fds: accept again when room frees.
    accept_paused: bool,
    last_accept_warning: Option<Instant>,
}

impl<H: Handler> Shard<H> {
    fn new(setup: Setup<H::Msg>, handler: H, io: Io) -> Shard<H> {
        let timing = setup.config.timing();
        let now = 0;
        Shard {
            id: setup.id,
            timing,
            conns: Slab::with_capacity(setup.config.max_conns_per_shard + OVER_CAP_GRACE),
            wheel: Wheel::new(now),
            handler,
            io,
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
            pending_total: 0,
            next_generation: 1,
            accept_paused: false,
            last_accept_warning: None,
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

    fn run(&mut self) {
        match self.io {
            Io::Epoll(_) => self.run_epoll(),
            Io::Uring(_) => self.run_uring(),
        }
        self.shutdown();
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

    // -- the epoll loop ------------------------------------------------------

    fn epoll(&mut self) -> &mut EpollIo {
        match &mut self.io {
            Io::Epoll(e) => e,
            Io::Uring(_) => unreachable!("epoll loop on an io_uring shard"),
        }
    }

    fn run_epoll(&mut self) {
        let mut ready: Vec<(u32, u64)> = Vec::with_capacity(EVENTS);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self.until_next_tick();
            let e = self.epoll();
            let timeout = if e.accept_now || !e.resume.is_empty() {
                0
            } else {
                wait.as_millis().clamp(1, 1000) as i32
            };
            let waited = e.epoll.wait(timeout).map(|events| ready.extend(events));
            if let Err(err) = waited {
                tracing::error!(shard = self.id.0, "epoll_wait failed: {err}; shard stops");
                break;
            }
            self.read_clocks();
            for (events, token) in ready.drain(..) {
                match token {
                    LISTENER => self.epoll().accept_now = true,
                    MAILBOX => self.drain_mailbox(),
                    token => {
                        let (key, generation) = (token as u32, (token >> 32) as u32);
                        if events & WRITABLE != 0 && self.live(key, generation) {
                            self.flush(key);
                        }
                        if events & (READABLE | HANGUP) != 0 && self.live(key, generation) {
                            self.epoll_read(key, events & HANGUP != 0);
                        }
                    }
                }
            }
            if self.epoll().accept_now {
                self.epoll_accept();
            }
            let e = self.epoll();
            std::mem::swap(&mut e.resume, &mut e.resume_next);
            for token in std::mem::take(&mut e.resume_next) {
                if self.live(token as u32, (token >> 32) as u32) {
                    self.epoll_read(token as u32, true);
                }
            }
            self.tick();
        }
    }

    fn epoll_accept(&mut self) {
        self.epoll().accept_now = false;
        for _ in 0..ACCEPT_BUDGET {
            if self.at_accept_bound() {
                self.accept_paused = true;
                return;
            }
            match sys::accept(self.listener) {
                Ok(fd) => {
                    let _ = sys::set_nodelay(fd);
                    let Some((key, generation)) = self.adopt(fd) else {
                        sys::close(fd);
                        continue;
                    };
                    let interest = READABLE | WRITABLE | HANGUP | EDGE;
                    if let Err(e) = self.epoll().epoll.add(fd, interest, token(key, generation)) {
                        tracing::warn!(shard = self.id.0, "cannot watch an accepted socket: {e}");
                        self.drop_conn(key);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS: the backlog keeps the
                    // connections; try again when room frees or next tick.
                    self.accept_paused = true;
                    self.warn_accept(&e);
                    return;
                }
            }
        }
        self.epoll().accept_now = true;
    }

    /// Reads until the socket is drained. With `hangup` (the peer shut its
    /// side in the same edge as its last data) a short read does not prove
    /// it drained: the EOF behind the data gets no edge of its own, so read
    /// on until EOF or EAGAIN.
    fn epoll_read(&mut self, key: u32, hangup: bool) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.conns.get(key as usize) else {
                return;
            };
            let (handle, generation) = (conn.handle, conn.generation);
            let mut scratch = std::mem::take(&mut self.epoll().scratch);
            let received = sys::recv(handle, &mut scratch);
            let outcome = match received {
                Ok(0) => Err(()),
                Ok(n) => {
                    self.feed(key, &mut scratch[..n]);
                    Ok((n, scratch.len()))
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok((0, 0)),
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok((1, 0)),
                Err(_) => Err(()),
            };
            self.epoll().scratch = scratch;
            match outcome {
                Err(()) => return self.lost(key),
                Ok((0, _)) => return,
                // Otherwise a short read drained the socket, and
                // edge-triggered epoll reports anything arriving later.
                Ok((n, size)) if (n < size && !hangup) || !self.live(key, generation) => return,
                Ok(_) => {}
            }
        }
        let generation = self.conns[key as usize].generation;
        self.epoll().resume.push(token(key, generation));
    }

    // -- the io_uring loop ---------------------------------------------------

    fn uring(&mut self) -> &mut UringIo {
        match &mut self.io {
            Io::Uring(u) => u,
            Io::Epoll(_) => unreachable!("io_uring loop on an epoll shard"),
        }
    }

    fn run_uring(&mut self) {
        let mut completions = std::mem::take(&mut self.uring().completions);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = if self.uring().rearm.is_empty() {
                self.until_next_tick()
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.uring().ring.wait(wait, &mut completions) {
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) {
                    // The kernel is short of memory for requests: try again.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                // A shard that stopped would strand its connections and
                // leave its mailbox unanswered: stop the process instead.
                tracing::error!(
                    shard = self.id.0,
                    "io_uring wait failed: {e}; aborting the controller"
                );
                std::process::abort();
            }
            self.read_clocks();
            for c in completions.drain(..) {
                self.completed(c);
            }
            for (key, generation) in std::mem::take(&mut self.uring().rearm) {
                if self.live(key, generation) {
                    let slot = self.conns[key as usize].handle as u32;
                    self.uring().ring.recv(slot, key, generation);
                }
            }
            if self.accept_paused && !self.at_accept_bound() {
                self.accept_paused = false;
            }
            let (now, paused, listener) = (self.now, self.accept_paused, self.listener);
            let u = self.uring();
            if !u.ring.accept_armed() && !paused && now >= u.accept_retry {
                u.ring.accept(listener);
            }
            self.tick();
        }
        self.uring().completions = completions;
    }

    /// A 24-bit generation from a receive's user_data names this
    /// connection if the low 24 bits match.
    fn live24(&self, key: u32, generation24: u32) -> Option<u32> {
        self.conns
            .get(key as usize)
            .filter(|c| c.generation & 0xFF_FFFF == generation24)
            .map(|c| c.generation)
    }

    fn completed(&mut self, c: Completion) {
        match c.op {
            Some(Op::Accept) => {
                if c.result >= 0 {
                    let slot = c.result as u32;
                    match self.adopt(slot as RawFd) {
                        Some((key, generation)) => {
                            let ring = &mut self.uring().ring;
                            ring.nodelay(slot);
                            ring.recv(slot, key, generation);
                        }
                        None => self.uring().ring.close(slot),
                    }
                    if self.at_accept_bound() && self.uring().ring.accept_armed() {
                        // Stop taking connections: the backlog keeps them
                        // until room frees (the multishot ends on cancel).
                        self.accept_paused = true;
                        self.uring().ring.cancel_accept();
                    }
                } else if c.result != -libc::ECANCELED {
                    // ENFILE (no free slot: closes still in flight), EMFILE,
                    // ENOBUFS: the backlog keeps the connections; accept
                    // again at the next tick, not at once.
                    let next = self.now + 1;
                    self.uring().accept_retry = next;
                    self.warn_accept(&std::io::Error::from_raw_os_error(-c.result));
                }
            }
            Some(Op::Recv(key, generation24)) => {
                let live = self.live24(key, generation24);
                let mut buf = c
                    .buffer()
                    .map(|bid| self.uring().ring.received(bid, c.result.max(0) as usize));
                match (c.result, live) {
                    (n, Some(_)) if n > 0 => {
                        let data = buf
                            .as_mut()
                            .expect("a receive with data selected a buffer")
                            .data();
                        self.feed(key, data);
                    }
                    (_, None) => {}
                    (0, Some(_)) => self.lost(key),
                    (e, Some(generation)) if e == -libc::ENOBUFS => {
                        // No buffer was free: the data waits in the socket;
                        // arm again once buffers are back.
                        metrics::inc(&self.stats().recv_rearms);
                        self.uring().rearm.push((key, generation));
                    }
                    (_, Some(_)) => self.lost(key),
                }
                if let Some(buf) = buf {
                    self.uring().ring.recycle(buf);
                }
                if c.result > 0
                    && !c.more()
                    && let Some(generation) = self.live24(key, generation24)
                {
                    self.uring().rearm.push((key, generation));
                }
            }
            Some(Op::Send(index)) => {
                let sent = c.result.max(0) as usize;
                if c.result > 0 {
                    self.stats()
                        .bytes_out
                        .fetch_add(sent as u64, Ordering::Relaxed);
                }
                let (key, generation) = match self.uring().ring.send_done(index, sent) {
                    None => return,
                    Some(SendDone::Partial { key, generation }) => {
                        // Only the same connection may get the rest: a
                        // dropped one's slot may already hold a new one.
                        if self.live(key, generation) {
                            self.uring().ring.resend(index);
                        } else {
                            self.uring().ring.abandon(index);
                        }
                        return;
                    }
                    Some(SendDone::Finished { key, generation }) => (key, generation),
                };
                if !self.live(key, generation) {
                    return;
                }
                self.conns[key as usize].set_sending(false);
                if c.result < 0 {
                    self.lost(key);
                } else {
                    self.flush(key);
                    self.apply_actions();
                }
            }
            Some(Op::Mailbox) => {
                if !c.more() {
                    let fd = self.mailboxes[self.id.0 as usize].wake_fd();
                    self.uring().ring.watch(fd);
                }
                self.drain_mailbox();
            }
            Some(Op::Quiet | Op::Closed) | None => {}
        }
    }

    // -- what every driver shares --------------------------------------------

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
        let spread = first_ping_offset(key, conn.generation, interval);
        if conn.admit(self.now, spread) {
            self.relink(key);
            metrics::inc(&self.stats().open_admitted);
        }
    }

    /// Puts `key` in the wheel at the deadline its connection asks for
    /// (after every input that may have moved it; a no-op if it did not).
    fn relink(&mut self, key: u32) {
        let conn = &self.conns[key as usize];
        let due = conn.poll_deadline().max(self.wheel.now() + 1);
        if conn.link.deadline() != Some(due) {
            self.wheel.insert(&mut self.conns, key, due);
        }
    }

    /// Takes an accepted socket (an fd, or a direct-descriptor slot). `None`
    /// past the accept bound (the caller closes it).
    fn adopt(&mut self, handle: RawFd) -> Option<(u32, u32)> {
        if self.at_accept_bound() {
            self.accept_paused = true;
            return None;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let over_cap = self.conns.len() >= self.config.max_conns_per_shard;
        let mut conn = Conn::accepted(handle, generation, self.now, &self.timing);
        if over_cap {
            conn.mark_over_cap();
        }
        let key = self.conns.insert(conn) as u32;
        self.relink(key);
        let stats = self.stats();
        metrics::inc(&stats.accepted);
        metrics::inc(&stats.open_connections);
        Some((key, generation))
    }

    // -- input ---------------------------------------------------------------

    /// Feeds received bytes to connection `key` and acts on the outcome.
    fn feed(&mut self, key: u32, data: &mut [u8]) {
        let fed = self.deliver(key, data);
        self.relink(key);
        self.settle(key, fed);
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
            ..
        } = self;
        let stats = &all_stats[id.0 as usize];
        let conn = &mut conns[key as usize];
        let cref = ConnRef {
            shard: *id,
            key,
            generation: conn.generation,
        };
        let over_cap = conn.is_over_cap();
        let mut accepted = false;
        out.clear();
        let fed = conn.feed(*now, data, &config.limits, timing, out, |event, out| {
            let mut cx = Cx {
                shard: *id,
                now: *clock,
                wall_ms: *wall_ms,
                current: Some(cref),
                out: None,
                actions,
                stop_current: false,
            };
            match event {
                Event::Upgrade(_) if over_cap => {}
                Event::Upgrade(req) => match handler.on_upgrade(cref, req) {
                    Ok(()) => accepted = true,
                    Err(refusal) => {
                        stats.bad(refusal.kind);
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
                    if let Ok(sent) = <[u8; 8]>::try_from(payload) {
                        let sent_ns = u64::from_be_bytes(sent);
                        let now_ns = clock.duration_since(*epoch).as_nanos() as u64;
                        if let Some(rtt) = now_ns
                            .checked_sub(sent_ns)
                            .filter(|ns| *ns < 3_600_000_000_000)
                        {
                            stats.rtt(rtt / 1000);
                        }
                    }
                }
            }
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
    /// flight), or `Err` if the peer is gone.
    fn transmit(&mut self, key: u32, bytes: &[u8]) -> Result<usize, ()> {
        let conn = &mut self.conns[key as usize];
        match &mut self.io {
            Io::Epoll(_) => {
                let mut sent = 0;
                while sent < bytes.len() {
                    match sys::send(conn.handle, &bytes[sent..]) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return Err(()),
                    }
                }
                self.all_stats[self.id.0 as usize]
                    .bytes_out
                    .fetch_add(sent as u64, Ordering::Relaxed);
                Ok(sent)
            }
            Io::Uring(u) => {
                // One send in flight per connection keeps its bytes in order.
                if conn.is_sending() || bytes.is_empty() {
                    return Ok(0);
                }
                u.ring.send(conn.handle as u32, key, conn.generation, bytes);
                conn.set_sending(true);
                Ok(bytes.len())
            }
        }
    }

    /// Sends `bytes` or keeps what the driver will not take. Returns false
    /// if the connection is gone (it was dropped here).
    fn write(&mut self, key: u32, bytes: &[u8]) -> bool {
        if self.conns[key as usize].pending_out() > 0 {
            return self.keep_unsent(key, bytes);
        }
        match self.transmit(key, bytes) {
            Err(()) => {
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
        let conn = &mut self.conns[key as usize];
        if conn.pending_out() + bytes.len() > self.config.max_pending_out
            || self.pending_total + bytes.len() > self.config.max_pending_out_per_shard
        {
            return self.cut_slow(key);
        }
        conn.queue_out(bytes);
        self.pending_total += bytes.len();
        true
    }

    /// The socket can take more (epoll: writable; io_uring: a send
    /// completed): send what was kept, and FIN once a closing connection's
    /// last bytes are out.
    fn flush(&mut self, key: u32) {
        let pending = self.conns[key as usize].take_pending_out();
        if !pending.is_empty() {
            let sent = match self.transmit(key, &pending) {
                Ok(n) => n,
                Err(()) => {
                    self.pending_total -= pending.len();
                    return self.lost(key);
                }
            };
            self.pending_total -= sent;
            self.conns[key as usize].restore_out(pending, sent);
        }
        let conn = &self.conns[key as usize];
        if conn.pending_out() == 0 && !conn.is_sending() && conn.phase() == Phase::Closing {
            self.shutdown_write(key);
        }
    }

    fn shutdown_write(&mut self, key: u32) {
        let handle = self.conns[key as usize].handle;
        match &mut self.io {
            Io::Epoll(_) => sys::shutdown_write(handle),
            Io::Uring(u) => u.ring.shutdown_write(handle as u32),
        }
    }

    /// Best effort, outside the ordered stream (a last close frame to a
    /// peer we are dropping); skipped if a frame is half sent.
    fn send_last(&mut self, key: u32, bytes: &[u8]) {
        let conn = &self.conns[key as usize];
        if conn.pending_out() > 0 || conn.is_sending() {
            return;
        }
        let (handle, generation) = (conn.handle, conn.generation);
        match &mut self.io {
            Io::Epoll(_) => {
                let _ = sys::send(handle, bytes);
            }
            Io::Uring(u) => u.ring.send(handle as u32, key, generation, bytes),
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
        let conn = &mut self.conns[key as usize];
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
        let conn = &mut self.conns[key as usize];
        conn.start_closing(self.now, &self.timing);
        let idle = conn.pending_out() == 0 && !conn.is_sending();
        self.relink(key);
        if idle {
            // Nothing more will be sent: FIN now (else when `flush` drains).
            self.shutdown_write(key);
        }
    }

    fn drop_conn(&mut self, key: u32) {
        self.wheel.cancel(&mut self.conns, key);
        let conn = self.conns.remove(key as usize);
        debug_assert!(!conn.is_live(), "handler must hear of the end first");
        self.pending_total -= conn.pending_out();
        match &mut self.io {
            Io::Epoll(_) => sys::close(conn.handle),
            // A receive or send still in flight completes on its own (as
            // stale, by generation); the slot frees when the close is done.
            Io::Uring(u) => u.ring.close(conn.handle as u32),
        }
        let stats = &self.all_stats[self.id.0 as usize];
        metrics::dec(&stats.open_connections);
        if conn.was_admitted() {
            metrics::dec(&stats.open_admitted);
        }
        if self.accept_paused && !self.at_accept_bound() {
            self.accept_paused = false;
            if let Io::Epoll(e) = &mut self.io {
                e.accept_now = true;
            }
        }
    }

    // -- time ----------------------------------------------------------------

    fn tick(&mut self) {
        let now = self.tick_of(self.clock);
        if now <= self.now {
            return;
        }
        self.now = now;
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
        if self.accept_paused && !self.at_accept_bound() {
            self.accept_paused = false;
            if let Io::Epoll(e) = &mut self.io {
                e.accept_now = true;
            }
        }
    }

    fn deadline(&mut self, key: u32) {
        let due = self.conns[key as usize].on_deadline(self.now, &self.timing);
        self.relink(key);
        match due {
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
                let mut frame = [0u8; 10];
                frame[0] = 0x80 | ws::OpCode::Ping as u8;
                frame[1] = 8;
                frame[2..].copy_from_slice(&sent_ns.to_be_bytes());
                if self.write(key, &frame) {
                    metrics::inc(&self.stats().pings_sent);
                }
            }
            Due::Alive => {
                let cref = self.cref(key);
                self.call(|h, cx| h.on_alive(cx, cref));
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
        }
    }

    /// Stop: every connection is told 1001 (going away) and released.
    fn shutdown(&mut self) {
        if let Io::Uring(u) = &mut self.io
            && u.ring.accept_armed()
        {
            // No new connections while we close the ones we have.
            u.ring.cancel_accept();
        }
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
        if let Io::Uring(u) = &mut self.io {
            // Wait (bounded) until nothing of ours is left in the kernel:
            // the last frames out, every slot closed, every receive ended.
            // Past the bound the ring keeps its buffers mapped on drop.
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut completions = Vec::new();
            while !u.ring.quiescent() && Instant::now() < deadline {
                completions.clear();
                if u.ring
                    .wait(Duration::from_millis(10), &mut completions)
                    .is_err()
                {
                    break;
                }
                for c in &completions {
                    match c.op {
                        Some(Op::Send(index)) => {
                            let done = u.ring.send_done(index, c.result.max(0) as usize);
                            if let Some(SendDone::Partial { .. }) = done {
                                u.ring.resend(index);
                            }
                        }
                        Some(Op::Recv(..)) => {
                            if let Some(bid) = c.buffer() {
                                let buf = u.ring.received(bid, c.result.max(0) as usize);
                                u.ring.recycle(buf);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        sys::close(self.listener);
        // Messages posted before the stop still get their answer (commands
        // find their instance gone), so no caller waits forever.
        self.drain_mailbox();
    }
}

#[cfg(test)]
mod tests {
    use super::first_ping_offset;

    #[test]
    fn first_pings_spread_evenly_over_the_interval() {
        // 30 s at 100 ms ticks; consecutive slots, as a ramp fills them.
        let interval = 300;
        let mut buckets = [0u32; 10];
        for key in 0..30_000u32 {
            let offset = first_ping_offset(key, key / 7 + 1, interval);
            assert!((1..=interval).contains(&offset));
            buckets[((offset - 1) * 10 / interval) as usize] += 1;
        }
        for count in buckets {
            assert!((2_700..=3_300).contains(&count), "{buckets:?}");
        }
    }
}
