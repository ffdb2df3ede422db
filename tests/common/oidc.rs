//! A small but real OpenID Connect provider for the gateway's tests: it
//! serves discovery, an authorization endpoint (it logs in whoever
//! `login_as` names, without a form), a token endpoint (authorization-code
//! with PKCE S256, and refresh), and its JWKS, on loopback. It checks what
//! a provider must: the client's id and secret, the exact redirect URI, a
//! code used once, the verifier against the challenge.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use jsonwebtoken::EncodingKey;
use serde::Deserialize;
use serde_json::{Value, json};

use super::keys::{rs256, rs256_key, unix_now};

pub const CLIENT_ID: &str = "tether-admin-ui";
pub const CLIENT_SECRET: &str = "a confidential client's secret";
/// The `aud` of the access tokens it issues (the gateway's API audience).
pub const API_AUDIENCE: &str = "tether-gateway";
const KID: &str = "idp-1";

struct Grant {
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    user: String,
    scope: String,
    groups: Vec<String>,
}

#[derive(Default)]
pub struct Seen {
    pub authorizations: u64,
    pub code_grants: u64,
    pub refresh_grants: u64,
    /// Token requests refused, with why.
    pub refused: Vec<String>,
    pub last_challenge_method: Option<String>,
}

type Refreshable = (String, String, Vec<String>);

struct Inner {
    issuer: String,
    key: EncodingKey,
    jwk: Value,
    redirect_uri: Mutex<String>,
    /// Who the next login is, and the scopes granted.
    login: Mutex<(String, String)>,
    /// The `groups` claim of the next login's ID token.
    groups: Mutex<Vec<String>>,
    expires_in: Mutex<u64>,
    codes: Mutex<HashMap<String, Grant>>,
    /// A refresh token's user, scope and groups.
    refresh: Mutex<HashMap<String, Refreshable>>,
    seen: Mutex<Seen>,
}

pub struct Provider {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn random() -> String {
    let bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Provider {
    /// Starts on a port of its own; the gateway's callback must be
    /// `redirect_uri`.
    pub fn start(redirect_uri: &str) -> Provider {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (key, jwk) = rs256_key(KID);
        let inner = Arc::new(Inner {
            issuer: format!("http://{addr}"),
            key,
            jwk,
            redirect_uri: Mutex::new(redirect_uri.into()),
            login: Mutex::new(("alice".into(), "openid portal.r portal.w".into())),
            groups: Mutex::default(),
            expires_in: Mutex::new(300),
            codes: Mutex::default(),
            refresh: Mutex::default(),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/jwks", get(jwks))
            .with_state(inner.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Provider {
            addr,
            inner,
            _stop: stop,
        }
    }

    pub fn issuer(&self) -> String {
        self.inner.issuer.clone()
    }

    /// Who logs in next, with which granted scopes (space-separated).
    pub fn login_as(&self, user: &str, scope: &str) {
        *self.inner.login.lock().unwrap() = (user.into(), scope.into());
    }

    /// The groups the next login's ID token lists.
    pub fn groups(&self, groups: &[&str]) {
        *self.inner.groups.lock().unwrap() = groups.iter().map(|g| g.to_string()).collect();
    }

    /// Lifetime of the access tokens it issues from now on.
    pub fn expires_in(&self, secs: u64) {
        *self.inner.expires_in.lock().unwrap() = secs;
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.inner.seen.lock().unwrap())
    }

    /// An access token of its own, as an API client would hold.
    pub fn access_token(&self, user: &str, scope: &str) -> String {
        access_token(&self.inner, user, scope)
    }
}

fn access_token(inner: &Inner, user: &str, scope: &str) -> String {
    let now = unix_now();
    let exp = now + *inner.expires_in.lock().unwrap();
    rs256(
        &inner.key,
        KID,
        &json!({"iss": inner.issuer, "aud": API_AUDIENCE, "sub": user, "scope": scope,
                "iat": now, "exp": exp, "client_id": CLIENT_ID}),
    )
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let i = &inner.issuer;
    Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "jwks_uri": format!("{i}/jwks"),
        "end_session_endpoint": format!("{i}/logout"),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Json<Value> {
    Json(json!({"keys": [inner.jwk]}))
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    response_type: String,
    client_id: String,
    redirect_uri: String,
    state: String,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

async fn authorize(State(inner): State<Arc<Inner>>, Query(q): Query<AuthorizeQuery>) -> Response {
    inner.seen.lock().unwrap().authorizations += 1;
    inner.seen.lock().unwrap().last_challenge_method = q.code_challenge_method.clone();
    if q.client_id != CLIENT_ID || q.redirect_uri != *inner.redirect_uri.lock().unwrap() {
        return (StatusCode::BAD_REQUEST, "unknown client or redirect_uri").into_response();
    }
    if q.response_type != "code" || q.code_challenge_method.as_deref() != Some("S256") {
        return (StatusCode::BAD_REQUEST, "code flow with PKCE S256 only").into_response();
    }
    let Some(challenge) = q.code_challenge else {
        return (StatusCode::BAD_REQUEST, "no code_challenge").into_response();
    };
    let (user, scope) = inner.login.lock().unwrap().clone();
    let groups = inner.groups.lock().unwrap().clone();
    let code = random();
    inner.codes.lock().unwrap().insert(
        code.clone(),
        Grant {
            redirect_uri: q.redirect_uri.clone(),
            challenge,
            nonce: q.nonce,
            user,
            scope,
            groups,
        },
    );
    Redirect::to(&format!("{}?code={code}&state={}", q.redirect_uri, q.state)).into_response()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
}

fn refuse(inner: &Inner, status: StatusCode, error: &str, why: &str) -> Response {
    inner.seen.lock().unwrap().refused.push(why.to_string());
    (
        status,
        Json(json!({"error": error, "error_description": why})),
    )
        .into_response()
}

fn client_ok(headers: &HeaderMap) -> bool {
    let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic) else {
        return false;
    };
    // Both halves are form-urlencoded (RFC 6749 2.3.1).
    let text = String::from_utf8_lossy(&decoded);
    let Some((id, secret)) = text.split_once(':') else {
        return false;
    };
    percent_decode(id) == CLIENT_ID && percent_decode(secret) == CLIENT_SECRET
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tokens(
    inner: &Inner,
    user: &str,
    scope: &str,
    groups: &[String],
    nonce: Option<&str>,
) -> Json<Value> {
    let now = unix_now();
    let expires_in = *inner.expires_in.lock().unwrap();
    let mut id = json!({"iss": inner.issuer, "aud": CLIENT_ID, "sub": user,
                        "iat": now, "exp": now + 300, "groups": groups});
    if let Some(n) = nonce {
        id["nonce"] = json!(n);
    }
    let refresh = random();
    inner.refresh.lock().unwrap().insert(
        refresh.clone(),
        (user.into(), scope.into(), groups.to_vec()),
    );
    Json(json!({
        "access_token": access_token(inner, user, scope),
        "token_type": "Bearer",
        "expires_in": expires_in,
        "refresh_token": refresh,
        "id_token": rs256(&inner.key, KID, &id),
        "scope": scope,
    }))
}

async fn token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if !client_ok(&headers) {
        return refuse(
            &inner,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "bad client credentials",
        );
    }
    match form.grant_type.as_str() {
        "authorization_code" => {
            let Some(grant) = form
                .code
                .as_deref()
                .and_then(|c| inner.codes.lock().unwrap().remove(c))
            else {
                return refuse(
                    &inner,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or used code",
                );
            };
            if form.redirect_uri.as_deref() != Some(grant.redirect_uri.as_str()) {
                return refuse(
                    &inner,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "redirect_uri differs",
                );
            }
            let verifier = form.code_verifier.unwrap_or_default();
            let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
            if computed != grant.challenge {
                return refuse(
                    &inner,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "PKCE verifier does not match",
                );
            }
            inner.seen.lock().unwrap().code_grants += 1;
            tokens(
                &inner,
                &grant.user,
                &grant.scope,
                &grant.groups,
                grant.nonce.as_deref(),
            )
            .into_response()
        }
        "refresh_token" => {
            let Some((user, scope, groups)) = form
                .refresh_token
                .as_deref()
                .and_then(|r| inner.refresh.lock().unwrap().remove(r))
            else {
                return refuse(
                    &inner,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown refresh token",
                );
            };
            inner.seen.lock().unwrap().refresh_grants += 1;
            tokens(&inner, &user, &scope, &groups, None).into_response()
        }
        other => refuse(
            &inner,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            other,
        ),
    }
}
