//! The admin plane: the controller's internal HTTP API (default
//! 127.0.0.1:8439) for operators and the gateway. tokio + axum on threads
//! of their own; every call into the controller goes through `Api`, which
//! never blocks a shard (commands travel through shard mailboxes, listings
//! hold the registry lock briefly).
//!
//! Trust (`access`): every request but the probes must name an allowed
//! Host, come from no browser Origin or an allowed one, and carry the
//! admin key. Only a caller with the key is trusted to say who it acts for
//! (`X-Tether-User`) and with which scopes (`X-Tether-Scopes`, e.g.
//! `portal.r portal.w`); the gateway sets both. Mutating tools need
//! `portal.w`. `/healthz`, `/readyz` and `/metrics` are open and
//! read-only, and may have a listener of their own (`health_listen`).

pub mod access;
pub mod audit;
mod cluster;
mod commands;
mod events;
mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod listener;
mod mcp;
mod metrics;
pub(crate) mod serve;
mod services;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::controller::Api;
use audit::{Audit, AuditConfig};

pub use commands::is_mutating;
pub(crate) use listener::AdminListener;
pub use listener::{AdminPeer, AdminTls, TcpOrTls};
pub use metrics::render as render_metrics;

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// tokio worker threads.
    pub workers: usize,
    /// Most instances one fan-out may target.
    pub max_fanout: usize,
    /// Default and most commands one fan-out runs at once.
    pub fanout_concurrency: usize,
    pub max_fanout_concurrency: usize,
    /// Largest page of `GET /services`.
    pub max_page: usize,
    /// Fan-outs running at once; more get 429.
    pub max_concurrent_fanouts: usize,
    /// Bytes of one instance's result kept in a fan-out answer (more are
    /// replaced by a note of their size).
    pub max_fanout_result: usize,
    /// Longest timeout a command may ask for.
    pub max_command_timeout: Duration,
    /// Origins allowed to open the WebSockets (`/events`, `/ctrl/mcp`).
    /// Browsers always send Origin; other clients do not. Empty: no browser.
    pub allowed_origins: Vec<String>,
    /// `None`: audit lines go to the log.
    pub audit: Option<AuditConfig>,
    /// Event streams (`/events`, WebSocket or SSE) open at once; each
    /// counts until its task ends.
    pub max_event_streams: usize,
    /// A stream's client that takes nothing for this long is dropped
    /// (TCP_USER_TIMEOUT on admin sockets, and a WebSocket send timeout).
    pub stream_send_timeout: Duration,
    /// Result bytes one fan-out keeps in all; past them results are
    /// replaced by a note of their size.
    pub max_fanout_bytes: usize,
    /// What callers present as `Authorization: Bearer` (`access`).
    pub key: access::AdminKey,
    /// Host names (matched without case, with or without a port) the API
    /// answers to; others get 421, DNS rebinding included.
    pub allowed_hosts: Vec<String>,
    /// A second listener that serves only the open probes (`/healthz`,
    /// `/readyz`, `/metrics`).
    pub health_listen: Option<SocketAddr>,
    /// HTTPS on `listen` (the probes' own listener stays plain). With a
    /// client CA, a verified client certificate authenticates like the key.
    pub tls: Option<Arc<AdminTls>>,
    /// This node's cluster layer (`--cluster`), set once it has started
    /// (it needs the admin plane's address first).
    pub cluster: Arc<std::sync::OnceLock<Arc<crate::cluster::Cluster>>>,
    /// A request's headers must all arrive within this (slow-header
    /// clients are cut).
    pub header_timeout: Duration,
}

impl AdminConfig {
    pub fn new(listen: SocketAddr) -> AdminConfig {
        AdminConfig {
            listen,
            workers: 2,
            max_fanout: 10_000,
            fanout_concurrency: 64,
            max_fanout_concurrency: 1024,
            max_page: 1000,
            max_concurrent_fanouts: 4,
            max_fanout_result: 64 << 10,
            max_command_timeout: Duration::from_secs(300),
            allowed_origins: Vec::new(),
            audit: None,
            max_event_streams: 64,
            stream_send_timeout: Duration::from_secs(10),
            max_fanout_bytes: 16 << 20,
            key: access::AdminKey::random().expect("/dev/urandom gives random bytes"),
            allowed_hosts: access::default_hosts(listen),
            health_listen: None,
            tls: None,
            header_timeout: serve::HEADER_TIMEOUT,
            cluster: Arc::default(),
        }
    }
}

pub(crate) struct State {
    api: Arc<Api>,
    audit: Audit,
    config: AdminConfig,
    /// Becomes true when the server stops: live streams end on it.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Fan-outs running at once (each may hold many replies).
    fanouts: Arc<tokio::sync::Semaphore>,
    /// Event streams open.
    streams: Arc<tokio::sync::Semaphore>,
    /// Sorted listings running at once (`MAX_CONCURRENT_SORTS`).
    sorts: Arc<tokio::sync::Semaphore>,
    /// Clients of the other cluster nodes' admin APIs.
    peers: forward::Peers,
    pump: Arc<events::Pump>,
}

/// Sorted listings computed at once: each holds 32 bytes per matching
/// record (32 MB at a million) until it answers.
const MAX_CONCURRENT_SORTS: usize = 2;

type AppState = Arc<State>;

/// Who asks, as the headers of a caller holding the admin key say.
pub(crate) struct Caller {
    who: String,
    scopes: String,
    /// The cluster node that forwarded this request here, if one did.
    forwarded_by: Option<String>,
}

/// How long requests in flight may take to finish when the server stops.
const GRACE: Duration = Duration::from_secs(3);

/// SO_SNDBUF of admin connections (fixed, so the kernel does not grow it).
const SEND_BUFFER: usize = 128 << 10;

pub const USER_HEADER: &str = "x-tether-user";
pub const SCOPES_HEADER: &str = "x-tether-scopes";
/// The scope that allows mutating tools.
pub const WRITE_SCOPE: &str = "portal.w";

impl Caller {
    fn from_headers(headers: &HeaderMap, peer: SocketAddr) -> Caller {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Caller {
            who: header(USER_HEADER).map_or_else(|| format!("admin-api@{peer}"), str::to_owned),
            scopes: header(SCOPES_HEADER).unwrap_or("").to_owned(),
            forwarded_by: header(forward::FORWARDED_BY_HEADER).map(str::to_owned),
        }
    }

    fn can_write(&self) -> bool {
        self.scopes.split([' ', ',']).any(|s| s == WRITE_SCOPE)
    }
}

/// What every operation returns: an HTTP status and a JSON body. REST
/// sends both; MCP wraps the body in a tool result.
pub(crate) type Reply = (StatusCode, serde_json::Value);

/// A JSON error: `{"error": code, "message": text}`.
pub(crate) fn fail(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    (status, json!({"error": code, "message": message.into()}))
}

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    respond(fail(status, code, message))
}

pub(crate) fn respond((status, body): Reply) -> Response {
    (status, Json(body)).into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin listener {0} is already in use (another process, or another tether); stop it or pass --admin with another address"
    )]
    InUse(SocketAddr),
    #[error("cannot listen on {0} for the admin API: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    #[error("cannot start the admin runtime: {0}")]
    Runtime(std::io::Error),
}

/// A server's thread and how to stop it: told, then joined (on drop too).
pub(crate) struct Serving {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Serving {
    pub(crate) fn new(stop: tokio::sync::oneshot::Sender<()>, thread: JoinHandle<()>) -> Serving {
        Serving {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub(crate) fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The running admin server.
pub struct AdminServer {
    local_addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    serving: Serving,
    cluster: Arc<std::sync::OnceLock<Arc<crate::cluster::Cluster>>>,
}

impl AdminServer {
    /// Binds `config.listen` now (so a port in use is reported at once) and
    /// serves on threads of its own.
    pub fn start(api: Arc<Api>, config: AdminConfig) -> Result<AdminServer, AdminError> {
        let (listener, local_addr) = bind(config.listen)?;
        let health = config.health_listen.map(bind).transpose()?;
        let health_addr = health.as_ref().map(|(_, addr)| *addr);
        let audit = match &config.audit {
            Some(c) => Audit::to_file(c.clone()).map_err(AdminError::Audit)?,
            None => Audit::to_log(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("tether-admin")
            .enable_all()
            .build()
            .map_err(AdminError::Runtime)?;
        let fanouts = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_fanouts));
        let streams = Arc::new(tokio::sync::Semaphore::new(config.max_event_streams));
        let pump = events::Pump::start().map_err(AdminError::Runtime)?;
        let user_timeout = config.stream_send_timeout;
        let tls = config.tls.clone();
        let header_timeout = config.header_timeout;
        let cluster = config.cluster.clone();
        let state = Arc::new(State {
            api,
            audit,
            config,
            stopping: tokio::sync::watch::channel(false).0,
            fanouts,
            streams,
            sorts: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SORTS)),
            peers: forward::Peers::default(),
            pump: pump.clone(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tether-admin-main".into())
            .spawn(move || {
                let stopping = state.stopping.clone();
                runtime.block_on(async move {
                    // A client that stops reading (a stalled event stream)
                    // holds at most this much kernel memory before
                    // backpressure reaches its bounded queue and cuts it.
                    // And one that takes nothing at all (a zero window, SSE
                    // or not) is dropped by the kernel after the timeout.
                    let tune = move |tcp: &tokio::net::TcpStream| {
                        let socket = socket2::SockRef::from(tcp);
                        let _ = socket.set_send_buffer_size(SEND_BUFFER);
                        let _ = socket.set_tcp_user_timeout(Some(user_timeout));
                    };
                    let listener = match tokio::net::TcpListener::from_std(listener)
                        .and_then(|tcp| listener::AdminListener::start(tcp, tls, tune))
                    {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("admin listener: {e}"),
                    };
                    let (graceful, graceful_done) = tokio::sync::watch::channel(false);
                    let done = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|d| *d).await;
                    };
                    if let Some((health, _)) = health {
                        match tokio::net::TcpListener::from_std(health)
                            .and_then(|tcp| listener::AdminListener::start(tcp, None, |_| {}))
                        {
                            Ok(l) => {
                                let probes = probes(state.clone());
                                let stop = done(graceful_done.clone());
                                tokio::spawn(serve::serve(
                                    "admin health",
                                    l,
                                    probes,
                                    stop,
                                    GRACE,
                                    header_timeout,
                                ));
                            }
                            Err(e) => return tracing::error!("admin health listener: {e}"),
                        }
                    }
                    let app = router(state);
                    let serving = tokio::spawn(serve::serve(
                        "admin",
                        listener,
                        app,
                        done(graceful_done),
                        GRACE,
                        header_timeout,
                    ));
                    let _ = stopped.await;
                    // End live streams, then let requests in flight finish,
                    // for a bounded time (`serve` bounds it by GRACE).
                    let _ = stopping.send(true);
                    let _ = graceful.send(true);
                    if let Err(e) = serving.await {
                        tracing::error!("admin server task failed: {e}");
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
                pump.halt();
            })
            .map_err(AdminError::Runtime)?;
        Ok(AdminServer {
            local_addr,
            health_addr,
            serving: Serving::new(stop, thread),
            cluster,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the cluster layer is set once it has started (`--cluster`).
    pub fn cluster(&self) -> &std::sync::OnceLock<Arc<crate::cluster::Cluster>> {
        &self.cluster
    }

    /// The probes' own listener, if one was asked for.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    pub fn shutdown(mut self) {
        self.serving.halt();
    }
}

fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), AdminError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => AdminError::InUse(addr),
        _ => AdminError::Listen(addr, e),
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| AdminError::Listen(addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| AdminError::Listen(addr, e))?;
    Ok((listener, local))
}

/// The open, read-only probes.
fn probes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .with_state(state)
}

fn router(state: AppState) -> Router {
    let guard = axum::middleware::from_fn_with_state(state.clone(), access::guard);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/services", get(services::list))
        .route("/services/{id}", get(services::one))
        .route("/services/{id}/commands", post(commands::one))
        .route("/services/{id}/tools", get(commands::tools))
        .route("/commands", post(commands::fanout))
        .route("/summary", get(services::summary))
        .route("/cluster", get(cluster::status))
        .route("/cluster/services", get(cluster::services))
        .route("/events", get(events::events))
        .route("/metrics", get(metrics::metrics))
        .route("/ctrl/mcp", get(mcp::mcp))
        .layer(guard)
        .with_state(state)
}

/// Ready when not stopping, the audit log can be written, and the admin
/// plane can serve: a request that needs a blocking thread and the
/// registry (as `GET /services` does) is answered within a second.
async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    if !state.api.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if state.audit.failing() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit log cannot be written: mutating commands are refused until it can\n",
        )
            .into_response();
    }
    let api = state.api.clone();
    let probe = tokio::task::spawn_blocking(move || api.counts().up);
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        // A node that lost etcd still serves its own sockets: ready, and
        // says its view of the others is stale.
        Ok(Ok(_)) => match state.config.cluster.get() {
            Some(c) if c.is_stale() => format!(
                "ready (cluster view stale: {})\n",
                c.last_error().unwrap_or_default()
            )
            .into_response(),
            _ => "ready\n".into_response(),
        },
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin plane cannot serve: no blocking thread or registry within 1 s\n",
        )
            .into_response(),
    }
}

/// Browsers send Origin on cross-origin requests and every WebSocket
/// (other clients do not): only allowed origins may call, so a page in a
/// browser cannot read the registry or run tools through it.
pub(crate) fn check_origin(state: &State, headers: &HeaderMap) -> Result<(), Reply> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if state.config.allowed_origins.iter().any(|o| o == origin) {
        return Ok(());
    }
    Err(fail(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        format!(
            "requests from origin {origin:?} are not allowed; add it with --admin-allow-origin"
        ),
    ))
}

pub fn now_rfc3339() -> String {
    crate::controller::rpc::Rfc3339(crate::controller::now_ms()).to_string()
}
