//! The per-shard protocol handler: turns a connection's text messages into
//! registry changes and replies, per ../shared/PROTOCOL.md, and relays
//! commands and discovery notifications to the shard's sockets.
//!
//! Holds 12 bytes per connection (`ConnState`); everything else about an
//! instance lives in the registry. Registry locks are short: never held
//! while serializing a snapshot or touching a socket.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use uuid::Uuid;

use super::auth::Verified;
use super::commands::{CommandOutcome, CommandRequest, Commands, outcome_of};
use super::rpc::{self, Method, RegisterRequest, Request, UpdateRequest};
use super::{ShardMsg, Shared};
use crate::engine::mailbox::Mailbox;
use crate::engine::{CloseCause, ConnRef, Cx, Handler, Refusal, ShardId, UpgradeRequest};
use crate::jsonrpc::{self, Code, Message, ParseError, RpcError};
use crate::metrics::{self, BadInput, ShardStats};
use crate::registry::{Owner, Rtt, UpdateOutcome, slot_of};

const MICROSERVICE_PATH: &str = "/ws/microservice";
const DISCOVERY_PATH: &str = "/ws/discovery";
const NO_SLOT: u32 = u32::MAX;
const MAX_TOUCHED_PER_TICK: usize = 1 << 16;
const NOT_REGISTERED: &str = "not registered yet: send service/register first";

#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
enum Endpoint {
    #[default]
    Microservice,
    Discovery,
}

/// What the handler knows of one connection.
#[derive(Copy, Clone, Default)]
struct ConnState {
    generation: u32,
    /// Registry slot of its registration (or of the one it deregistered).
    slot: u32,
    endpoint: Endpoint,
    registered: bool,
    /// Its registration's token allows discovery on this socket (light-4j
    /// ≥ 2.3.7 sends discovery there): `portal.r`, or auth is off.
    may_discover: bool,
    inflight: u16,
    /// The request bucket (`ControllerConfig::request_burst`): tokens
    /// left, and when it was last refilled, in deciseconds of the
    /// monotonic clock (wrapping every 109 minutes: an idle connection
    /// whose gap is a multiple of that is refilled for the remainder only).
    tokens: u8,
    refilled_ds: u16,
}

pub(crate) fn owner_of(conn: ConnRef) -> Owner {
    Owner {
        shard: conn.shard.0,
        key: conn.key,
        generation: conn.generation,
    }
}

pub(crate) fn conn_of(owner: Owner) -> ConnRef {
    ConnRef {
        shard: ShardId(owner.shard),
        key: owner.key,
        generation: owner.generation,
    }
}

/// A drain in progress on one shard: its connections, closed in order so
/// that by `start + period × i / n` the first i are.
struct Drain {
    start: std::time::Instant,
    period: Duration,
    conns: Vec<ConnRef>,
    closed: usize,
}

pub struct ShardHandler {
    drain: Option<Drain>,
    shard: ShardId,
    shared: Arc<Shared>,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    stats: Arc<[ShardStats]>,
    conns: Vec<ConnState>,
    /// Reused for every message we write.
    buf: Vec<u8>,
    /// Registered connections seen alive since the last tick.
    touched: Vec<(u32, Owner, Option<Rtt>)>,
    /// Superseded connections on other shards whose mailbox was full.
    supersede_retry: Vec<ConnRef>,
    /// Services named by verified upgrade bearer tokens, until register
    /// (by connection key, with its generation). Empty when auth is off.
    bearer: HashMap<u32, (u32, Verified)>,
    /// The instance each connection deregistered, while its close is on
    /// the way (a repeat is answered only for that very id).
    deregistered: HashMap<u32, (u32, Uuid)>,
    commands: Commands,
    /// The answer to a path that is neither endpoint (it names them).
    wrong_path: &'static str,
}

impl ShardHandler {
    pub(crate) fn new(
        shard: ShardId,
        shared: Arc<Shared>,
        mailboxes: Arc<[Mailbox<ShardMsg>]>,
        stats: Arc<[ShardStats]>,
    ) -> ShardHandler {
        let max_conns = shared.config.engine.max_conns_per_shard + crate::engine::OVER_CAP_GRACE;
        let wrong_path = wrong_path_message(&shared.config.base_path);
        ShardHandler {
            drain: None,
            shard,
            shared,
            mailboxes,
            stats,
            // One entry per connection the shard may hold: reserved, not touched.
            conns: Vec::with_capacity(max_conns),
            buf: Vec::with_capacity(4096),
            touched: Vec::new(),
            supersede_retry: Vec::new(),
            bearer: HashMap::new(),
            deregistered: HashMap::new(),
            commands: Commands::default(),
            wrong_path,
        }
    }

    /// Notes a sign of life, applied to the registry once per tick. Bounded:
    /// past the bound a busy connection's lastSeenAt waits for the next tick.
    fn touch(&mut self, conn: ConnRef, rtt: Option<Rtt>) {
        if self.touched.len() >= MAX_TOUCHED_PER_TICK {
            return;
        }
        if let Some(&mut ConnState {
            registered: true,
            slot,
            ..
        }) = self.state(conn)
        {
            self.touched.push((slot, owner_of(conn), rtt));
        }
    }

    /// Begins this shard's share of a drain: `session/draining` to every
    /// registered service now, the closes spread over `period`. Besides
    /// light-portal's `deadlineMs` and `reason` it carries
    /// `reconnectWindowMs`: tether's agents spread their first reconnect
    /// over it (others ignore it).
    fn start_drain(&mut self, cx: &mut Cx<'_>, period: Duration, reconnect_window: Duration) {
        let shard = self.shard;
        let conns: Vec<ConnRef> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, s)| s.generation != 0)
            .map(|(key, s)| ConnRef {
                shard,
                key: key as u32,
                generation: s.generation,
            })
            .collect();
        self.buf.clear();
        jsonrpc::write_notification(
            &mut self.buf,
            "session/draining",
            &serde_json::json!({
                "deadlineMs": period.as_millis() as u64,
                "reason": "controller shutting down; reconnect (to another node if there is one)",
                "reconnectWindowMs": reconnect_window.as_millis() as u64,
            }),
        );
        let services = conns.iter().copied().filter(|c| {
            self.conns[c.key as usize].registered
                && self.conns[c.key as usize].endpoint == Endpoint::Microservice
        });
        cx.send_text_to_all(services, &self.buf);
        use std::sync::atomic::Ordering::SeqCst;
        self.shared.drain_left.fetch_add(conns.len(), SeqCst);
        self.shared.drain_left.fetch_sub(1, SeqCst); // this shard's share is taken
        self.drain = Some(Drain {
            start: cx.now(),
            period,
            conns,
            closed: 0,
        });
        self.drain_some(cx);
    }

    /// Closes the connections whose turn in the drain has come.
    fn drain_some(&mut self, cx: &mut Cx<'_>) {
        let Some(d) = &mut self.drain else { return };
        let n = d.conns.len();
        let elapsed = cx.now().saturating_duration_since(d.start);
        let due = if d.period.is_zero() || elapsed >= d.period {
            n
        } else {
            ((n as u128 * elapsed.as_nanos()).div_ceil(d.period.as_nanos()) as usize).min(n)
        };
        for conn in &d.conns[d.closed..due] {
            cx.close(*conn, 1001, "controller draining");
        }
        let closed = due.saturating_sub(d.closed);
        d.closed = due;
        self.shared
            .drain_left
            .fetch_sub(closed, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes one request token from `conn`'s bucket; false if it is empty.
    fn take_token(&mut self, conn: ConnRef, now: std::time::Instant) -> bool {
        let now_ds = (self.shared.monotonic_ms(now) / 100) as u16;
        let (burst, rate) = (
            self.shared.config.request_burst,
            u32::from(self.shared.config.requests_per_second),
        );
        let Some(s) = self.state(conn) else {
            return true;
        };
        if s.refilled_ds == 0 {
            s.refilled_ds = now_ds; // the first request: the bucket is full
        }
        let refill = u32::from(now_ds.wrapping_sub(s.refilled_ds)) * rate / 10;
        if refill > 0 {
            s.tokens = (u32::from(s.tokens) + refill).min(u32::from(burst)) as u8;
            s.refilled_ds = now_ds;
        }
        if s.tokens == 0 {
            metrics::inc(&self.stats[self.shard.0 as usize].rate_limited);
            return false;
        }
        s.tokens -= 1;
        true
    }

    fn rate_limited(&self) -> RpcError {
        RpcError::new(
            Code::RateLimited,
            format!(
                "rate limited: at most {} lookups, subscriptions and metadata updates a second per connection (bursts of {}); retry later",
                self.shared.config.requests_per_second, self.shared.config.request_burst
            ),
        )
    }

    fn bad(&self, kind: BadInput) {
        self.stats[self.shard.0 as usize].bad(kind);
    }

    fn state(&mut self, conn: ConnRef) -> Option<&mut ConnState> {
        self.conns
            .get_mut(conn.key as usize)
            .filter(|s| s.generation == conn.generation)
    }

    /// The id this connection registered, if it still owns that record.
    fn registered_id(&self, conn: ConnRef) -> Option<Uuid> {
        let state = self
            .conns
            .get(conn.key as usize)
            .filter(|s| s.generation == conn.generation)?;
        if !state.registered {
            return None;
        }
        self.shared.registry().owned_id(state.slot, owner_of(conn))
    }

    fn reply_result<T: serde::Serialize + ?Sized>(
        &mut self,
        cx: &mut Cx<'_>,
        conn: ConnRef,
        id: &RawValue,
        result: &T,
    ) {
        self.buf.clear();
        jsonrpc::write_result(&mut self.buf, id, result);
        cx.send_text(conn, &self.buf);
    }

    /// The one place a peer's error is counted.
    fn count(&self, error: &RpcError) {
        if let Some(kind) = error.kind {
            self.bad(kind);
        }
    }

    /// The one place an error is answered: counted, written, and for an
    /// unauthorized peer followed by close 1008 (PROTOCOL.md). A registered
    /// service refused one request for its token's scope stays connected:
    /// its liveness does not hang on what it may look up.
    fn fail(&mut self, cx: &mut Cx<'_>, conn: ConnRef, id: Option<&RawValue>, error: &RpcError) {
        self.count(error);
        self.buf.clear();
        error.write(&mut self.buf, id);
        cx.send_text(conn, &self.buf);
        let registered = self.state(conn).is_some_and(|s| s.registered);
        if error.code == Code::Unauthorized && !registered {
            cx.close(conn, 1008, "unauthorized");
        }
    }

    fn request(
        &mut self,
        cx: &mut Cx<'_>,
        conn: ConnRef,
        id: &RawValue,
        name: &str,
        params: Option<&RawValue>,
    ) -> Result<(), RpcError> {
        let Some(state) = self.state(conn).copied() else {
            return Ok(());
        };
        let method = Method::parse(name)
            .ok_or_else(|| RpcError::method_not_found(format!("method not found: {name}")))?;
        if state.endpoint == Endpoint::Discovery && !method.is_discovery() {
            return Err(RpcError::method_not_found(format!(
                "{name} is not served on {DISCOVERY_PATH}: only discovery/* methods are"
            )));
        }
        if state.endpoint == Endpoint::Microservice
            && state.registered
            && method.is_discovery()
            && !state.may_discover
        {
            return Err(RpcError::new(
                Code::Unauthorized,
                format!(
                    "unauthorized: this connection's registration token lacks the scope {} that discovery needs",
                    super::auth::READ_SCOPE
                ),
            ));
        }
        if state.endpoint == Endpoint::Microservice && !state.registered {
            // A connection that deregistered may still repeat its deregister.
            let repeat = method == Method::Deregister && self.deregistered.contains_key(&conn.key);
            if method != Method::Register && !repeat {
                return Err(RpcError::not_registered(NOT_REGISTERED));
            }
        }
        if method == Method::Register && state.registered {
            return Err(RpcError::new(
                Code::InvalidRequest,
                "already registered on this connection; open another connection to register another instance",
            ));
        }
        if matches!(
            method,
            Method::Lookup | Method::Subscribe | Method::UpdateMetadata
        ) && !self.take_token(conn, cx.now())
        {
            return Err(self.rate_limited());
        }
        match Request::parse(method, params)? {
            Request::Register(request) => self.register(cx, conn, id, &request),
            Request::Deregister { instance, reason } => {
                self.deregister(cx, conn, state, id, instance, &reason)
            }
            Request::UpdateMetadata(update) => {
                self.update(conn, &update, cx.wall_ms())?;
                self.reply_result(cx, conn, id, &serde_json::json!({"status": "updated"}));
                Ok(())
            }
            Request::Lookup(filter) => {
                let now = self.shared.monotonic_ms(cx.now());
                let snapshot = self.shared.registry().lookup_shared(&filter, now);
                self.reply_result(cx, conn, id, rpc::shared_json(&snapshot));
                Ok(())
            }
            Request::Subscribe(filter) => {
                let now = self.shared.monotonic_ms(cx.now());
                let subscribed =
                    self.shared
                        .registry()
                        .subscribe_shared(&filter, owner_of(conn), now);
                let snapshot =
                    subscribed.map_err(|e| RpcError::new(Code::RateLimited, e.to_string()))?;
                self.reply_result(cx, conn, id, rpc::shared_json(&snapshot));
                Ok(())
            }
            Request::Unsubscribe(filter) => {
                self.shared.registry().unsubscribe(&filter, owner_of(conn));
                self.reply_result(cx, conn, id, &rpc::unsubscribed(&filter));
                Ok(())
            }
        }
    }

    fn register(
        &mut self,
        cx: &mut Cx<'_>,
        conn: ConnRef,
        id: &RawValue,
        request: &RegisterRequest<'_>,
    ) -> Result<(), RpcError> {
        let upgrade_bearer = self
            .bearer
            .remove(&conn.key)
            .filter(|(generation, _)| *generation == conn.generation);
        let may_discover = match &self.shared.auth {
            None => true,
            Some(auth) => {
                match (request.jwt.as_deref(), upgrade_bearer) {
                    // The Authorization header of the upgrade stands in for `jwt`.
                    (None, Some((_, verified))) => auth
                        .check_registrant(&verified, &request.service_id)
                        .map(|()| verified),
                    (jwt, _) => auth.check_service(jwt, &request.service_id),
                }
                .map_err(|why| RpcError::new(Code::Unauthorized, format!("unauthorized: {why}")))?
                .may_discover
            }
        };
        // The peer's address: the address itself when the service names
        // none (light-4j leaves it to the controller), else asked only if
        // the registration would supersede (a conflict names the peers).
        let mut peer = None;
        let derived;
        let address = match &request.address {
            Some(address) => address.as_str(),
            None => {
                peer = cx.peer_addr();
                derived = peer
                    .map(|p| p.ip().to_canonical().to_string())
                    .ok_or_else(|| {
                        RpcError::invalid_params(
                            "missing address, and the socket's peer address is unknown",
                        )
                    })?;
                derived.as_str()
            }
        };
        let registered = self.shared.registry().register(
            &request.registration(address),
            owner_of(conn),
            cx.wall_ms(),
            &mut || peer.or_else(|| cx.peer_addr()),
        );
        let registered = match registered {
            Ok(registered) => registered,
            Err(refused) => {
                // Two live processes with one identity: the holder keeps
                // it; this one is slowed down (1013, a retry hint) rather
                // than flapping discovery for every subscriber.
                metrics::inc(&self.stats[self.shard.0 as usize].identity_conflict_refusals);
                let secs = refused.retry_after_ms / 1000;
                let error = RpcError::new(
                    Code::RateLimited,
                    format!(
                        "identity conflict: instance {} holds this (serviceId, envTag, address, port) and was superseded too often; is a second process registering the same identity? Retry after {secs} s",
                        refused.holder
                    ),
                );
                self.fail(cx, conn, Some(id), &error);
                cx.close(
                    conn,
                    1013,
                    &format!("identity conflict; retry after {secs}s"),
                );
                return Ok(());
            }
        };
        if let Some(s) = self.state(conn) {
            s.slot = slot_of(&registered.id);
            s.registered = true;
            s.may_discover = may_discover;
        }
        if let Some(old) = registered.superseded {
            self.supersede(cx, conn_of(old));
        }
        cx.admit(conn);
        let result =
            serde_json::json!({"runtimeInstanceId": registered.id, "status": "registered"});
        self.reply_result(cx, conn, id, &result);
        Ok(())
    }

    fn supersede(&mut self, cx: &mut Cx<'_>, old: ConnRef) {
        if old.shard == self.shard {
            self.mark_unregistered(old);
            cx.close(old, 4000, "superseded");
        } else if self.mailboxes[old.shard.0 as usize]
            .post(ShardMsg::Supersede(old))
            .is_err()
        {
            // Its record is already replaced (it cannot touch the new one),
            // but its socket must still be closed: try again each tick.
            self.supersede_retry.push(old);
        }
    }

    fn mark_unregistered(&mut self, conn: ConnRef) {
        if let Some(s) = self.state(conn) {
            s.registered = false;
            s.slot = NO_SLOT;
        }
    }

    fn deregister(
        &mut self,
        cx: &mut Cx<'_>,
        conn: ConnRef,
        state: ConnState,
        id: &RawValue,
        instance: Uuid,
        reason: &str,
    ) -> Result<(), RpcError> {
        let done = if state.registered {
            self.shared
                .registry()
                .deregister(&instance, owner_of(conn), reason, cx.wall_ms())
        } else {
            // Idempotent: this connection already deregistered this one.
            self.deregistered.get(&conn.key) == Some(&(conn.generation, instance))
        };
        if !done {
            return Err(RpcError::invalid_params(format!(
                "runtimeInstanceId {instance} is not this connection's instance"
            )));
        }
        if let Some(s) = self.state(conn) {
            s.registered = false;
        }
        self.deregistered
            .insert(conn.key, (conn.generation, instance));
        let result = serde_json::json!({"runtimeInstanceId": instance, "status": "deregistered"});
        self.reply_result(cx, conn, id, &result);
        // The ack goes out first, then the close (light-fabric's graceful
        // shutdown: flush the ack, close with 1000).
        cx.close(conn, 1000, "deregistered");
        Ok(())
    }

    /// Applies `service/update_metadata`; `Err` says why it was not (fully) applied.
    fn update(
        &mut self,
        conn: ConnRef,
        update: &UpdateRequest<'_>,
        now_ms: u64,
    ) -> Result<(), RpcError> {
        let instance = self
            .registered_id(conn)
            .ok_or_else(|| RpcError::not_registered(NOT_REGISTERED))?;
        let outcome =
            self.shared
                .registry()
                .update(&instance, owner_of(conn), &update.update(), now_ms);
        match outcome {
            UpdateOutcome::Updated => Ok(()),
            // Replaced by a newer registration: not this peer's mistake.
            UpdateOutcome::NotOwner => Err(RpcError::not_registered(
                "this connection's registration was replaced",
            )
            .uncounted()),
            UpdateOutcome::PortTaken => Err(RpcError::invalid_params(
                "the other fields were applied, but the new port is already registered by another instance with this serviceId, envTag and address",
            )),
        }
    }

    /// A notification gets no answer: `Err` is only counted.
    fn notification(
        &mut self,
        conn: ConnRef,
        method: &str,
        params: Option<&RawValue>,
        text: &str,
        now: std::time::Instant,
        now_ms: u64,
    ) -> Result<(), RpcError> {
        match Method::parse(method) {
            Some(Method::UpdateMetadata) => {
                let update = rpc::update_params(params).map_err(RpcError::invalid_params)?;
                if !self.take_token(conn, now) {
                    // A notification has no answer: counted, and logged.
                    tracing::debug!(
                        shard = self.shard.0,
                        "update_metadata over the connection's rate limit dropped"
                    );
                    return Err(self.rate_limited());
                }
                self.update(conn, &update, now_ms)
            }
            None if method.starts_with("notifications/") => {
                let instance = self
                    .registered_id(conn)
                    .ok_or_else(|| RpcError::not_registered(NOT_REGISTERED))?;
                self.shared.watchers.relay(&instance, text);
                Ok(())
            }
            _ => Err(RpcError::method_not_found(format!(
                "no such notification: {method}"
            ))),
        }
    }

    fn response(&mut self, conn: ConnRef, id: &RawValue, outcome: Result<&RawValue, &RawValue>) {
        let finished = id
            .get()
            .parse::<u64>()
            .ok()
            .is_some_and(|wire_id| self.commands.finish(conn, wire_id, outcome_of(outcome)));
        if finished {
            if let Some(s) = self.state(conn) {
                s.inflight = s.inflight.saturating_sub(1);
            }
        } else {
            self.bad(BadInput::UnknownReplyId);
        }
    }

    fn command(
        &mut self,
        cx: &mut Cx<'_>,
        request: CommandRequest,
        permit: super::commands::Permit,
    ) {
        let conn = request.target;
        let max = self.shared.config.max_inflight_per_instance;
        let owns = self.registered_id(conn) == Some(request.instance);
        let Some(state) = self.state(conn).filter(|_| owns) else {
            return (request.reply)(CommandOutcome::NotFound);
        };
        if state.inflight as usize >= max.min(u16::MAX as usize) {
            return (request.reply)(CommandOutcome::Busy(
                "too many commands in flight for this instance",
            ));
        }
        state.inflight += 1;
        let deadline = cx.now() + request.timeout;
        let wire_id = self.commands.start(conn, deadline, request.reply, permit);
        self.buf.clear();
        jsonrpc::write_request(
            &mut self.buf,
            wire_id,
            &request.method,
            request.params.as_deref(),
        );
        cx.send_text(conn, &self.buf);
    }
}

impl Handler for ShardHandler {
    type Msg = ShardMsg;

    fn on_upgrade(&mut self, conn: ConnRef, req: &UpgradeRequest<'_>) -> Result<(), Refusal> {
        if self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Refusal {
                status: 503,
                message: "the controller is draining; connect to another node or retry",
                kind: None,
            });
        }
        let base = self.shared.config.base_path.as_str();
        let endpoint = match req.path.strip_prefix(base) {
            Some(MICROSERVICE_PATH) => Endpoint::Microservice,
            Some(DISCOVERY_PATH) => Endpoint::Discovery,
            _ => {
                return Err(Refusal {
                    status: 404,
                    message: self.wrong_path,
                    kind: Some(BadInput::WrongPath),
                });
            }
        };
        if let Some(auth) = &self.shared.auth {
            match (endpoint, req.authorization) {
                (Endpoint::Discovery, header) if auth.check_discovery(header).is_err() => {
                    return Err(Refusal {
                        status: 401,
                        message: "a valid Authorization: Bearer token is required on /ws/discovery",
                        kind: Some(BadInput::Unauthorized),
                    });
                }
                (Endpoint::Microservice, Some(header)) => match auth.verify(header) {
                    // Kept (the service it names) until service/register.
                    Ok(verified) => {
                        self.bearer.insert(conn.key, (conn.generation, verified));
                    }
                    Err(_) => {
                        return Err(Refusal {
                            status: 401,
                            message: "the Authorization bearer token is not valid for this controller",
                            kind: Some(BadInput::Unauthorized),
                        });
                    }
                },
                _ => {}
            }
        }
        let key = conn.key as usize;
        if self.conns.len() <= key {
            self.conns.resize(key + 1, ConnState::default());
        }
        self.conns[key] = ConnState {
            generation: conn.generation,
            slot: NO_SLOT,
            endpoint,
            registered: false,
            may_discover: false,
            inflight: 0,
            tokens: self.shared.config.request_burst,
            refilled_ds: 0,
        };
        Ok(())
    }

    fn on_open(&mut self, cx: &mut Cx<'_>, conn: ConnRef) {
        if self
            .state(conn)
            .is_some_and(|s| s.endpoint == Endpoint::Discovery)
        {
            cx.admit(conn);
        }
    }

    fn on_text(&mut self, cx: &mut Cx<'_>, conn: ConnRef, text: &str) {
        self.touch(conn, None);
        match jsonrpc::parse(text) {
            Ok(Message::Request { id, method, params }) => {
                if let Err(e) = self.request(cx, conn, id, &method, params) {
                    self.fail(cx, conn, Some(id), &e);
                }
            }
            Ok(Message::Notification { method, params }) => {
                if let Err(e) =
                    self.notification(conn, &method, params, text, cx.now(), cx.wall_ms())
                {
                    self.count(&e);
                }
            }
            Ok(Message::Response { id, outcome }) => self.response(conn, id, outcome),
            Err(ParseError::Json) => {
                let e = RpcError::new(Code::Parse, "parse error: the text frame is not valid JSON");
                self.fail(cx, conn, None, &e);
            }
            Err(ParseError::Invalid { id, why }) => {
                let e = RpcError::new(Code::InvalidRequest, format!("invalid request: {why}"));
                self.fail(cx, conn, id, &e);
            }
        }
    }

    fn on_alive(&mut self, _cx: &mut Cx<'_>, conn: ConnRef, rtt: Option<Duration>) {
        self.touch(conn, rtt.map(Rtt::new));
    }

    /// A command to the instance is still in flight: the service may be
    /// running the tool in its read loop (light-fabric does), answering no
    /// ping. It is not marked down before that command's own deadline.
    fn on_pong_missed(
        &mut self,
        conn: ConnRef,
        now: std::time::Instant,
    ) -> Option<std::time::Instant> {
        let state = self.state(conn)?;
        if state.inflight == 0 {
            return None;
        }
        self.commands
            .latest_deadline(conn)
            .filter(|deadline| *deadline > now)
    }

    fn on_closed(&mut self, cx: &mut Cx<'_>, conn: ConnRef, cause: CloseCause) {
        if !self.bearer.is_empty() {
            self.bearer.remove(&conn.key);
        }
        if !self.deregistered.is_empty() {
            self.deregistered.remove(&conn.key);
        }
        let Some(state) = self.state(conn).copied() else {
            return;
        };
        let owner = owner_of(conn);
        {
            let mut registry = self.shared.registry();
            registry.unsubscribe_all(owner);
            if let Some(instance) = state
                .registered
                .then(|| registry.owned_id(state.slot, owner))
                .flatten()
            {
                let now = cx.wall_ms();
                match cause {
                    CloseCause::PongMissed => {
                        registry.mark_down(&instance, owner, "no pong within pong-timeout", now);
                    }
                    _ => registry.disconnected(&instance, owner, now),
                }
            }
        }
        if state.inflight > 0 {
            self.commands.fail_conn(conn);
        }
        if let Some(s) = self.state(conn) {
            *s = ConnState {
                generation: 0,
                slot: NO_SLOT,
                ..ConnState::default()
            };
        }
    }

    fn on_message(&mut self, cx: &mut Cx<'_>, msg: ShardMsg) {
        match msg {
            ShardMsg::Supersede(old) => {
                self.mark_unregistered(old);
                cx.close(old, 4000, "superseded");
            }
            ShardMsg::Command(request, permit) => self.command(cx, *request, permit),
            ShardMsg::Drain {
                period,
                reconnect_window,
            } => self.start_drain(cx, period, reconnect_window),
        }
    }

    fn on_tick(&mut self, cx: &mut Cx<'_>) {
        if self.drain.is_some() {
            self.drain_some(cx);
        }
        let now = cx.wall_ms();
        if self
            .shared
            .supersede_pending
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Superseded from another node while this shard's queue was full.
            let mut later = self
                .shared
                .supersede_later
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let shard = self.shard;
            later.retain(|c| {
                let mine = c.shard == shard;
                if mine {
                    self.supersede_retry.push(*c);
                }
                !mine
            });
            self.shared
                .supersede_pending
                .store(!later.is_empty(), std::sync::atomic::Ordering::Release);
        }
        let retry = std::mem::take(&mut self.supersede_retry);
        for old in retry {
            self.supersede(cx, old);
        }
        let notifications = {
            let mut registry = self.shared.registry();
            for (slot, owner, rtt) in self.touched.drain(..) {
                if let Some(id) = registry.owned_id(slot, owner) {
                    registry.touch(&id, owner, now, rtt);
                }
            }
            if self.shard.0 == 0 {
                registry.expire_down(now);
                #[cfg(debug_assertions)]
                registry.check_invariants();
            }
            registry.take_notifications(self.shard.0, self.shared.monotonic_ms(cx.now()))
        };
        for n in notifications {
            self.buf.clear();
            jsonrpc::write_notification(
                &mut self.buf,
                "discovery/changed",
                rpc::shared_json(&n.snapshot),
            );
            // One encoded frame for every subscriber of this filter.
            cx.send_text_to_all(n.owners.into_iter().map(conn_of), &self.buf);
        }
        if !self.commands.is_empty() {
            for conn in self.commands.expire(cx.now()) {
                if let Some(s) = self.state(conn) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
            }
        }
    }
}

/// "no such path: tether serves {base}/ws/microservice and …": made once
/// per controller and shard (a `Refusal` carries a static message).
fn wrong_path_message(base: &str) -> &'static str {
    const PLAIN: &str = "no such path: tether serves /ws/microservice and /ws/discovery";
    if base.is_empty() {
        return PLAIN;
    }
    let message =
        format!("no such path: tether serves {base}{MICROSERVICE_PATH} and {base}{DISCOVERY_PATH}");
    Box::leak(message.into_boxed_str())
}

/// A default for commands that did not name a timeout.
pub(crate) const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests;
