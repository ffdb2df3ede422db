//! The gateway's routes: `/api/…` (proxied, after authentication and the
//! checks in `mod.rs`'s summary), `/auth/…` (browser login, session,
//! logout), the probes, and the Admin UI.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::json;

use super::identity::{self, User};
use super::proxy::{self, Carry};
use super::session::{PendingLogin, random_token, same_secret};
use super::{
    CSRF_HEADER, LOGIN_COOKIE, SESSION_COOKIE, State, WS_PROTOCOL, fail, security_headers,
};
use crate::admin::AdminPeer;

type AppState = Arc<State>;

/// Longest query string passed upstream.
const MAX_QUERY: usize = 4096;
/// Longest `return_to` path kept through a login.
const MAX_RETURN_TO: usize = 512;

/// The request's id, set by `frame`.
#[derive(Clone)]
struct RequestId(String);

/// Who the access log names for a response.
#[derive(Clone)]
struct LoggedUser(String);

pub(super) fn router(state: AppState) -> Router {
    let frame = axum::middleware::from_fn_with_state(state.clone(), frame);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/auth/session", get(session_info))
        .route("/auth/login", get(login))
        .route("/auth/callback", get(callback))
        .route("/auth/dev-login", post(dev_login))
        .route("/auth/logout", post(logout))
        .route("/api/{*rest}", any(api))
        .fallback(ui_or_not_found)
        .layer(frame)
        .with_state(state)
}

async fn not_found() -> Response {
    fail(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route on the gateway",
    )
}

/// The address a request comes from: the peer, or whom a trusted proxy
/// spoke for (`forwarded`).
#[derive(Clone, Copy)]
struct ClientIp(std::net::IpAddr);

/// Around every request: its id, the security headers, the access log.
async fn frame(
    AxState(state): AxState<AppState>,
    ConnectInfo(peer): ConnectInfo<AdminPeer>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = random_token(9);
    request.extensions_mut().insert(RequestId(id.clone()));
    let client = ClientIp(
        state
            .config
            .trusted_proxies
            .client(peer.addr.ip(), request.headers()),
    );
    request.extensions_mut().insert(client);
    let method = request.method().clone();
    let path: String = request.uri().path().chars().take(512).collect();
    let mut response = next.run(request).await;
    security_headers(
        response.headers_mut(),
        state.public_origin.starts_with("https://"),
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let user = response
        .extensions()
        .get::<LoggedUser>()
        .map(|u| u.0.clone());
    state.log.write(&json!({
        "ts": crate::admin::now_rfc3339(),
        "id": id,
        "peer": peer.addr.to_string(),
        // Behind a trusted proxy: whom it spoke for.
        "client": (client.0 != peer.addr.ip()).then(|| client.0.to_string()),
        "method": method.as_str(),
        "path": path,
        "status": response.status().as_u16(),
        "user": user,
        "ms": (started.elapsed().as_secs_f64() * 1e3 * 1000.0).round() / 1000.0,
    }));
    response
}

fn with_user(mut response: Response, user: &str) -> Response {
    response
        .extensions_mut()
        .insert(LoggedUser(user.to_string()));
    response
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(response: &mut Response, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn session_cookie(id: &str) -> String {
    format!("{SESSION_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict")
}

fn cleared(name: &str, same_site: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age=0")
}

/// Why a request is refused (a JSON error once it is a response).
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        fail(self.0, self.1, self.2)
    }
}

/// A browser's Origin, when it sent one, must be allowed.
fn check_origin(state: &State, headers: &HeaderMap) -> Result<bool, Refusal> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(false);
    };
    let origin = origin.to_str().unwrap_or("");
    if state.origins.iter().any(|o| o == origin) {
        return Ok(true);
    }
    Err(Refusal(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        format!("requests from origin {origin:?} are not allowed; add it with --allow-origin"),
    ))
}

/// How the caller authenticated.
enum Via {
    /// With when the token expires (Unix seconds).
    Bearer(Option<u64>),
    Session {
        id: String,
        csrf: String,
        ended: tokio::sync::watch::Receiver<bool>,
        deadline: Instant,
    },
}

impl Via {
    /// When a stream it opens must end: its token's expiry; or its
    /// session's end (logout, expiry, eviction), lifetime, idling out, or
    /// a change of its user's scopes.
    fn socket_end(&self, state: &AppState, user: &User) -> proxy::SocketEnd {
        match self {
            Via::Bearer(exp) => proxy::SocketEnd {
                ended: None,
                deadline: exp.and_then(|exp| {
                    let left = exp.saturating_sub(identity::unix_now());
                    Instant::now()
                        .checked_add(std::time::Duration::from_secs(left) + crate::jwt::LEEWAY)
                }),
                still_valid: None,
            },
            Via::Session {
                id,
                ended,
                deadline,
                ..
            } => {
                let (st, id, scopes) = (state.clone(), id.clone(), user.scopes.clone());
                proxy::SocketEnd {
                    ended: Some(ended.clone()),
                    deadline: Some(*deadline),
                    still_valid: Some(Box::new(move || {
                        st.sessions
                            .alive(&id)
                            .is_some_and(|s| s.user.scopes == scopes)
                    })),
                }
            }
        }
    }
}

fn unauthorized(message: impl Into<String>) -> Response {
    let mut r = fail(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tether\", error=\"invalid_token\""),
    );
    r
}

fn too_many(wait: std::time::Duration, what: &str) -> Response {
    let mut r = fail(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        what.to_string(),
    );
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// The session named by the cookie, refreshed on the server when its
/// access token expired (a failed refresh ends it).
async fn session_user(state: &AppState, headers: &HeaderMap) -> Result<(User, Via), String> {
    let id =
        cookie(headers, SESSION_COOKIE).ok_or("no credentials: log in, or send a bearer token")?;
    let session = state
        .sessions
        .get(id)
        .ok_or("the session has ended: log in again")?;
    let mut user = session.user.clone();
    let expired =
        |s: &super::session::Session| s.oidc.as_ref().is_some_and(|t| Instant::now() >= t.expires);
    if state.config.oidc.is_some() && expired(&session) {
        let _one_at_a_time = session.refreshing.lock().await;
        // Another request may have refreshed them meanwhile.
        let session = state
            .sessions
            .get(id)
            .ok_or("the session has ended: log in again")?;
        user = session.user.clone();
        if !expired(&session) {
            let via = session_via(state, id, &session);
            return Ok((user, via));
        }
        let (st, tokens, was) = (
            state.clone(),
            session.oidc.clone().expect("expired tokens"),
            session.user.clone(),
        );
        let refreshed = tokio::task::spawn_blocking(move || {
            let oidc = st.config.oidc.as_ref().expect("checked above");
            oidc.refresh(&tokens, &was, st.config.bearer.as_ref())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match refreshed {
            Ok((fresh, tokens)) => {
                state.sessions.update(id, fresh.clone(), Some(tokens));
                user = fresh;
            }
            Err(e) => {
                state.sessions.remove(id);
                tracing::info!("session of {} ended: {e}", user.name);
                return Err("the session has expired: log in again".into());
            }
        }
    }
    let via = session_via(state, id, &session);
    Ok((user, via))
}

fn session_via(state: &State, id: &str, session: &super::session::Session) -> Via {
    Via::Session {
        id: id.to_string(),
        csrf: session.csrf.clone(),
        ended: session.ended.subscribe(),
        deadline: session.deadline(state.sessions.limits()),
    }
}

/// A bearer token (API clients) or a session cookie (browsers).
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<(User, Via), String> {
    // A Bearer token (the scheme in any case) wins; another scheme (a
    // proxy's Basic, say) is not ours, and the session cookie is used.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|a| a.to_str().ok())
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    if let Some(token) = bearer {
        let verifier = state.config.bearer.as_ref().ok_or(
            "this gateway takes no bearer tokens (start it with --jwks, --jwks-url or --dev)",
        )?;
        return identity::bearer(verifier, token.trim()).map(|(u, exp)| (u, Via::Bearer(exp)));
    }
    session_user(state, headers).await
}

/// The CSRF token a browser request carries: the header, or on a
/// WebSocket upgrade the `csrf.<token>` subprotocol.
fn offered_csrf(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("csrf.").map(str::to_owned))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A session's state-changing request (or any WebSocket upgrade) must
/// come from an allowed Origin and carry the session's CSRF token.
fn check_csrf(headers: &HeaderMap, csrf: &str, origin_seen: bool) -> Result<(), Refusal> {
    if !origin_seen {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "csrf",
            "a browser session's request must carry an allowed Origin".into(),
        ));
    }
    match offered_csrf(headers) {
        Some(offered) if same_secret(&offered, csrf) => Ok(()),
        Some(_) => Err(Refusal(
            StatusCode::FORBIDDEN,
            "csrf",
            "the CSRF token is not this session's".into(),
        )),
        None => Err(Refusal(
            StatusCode::FORBIDDEN,
            "csrf",
            format!(
                "a browser session's request must carry {CSRF_HEADER} (or the csrf.<token> WebSocket subprotocol)"
            ),
        )),
    }
}

/// The tool a command body names, if it parses.
fn command_tool(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("name")?.as_str().map(str::to_owned)
}

async fn api(
    AxState(state): AxState<AppState>,
    Extension(client): Extension<ClientIp>,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map_or_else(String::new, |r| r.0.clone());
    let Some(target) = proxy::route(&parts.method, parts.uri.path()) else {
        return fail(
            StatusCode::NOT_FOUND,
            "not_found",
            "the gateway does not forward this path or method",
        );
    };
    let origin_seen = match check_origin(&state, &parts.headers) {
        Ok(seen) => seen,
        Err(r) => return r.into_response(),
    };
    let query = parts.uri.query().map(str::to_owned);
    if query.as_ref().is_some_and(|q| q.len() > MAX_QUERY) {
        return fail(
            StatusCode::URI_TOO_LONG,
            "query_too_long",
            format!("the query string is longer than {MAX_QUERY} bytes"),
        );
    }
    // An address that used up its failed attempts waits before any more
    // tokens are checked.
    let ip_key = format!("ip:{}", client.0);
    if let Some(wait) = state.limiter.exhausted(&ip_key) {
        return too_many(wait, "too many failed attempts from this address");
    }
    let (user, via) = match authenticate(&state, &parts.headers).await {
        Ok(found) => found,
        Err(why) => {
            // Failed attempts are limited per address.
            if let Err(wait) = state.limiter.take(&ip_key) {
                return too_many(wait, "too many failed attempts from this address");
            }
            return unauthorized(why);
        }
    };
    let upgrade = is_upgrade(&parts.headers);
    // `tools` is a GET that sends the service a command: CSRF-checked too.
    if let Via::Session { csrf, .. } = &via
        && (parts.method != Method::GET || upgrade || target.sends)
        // Browsers send no Origin on a same-origin GET: there the token
        // alone (which only the gateway's own pages can read) is asked.
        && let Err(r) = check_csrf(
            &parts.headers,
            csrf,
            origin_seen || (parts.method == Method::GET && !upgrade),
        )
    {
        return with_user(r.into_response(), &user.name);
    }
    if let Err(wait) = state.limiter.take(&format!("user:{}", user.name)) {
        return with_user(too_many(wait, "too many requests: slow down"), &user.name);
    }
    if !user.can_read() {
        return with_user(
            fail(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("the admin API needs the scope {}", identity::READ_SCOPE),
            ),
            &user.name,
        );
    }
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > state.config.max_body)
    {
        return with_user(body_too_large(state.config.max_body), &user.name);
    }
    let body = match axum::body::to_bytes(body, state.config.max_body).await {
        Ok(b) => b,
        Err(_) => return with_user(body_too_large(state.config.max_body), &user.name),
    };
    if target.command
        && let Some(tool) = command_tool(&body)
        && crate::admin::is_mutating(&tool)
        && !user.can_write()
    {
        return with_user(
            fail(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!(
                    "the tool {tool} changes the service: it needs the scope {}",
                    identity::WRITE_SCOPE
                ),
            ),
            &user.name,
        );
    }
    let socket = match target.carry {
        Carry::Http => false,
        Carry::Stream => upgrade,
        Carry::Socket => {
            if !upgrade {
                return with_user(
                    fail(
                        StatusCode::BAD_REQUEST,
                        "websocket_only",
                        "this path is a WebSocket",
                    ),
                    &user.name,
                );
            }
            true
        }
    };
    let forward = proxy::Forward {
        upstream: &state.upstream,
        target: &target,
        query: query.as_deref(),
        user: &user,
        request_id: &request_id,
    };
    let response = if socket {
        let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
            Ok(ws) => ws,
            Err(e) => return with_user(e.into_response(), &user.name),
        };
        let slot = match socket_slot(&state, &user) {
            Ok(slot) => slot,
            Err(r) => return *r,
        };
        let protocol = matches!(via, Via::Session { .. }).then_some(WS_PROTOCOL);
        let (st, key) = (state.clone(), format!("user:{}", user.name));
        let limits = proxy::SocketLimits {
            max_message: state.config.max_body,
            throttle: Box::new(move || st.limiter.take(&key)),
        };
        let end = via.socket_end(&state, &user);
        proxy::forward_socket(forward, ws, slot, protocol, end, limits).await
    } else {
        // An event stream over SSE is bounded like a WebSocket.
        let stream = if target.carry == Carry::Stream {
            let slot = match socket_slot(&state, &user) {
                Ok(slot) => slot,
                Err(r) => return *r,
            };
            Some((slot, via.socket_end(&state, &user)))
        } else {
            None
        };
        proxy::forward_http(forward, parts.method.clone(), &parts.headers, body, stream).await
    };
    with_user(response, &user.name)
}

/// One of the user's WebSocket / event-stream slots, or the 429.
fn socket_slot(state: &State, user: &User) -> Result<super::limits::SocketSlot, Box<Response>> {
    state.sockets.open(&user.name).ok_or_else(|| {
        Box::new(with_user(
            too_many(
                std::time::Duration::from_secs(5),
                "too many WebSockets and event streams open for this user",
            ),
            &user.name,
        ))
    })
}

fn body_too_large(max: usize) -> Response {
    fail(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("a request body may hold at most {max} bytes"),
    )
}

/// `/readyz`: ready when the admin plane says it is.
async fn readyz(AxState(state): AxState<AppState>) -> Response {
    let request = hyper::Request::get("/readyz")
        .header(header::HOST, state.upstream.authority())
        .body(http_body_util::Full::new(bytes::Bytes::new()));
    let Ok(request) = request else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "bad probe\n").into_response();
    };
    // The body is read to its end, so the connection goes back to the
    // pool; what went wrong is logged, not told to whoever asks.
    let ready = match state.upstream.send(request).await {
        Ok(r) => {
            let ok = r.status().is_success();
            let _ = http_body_util::BodyExt::collect(r.into_body()).await;
            ok
        }
        Err(e) => {
            tracing::warn!("gateway /readyz: {e}");
            false
        }
    };
    if ready {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin plane is not ready or not reachable\n",
        )
            .into_response()
    }
}

/// `GET /auth/session`: who the browser's session is, and its CSRF token
/// (readable by same-origin script only).
async fn session_info(AxState(state): AxState<AppState>, headers: HeaderMap) -> Response {
    let login = if state.config.oidc.is_some() {
        "oidc"
    } else if state.config.dev_login {
        "dev"
    } else {
        "none"
    };
    match session_user(&state, &headers).await {
        Ok((user, Via::Session { csrf, .. })) => with_user(
            axum::Json(json!({
                "user": user.name,
                "scopes": user.scopes,
                "canWrite": user.can_write(),
                "csrf": csrf,
                "login": login,
            }))
            .into_response(),
            &user.name,
        ),
        Ok((_, Via::Bearer(_))) => unreachable!("sessions come from cookies"),
        Err(why) => fail(StatusCode::UNAUTHORIZED, "unauthorized", why),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    return_to: Option<String>,
}

/// A local path to return to after login, or `/`.
fn safe_return(path: Option<&str>) -> String {
    match path {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.starts_with("/\\")
                && p.len() <= MAX_RETURN_TO
                && p.bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b'"' | b'<' | b'>' | b'\\' | b'\'')
                }) =>
        {
            p.to_string()
        }
        _ => "/".into(),
    }
}

/// Logins are limited per address like failed attempts.
/// Random bytes in a login cookie's binding.
const BINDING_BYTES: usize = 24;

/// Whether a login cookie's value is a binding this gateway made (base64url
/// of `BINDING_BYTES`), so a planted odd value is never reused.
fn is_binding(value: &str) -> bool {
    value.len() == BINDING_BYTES.div_ceil(3) * 4
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn login_limited(state: &State, client: ClientIp) -> Option<Response> {
    let wait = state.limiter.take(&format!("ip:{}", client.0)).err()?;
    Some(too_many(wait, "too many logins from this address"))
}

/// `GET /auth/login`: off to the identity provider, or the dev login page.
async fn login(
    AxState(state): AxState<AppState>,
    Extension(client): Extension<ClientIp>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    if let Some(r) = login_limited(&state, client) {
        return r;
    }
    let return_to = safe_return(q.return_to.as_deref());
    if let Some(oidc) = &state.config.oidc {
        // A browser with a login under way (another tab) keeps its binding,
        // so each of its logins can finish. It is worth nothing without a
        // pending `state`, which only the provider's redirect carries.
        let binding = cookie(&headers, LOGIN_COOKIE)
            .filter(|b| is_binding(b))
            .map_or_else(|| random_token(BINDING_BYTES), str::to_owned);
        let (login_state, verifier, nonce) = (random_token(24), random_token(32), random_token(16));
        let url = oidc.authorize_url(&login_state, &verifier, &nonce);
        let pending = PendingLogin {
            verifier,
            nonce,
            return_to,
            binding: binding.clone(),
            created: Instant::now(),
        };
        state.sessions.start_login(login_state, pending);
        let mut r = Redirect::to(&url).into_response();
        set_cookie(
            &mut r,
            format!(
                "{LOGIN_COOKIE}={binding}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=600"
            ),
        );
        return r;
    }
    if state.config.dev_login {
        return Html(dev_login_page(&return_to)).into_response();
    }
    fail(
        StatusCode::NOT_FOUND,
        "no_login",
        "this gateway has no browser login (start it with --oidc-issuer, or --dev)",
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn dev_login_page(return_to: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"color-scheme\" content=\"light dark\">\
         <title>tether: dev login</title></head><body><main>\
         <h1>tether gateway (dev mode)</h1>\
         <p>No identity provider: pick a user name and what it may do. Never run --dev in production.</p>\
         <form method=\"post\" action=\"/auth/dev-login\">\
         <input type=\"hidden\" name=\"return_to\" value=\"{}\">\
         <p><label>User <input name=\"user\" value=\"dev\" required maxlength=\"128\" autofocus></label></p>\
         <p><label><input type=\"radio\" name=\"access\" value=\"write\" checked> read and send commands (portal.r portal.w)</label><br>\
         <label><input type=\"radio\" name=\"access\" value=\"read\"> read only (portal.r)</label></p>\
         <p><button type=\"submit\">Log in</button></p></form></main></body></html>",
        escape(return_to)
    )
}

/// A page that moves the browser on from the login with a same-site
/// navigation, so the SameSite=Strict session cookie goes with it (a
/// redirect chain that began at the identity provider would drop it).
fn onward_page(to: &str) -> Html<String> {
    let to = escape(to);
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"0;url={to}\"><title>tether: logged in</title></head>\
         <body><p>Logged in. <a href=\"{to}\">Continue</a>.</p></body></html>"
    ))
}

#[derive(Deserialize)]
struct DevLogin {
    user: String,
    access: Option<String>,
    return_to: Option<String>,
}

/// `POST /auth/dev-login` (`--dev` only): a session for any name.
async fn dev_login(
    AxState(state): AxState<AppState>,
    Extension(client): Extension<ClientIp>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<DevLogin>,
) -> Response {
    if !state.config.dev_login {
        return not_found().await;
    }
    if let Some(r) = login_limited(&state, client) {
        return r;
    }
    match check_origin(&state, &headers) {
        Ok(true) => {}
        Ok(false) => {
            return fail(
                StatusCode::FORBIDDEN,
                "csrf",
                "a login must come from the gateway's own page (an allowed Origin)",
            );
        }
        Err(r) => return r.into_response(),
    }
    let name = form.user.trim().to_string();
    if let Err(e) = identity::check_name(&name) {
        return fail(StatusCode::BAD_REQUEST, "bad_user", e);
    }
    let scopes = match form.access.as_deref() {
        Some("read") => vec![identity::READ_SCOPE.to_string()],
        _ => vec![
            identity::READ_SCOPE.to_string(),
            identity::WRITE_SCOPE.to_string(),
        ],
    };
    let user = User { name, scopes };
    let (id, _) = state.sessions.create(user.clone(), None);
    let mut r = Redirect::to(&safe_return(form.return_to.as_deref())).into_response();
    set_cookie(&mut r, session_cookie(&id));
    with_user(r, &user.name)
}

#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The login cookie stays (it expires in 10 minutes): another tab's login
/// may still need it.
fn login_failed(status: StatusCode, why: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tether: login failed</title></head>\
             <body><h1>Login failed</h1><p>{}</p><p><a href=\"/auth/login\">Try again</a></p></body></html>",
            escape(why)
        )),
    )
        .into_response()
}

/// `GET /auth/callback`: the identity provider sends the browser back
/// with a code; it is exchanged on the server.
async fn callback(
    AxState(state): AxState<AppState>,
    Extension(client): Extension<ClientIp>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    if state.config.oidc.is_none() {
        return not_found().await;
    }
    if let Some(r) = login_limited(&state, client) {
        return r;
    }
    if let Some(error) = q.error {
        let why = format!(
            "the identity provider said {error}: {}",
            q.error_description.unwrap_or_default()
        );
        return login_failed(StatusCode::UNAUTHORIZED, &why);
    }
    let (Some(code), Some(login_state)) = (q.code, q.state) else {
        return login_failed(
            StatusCode::BAD_REQUEST,
            "the callback carries no code or state",
        );
    };
    let pending = match state
        .sessions
        .finish_login(&login_state, cookie(&headers, LOGIN_COOKIE))
    {
        Ok(p) => p,
        Err(why) => return login_failed(StatusCode::BAD_REQUEST, why),
    };
    let st = state.clone();
    let (verifier, nonce) = (pending.verifier.clone(), pending.nonce.clone());
    let exchanged = tokio::task::spawn_blocking(move || {
        let oidc = st.config.oidc.as_ref().expect("checked above");
        oidc.exchange(&code, &verifier, &nonce, st.config.bearer.as_ref())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (user, tokens) = match exchanged {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!("OIDC login failed: {e}");
            return login_failed(StatusCode::BAD_GATEWAY, &e);
        }
    };
    let (id, _) = state.sessions.create(user.clone(), Some(tokens));
    let mut r = onward_page(&pending.return_to).into_response();
    set_cookie(&mut r, session_cookie(&id));
    with_user(r, &user.name)
}

/// `POST /auth/logout`: the session ends here; the answer says where the
/// browser may go to end it at the provider too.
async fn logout(AxState(state): AxState<AppState>, headers: HeaderMap) -> Response {
    let origin_seen = match check_origin(&state, &headers) {
        Ok(seen) => seen,
        Err(r) => return r.into_response(),
    };
    let (user, via) = match session_user(&state, &headers).await {
        Ok(found) => found,
        Err(why) => return unauthorized(why),
    };
    let Via::Session { id, csrf, .. } = via else {
        unreachable!("sessions come from cookies")
    };
    if let Err(r) = check_csrf(&headers, &csrf, origin_seen) {
        return with_user(r.into_response(), &user.name);
    }
    state.sessions.remove(&id);
    let provider = state
        .config
        .oidc
        .as_ref()
        .and_then(|o| o.logout_url(&format!("{}/", state.public_origin)));
    let mut r = axum::Json(json!({"loggedOut": true, "providerLogout": provider})).into_response();
    set_cookie(&mut r, cleared(SESSION_COOKIE, "Strict"));
    with_user(r, &user.name)
}

/// The Admin UI (`super::ui`) for its GET paths; 404 for the rest.
async fn ui_or_not_found(method: Method, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    if (method == Method::GET || method == Method::HEAD)
        && let Some(r) = super::ui::serve(uri.path(), &headers)
    {
        return r;
    }
    not_found().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_paths_stay_on_the_gateway() {
        assert_eq!(
            safe_return(Some("/instances?status=DOWN")),
            "/instances?status=DOWN"
        );
        for bad in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "/\"><script>",
            "",
        ] {
            assert_eq!(safe_return(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_return(None), "/");
    }

    #[test]
    fn csrf_tokens_come_from_the_header_or_the_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(offered_csrf(&h), None);
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("tether.v1, csrf.abc-_1"),
        );
        assert_eq!(offered_csrf(&h).as_deref(), Some("abc-_1"));
        h.insert(CSRF_HEADER, HeaderValue::from_static("xyz"));
        assert_eq!(offered_csrf(&h).as_deref(), Some("xyz"));
        assert!(check_csrf(&h, "xyz", true).is_ok());
        assert!(check_csrf(&h, "xyz", false).is_err(), "no Origin");
        assert!(check_csrf(&h, "other", true).is_err());
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-tether-session=s1; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("s1"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
