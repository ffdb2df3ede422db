//! The gateway: a backend-for-frontend in front of human admins only.
//! Services never come through it (`/ws/microservice` is not proxied; the
//! chained relay the load test measures is `crate::relay`, a separate
//! mode).
//!
//! - Browsers log in with OIDC (`oidc`: authorization code + PKCE, as a
//!   confidential client) or, under `--dev`, with a built-in login page.
//!   They hold only a session cookie (`session`); every state-changing
//!   request and WebSocket upgrade must carry the session's CSRF token
//!   (`X-Tether-CSRF`, or the `csrf.<token>` WebSocket subprotocol, as a
//!   browser cannot set headers on a WebSocket) and come from an allowed
//!   Origin.
//! - API clients send a bearer JWT (`identity`).
//! - Either way the user needs `portal.r`, and `portal.w` for mutating
//!   commands; requests are rate-limited per user (`limits`) and bounded
//!   in size, and go to the admin plane through `proxy`'s allowlist with
//!   the gateway's own credentials (`upstream`).
//! - Every response carries security headers (CSP with
//!   `frame-ancestors 'none'`, nosniff, no referrer across origins), and every request
//!   one JSON line in the access log (`access_log`).

pub mod access_log;
pub mod forwarded;
pub mod identity;
pub mod limits;
pub mod oidc;
pub mod proxy;
pub mod session;
mod ui;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::admin::AdminTls;
use crate::admin::access::AdminKey;
pub use crate::admin::upstream;
use crate::jwt::Verifier;
use limits::{Limiter, RateLimit, SocketCounts};
use oidc::Oidc;
use session::{SessionLimits, Sessions};
use upstream::{Upstream, UpstreamConfig};

/// The session cookie (the `__Host-` prefix: Secure, Path=/, no Domain).
pub const SESSION_COOKIE: &str = "__Host-tether-session";
/// Binds an OIDC callback to the browser that started the login.
pub const LOGIN_COOKIE: &str = "__Host-tether-login";
/// The header that carries the session's CSRF token.
pub const CSRF_HEADER: &str = "x-tether-csrf";
/// The WebSocket subprotocol the gateway answers with; the browser offers
/// it with `csrf.<token>`.
pub const WS_PROTOCOL: &str = "tether.v1";

/// How long requests in flight may take to finish when the gateway stops.
const GRACE: Duration = Duration::from_secs(3);

pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// The URL browsers reach the gateway at (scheme://host[:port]): the
    /// OIDC redirect goes under it, and its origin is allowed. Default:
    /// http(s)://the bound address.
    pub public_url: Option<String>,
    /// Origins allowed besides the public URL's.
    pub allowed_origins: Vec<String>,
    pub upstream: UpstreamConfig,
    /// Verifies API clients' bearer tokens; `None`: bearer tokens refused.
    pub bearer: Option<Verifier>,
    pub oidc: Option<Oidc>,
    /// `--dev`: the built-in login page (no identity provider).
    pub dev_login: bool,
    pub rate: RateLimit,
    /// Largest request body, in bytes (413 past it).
    pub max_body: usize,
    /// WebSockets one user may hold open at once.
    pub max_sockets_per_user: usize,
    pub sessions: SessionLimits,
    /// `None`: the access log goes to stdout.
    pub access_log: Option<std::path::PathBuf>,
    /// HTTPS on `listen`.
    pub tls: Option<Arc<AdminTls>>,
    pub workers: usize,
    /// A request's headers must all arrive within this (slow-header
    /// clients are cut).
    pub header_timeout: Duration,
    /// Proxies in front of the gateway whose `X-Forwarded-For` names the
    /// client (per-address limits, the access log); default none.
    pub trusted_proxies: forwarded::TrustedProxies,
}

impl GatewayConfig {
    /// Defaults for a gateway on `listen` in front of the admin plane at
    /// `upstream` (called with `key`).
    pub fn new(listen: SocketAddr, upstream: &str, key: Option<AdminKey>) -> GatewayConfig {
        GatewayConfig {
            listen,
            public_url: None,
            allowed_origins: Vec::new(),
            upstream: UpstreamConfig {
                url: upstream.into(),
                key,
                ca: None,
                client_cert: None,
            },
            bearer: None,
            oidc: None,
            dev_login: false,
            rate: RateLimit {
                rate: 20.0,
                burst: 60.0,
            },
            max_body: 64 << 10,
            max_sockets_per_user: 8,
            sessions: SessionLimits::default(),
            access_log: None,
            tls: None,
            workers: 2,
            header_timeout: crate::admin::serve::HEADER_TIMEOUT,
            trusted_proxies: forwarded::TrustedProxies::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the admin plane is unreachable: {0}")]
    Upstream(String),
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        match self {
            GatewayError::Upstream(e) => {
                tracing::warn!("gateway upstream: {e}");
                fail(StatusCode::BAD_GATEWAY, "upstream_unavailable", e)
            }
        }
    }
}

/// A JSON error: `{"error": code, "message": text}`.
pub(crate) fn fail(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

pub(crate) struct State {
    config: GatewayConfig,
    upstream: Arc<Upstream>,
    sessions: Sessions,
    limiter: Limiter,
    sockets: SocketCounts,
    log: access_log::AccessLog,
    /// Origins allowed (the public URL's first).
    origins: Vec<String>,
    /// Cookies get Secure (the public URL is https, or a loopback http
    /// one, which browsers treat as secure).
    public_origin: String,
}

/// The origin (scheme://host[:port]) of a URL.
pub fn origin_of(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no host"));
    }
    let authority = authority.to_ascii_lowercase();
    // Browsers leave the scheme's default port out of Origin.
    let default = if scheme == "https" { ":443" } else { ":80" };
    let authority = authority.strip_suffix(default).unwrap_or(&authority);
    Ok(format!("{scheme}://{authority}"))
}

/// A public URL browsers can keep the gateway's cookies for: https, or
/// http on a loopback name (which browsers treat as secure). No path: the
/// cookies are for `/`.
pub fn check_public_url(url: &str) -> Result<(), String> {
    let origin = origin_of(url)?;
    let rest = url
        .split_once("://")
        .map_or("", |(_, r)| r)
        .trim_end_matches('/');
    if rest.contains(['/', '?', '#']) {
        return Err(format!(
            "the public URL {url:?} must have no path (the gateway serves /)"
        ));
    }
    let host = origin.split_once("://").map_or("", |(_, h)| h);
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let loopback = host == "localhost" || host == "[::1]" || host.starts_with("127.");
    if origin.starts_with("http://") && !loopback {
        return Err(format!(
            "the public URL {url:?} is plain http on a non-loopback host: browsers would drop the gateway's Secure cookies; serve https (--tls-cert, or a TLS proxy in front and --public-url https://…)"
        ));
    }
    Ok(())
}

/// The running gateway.
pub struct Gateway {
    local_addr: SocketAddr,
    public_origin: String,
    serving: crate::admin::Serving,
}

impl Gateway {
    /// Binds `config.listen` now and serves on threads of its own.
    pub fn start(config: GatewayConfig) -> Result<Gateway, String> {
        let upstream = Arc::new(Upstream::new(&config.upstream)?);
        let listener = std::net::TcpListener::bind(config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let public_origin = match &config.public_url {
            Some(url) => origin_of(url)?,
            None => format!("{scheme}://{local_addr}"),
        };
        let mut origins = vec![public_origin.clone()];
        for o in &config.allowed_origins {
            origins.push(origin_of(o)?);
        }
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let log = access_log::AccessLog::open(config.access_log.as_deref())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("tether-gateway")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the gateway runtime: {e}"))?;
        let tls = config.tls.clone();
        let header_timeout = config.header_timeout;
        let state_origin = public_origin.clone();
        let state = Arc::new(State {
            sessions: Sessions::new(config.sessions),
            limiter: Limiter::new(config.rate),
            sockets: SocketCounts::new(config.max_sockets_per_user),
            config,
            upstream,
            log,
            origins,
            public_origin,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tether-gateway-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // A peer that takes nothing for a minute, or vanished
                    // without a FIN, is dropped by the kernel.
                    let tune = |tcp: &tokio::net::TcpStream| {
                        let _ = tcp.set_nodelay(true);
                        let socket = socket2::SockRef::from(tcp);
                        let _ = socket.set_tcp_user_timeout(Some(Duration::from_secs(60)));
                        let _ = socket.set_tcp_keepalive(
                            &socket2::TcpKeepalive::new()
                                .with_time(Duration::from_secs(60))
                                .with_interval(Duration::from_secs(10)),
                        );
                    };
                    let listener = match tokio::net::TcpListener::from_std(listener)
                        .and_then(|tcp| crate::admin::AdminListener::start(tcp, tls, tune))
                    {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("gateway listener: {e}"),
                    };
                    let app = web::router(state);
                    let stop = async {
                        let _ = stopped.await;
                    };
                    crate::admin::serve::serve(
                        "gateway",
                        listener,
                        app,
                        stop,
                        GRACE,
                        header_timeout,
                    )
                    .await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the gateway: {e}"))?;
        Ok(Gateway {
            local_addr,
            public_origin: state_origin,
            serving: crate::admin::Serving::new(stop, thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The origin browsers use (the public URL's, or the bound address's).
    pub fn public_origin(&self) -> &str {
        &self.public_origin
    }

    pub fn shutdown(mut self) {
        self.serving.halt();
    }
}

/// The headers every gateway response carries.
pub(crate) fn security_headers(headers: &mut axum::http::HeaderMap, https: bool) {
    let set = |h: &mut axum::http::HeaderMap, name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // same-origin, not no-referrer: under no-referrer Chromium sends
    // `Origin: null` on form posts, and the Origin check needs the real one.
    set(headers, header::REFERRER_POLICY, "same-origin");
    set(
        headers,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    if https {
        set(
            headers,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000",
        );
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_origins_browsers_keep_cookies_for() {
        assert_eq!(
            origin_of("https://Admin.Example.com:443/").unwrap(),
            "https://admin.example.com"
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8440").unwrap(),
            "http://127.0.0.1:8440"
        );
        assert!(check_public_url("https://admin.example.com").is_ok());
        assert!(check_public_url("http://127.0.0.1:8440/").is_ok());
        assert!(check_public_url("http://localhost:8440").is_ok());
        assert!(
            check_public_url("http://admin.example.com").is_err(),
            "plain http"
        );
        assert!(
            check_public_url("https://admin.example.com/tether").is_err(),
            "a path"
        );
        assert!(check_public_url("ftp://x").is_err());
    }
}
