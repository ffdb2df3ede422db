//! The controller: the engine's shards running the registry protocol, and
//! the library API the admin plane, the CLI and the tests use (commands,
//! lookups, events, relayed service notifications, counters).
//!
//! Shared state is one registry behind one mutex, locked briefly by
//! shards (registrations, lookups, one batch per tick) and by API callers;
//! commands travel to the shard holding the instance's socket through its
//! mailbox, so no API call ever blocks a shard.

pub mod auth;
pub mod commands;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod handler;

pub mod rpc;

/// Milliseconds since the Unix epoch (wall clock, for timestamps).
pub use crate::engine::wall_clock_ms as now_ms;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use uuid::Uuid;

use crate::engine::mailbox::Mailbox;
use crate::engine::{ConnRef, Engine, EngineConfig, StartError};
use crate::metrics::ShardStats;
use crate::registry::events::{Epoch, ReplayError, Resume, Subscription};
use crate::registry::{Filter, Registry, RegistryConfig, Snapshot, Status};
pub use commands::{CommandOutcome, Reply};
use commands::{CommandRequest, Permit};

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub engine: EngineConfig,
    pub registry: RegistryConfig,
    /// This controller's hostId: the `host` claim service tokens must carry.
    pub host_id: String,
    /// A path prefix the service endpoints are served under (`/controller`
    /// serves `/controller/ws/microservice`), for a path-routing ingress;
    /// empty for none. See `valid_base_path`.
    pub base_path: String,
    pub command_timeout: Duration,
    pub max_inflight_per_instance: usize,
    pub max_inflight_total: usize,
    /// Relayed service notifications queued per watcher before dropping.
    pub watcher_queue: usize,
    /// Notification watches that may exist at once.
    pub max_watchers: usize,
    /// Lookups, subscriptions and metadata updates one connection may send:
    /// a bucket of `request_burst`, refilled at `requests_per_second`.
    /// Past it: -32003 (a real service, which looks up and subscribes at
    /// start and updates now and then, never gets there).
    pub request_burst: u8,
    pub requests_per_second: u16,
    /// Registrations per second this node (or its successor) takes after
    /// a restart: a drain asks services to spread their first reconnect
    /// over services / rate (`reconnectWindowMs` in `session/draining`).
    pub reconnect_rate: u32,
}

/// What `--reconnect-rate` defaults to: well under what one node took
/// in the herd runs on 2 cores (~34,000/s plain, README).
pub const DEFAULT_RECONNECT_RATE: u32 = 20_000;

/// The window a drain asks services to spread their first reconnect
/// over: `services / rate`, at least 1 s (the agents' own first backoff)
/// and at most the agents' ceiling.
pub fn reconnect_window(services: usize, rate: u32) -> Duration {
    let secs = services as f64 / f64::from(rate.max(1));
    Duration::from_secs_f64(secs).clamp(Duration::from_secs(1), crate::agent::MAX_RECONNECT_WINDOW)
}

impl ControllerConfig {
    pub fn new(engine: EngineConfig) -> ControllerConfig {
        ControllerConfig {
            registry: RegistryConfig::default(),
            host_id: default_host_id(),
            base_path: String::new(),
            command_timeout: handler::DEFAULT_COMMAND_TIMEOUT,
            max_inflight_per_instance: 64,
            max_inflight_total: 4096,
            watcher_queue: 1024,
            max_watchers: 4096,
            request_burst: 64,
            requests_per_second: 20,
            reconnect_rate: DEFAULT_RECONNECT_RATE,
            engine,
        }
    }
}

/// A `--base-path` as served: `""` or `/a/b` (leading slash, none at the
/// end, no query, fragment or space). `/` means none.
pub fn valid_base_path(path: &str) -> Result<String, String> {
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return Ok(String::new());
    }
    let bad = |why: &str| Err(format!("--base-path {path:?} {why}, like /controller"));
    if !path.starts_with('/') {
        return bad("must start with /");
    }
    if path.len() > 256 {
        return bad("is over 256 bytes");
    }
    if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '%'))
    {
        return bad("must be a plain path (no query, fragment, escapes or spaces)");
    }
    if path.contains("//") {
        return bad("must not hold an empty segment");
    }
    Ok(path.to_string())
}

/// The machine's host name, the usual hostId.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// What other threads post to a shard.
pub enum ShardMsg {
    /// Close this connection with 4000: its registration was replaced.
    Supersede(ConnRef),
    /// Send a command to an instance on this shard.
    Command(Box<CommandRequest>, Permit),
    /// Drain: tell every service `session/draining` (with the window to
    /// spread its reconnect over), then close every connection with 1001,
    /// spread evenly over `period`.
    Drain {
        period: Duration,
        reconnect_window: Duration,
    },
}

/// Service notifications (`notifications/*`) relayed to whoever watches
/// that instance; dropped when nobody does. Bounded: each watch queues at
/// most `watcher_queue` messages (more are dropped), and at most
/// `max_watchers` watches exist.
#[derive(Default)]
pub struct Watchers {
    count: AtomicUsize,
    by_instance: Mutex<HashMap<Uuid, Vec<WatchSender>>>,
}

/// One watch's queue, and a token that dies with its `Watch`.
type WatchSender = (SyncSender<Arc<str>>, Weak<()>);

/// The receiving end of `Controller::watch_notifications`; dropping it ends
/// the watch.
pub struct Watch {
    rx: Receiver<Arc<str>>,
    _alive: Arc<()>,
}

impl Watch {
    pub fn recv_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Arc<str>, std::sync::mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    pub fn try_recv(&self) -> Result<Arc<str>, std::sync::mpsc::TryRecvError> {
        self.rx.try_recv()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0} notification watches exist already, the limit")]
pub struct WatchError(pub usize);

impl Watchers {
    fn relay(&self, instance: &Uuid, text: &str) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get_mut(instance) else {
            return;
        };
        let text: Arc<str> = Arc::from(text);
        let before = list.len();
        // A full queue drops this message; a dropped watch leaves.
        list.retain(|(tx, alive)| {
            alive.strong_count() > 0
                && !matches!(
                    tx.try_send(text.clone()),
                    Err(TrySendError::Disconnected(_))
                )
        });
        self.count.fetch_sub(before - list.len(), Ordering::Relaxed);
        if list.is_empty() {
            map.remove(instance);
        }
    }

    fn watch(&self, instance: Uuid, queue: usize, max: usize) -> Result<Watch, WatchError> {
        let mut map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        if self.count.load(Ordering::Relaxed) >= max {
            // Dropped watches of quiet instances are only found by a sweep.
            let mut removed = 0;
            map.retain(|_, list| {
                let before = list.len();
                list.retain(|(_, alive)| alive.strong_count() > 0);
                removed += before - list.len();
                !list.is_empty()
            });
            self.count.fetch_sub(removed, Ordering::Relaxed);
            if self.count.load(Ordering::Relaxed) >= max {
                return Err(WatchError(max));
            }
        }
        let (tx, rx) = sync_channel(queue);
        let alive = Arc::new(());
        map.entry(instance)
            .or_default()
            .push((tx, Arc::downgrade(&alive)));
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(Watch { rx, _alive: alive })
    }
}

pub struct Shared {
    registry: Mutex<Registry>,
    /// Where the shards' monotonic milliseconds count from (one origin for
    /// all, so coalescing compares like with like).
    epoch: Instant,
    pub config: ControllerConfig,
    inflight: Arc<AtomicUsize>,
    watchers: Watchers,
    /// Commands ended, indexed by `CommandOutcome::index`.
    command_outcomes: [std::sync::atomic::AtomicU64; CommandOutcome::LABELS.len()],
    auth: Option<auth::Auth>,
    /// Set once a drain begins: new upgrades are refused (503).
    draining: std::sync::atomic::AtomicBool,
    /// Connections a drain has still to close, all shards together.
    drain_left: AtomicUsize,
    /// Sockets whose records were superseded from outside a shard (by a
    /// registration on another node) while their shard's queue was full:
    /// each shard closes its own at its next tick.
    pub(crate) supersede_later: Mutex<Vec<crate::engine::ConnRef>>,
    pub(crate) supersede_pending: AtomicBool,
}

/// The registry, locked. Debug builds count the guards each thread holds,
/// so code that serializes (snapshots, admin JSON) can assert it holds
/// none: a lock held while serializing stalls every shard waiting on it.
pub struct RegistryGuard<'a> {
    guard: MutexGuard<'a, Registry>,
}

#[cfg(debug_assertions)]
thread_local! {
    static GUARDS_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl std::ops::Deref for RegistryGuard<'_> {
    type Target = Registry;

    fn deref(&self) -> &Registry {
        &self.guard
    }
}

impl std::ops::DerefMut for RegistryGuard<'_> {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.guard
    }
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        GUARDS_HELD.with(|held| held.set(held.get() - 1));
    }
}

/// Debug builds: panics if this thread holds the registry lock. Called
/// where JSON is written from registry data (`what` says which).
pub(crate) fn assert_registry_unlocked(what: &str) {
    #[cfg(debug_assertions)]
    GUARDS_HELD.with(|held| {
        assert_eq!(
            held.get(),
            0,
            "{what} while holding the registry lock: copy the data out, unlock, then serialize"
        )
    });
    let _ = what;
}

/// What the registry counts, read in one short lock.
#[derive(Clone, Debug, Default)]
pub struct RegistryCounts {
    pub up: usize,
    pub down: usize,
    pub subscriptions: usize,
    pub event_subscribers: usize,
    /// Event subscribers cut for falling behind.
    pub events_cut: u64,
    pub last_event_seq: u64,
    /// Events so far, by kind.
    pub events: Vec<(crate::registry::events::EventKind, u64)>,
}

impl Shared {
    /// The state the shards and the API share; the registry is reserved for
    /// the most connections the engine can hold.
    pub(crate) fn new(mut config: ControllerConfig, auth: Option<auth::Auth>) -> Shared {
        let shards = config.engine.shards;
        config.registry.capacity = config.registry.capacity.max(
            shards * (config.engine.max_conns_per_shard + crate::engine::OVER_CAP_GRACE)
                + config.registry.max_down_retained,
        );
        Shared {
            registry: Mutex::new(Registry::new(config.registry.clone(), shards)),
            epoch: Instant::now(),
            inflight: Arc::new(AtomicUsize::new(0)),
            watchers: Watchers::default(),
            command_outcomes: Default::default(),
            auth,
            draining: std::sync::atomic::AtomicBool::new(false),
            drain_left: AtomicUsize::new(0),
            supersede_later: Mutex::new(Vec::new()),
            supersede_pending: AtomicBool::new(false),
            config,
        }
    }

    /// Milliseconds at `at` on a clock that never steps (for coalescing
    /// intervals); never 0, which means "never" to the registry.
    pub(crate) fn monotonic_ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1_000_000
    }

    /// Locks the registry. Keep the guard briefly: shards wait on it, and
    /// never serialize while holding it (`assert_registry_unlocked`).
    pub(crate) fn registry(&self) -> RegistryGuard<'_> {
        let guard = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(debug_assertions)]
        GUARDS_HELD.with(|held| held.set(held.get() + 1));
        RegistryGuard { guard }
    }
}

/// A running controller: its shards and its API.
pub struct Controller {
    engine: Engine<ShardMsg>,
    api: Arc<Api>,
}

/// What the controller offers to the admin plane, the CLI and tests. Cheap
/// to share (`Controller::api`); never blocks a shard.
pub struct Api {
    shared: Arc<Shared>,
    /// Runs callers' reply callbacks off the shard threads (see `call`).
    relay: std::sync::mpsc::Sender<(Reply, CommandOutcome)>,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    stats: Arc<[ShardStats]>,
    local_addr: std::net::SocketAddr,
    io: crate::engine::IoDriver,
    stopping: AtomicBool,
}

impl Controller {
    pub fn start(
        config: ControllerConfig,
        auth: Option<auth::Auth>,
    ) -> Result<Controller, StartError> {
        let shared = Arc::new(Shared::new(config, auth));
        let for_shards = shared.clone();
        let engine = Engine::start(shared.config.engine.clone(), move |id, mailboxes, stats| {
            handler::ShardHandler::new(id, for_shards.clone(), mailboxes, stats)
        })?;
        let (relay, replies) = std::sync::mpsc::channel::<(Reply, CommandOutcome)>();
        std::thread::Builder::new()
            .name("tether-replies".into())
            .spawn(move || {
                for (reply, outcome) in replies {
                    // A caller's callback that panics must not take the relay
                    // (and every later reply) with it.
                    let caught =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reply(outcome)));
                    if caught.is_err() {
                        tracing::error!("a command reply callback panicked");
                    }
                }
            })
            .map_err(StartError::Io)?;
        let api = Arc::new(Api {
            relay,
            shared,
            mailboxes: engine.mailboxes().clone(),
            stats: engine.stats().clone(),
            local_addr: engine.local_addr(),
            io: engine.io(),
            stopping: AtomicBool::new(false),
        });
        Ok(Controller { engine, api })
    }

    pub fn api(&self) -> Arc<Api> {
        self.api.clone()
    }

    /// Closes every connection with 1001 and stops the shards.
    pub fn shutdown(self) {
        self.api.set_stopping();
        self.engine.shutdown();
    }
}

impl std::ops::Deref for Controller {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Api {
    /// The service endpoint's address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    pub fn shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// The I/O driver the shards run.
    pub fn io(&self) -> crate::engine::IoDriver {
        self.io
    }

    /// The default deadline of a command that names none.
    pub fn command_timeout(&self) -> Duration {
        self.shared.config.command_timeout
    }

    /// One instance, up or down, detached from the registry.
    pub fn node(&self, id: &Uuid) -> Option<crate::registry::Node> {
        self.shared.registry().node_of(id)
    }

    /// Several instances under one lock (keep `ids` to a chunk).
    pub fn nodes(&self, ids: &[Uuid]) -> Vec<Option<crate::registry::Node>> {
        let registry = self.shared.registry();
        ids.iter().map(|id| registry.node_of(id)).collect()
    }

    /// Instances by status and the largest services (`top` of them).
    pub fn summary(&self, top: usize) -> crate::registry::Summary {
        self.shared.registry().summary(top)
    }

    /// The registry's counters.
    pub fn counts(&self) -> RegistryCounts {
        use crate::registry::events::EventKind;
        let registry = self.shared.registry();
        RegistryCounts {
            up: registry.len_up(),
            down: registry.len_down(),
            subscriptions: registry.subscription_count(),
            event_subscribers: registry.events.subscriber_count(),
            events_cut: registry.events.cut_count(),
            last_event_seq: registry.events.last_seq(),
            events: EventKind::ALL
                .iter()
                .map(|k| (*k, registry.events.count(*k)))
                .collect(),
        }
    }

    pub fn stats(&self) -> &Arc<[ShardStats]> {
        &self.stats
    }

    /// False once shutdown has begun (for /readyz).
    pub fn ready(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
    }

    /// Marks the controller as stopping: /readyz answers 503 from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Starts a graceful drain: new upgrades are refused (503), every
    /// registered service is sent `session/draining {deadlineMs, reason}`,
    /// and every connection is closed with 1001, spread evenly over
    /// `period` so the services do not all reconnect at once. Watch
    /// `drain_left` for the end.
    pub fn drain(&self, period: Duration) {
        self.set_stopping();
        if self.shared.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        // One for each shard until it has taken its share.
        self.shared
            .drain_left
            .fetch_add(self.mailboxes.len(), Ordering::SeqCst);
        let services = self.shared.registry().len_up();
        let reconnect_window = reconnect_window(services, self.shared.config.reconnect_rate);
        for mailbox in self.mailboxes.iter() {
            let mut msg = ShardMsg::Drain {
                period,
                reconnect_window,
            };
            // Bounded: a full mailbox drains within ticks.
            for _ in 0..100 {
                match mailbox.post(msg) {
                    Ok(()) => break,
                    Err(full) => {
                        msg = full.0;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }

    /// Connections a drain has still to close (0 before one starts, and
    /// once every shard has closed its share).
    pub fn drain_left(&self) -> usize {
        self.shared.drain_left.load(Ordering::SeqCst)
    }

    /// Commands in flight in all.
    pub fn commands_in_flight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    /// Commands ended, by outcome label (`CommandOutcome::label`).
    pub fn command_outcomes(&self) -> Vec<(&'static str, u64)> {
        CommandOutcome::LABELS
            .iter()
            .zip(&self.shared.command_outcomes)
            .map(|(label, n)| (*label, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// One page of a listing, scanned a chunk at a time so the registry is
    /// never held for long (a substring search visits every record).
    pub fn page(
        &self,
        query: crate::registry::Query,
        cursor: u32,
        limit: usize,
    ) -> crate::registry::Page {
        self.scan_page(crate::registry::PageScan::new(query, cursor, limit))
    }

    /// A page of `query` (unsorted) from `cursor`, its `total` not counted:
    /// for walking the whole registry in O(N).
    pub fn page_uncounted(
        &self,
        query: crate::registry::Query,
        cursor: u32,
        limit: usize,
    ) -> crate::registry::Page {
        self.scan_page(crate::registry::PageScan::new(query, cursor, limit).uncounted())
    }

    fn scan_page(&self, mut scan: crate::registry::PageScan) -> crate::registry::Page {
        const CHUNK: u32 = 4096;
        while !self.shared.registry().page_step(&mut scan, CHUNK) {
            // Let shards waiting on the registry in.
            std::thread::yield_now();
        }
        if scan.is_sorted() {
            // Ordered with the registry let go; taken again for the page.
            scan.sort();
            self.shared.registry().fill_sorted(&mut scan);
        }
        scan.finish()
    }

    pub fn lookup(&self, filter: &Filter) -> Snapshot {
        self.shared.registry().lookup(filter)
    }

    /// Merges other nodes' instances into discovery (None: this node's
    /// alone); every subscriber gets a fresh snapshot.
    pub fn set_remote_instances(&self, remote: Option<Arc<dyn crate::registry::RemoteInstances>>) {
        self.shared.registry().set_remote(remote);
    }

    /// Other nodes' instances of these (serviceId, envTag, protocol) came
    /// or went: their subscribers are due a snapshot.
    pub fn remote_instances_changed<'a>(
        &self,
        changed: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        let mut registry = self.shared.registry();
        for (service, env, protocol) in changed {
            registry.mark_remote_changed(service, env, protocol);
        }
    }

    /// The up records here of the identities other nodes just published:
    /// (the index into `moved`, the local record's id). Changes nothing.
    pub fn moved_candidates(
        &self,
        moved: &[crate::registry::MovedInstance<'_>],
    ) -> Vec<(usize, Uuid)> {
        let mut found = Vec::new();
        for (start, chunk) in (0..).step_by(1024).zip(moved.chunks(1024)) {
            let registry = self.shared.registry();
            found.extend(
                chunk
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| registry.up_with_identity(m).map(|id| (start + i, id))),
            );
        }
        found
    }

    /// The service moved: its record `local` here (if still up) is
    /// superseded and removed, and its socket closed with 4000 (now, or by
    /// its shard's next tick if the shard's queue is full). The caller has
    /// settled that the other node's registration is the newer one.
    pub fn supersede_moved(
        &self,
        local: &Uuid,
        moved: &crate::registry::MovedInstance<'_>,
    ) -> bool {
        let Some(owner) = self
            .shared
            .registry()
            .supersede_moved(local, moved, now_ms())
        else {
            return false;
        };
        let conn = handler::conn_of(owner);
        if let Err(full) = self.mailboxes[conn.shard.0 as usize].post(ShardMsg::Supersede(conn)) {
            let ShardMsg::Supersede(conn) = full.0 else {
                unreachable!("the message posted")
            };
            self.shared
                .supersede_later
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
            self.shared.supersede_pending.store(true, Ordering::Release);
        }
        true
    }

    /// The other nodes' instances were read afresh: every subscriber is
    /// due a snapshot.
    pub fn all_remote_instances_changed(&self) {
        self.shared.registry().mark_all_remote_changed();
    }

    /// Events after `since` (kept ones first), then live ones.
    pub fn subscribe_events(
        &self,
        since: Option<Resume>,
    ) -> Result<(u64, Subscription), ReplayError> {
        self.shared.registry().events.subscribe(since)
    }

    /// The event log's epoch: this start's (sequence numbers mean
    /// something only within it).
    pub fn events_epoch(&self) -> Epoch {
        self.shared.registry().events.epoch()
    }

    /// Relays the `notifications/*` an instance sends, while the watch lives.
    pub fn watch_notifications(&self, instance: Uuid) -> Result<Watch, WatchError> {
        let config = &self.shared.config;
        self.shared
            .watchers
            .watch(instance, config.watcher_queue, config.max_watchers)
    }

    /// Sends `method` with `params` to an instance; `reply` is called
    /// exactly once with the outcome (possibly before this returns).
    ///
    /// `reply` never runs on a shard thread: shards have fd tables of their
    /// own, and a callback that signals through a file descriptor opened
    /// elsewhere (an async runtime's waker, say) would write to the wrong
    /// file there. Replies from shards are relayed to a thread of the
    /// process's own table.
    pub fn call(
        &self,
        instance: Uuid,
        method: &str,
        params: Option<Box<RawValue>>,
        timeout: Option<Duration>,
        reply: Reply,
    ) {
        let counted = self.shared.clone();
        let relay = self.relay.clone();
        let relayed: Reply = Box::new(move |outcome| {
            counted.command_outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
            // A send fails only once the controller is gone: nobody waits.
            let _ = relay.send((reply, outcome));
        });
        let reply = relayed;
        let target = {
            let registry = self.shared.registry();
            registry
                .get(&instance)
                .filter(|i| i.status == Status::Up)
                .map(|i| handler::conn_of(i.owner))
        };
        let Some(target) = target else {
            return reply(CommandOutcome::NotFound);
        };
        if !self.ready() {
            return reply(CommandOutcome::Busy("the controller is shutting down"));
        }
        let max = self.shared.config.max_inflight_total;
        let Some(permit) = Permit::try_take(&self.shared.inflight, max) else {
            return reply(CommandOutcome::Busy(
                "too many commands in flight in the controller",
            ));
        };
        let timeout = timeout.unwrap_or(self.shared.config.command_timeout);
        let request = Box::new(CommandRequest {
            instance,
            target,
            method: method.to_string(),
            params,
            timeout,
            reply,
        });
        if let Err(full) =
            self.mailboxes[target.shard.0 as usize].post(ShardMsg::Command(request, permit))
        {
            let ShardMsg::Command(request, _permit) = full.0 else {
                unreachable!()
            };
            (request.reply)(CommandOutcome::Busy("the instance's shard queue is full"));
        }
    }

    /// `call`, waiting for the outcome.
    pub fn call_blocking(
        &self,
        instance: Uuid,
        method: &str,
        params: Option<Box<RawValue>>,
        timeout: Option<Duration>,
    ) -> CommandOutcome {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.call(
            instance,
            method,
            params,
            timeout,
            Box::new(move |o| drop(tx.send(o))),
        );
        rx.recv().unwrap_or(CommandOutcome::Gone)
    }

    /// `tools/call` of tool `name` with `arguments`, waiting for the outcome.
    pub fn call_tool(
        &self,
        instance: Uuid,
        name: &str,
        arguments: serde_json::Value,
    ) -> CommandOutcome {
        let raw = tool_call_params(name, &arguments);
        self.call_blocking(instance, "tools/call", Some(raw), None)
    }
}

/// The `params` of a `tools/call`.
pub fn tool_call_params(name: &str, arguments: &serde_json::Value) -> Box<RawValue> {
    let params = serde_json::json!({"name": name, "arguments": arguments});
    RawValue::from_string(params.to_string()).expect("json! is valid JSON")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_drain_s_reconnect_window_is_services_over_rate_bounded() {
        use std::time::Duration;
        let w = super::reconnect_window;
        assert_eq!(w(300_000, 20_000), Duration::from_secs(15));
        assert_eq!(w(10, 20_000), Duration::from_secs(1));
        assert_eq!(w(1_000_000_000, 20_000), crate::agent::MAX_RECONNECT_WINDOW);
        // A rate of 0 counts as 1 per second.
        assert_eq!(w(5_000, 0), crate::agent::MAX_RECONNECT_WINDOW);
    }

    use super::valid_base_path;

    #[test]
    fn base_paths_are_plain_absolute_paths() {
        for (given, served) in [
            ("", ""),
            ("/", ""),
            ("/controller", "/controller"),
            ("/a/b/", "/a/b"),
        ] {
            assert_eq!(valid_base_path(given).as_deref(), Ok(served), "{given}");
        }
        for bad in ["controller", "/a?b", "/a#b", "/a b", "/a//b", "/%2e"] {
            let e = valid_base_path(bad).unwrap_err();
            assert!(
                e.contains("--base-path") && e.contains("/controller"),
                "{bad}: {e}"
            );
        }
    }
}
