//! What the gateway forwards to the admin plane, and how. Only the paths
//! and methods in `route` pass (everything else is 404 here, service
//! sockets included: `/ws/microservice` is never proxied). Requests go
//! upstream with a fixed set of headers: the caller's own identity headers
//! and credentials are dropped, and the gateway sets `Authorization` (its
//! admin key), `X-Tether-User` and `X-Tether-Scopes` from the
//! authenticated user.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::CloseFrame as AxClose;
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use tokio_tungstenite::tungstenite::Message as TgMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TgClose;

use super::identity::User;
use super::limits::SocketSlot;
use super::upstream::Upstream;
use super::{GatewayError, fail};
use crate::admin::{SCOPES_HEADER, USER_HEADER};

/// How a route is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// A request and its (streamed) response.
    Http,
    /// A WebSocket, or else a streamed response (`/events` speaks both).
    Stream,
    /// A WebSocket only.
    Socket,
}

/// An allowed request: where it goes upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub path: String,
    pub carry: Carry,
    /// A command body: the gateway checks its tool against the user's
    /// scopes before it goes.
    pub command: bool,
    /// It sends the service something (a command, `tools/list`): a
    /// browser session must show its CSRF token, even on a GET.
    pub sends: bool,
}

/// An instance id or service id in a path: letters, digits, `-`, `_`,
/// `.`, at most 128 (no `..`, no escapes).
fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The allowlist: `/api/...` paths of the gateway to admin plane paths.
pub fn route(method: &Method, path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/api/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let target = |path: String, carry, command| {
        Some(Target {
            sends: command || path.ends_with("/tools"),
            path,
            carry,
            command,
        })
    };
    match (method, parts.as_slice()) {
        (&Method::GET, ["services"]) => target("/services".into(), Carry::Http, false),
        (&Method::GET, ["summary"]) => target("/summary".into(), Carry::Http, false),
        (&Method::GET, ["cluster"]) => target("/cluster".into(), Carry::Http, false),
        (&Method::GET, ["services", id]) if segment_ok(id) => {
            target(format!("/services/{id}"), Carry::Http, false)
        }
        (&Method::GET, ["services", id, "tools"]) if segment_ok(id) => {
            target(format!("/services/{id}/tools"), Carry::Http, false)
        }
        (&Method::POST, ["services", id, "commands"]) if segment_ok(id) => {
            target(format!("/services/{id}/commands"), Carry::Http, true)
        }
        (&Method::POST, ["commands"]) => target("/commands".into(), Carry::Http, true),
        (&Method::GET, ["events"]) => target("/events".into(), Carry::Stream, false),
        (&Method::GET, ["ctrl", "mcp"]) => target("/ctrl/mcp".into(), Carry::Socket, false),
        _ => None,
    }
}

/// Response headers passed back from upstream (others are dropped).
const PASS_BACK: [header::HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::RETRY_AFTER,
    header::CACHE_CONTROL,
];

/// One allowed request, authenticated: what every forward needs.
pub struct Forward<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub target: &'a Target,
    pub query: Option<&'a str>,
    pub user: &'a User,
    pub request_id: &'a str,
}

impl Forward<'_> {
    /// The headers every upstream request carries.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("host", self.upstream.authority().to_string()),
            (USER_HEADER, self.user.name.clone()),
            (SCOPES_HEADER, self.user.scopes_header()),
            ("x-request-id", self.request_id.to_string()),
        ];
        if let Some(bearer) = self.upstream.bearer() {
            h.push(("authorization", bearer.to_string()));
        }
        h
    }

    /// The upstream path and query.
    fn path_and_query(&self) -> String {
        match self.query {
            Some(q) => format!("{}?{q}", self.target.path),
            None => self.target.path.clone(),
        }
    }
}

/// Forwards one HTTP request (its body already read and bounded).
/// A stream's (SSE's) guard: its slot and when it must end.
pub type StreamGuard = (SocketSlot, SocketEnd);

pub async fn forward_http(
    f: Forward<'_>,
    method: Method,
    incoming: &HeaderMap,
    body: Bytes,
    stream: Option<StreamGuard>,
) -> Response {
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(f.path_and_query());
    for (k, v) in f.headers() {
        builder = builder.header(k, v);
    }
    let last_event_id = header::HeaderName::from_static("last-event-id");
    for name in [header::ACCEPT, header::CONTENT_TYPE, last_event_id] {
        if let Some(v) = incoming.get(&name) {
            builder = builder.header(name, v.clone());
        }
    }
    let request = match builder.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return fail(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    match f.upstream.send(request).await {
        Ok(response) if response.status() == StatusCode::UNAUTHORIZED => refused_gateway(),
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = match stream {
                // An event stream counts against its user's sockets, and
                // ends with its session or token, as a WebSocket does.
                Some((slot, end)) => Body::new(Ending {
                    inner: body,
                    end: Box::pin(end.wait()),
                    _slot: slot,
                }),
                None => Body::new(body),
            };
            let mut out = Response::new(body);
            *out.status_mut() = parts.status;
            for name in PASS_BACK {
                if let Some(v) = parts.headers.get(&name) {
                    out.headers_mut().insert(name, v.clone());
                }
            }
            out
        }
        Err(e) => GatewayError::Upstream(e).into_response(),
    }
}

/// A streamed body that ends early when its credentials end.
struct Ending<B> {
    inner: B,
    end: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    _slot: SocketSlot,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Ending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        if self.end.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
}

/// The admin plane refused the gateway's own credentials (a wrong admin
/// key or client certificate): that is the gateway's fault, not the
/// user's, so not a 401 (a browser would be sent to log in again, in a
/// loop).
fn refused_gateway() -> Response {
    tracing::error!(
        "the admin plane refused the gateway's credentials: check --upstream-key-file or the client certificate"
    );
    fail(
        StatusCode::BAD_GATEWAY,
        "upstream_refused_gateway",
        "the admin plane refused the gateway's own credentials; the operator must fix the gateway's admin key or certificate",
    )
}

/// When a proxied WebSocket must close: its session ended, or a deadline
/// (the session's lifetime, the bearer token's expiry) passed.
pub struct SocketEnd {
    pub ended: Option<tokio::sync::watch::Receiver<bool>>,
    pub deadline: Option<std::time::Instant>,
    /// Asked every `REVALIDATE`: false ends the socket (its session idled
    /// out, or its user's scopes changed since it opened).
    pub still_valid: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

/// How often an open socket's session is checked again.
const REVALIDATE: std::time::Duration = std::time::Duration::from_secs(30);

impl SocketEnd {
    async fn wait(mut self) {
        let ended = async {
            match &mut self.ended {
                Some(rx) => {
                    let _ = rx.wait_for(|ended| *ended).await;
                }
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let still_valid = async {
            match &self.still_valid {
                Some(valid) => loop {
                    tokio::time::sleep(REVALIDATE).await;
                    if !valid() {
                        return;
                    }
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = ended => {}
            () = deadline => {}
            () = still_valid => {}
        }
    }
}

/// What bounds a proxied WebSocket's caller.
pub struct SocketLimits {
    /// Largest message from the caller (the HTTP body limit).
    pub max_message: usize,
    /// Takes one of the user's requests per message from the caller; an
    /// `Err` says how long to wait (the socket then reads no more until
    /// then: backpressure, not an error).
    pub throttle: Box<dyn Fn() -> Result<(), std::time::Duration> + Send + Sync>,
}

/// How long a message to the caller may take to go out before the caller
/// is taken for gone.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The caller is pinged this often (idle NATs and dead peers).
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the upstream WebSocket first (so a failure is a 502 to the
/// caller, not a socket that closes at once), then upgrades the caller's.
pub async fn forward_socket(
    f: Forward<'_>,
    upgrade: WebSocketUpgrade,
    slot: SocketSlot,
    protocol: Option<&'static str>,
    end: SocketEnd,
    limits: SocketLimits,
) -> Response {
    let upstream = f.upstream.clone();
    let scheme = if upstream.is_tls() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}{}", upstream.authority(), f.path_and_query());
    let mut request = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return fail(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    for (k, v) in f.headers() {
        if let Ok(v) = HeaderValue::from_str(&v) {
            request.headers_mut().insert(k, v);
        }
    }
    let io = match upstream.connect().await {
        Ok(io) => io,
        Err(e) => return GatewayError::Upstream(e).into_response(),
    };
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::client_async(request, io),
    )
    .await;
    let upstream_ws = match opened {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response)))
            if response.status() == StatusCode::UNAUTHORIZED =>
        {
            return refused_gateway();
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            // The admin plane refused (a bad `since`, too many streams):
            // its status and body go back as they are.
            let status = response.status();
            let body = response.into_body().unwrap_or_default();
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return out;
        }
        Ok(Err(e)) => {
            return GatewayError::Upstream(format!("WebSocket upstream: {e}")).into_response();
        }
        Err(_) => {
            return GatewayError::Upstream(
                "the admin plane's WebSocket did not open within 10 s".into(),
            )
            .into_response();
        }
    };
    let upgrade = match protocol {
        Some(p) => upgrade.protocols([p]),
        None => upgrade,
    };
    upgrade
        .max_message_size(limits.max_message)
        .max_frame_size(limits.max_message)
        .on_upgrade(move |socket| relay(socket, upstream_ws, slot, end, limits))
}

type UpstreamWs = tokio_tungstenite::WebSocketStream<super::upstream::UpstreamIo>;

/// A message for upstream; `Err` carries a close (its code and reason
/// kept).
fn to_upstream(m: AxMessage) -> Result<TgMessage, Option<TgClose>> {
    Ok(match m {
        AxMessage::Text(t) => TgMessage::text(t.as_str()),
        AxMessage::Binary(b) => TgMessage::binary(b),
        AxMessage::Ping(p) => TgMessage::Ping(p),
        AxMessage::Pong(p) => TgMessage::Pong(p),
        AxMessage::Close(frame) => {
            return Err(frame.map(|f| TgClose {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            }));
        }
    })
}

/// A message for the caller; `Err` carries a close (the admin plane's
/// code, e.g. 1008 for a stream cut for falling behind, goes through).
fn to_client(m: TgMessage) -> Result<Option<AxMessage>, Option<AxClose>> {
    Ok(Some(match m {
        TgMessage::Text(t) => AxMessage::text(t.as_str()),
        TgMessage::Binary(b) => AxMessage::binary(b),
        TgMessage::Ping(p) => AxMessage::Ping(p),
        TgMessage::Pong(p) => AxMessage::Pong(p),
        TgMessage::Frame(_) => return Ok(None),
        TgMessage::Close(frame) => {
            return Err(frame.map(|f| AxClose {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            }));
        }
    }))
}

/// Carries messages both ways until either side closes, then closes the
/// other with the same code; or until `end`, when both are closed (1008
/// to the caller: its credentials ended). Messages from the caller are
/// rate-limited like requests; the caller is pinged every `PING_EVERY`,
/// and one that takes nothing for `SEND_TIMEOUT` is dropped. `_slot`
/// counts the socket against its user until then.
async fn relay(
    client: WebSocket,
    upstream: UpstreamWs,
    _slot: SocketSlot,
    end: SocketEnd,
    limits: SocketLimits,
) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let (outgoing, mut outbox) = tokio::sync::mpsc::channel::<AxMessage>(64);
    // One writer to the caller: relayed messages, pongs and our pings.
    let writer = async {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            let m = tokio::select! {
                m = outbox.recv() => m,
                _ = ping.tick() => Some(AxMessage::Ping(Bytes::new())),
            };
            let Some(m) = m else { return };
            let closing = matches!(m, AxMessage::Close(_));
            match tokio::time::timeout(SEND_TIMEOUT, client_tx.send(m)).await {
                Ok(Ok(())) if !closing => {}
                _ => return,
            }
        }
    };
    let down = async {
        let mut close = None;
        while let Some(Ok(m)) = up_rx.next().await {
            match to_client(m) {
                Ok(Some(m)) => {
                    if outgoing.send(m).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(frame) => {
                    close = frame;
                    break;
                }
            }
        }
        let _ = outgoing.send(AxMessage::Close(close)).await;
        std::future::pending::<()>().await;
    };
    let up = async {
        let mut close = None;
        while let Some(Ok(m)) = client_rx.next().await {
            if matches!(m, AxMessage::Text(_) | AxMessage::Binary(_))
                && let Err(wait) = (limits.throttle)()
            {
                tokio::time::sleep(wait).await;
            }
            match to_upstream(m) {
                Ok(m) => {
                    if up_tx.send(m).await.is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    close = frame;
                    break;
                }
            }
        }
        let _ = up_tx.send(TgMessage::Close(close)).await;
        let _ = up_tx.close().await;
    };
    let credentials_ended = tokio::select! {
        () = writer => false,
        () = down => false,
        () = up => false,
        () = end.wait() => true,
    };
    if credentials_ended {
        let close = AxClose {
            code: 1008,
            reason: "the session or token ended: log in again".into(),
        };
        let _ =
            tokio::time::timeout(SEND_TIMEOUT, client_tx.send(AxMessage::Close(Some(close)))).await;
        let _ = up_tx.send(TgMessage::Close(None)).await;
    } else {
        // Answer a close the caller began (tungstenite queues the reply
        // until the next write or flush).
        let _ = tokio::time::timeout(Duration::from_secs(1), client_tx.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_admin_routes_pass() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(route(&get, "/api/services").unwrap().path, "/services");
        let id = "0190b5a4-1111-7000-8000-000000000001";
        assert_eq!(
            route(&get, &format!("/api/services/{id}")).unwrap().path,
            format!("/services/{id}")
        );
        assert!(
            route(&post, &format!("/api/services/{id}/commands"))
                .unwrap()
                .command
        );
        assert!(route(&post, "/api/commands").unwrap().command);
        assert_eq!(route(&get, "/api/cluster").unwrap().path, "/cluster");
        assert!(route(&post, "/api/cluster").is_none());
        assert_eq!(route(&get, "/api/events").unwrap().carry, Carry::Stream);
        assert_eq!(route(&get, "/api/ctrl/mcp").unwrap().carry, Carry::Socket);
        for (m, p) in [
            (&get, "/ws/microservice"),
            (&get, "/api/ws/microservice"),
            (&get, "/api/ws/discovery"),
            (&get, "/api/metrics"),
            (&post, "/api/services"),
            (&Method::DELETE, &format!("/api/services/{id}")),
            (&get, "/api/services/../metrics"),
            (&get, "/api/services/%2e%2e"),
            (&get, "/api/services/a%2Fb/tools"),
            (&get, "/api/services//tools"),
            (&get, "/api/services/x/tools/extra"),
            (&get, "/services"),
            (&get, "/api/"),
        ] {
            assert!(route(m, p).is_none(), "{m} {p}");
        }
    }
}
