//! The connection engine: shards that accept WebSocket connections, frame
//! their messages, ping them and notice when they die.
//!
//! Knows nothing of JSON or registries: it hands whole text messages to a
//! `Handler` (one per shard) and carries out what the handler asks through
//! its `Cx` (send, close, admit). Everything a connection owns is bounded
//! by `EngineConfig`.
//!
//! Layers, bottom up: `sys`, `epoll` and `uring` wrap the OS; `io` is the
//! one I/O layer every event loop uses (the shards here, the agent's
//! worker, the relay); `shard` is a driver-agnostic core with an epoll and
//! an io_uring loop; `conn` and `ws` are the sans-IO connection machine and
//! codec; `wheel` times everything.
//!
//! Invariant: each shard thread has its own fd table (`unshare(CLONE_FILES)`
//! at start), holding only its listener, the mailboxes' eventfds (created
//! before) and the sockets it accepts. Code that runs on a shard thread,
//! handlers and everything they call, must therefore never use a file
//! descriptor opened elsewhere: in a shard's table that number is closed or
//! is one of its own sockets. Signal other threads through memory (std
//! channels and mutexes wake through futexes), never through an fd (an async
//! runtime's waker, a pipe, a log file opened later).

pub mod admission;
pub mod conn;
pub mod epoll;
pub mod io;
pub mod listen;
pub mod mailbox;
mod shard;
pub mod sys;
pub mod tls;
pub mod uring;
pub mod wheel;
pub mod ws;

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use conn::{Limits, Violation};
use mailbox::{Full, Mailbox};
pub use ws::UpgradeRequest;

use crate::metrics::{BadInput, ShardStats};

/// Fds a shard keeps free beyond its connection cap: the connections it
/// accepts past the cap only to answer 1013, plus its own eventfds, epoll
/// and listener.
pub const FD_RESERVE: usize = 64;
/// How many connections past the cap may be in the middle of being told 1013.
pub const OVER_CAP_GRACE: usize = 32;

/// The I/O driver a shard runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IoDriver {
    Epoll,
    Uring,
}

impl std::fmt::Display for IoDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoDriver::Epoll => "epoll",
            IoDriver::Uring => "io_uring",
        })
    }
}

/// Which driver to use: io_uring where the kernel supports it (>= 6.0),
/// else epoll; or one forced.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IoChoice {
    Auto,
    Epoll,
    Uring,
}

impl std::str::FromStr for IoChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<IoChoice, String> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "epoll" => Ok(IoChoice::Epoll),
            "uring" | "io_uring" => Ok(IoChoice::Uring),
            other => Err(format!("--io is auto, uring or epoll, not {other:?}")),
        }
    }
}

impl IoChoice {
    /// `TETHER_IO` (auto, uring, epoll) if set, else auto: lets a test
    /// suite run once per driver.
    pub fn from_env() -> IoChoice {
        std::env::var("TETHER_IO")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(IoChoice::Auto)
    }

    /// The driver to run. Auto falls back to epoll, saying why once.
    pub fn resolve(self) -> Result<IoDriver, String> {
        match self {
            IoChoice::Epoll => Ok(IoDriver::Epoll),
            IoChoice::Uring => {
                uring::probe().map_err(|why| format!("--io uring is not available here: {why}"))?;
                Ok(IoDriver::Uring)
            }
            IoChoice::Auto => Ok(match uring::probe() {
                Ok(()) => IoDriver::Uring,
                Err(why) => {
                    tracing::info!("io_uring is not available ({why}); using epoll");
                    IoDriver::Epoll
                }
            }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub listen: SocketAddr,
    /// TLS on the listener (`wss://`): every connection's handshake first.
    pub tls: Option<Arc<tls::TlsAcceptor>>,
    pub io: IoChoice,
    pub shards: usize,
    pub max_conns_per_shard: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// The HTTP upgrade must complete within this.
    pub handshake_timeout: Duration,
    /// The handler must admit (e.g. on `service/register`) within this.
    pub admit_timeout: Duration,
    /// After we send a close frame, how long the peer has to answer.
    pub close_linger: Duration,
    pub tick: Duration,
    pub limits: Limits,
    /// Unsent output one connection may hold before it is cut as too slow.
    pub max_pending_out: usize,
    /// What a connection the handler has not admitted (no register yet)
    /// may hold in all, in and out: it needs little, so it gets little.
    pub max_held_unadmitted: usize,
    /// Buffered bytes (input being reassembled, output queued or in
    /// flight) all shards together may hold; each shard keeps an equal
    /// slice. Past its slice a shard cuts the connections holding the most
    /// beyond their fair share (slice / connections), biggest first, so a
    /// connection within its share is never cut because of others.
    pub buffer_budget: usize,
    /// A frame or fragmented message, once begun, must be whole within this.
    pub message_timeout: Duration,
    /// Connections the handler has not admitted yet (upgrade or register
    /// in progress) one shard holds at once. At it the shard stops
    /// accepting (the listen backlog holds the rest) and evicts the oldest
    /// of them once it is `unadmitted_grace` old (1013 if upgraded), as it
    /// does when a new connection finds the shard at its connection bound:
    /// half-open sockets cannot keep registering services out, registered
    /// ones keep their places, and a reconnect herd is taken in as fast as
    /// it registers rather than evicted.
    pub max_unadmitted_per_shard: usize,
    /// A connection not admitted yet is evicted for another only once it
    /// is this old (it had its chance to register), or four to eight times
    /// the 95th percentile of the shard's recent clients' time from accept
    /// to admission if that is longer (at most the admit timeout, which is
    /// also the answer until a pace is known; see `admission::Pace`): slow clients in a herd
    /// are not evicted only to come back, while a slowloris's sockets
    /// still go.
    pub unadmitted_grace: Duration,
    /// Sockets one source address may hold in their handshakes (accepted,
    /// not yet admitted), node-wide; past it its new sockets are closed at
    /// accept. 0: no bound. Default: `default_max_handshakes_per_source`.
    pub max_handshakes_per_source: u32,
    /// Connections one source address may hold, node-wide; past it its new
    /// sockets are closed at accept. 0 (the default): no bound.
    pub max_conns_per_source: u32,
    /// A listen address in use is tried again for this long before start
    /// fails (a controller that just exited may still hold it).
    pub listen_wait: Duration,
    /// Messages waiting in one shard's mailbox.
    pub mailbox_capacity: usize,
    /// io_uring: provided receive buffers per shard (a power of two, each
    /// 2 KiB). Fewer costs re-arms when many connections send at once,
    /// never data.
    pub uring_recv_buffers: u16,
}

impl EngineConfig {
    pub fn new(listen: SocketAddr, shards: usize) -> EngineConfig {
        EngineConfig {
            listen,
            tls: None,
            io: IoChoice::from_env(),
            shards,
            max_conns_per_shard: default_max_conns_per_shard(shards),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            admit_timeout: Duration::from_secs(10),
            close_linger: Duration::from_secs(2),
            tick: Duration::from_millis(100),
            limits: Limits::default(),
            max_pending_out: 16 << 20,
            max_held_unadmitted: 64 << 10,
            buffer_budget: 1 << 30,
            message_timeout: Duration::from_secs(10),
            max_unadmitted_per_shard: DEFAULT_MAX_UNADMITTED_PER_SHARD,
            unadmitted_grace: Duration::from_secs(2),
            max_handshakes_per_source: default_max_handshakes_per_source(
                shards,
                DEFAULT_MAX_UNADMITTED_PER_SHARD,
            ),
            max_conns_per_source: 0,
            listen_wait: Duration::from_secs(5),
            mailbox_capacity: 65_536,
            uring_recv_buffers: 512,
        }
    }

    pub(crate) fn ticks(&self, d: Duration) -> wheel::Tick {
        let ticks = d.as_nanos().div_ceil(self.tick.as_nanos().max(1));
        ticks.clamp(1, u32::MAX as u128 / 4) as wheel::Tick
    }

    pub(crate) fn timing(&self) -> conn::Timing {
        conn::Timing {
            handshake: self.ticks(self.handshake_timeout),
            admit: self.ticks(self.admit_timeout),
            ping_interval: self.ticks(self.ping_interval),
            // A hundredth of the interval, at least two ticks: the ticks
            // of both clocks' rounding and a peer's timer running late.
            ping_grace: (self.ticks(self.ping_interval) / 100).max(2),
            pong_timeout: self.ticks(self.pong_timeout),
            linger: self.ticks(self.close_linger),
            message: self.ticks(self.message_timeout),
        }
    }

    fn validate(&self) -> Result<(), StartError> {
        let bad = |msg: String| Err(StartError::Config(msg));
        if self.shards == 0 || self.shards > 1024 {
            return bad(format!("--shards must be 1..=1024, not {}", self.shards));
        }
        let nofile = sys::nofile_limit().unwrap_or(1024) as usize;
        let room = nofile.saturating_sub(FD_RESERVE + self.shards);
        if self.max_conns_per_shard == 0 || self.max_conns_per_shard > room {
            return bad(format!(
                "--max-conns-per-shard {} does not fit one shard's fd table: RLIMIT_NOFILE is {nofile}, \
                 minus {} reserved, leaves {room}; use more shards to hold more connections",
                self.max_conns_per_shard,
                FD_RESERVE + self.shards
            ));
        }
        // Ticks are u32: at 50 ms they wrap after 6.8 years of uptime.
        if self.tick < Duration::from_millis(50) || self.tick > Duration::from_secs(1) {
            return bad(format!("tick must be 50ms..=1s, not {:?}", self.tick));
        }
        if !self.uring_recv_buffers.is_power_of_two() || self.uring_recv_buffers > 32_768 {
            return bad(format!(
                "uring_recv_buffers must be a power of two up to 32768, not {}",
                self.uring_recv_buffers
            ));
        }
        if self.ping_interval < self.tick || self.pong_timeout < self.tick {
            return bad(format!(
                "--ping-interval and --pong-timeout must be at least one tick ({:?})",
                self.tick
            ));
        }
        Ok(())
    }
}

/// Sockets one shard holds in their handshakes before it stops accepting.
pub const DEFAULT_MAX_UNADMITTED_PER_SHARD: usize = 1024;

/// The default bound on one source address's sockets in their handshakes:
/// an eighth of the node's room for handshakes (`shards` ×
/// `max_unadmitted_per_shard`), at least 1,024. One address flooding
/// connects keeps at most that share and the other sources the rest, while
/// the many services behind one address (a NAT, a big host) reconnecting
/// in a herd are not refused: a fixed 1,024 was 5 % of a 20-shard node,
/// and measured at 300,000 services over 30 addresses one address held up
/// to 1,082 in a restart's herd, each refusal a longer backoff. The 1,024
/// floor means one address may take half of a 2-shard node's room and all
/// of a 1-shard node's (as before); a source is one full address, so an
/// IPv6 host with many addresses is many sources.
pub fn default_max_handshakes_per_source(shards: usize, max_unadmitted_per_shard: usize) -> u32 {
    let share = shards.saturating_mul(max_unadmitted_per_shard) / 8;
    share.clamp(1024, u32::MAX as usize) as u32
}

/// Just under what one fd table holds: RLIMIT_NOFILE minus the reserve.
pub fn default_max_conns_per_shard(shards: usize) -> usize {
    let nofile = sys::nofile_limit().unwrap_or(1024) as usize;
    nofile.saturating_sub(FD_RESERVE + shards).max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error("shard {shard} could not start: {message}")]
    Shard { shard: usize, message: String },
    #[error("cannot create a shard mailbox: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// Names one connection for as long as it lives: a reused slab slot gets a
/// new generation, so a stale reference is recognised and ignored.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: ShardId,
    pub key: u32,
    pub generation: u32,
}

/// Why the handler will hear no more from a connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// The peer sent a close frame (with this code, if any).
    PeerClosed(Option<u16>),
    /// The socket ended without a close frame (EOF, reset, error).
    PeerGone,
    Violation(Violation),
    /// No frame arrived within the pong timeout after a ping.
    PongMissed,
    /// Not admitted within the admit timeout.
    AdmitTimeout,
    /// The handler closed it with this code.
    Closed(u16),
    /// It would not read what we sent, past `max_pending_out`.
    SlowConsumer,
    /// Its shard was over its slice of the buffer budget, and it held the
    /// most beyond its fair share.
    OverBudget,
    /// A frame or message it began was not whole within the message timeout.
    MessageTimeout,
    /// Not admitted yet, and the oldest such when room was needed.
    Evicted,
    Shutdown,
}

/// An upgrade the handler refuses: answered with this HTTP status.
#[derive(Copy, Clone, Debug)]
pub struct Refusal {
    pub status: u16,
    pub message: &'static str,
    /// The bad-input counter it is reported under; `None` when the peer did
    /// nothing wrong (the controller is draining).
    pub kind: Option<BadInput>,
}

/// One per shard; called only from that shard's thread.
pub trait Handler: Send + 'static {
    /// What others post to this shard's mailbox.
    type Msg: Send + 'static;

    /// A valid upgrade request arrived. `Ok` accepts it.
    fn on_upgrade(&mut self, conn: ConnRef, req: &UpgradeRequest<'_>) -> Result<(), Refusal>;
    /// The 101 went out; the connection may now be sent to or admitted.
    fn on_open(&mut self, cx: &mut Cx<'_>, conn: ConnRef);
    fn on_text(&mut self, cx: &mut Cx<'_>, conn: ConnRef, text: &str);
    /// The peer is alive: it answered a ping (`rtt`: its round trip, when
    /// the pong carried our stamp), or a check found life of its own within
    /// the interval (at most about once per interval and conn).
    fn on_alive(&mut self, cx: &mut Cx<'_>, conn: ConnRef, rtt: Option<Duration>);
    /// No frame came within the pong timeout. `Some(until)` keeps the
    /// connection until then (the peer is busy on our behalf: clients that
    /// run a tool inside their read loop answer no ping meanwhile), and the
    /// check comes again at `until`; `None` ends it as `PongMissed`.
    fn on_pong_missed(&mut self, conn: ConnRef, now: Instant) -> Option<Instant> {
        let _ = (conn, now);
        None
    }
    /// Exactly once for every connection whose upgrade was accepted.
    fn on_closed(&mut self, cx: &mut Cx<'_>, conn: ConnRef, cause: CloseCause);
    fn on_message(&mut self, cx: &mut Cx<'_>, msg: Self::Msg);
    /// Once per tick, after the tick's deadlines.
    fn on_tick(&mut self, cx: &mut Cx<'_>);
}

pub(crate) enum Action {
    Send {
        conn: ConnRef,
        frame: Range<usize>,
    },
    Close {
        conn: ConnRef,
        code: u16,
        reason: Range<usize>,
    },
    Admit(ConnRef),
}

/// What handlers asked for, carried out by the shard after the callback.
#[derive(Default)]
pub(crate) struct Actions {
    list: Vec<Action>,
    bytes: Vec<u8>,
}

impl Actions {
    fn clear(&mut self) {
        self.list.clear();
        self.bytes.clear();
    }
}

/// The handler's view of its shard during a callback. Time comes in here
/// (the shard reads its clocks once per loop turn), so a handler reads no
/// clock of its own and runs the same on a test's fake clock.
pub struct Cx<'a> {
    shard: ShardId,
    now: Instant,
    wall_ms: u64,
    current: Option<ConnRef>,
    /// Frames for `current`, sent in order right after the callback.
    out: Option<&'a mut Vec<u8>>,
    actions: &'a mut Actions,
    stop_current: bool,
    /// The handler admitted `current`: its answers already get an admitted
    /// connection's bounds.
    admit_current: bool,
    /// How to learn the current connection's peer address, asked only
    /// when the handler needs it (one system call).
    peer: Peer<'a>,
}

/// Where `Cx::peer_addr` gets its answer.
pub(crate) enum Peer<'a> {
    /// Outside a connection's input.
    None,
    /// A recorder's fixed answer.
    Known(Option<SocketAddr>),
    /// The shard's driver, for the connection being fed.
    Ask(&'a mut dyn FnMut() -> Option<SocketAddr>),
}

impl<'a> Cx<'a> {
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard's monotonic clock at the start of this callback.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The wall clock at the same moment, in milliseconds since the Unix
    /// epoch (for timestamps people and clients read).
    pub fn wall_ms(&self) -> u64 {
        self.wall_ms
    }

    /// Queues one text message to `conn` (ignored if it has gone).
    pub fn send_text(&mut self, conn: ConnRef, text: &[u8]) {
        match &mut self.out {
            Some(out) if Some(conn) == self.current => {
                ws::encode_frame(out, ws::OpCode::Text, text, None)
            }
            _ => {
                let start = self.actions.bytes.len();
                ws::encode_frame(&mut self.actions.bytes, ws::OpCode::Text, text, None);
                let frame = start..self.actions.bytes.len();
                self.actions.list.push(Action::Send { conn, frame });
            }
        }
    }

    /// Queues the same text message to every connection in `conns`,
    /// encoded once (a discovery snapshot to all its subscribers).
    pub fn send_text_to_all(&mut self, conns: impl IntoIterator<Item = ConnRef>, text: &[u8]) {
        let start = self.actions.bytes.len();
        ws::encode_frame(&mut self.actions.bytes, ws::OpCode::Text, text, None);
        let frame = start..self.actions.bytes.len();
        for conn in conns {
            self.actions.list.push(Action::Send {
                conn,
                frame: frame.clone(),
            });
        }
    }

    /// Starts the close handshake with `code`. The handler then hears
    /// `on_closed(Closed(code))` and nothing more from `conn`.
    pub fn close(&mut self, conn: ConnRef, code: u16, reason: &str) {
        if Some(conn) == self.current {
            self.stop_current = true;
        }
        let start = self.actions.bytes.len();
        self.actions.bytes.extend_from_slice(reason.as_bytes());
        let reason = start..self.actions.bytes.len();
        self.actions.list.push(Action::Close { conn, code, reason });
    }

    /// Starts liveness checks (pings) and lifts the admit deadline.
    pub fn admit(&mut self, conn: ConnRef) {
        if Some(conn) == self.current {
            self.admit_current = true;
        }
        self.actions.list.push(Action::Admit(conn));
    }

    /// The socket's peer address for the connection whose message is being
    /// handled (`None` outside one, or if the socket cannot say). It costs
    /// a system call, so it is asked only when needed: a registration that
    /// names no address of its own.
    pub fn peer_addr(&mut self) -> Option<SocketAddr> {
        match &mut self.peer {
            Peer::None => None,
            Peer::Known(addr) => *addr,
            Peer::Ask(ask) => ask(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a handler asked of its shard, read back by a unit test that runs
/// the handler with no shard, no socket and a clock of its own (as
/// quinn-proto's tests drive a `Connection`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A text message to `conn`.
    Text {
        conn: ConnRef,
        text: String,
    },
    Close {
        conn: ConnRef,
        code: u16,
        reason: String,
    },
    Admit(ConnRef),
}

/// Stands in for a shard around a handler's callbacks: hands out `Cx`s on
/// a fake clock and records what they were asked.
pub struct Recorder {
    shard: ShardId,
    now: Instant,
    wall_ms: u64,
    actions: Actions,
    peer: Option<SocketAddr>,
}

impl Recorder {
    pub fn new(shard: ShardId, now: Instant, wall_ms: u64) -> Recorder {
        Recorder {
            shard,
            now,
            wall_ms,
            actions: Actions::default(),
            peer: None,
        }
    }

    /// What `Cx::peer_addr` answers in the contexts handed out from now on.
    pub fn set_peer(&mut self, peer: Option<SocketAddr>) {
        self.peer = peer;
    }

    /// Moves both clocks forward.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.wall_ms += by.as_millis() as u64;
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn wall_ms(&self) -> u64 {
        self.wall_ms
    }

    /// A context for one callback; its effects stay recorded until `take`.
    pub fn cx(&mut self) -> Cx<'_> {
        Cx {
            shard: self.shard,
            now: self.now,
            wall_ms: self.wall_ms,
            current: None,
            out: None,
            actions: &mut self.actions,
            stop_current: false,
            admit_current: false,
            peer: Peer::Known(self.peer),
        }
    }

    /// What the callbacks asked since the last `take`, in order.
    pub fn take(&mut self) -> Vec<Effect> {
        let actions = std::mem::take(&mut self.actions);
        let text = |frame: &[u8]| {
            let header = ws::decode_header(frame, ws::Role::Client)
                .expect("a frame the engine encoded")
                .expect("a whole frame");
            String::from_utf8_lossy(&frame[header.header_len..]).into_owned()
        };
        let bytes = &actions.bytes;
        actions
            .list
            .into_iter()
            .map(|action| match action {
                Action::Send { conn, frame } => Effect::Text {
                    conn,
                    text: text(&bytes[frame]),
                },
                Action::Close { conn, code, reason } => Effect::Close {
                    conn,
                    code,
                    reason: String::from_utf8_lossy(&bytes[reason]).into_owned(),
                },
                Action::Admit(conn) => Effect::Admit(conn),
            })
            .collect()
    }
}

/// A running engine: its shards, their mailboxes and counters.
pub struct Engine<M: Send + 'static> {
    threads: Vec<JoinHandle<()>>,
    mailboxes: Arc<[Mailbox<M>]>,
    stats: Arc<[ShardStats]>,
    stop: Arc<AtomicBool>,
    local_addr: SocketAddr,
    io: IoDriver,
}

impl<M: Send + 'static> Engine<M> {
    /// Opens the listeners and starts one thread per shard. `make_handler`
    /// builds each shard's handler; it gets the mailboxes so handlers can
    /// post to each other.
    pub fn start<H, F>(config: EngineConfig, mut make_handler: F) -> Result<Engine<M>, StartError>
    where
        H: Handler<Msg = M>,
        F: FnMut(ShardId, Arc<[Mailbox<M>]>, Arc<[ShardStats]>) -> H,
    {
        config.validate()?;
        let io = config.io.resolve().map_err(StartError::Config)?;
        let mailboxes: Arc<[Mailbox<M>]> = (0..config.shards)
            .map(|_| Mailbox::new(config.mailbox_capacity))
            .collect::<Result<Vec<_>, _>>()?
            .into();
        let stats: Arc<[ShardStats]> = (0..config.shards).map(|_| ShardStats::default()).collect();
        let (listeners, local_addr) =
            listen::open_listeners_waiting(config.listen, config.shards, config.listen_wait)?;
        let sources = admission::Sources::new(
            config.max_handshakes_per_source,
            config.max_conns_per_source,
        )
        .map(Arc::new);
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let config = Arc::new(config);
        let mut group = io::StartGroup::default();
        for index in 0..config.shards {
            let id = ShardId(index as u16);
            let handler = make_handler(id, mailboxes.clone(), stats.clone());
            let setup = shard::Setup {
                id,
                listener: listeners[index],
                keep: listeners[index..=index]
                    .iter()
                    .copied()
                    .chain(mailboxes.iter().map(|m| m.wake_fd()))
                    .collect(),
                config: config.clone(),
                mailboxes: mailboxes.clone(),
                stats: stats.clone(),
                stop: stop.clone(),
                sources: sources.clone(),
                epoch,
                io,
            };
            group.spawn(format!("tether-shard-{index}"), move |ready| {
                shard::run(setup, handler, ready)
            });
        }
        let (threads, started) = group.wait();
        let failure = started
            .err()
            .map(|(shard, message)| StartError::Shard { shard, message });
        // Each shard now holds its own listener in its own fd table.
        listeners.into_iter().for_each(sys::close);
        let engine = Engine {
            threads,
            mailboxes,
            stats,
            stop,
            local_addr,
            io,
        };
        match failure {
            None => Ok(engine),
            Some(e) => {
                engine.shutdown();
                Err(e)
            }
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The driver the shards run.
    pub fn io(&self) -> IoDriver {
        self.io
    }

    pub fn shards(&self) -> usize {
        self.mailboxes.len()
    }

    pub fn stats(&self) -> &Arc<[ShardStats]> {
        &self.stats
    }

    pub fn mailboxes(&self) -> &Arc<[Mailbox<M>]> {
        &self.mailboxes
    }

    pub fn post(&self, shard: ShardId, msg: M) -> Result<(), Full<M>> {
        self.mailboxes[shard.0 as usize].post(msg)
    }

    /// Closes every connection with 1001 (going away) and joins the shards.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.mailboxes.iter().for_each(Mailbox::wake);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<M: Send + 'static> Drop for Engine<M> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_may_hold_an_eighth_of_the_nodes_handshakes_at_least_1024() {
        // Up to 8 shards the bound stays 1,024 (half of a 2-shard node's room).
        assert_eq!(default_max_handshakes_per_source(2, 1024), 1024);
        assert_eq!(default_max_handshakes_per_source(8, 1024), 1024);
        // A 20-shard node (300,000 services here): 2,560 of 20,480.
        assert_eq!(default_max_handshakes_per_source(20, 1024), 2560);
        assert_eq!(default_max_handshakes_per_source(68, 1024), 8704);
        // The config's default follows its shards.
        let listen = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            EngineConfig::new(listen, 20).max_handshakes_per_source,
            2560
        );
    }
}
