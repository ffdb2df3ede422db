//! The gateway (BFF) in front of a real controller and admin plane, over
//! real HTTP and WebSockets on loopback: bearer JWTs and what fails them,
//! scopes, browser sessions with CSRF and Origin checks, rate limits, the
//! route allowlist, and the OIDC code flow with PKCE against a small OIDC
//! provider the test starts (tests/common/oidc.rs).

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::keys::{rs256, rs256_key, unix_now};
use common::oidc::{self, Provider};
use common::*;
use serde_json::{Value, json};
use tether::admin::access::AdminKey;
use tether::admin::audit::AuditConfig;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::controller::Controller;
use tether::gateway::identity::{DEV_AUDIENCE, DEV_ISSUER, mint_dev_token};
use tether::gateway::oidc::{Oidc, OidcConfig};
use tether::gateway::{Gateway, GatewayConfig};
use tether::jwt::{Expect, Verifier};

const KEY: &str = "a test admin key, 32 bytes long.";
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "tether-gateway";
const DEV_KEY: &[u8] = b"the dev gateway's key, 32 bytes.";

struct Stack {
    ctl: Controller,
    _admin: AdminServer,
    gw: Gateway,
    audit: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A verifier of RS256 tokens signed by the test key under kid `k1`.
fn rs256_verifier() -> Verifier {
    let (_, jwk) = rs256_key("k1");
    Verifier::from_jwks(
        &json!({"keys": [jwk]}).to_string(),
        Expect {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
        },
    )
    .unwrap()
}

fn dev_verifier() -> Verifier {
    Verifier::shared_secret(
        DEV_KEY,
        Expect {
            issuer: Some(DEV_ISSUER.into()),
            audience: Some(DEV_AUDIENCE.into()),
        },
    )
}

impl Stack {
    fn start(tweak: impl FnOnce(&mut GatewayConfig)) -> Stack {
        let dir = std::env::temp_dir().join(format!(
            "tether-gateway-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let audit = dir.join("audit.jsonl");
        let ctl = controller(1);
        let mut admin = AdminConfig::new("127.0.0.1:0".parse().unwrap());
        admin.key = AdminKey::new(KEY.as_bytes());
        admin.audit = Some(AuditConfig::new(audit.clone()));
        let admin = AdminServer::start(ctl.api(), admin).unwrap();
        let mut config = GatewayConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            &format!("http://{}", admin.local_addr()),
            Some(AdminKey::new(KEY.as_bytes())),
        );
        config.access_log = Some(dir.join("access.jsonl"));
        config.bearer = Some(rs256_verifier());
        tweak(&mut config);
        let gw = Gateway::start(config).unwrap();
        Stack {
            ctl,
            _admin: admin,
            gw,
            audit,
            _dir: TempDir(dir),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.local_addr())
    }

    fn origin(&self) -> String {
        self.gw.public_origin().to_string()
    }

    fn swarm(&self, n: usize) -> Swarm {
        let url = format!("ws://{}/ws/microservice", self.ctl.local_addr())
            .parse()
            .unwrap();
        let mut config = SwarmConfig::new(url, n);
        config.service_id = "svc".into();
        config.run_for = Some(Duration::from_secs(120));
        let swarm = Swarm::start(config).unwrap();
        assert!(swarm.wait_registered(n as u64, Duration::from_secs(60)));
        swarm
    }
}

/// A client that follows no redirects and takes every status as an answer.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of the cookie `name` this answer sets, and its attributes.
    fn set_cookie(&self, name: &str) -> Option<(String, String)> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| {
                let (pair, attrs) = c.split_once(';').unwrap_or((c, ""));
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| (v.to_string(), attrs.to_string()))
            })
    }
}

fn answer(mut r: ureq::http::Response<ureq::Body>) -> Answer {
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.body_mut().read_to_string().unwrap_or_default(),
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    answer(req.call().unwrap())
}

fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = agent().post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    answer(req.send(body).unwrap())
}

fn claims(sub: &str, scope: &str) -> Value {
    let now = unix_now();
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
           "iat": now, "nbf": now, "exp": now + 600})
}

fn token(claims: &Value) -> String {
    let (key, _) = rs256_key("k1");
    rs256(&key, "k1", claims)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test]
fn bearer_tokens_pass_only_with_a_good_signature_issuer_audience_and_time() {
    let stack = Stack::start(|_| {});
    let summary = stack.url("/api/summary");
    let ok = token(&claims("ana", "portal.r"));
    let a = get(&summary, &[("authorization", &bearer(&ok))]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["total"], 0);
    // Security headers on every answer.
    let csp = a.header("content-security-policy").unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));

    let now = unix_now();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("ana", "portal.r");
        f(&mut c);
        token(&c)
    };
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = b64(&claims("ana", "portal.r portal.w"));
    let mut bad_sig = ok.clone();
    let cut = bad_sig.rfind('.').unwrap() + 10;
    let flipped = if &bad_sig[cut..=cut] == "A" { "B" } else { "A" };
    bad_sig.replace_range(cut..=cut, flipped);
    let (key, _) = rs256_key("k1");
    let unknown_kid = rs256(&key, "k9", &claims("ana", "portal.r"));
    // HS256 signed with the public key's JWK as the secret: the classic
    // algorithm confusion.
    let (_, jwk) = rs256_key("k1");
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("ana", "portal.r"),
        &jsonwebtoken::EncodingKey::from_secret(jwk["n"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    let refused = [
        ("expired", with(&|c| c["exp"] = json!(now - 120))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now + 300))),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://other.test")),
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("someone-else")),
        ),
        (
            "no audience",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
        ),
        ("bad signature", bad_sig),
        (
            "alg none",
            format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"}))),
        ),
        ("unknown kid", unknown_kid),
        ("HS256 with the public key", confused),
        ("not a JWT", "garbage".into()),
    ];
    for (what, t) in &refused {
        let a = get(&summary, &[("authorization", &bearer(t))]);
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert_eq!(a.json()["error"], "unauthorized", "{what}");
        assert!(a.header("www-authenticate").unwrap().starts_with("Bearer"));
    }
    assert_eq!(get(&summary, &[]).status, 401, "no credentials");
    assert_eq!(
        get(&summary, &[("authorization", "Basic YTpi")]).status,
        401,
        "not a bearer"
    );
    // A token without a portal scope is valid but may not read.
    let a = get(
        &summary,
        &[("authorization", &bearer(&token(&claims("ana", "openid"))))],
    );
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (403, Some("insufficient_scope"))
    );
}

#[test]
fn scopes_decide_the_commands_and_the_gateway_sets_who_asks() {
    let stack = Stack::start(|_| {});
    let _swarm = stack.swarm(3);
    let reader = bearer(&token(&claims("reader", "portal.r")));
    let writer = bearer(&token(&claims("writer", "portal.r portal.w")));
    let list = get(
        &stack.url("/api/services?limit=10"),
        &[("authorization", &reader)],
    );
    assert_eq!(list.status, 200, "{}", list.body);
    let items = list.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3);
    let id = items[0]["runtimeInstanceId"].as_str().unwrap().to_string();
    let commands = stack.url(&format!("/api/services/{id}/commands"));
    // Reading tools pass with portal.r, and the service's reply comes back.
    let a = post(
        &commands,
        &[("authorization", &reader)],
        r#"{"name":"get_service_info"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["result"]["runtimeInstanceId"], json!(id));
    let tools = get(
        &stack.url(&format!("/api/services/{id}/tools")),
        &[("authorization", &reader)],
    );
    assert_eq!(tools.status, 200, "{}", tools.body);
    // A mutating one does not, whatever identity headers the caller adds:
    // they are dropped, and the gateway says who asks.
    let forged = [
        ("authorization", reader.as_str()),
        ("x-tether-user", "root"),
        ("x-tether-scopes", "portal.r portal.w"),
    ];
    let a = post(&commands, &forged, r#"{"name":"shutdown"}"#);
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (403, Some("insufficient_scope")),
        "{}",
        a.body
    );
    let fanout = post(
        &stack.url("/api/commands"),
        &forged,
        r#"{"name":"set_log_level","serviceId":"svc","arguments":{}}"#,
    );
    assert_eq!(fanout.status, 403, "{}", fanout.body);
    // With portal.w it goes to the service (which has no such tool).
    let a = post(
        &commands,
        &[("authorization", &writer)],
        r#"{"name":"set_log_level"}"#,
    );
    assert_ne!(a.status, 403, "{}", a.body);
    assert!(a.json()["outcome"].is_string(), "{}", a.body);
    let a = post(
        &commands,
        &[("authorization", &reader), ("x-tether-user", "root")],
        r#"{"name":"check"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    drop(_swarm);
    // The audit log is written by a thread of its own: a read-only
    // command's line may follow its answer by a moment.
    let results = || -> Vec<(String, String)> {
        json_lines(&stack.audit)
            .iter()
            .filter(|l| l["phase"] == "result")
            .map(|l| {
                (
                    l["who"].as_str().unwrap().into(),
                    l["tool"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    eventually("four result lines in the audit log", || {
        results().len() >= 4
    });
    let expected: Vec<(String, String)> = [
        ("reader", "get_service_info"),
        ("reader", "tools/list"),
        ("writer", "set_log_level"),
        ("reader", "check"),
    ]
    .iter()
    .map(|(w, t)| (w.to_string(), t.to_string()))
    .collect();
    assert_eq!(results(), expected);
}

/// Logs in through the dev login page: the session cookie's value.
fn dev_session(stack: &Stack, user: &str, access: &str) -> String {
    let form = format!("user={user}&access={access}&return_to=%2Finstances");
    let mut req = agent()
        .post(stack.url("/auth/dev-login"))
        .header("content-type", "application/x-www-form-urlencoded");
    req = req.header("origin", stack.origin());
    let a = answer(req.send(form.as_str()).unwrap());
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some("/instances"));
    let (id, attrs) = a.set_cookie("__Host-tether-session").unwrap();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(attr), "{attrs}");
    }
    assert!(!attrs.contains("Domain"), "{attrs}");
    id
}

fn ws(
    stack: &Stack,
    path: &str,
    headers: &[(&'static str, String)],
) -> Result<tungstenite::WebSocket<TcpStream>, u16> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}{path}", stack.gw.local_addr())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
    }
    let stream = TcpStream::connect(stack.gw.local_addr()).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    match tungstenite::client(request, stream) {
        Ok((socket, response)) => {
            if let Some(p) = response.headers().get("sec-websocket-protocol") {
                assert_eq!(p, "tether.v1");
            }
            Ok(socket)
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(r.status().as_u16())
        }
        Err(e) => panic!("handshake: {e}"),
    }
}

#[test]
fn browser_sessions_need_the_csrf_token_and_an_allowed_origin() {
    let stack = Stack::start(|c| {
        c.bearer = Some(dev_verifier());
        c.dev_login = true;
    });
    let _swarm = stack.swarm(1);
    // The login form is the gateway's own; a cross-site POST cannot log
    // anyone in.
    let page = get(&stack.url("/auth/login"), &[]);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/auth/dev-login\""));
    let foreign = agent()
        .post(stack.url("/auth/dev-login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://evil.example")
        .send("user=x")
        .unwrap();
    assert_eq!(answer(foreign).status, 403);
    let no_origin = agent()
        .post(stack.url("/auth/dev-login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .send("user=x")
        .unwrap();
    assert_eq!(answer(no_origin).status, 403);

    let id = dev_session(&stack, "ana", "write");
    let cookie = format!("__Host-tether-session={id}");
    let me = get(&stack.url("/auth/session"), &[("cookie", &cookie)]);
    assert_eq!(me.status, 200, "{}", me.body);
    let me = me.json();
    assert_eq!(
        (me["user"].as_str(), me["canWrite"].as_bool()),
        (Some("ana"), Some(true))
    );
    let csrf = me["csrf"].as_str().unwrap().to_string();
    // Reading needs no CSRF token.
    let list = get(&stack.url("/api/services"), &[("cookie", &cookie)]);
    assert_eq!(list.status, 200, "{}", list.body);
    let iid = list.json()["items"][0]["runtimeInstanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let commands = stack.url(&format!("/api/services/{iid}/commands"));
    // Listing tools sends the service tools/list: a GET, but CSRF-checked.
    let tools = stack.url(&format!("/api/services/{iid}/tools"));
    assert_eq!(get(&tools, &[("cookie", &cookie)]).status, 403);
    let csrf_header = me["csrf"].as_str().unwrap().to_string();
    assert_eq!(
        get(
            &tools,
            &[("cookie", &cookie), ("x-tether-csrf", &csrf_header)]
        )
        .status,
        200
    );
    let origin = stack.origin();
    let body = r#"{"name":"get_service_info"}"#;
    // A state-changing request without the token, with a wrong one, or
    // with the token but no Origin, is refused.
    for headers in [
        vec![("cookie", cookie.as_str()), ("origin", origin.as_str())],
        vec![
            ("cookie", cookie.as_str()),
            ("origin", origin.as_str()),
            ("x-tether-csrf", "not-the-token"),
        ],
        vec![
            ("cookie", cookie.as_str()),
            ("x-tether-csrf", csrf.as_str()),
        ],
    ] {
        let a = post(&commands, &headers, body);
        assert_eq!(
            (a.status, a.json()["error"].as_str()),
            (403, Some("csrf")),
            "{headers:?}"
        );
    }
    let foreign = post(
        &commands,
        &[
            ("cookie", &cookie),
            ("origin", "http://evil.example"),
            ("x-tether-csrf", &csrf),
        ],
        body,
    );
    assert_eq!(
        (foreign.status, foreign.json()["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    let a = post(
        &commands,
        &[
            ("cookie", &cookie),
            ("origin", &origin),
            ("x-tether-csrf", &csrf),
        ],
        body,
    );
    assert_eq!(a.status, 200, "{}", a.body);

    // WebSockets: the browser's way (the token as a subprotocol) opens;
    // a foreign Origin, no token, or a wrong one does not.
    let protocols = format!("tether.v1, csrf.{csrf}");
    let mut events = ws(
        &stack,
        "/api/events",
        &[
            ("cookie", cookie.clone()),
            ("origin", origin.clone()),
            ("sec-websocket-protocol", protocols.clone()),
        ],
    )
    .expect("the event stream opens");
    let hello: Value = serde_json::from_str(events.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(hello["type"], "hello", "{hello}");
    let refusals = [
        vec![
            ("cookie", cookie.clone()),
            ("origin", "http://evil.example".to_string()),
            ("sec-websocket-protocol", protocols.clone()),
        ],
        vec![("cookie", cookie.clone()), ("origin", origin.clone())],
        vec![
            ("cookie", cookie.clone()),
            ("origin", origin.clone()),
            (
                "sec-websocket-protocol",
                "tether.v1, csrf.wrong".to_string(),
            ),
        ],
        vec![
            ("cookie", cookie.clone()),
            ("sec-websocket-protocol", protocols.clone()),
        ],
    ];
    for headers in &refusals {
        assert_eq!(
            ws(&stack, "/api/events", headers).err(),
            Some(403),
            "{headers:?}"
        );
    }
    // A live event comes through: the swarm's service goes away.
    drop(_swarm);
    let down = loop {
        let m = events.read().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] != "hello" {
            break v;
        }
    };
    assert!(down["seq"].is_u64(), "{down}");

    // An SSE event stream of the session, read on a thread of its own
    // until it ends.
    let sse = {
        let (url, cookie) = (stack.url("/api/events"), cookie.clone());
        std::thread::spawn(move || {
            let mut r = agent()
                .get(&url)
                .header("cookie", &cookie)
                .header("accept", "text/event-stream")
                .call()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(&mut r.body_mut().as_reader(), &mut body);
            (body, std::time::Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Logout needs the token too, then the session is gone.
    let a = post(
        &stack.url("/auth/logout"),
        &[("cookie", &cookie), ("origin", &origin)],
        "",
    );
    assert_eq!(a.status, 403);
    let a = post(
        &stack.url("/auth/logout"),
        &[
            ("cookie", &cookie),
            ("origin", &origin),
            ("x-tether-csrf", &csrf),
        ],
        "",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let logged_out = std::time::Instant::now();
    assert!(
        a.set_cookie("__Host-tether-session")
            .unwrap()
            .1
            .contains("Max-Age=0")
    );
    // The event stream the session opened ends with it (1008).
    let closed = loop {
        match events.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("the stream ended without a close: {e}"),
        }
    };
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(1008));
    // The SSE stream ended with it too (not at the client's 20 s timeout).
    let (seen, ended) = sse.join().unwrap();
    assert!(seen.contains("hello"), "{seen}");
    assert!(
        ended.duration_since(logged_out) < Duration::from_secs(5),
        "the stream outlived the logout by {:?}",
        ended.duration_since(logged_out)
    );
    assert_eq!(
        get(&stack.url("/auth/session"), &[("cookie", &cookie)]).status,
        401
    );
    assert_eq!(
        get(&stack.url("/api/summary"), &[("cookie", &cookie)]).status,
        401
    );

    // A read-only session cannot send a mutating command.
    let ro = format!(
        "__Host-tether-session={}",
        dev_session(&stack, "viewer", "read")
    );
    let me = get(&stack.url("/auth/session"), &[("cookie", &ro)]).json();
    assert_eq!(me["canWrite"], false);
    let a = post(
        &stack.url("/api/commands"),
        &[
            ("cookie", &ro),
            ("origin", &origin),
            ("x-tether-csrf", me["csrf"].as_str().unwrap()),
        ],
        r#"{"name":"shutdown","serviceId":"svc"}"#,
    );
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (403, Some("insufficient_scope"))
    );
    // And `tether token`'s dev tokens pass as bearer tokens.
    let t = mint_dev_token(DEV_KEY, "cli", &["portal.r"], Duration::from_secs(60)).unwrap();
    assert_eq!(
        get(
            &stack.url("/api/summary"),
            &[("authorization", &bearer(&t))]
        )
        .status,
        200
    );
}

#[test]
fn requests_past_the_rate_limit_or_the_size_limit_are_refused() {
    let stack = Stack::start(|c| {
        c.rate = tether::gateway::limits::RateLimit {
            rate: 0.5,
            burst: 3.0,
        };
        c.max_body = 1024;
    });
    let summary = stack.url("/api/summary");
    let ana = bearer(&token(&claims("ana", "portal.r")));
    let bo = bearer(&token(&claims("bo", "portal.r")));
    for _ in 0..3 {
        assert_eq!(get(&summary, &[("authorization", &ana)]).status, 200);
    }
    let limited = get(&summary, &[("authorization", &ana)]);
    assert_eq!(
        (limited.status, limited.json()["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(
        limited
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Per user: another one is not held back.
    assert_eq!(get(&summary, &[("authorization", &bo)]).status, 200);
    // Bodies past the limit: 413, before anything goes upstream.
    let big = format!(
        r#"{{"name":"check","arguments":{{"x":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let a = post(&stack.url("/api/commands"), &[("authorization", &bo)], &big);
    assert_eq!(a.status, 413, "{}", a.body);
    // Failed attempts are limited per address: after the burst, 429
    // instead of 401.
    let statuses: Vec<u16> = (0..5)
        .map(|_| get(&summary, &[("authorization", "Bearer nope")]).status)
        .collect();
    assert_eq!(statuses, vec![401, 401, 401, 429, 429]);
    // And the address waits before any more tokens are even checked, a
    // good one included.
    assert_eq!(get(&summary, &[("authorization", &bo)]).status, 429);
}

#[test]
fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() {
    let stack = Stack::start(|c| {
        c.rate = tether::gateway::limits::RateLimit {
            rate: 0.5,
            burst: 3.0,
        };
        // The test's own loopback address stands for the ingress.
        c.trusted_proxies =
            tether::gateway::forwarded::TrustedProxies::parse("127.0.0.0/8").unwrap();
    });
    let summary = stack.url("/api/summary");
    let failed = |from: &str| {
        get(
            &summary,
            &[("authorization", "Bearer nope"), ("x-forwarded-for", from)],
        )
        .status
    };
    // One browser behind the proxy uses up its failed attempts...
    let statuses: Vec<u16> = (0..4).map(|_| failed("198.51.100.1")).collect();
    assert_eq!(statuses, vec![401, 401, 401, 429]);
    // ...a spoofed entry left of what the proxy added changes nothing...
    assert_eq!(failed("6.6.6.6, 198.51.100.1"), 429);
    // ...while another browser, and the proxy itself, still get answers.
    assert_eq!(failed("198.51.100.2"), 401);
    let ana = bearer(&token(&claims("ana", "portal.r")));
    assert_eq!(get(&summary, &[("authorization", &ana)]).status, 200);
    // The access log names whom the proxy spoke for.
    let log = stack._dir.0.join("access.jsonl");
    eventually("the access log names the forwarded client", || {
        json_lines(&log)
            .iter()
            .any(|l| l["client"] == "198.51.100.2" && l["status"] == 401)
    });

    // Without --trusted-proxy the header is nobody's word: every request
    // counts against the peer's own address.
    let plain = Stack::start(|c| {
        c.rate = tether::gateway::limits::RateLimit {
            rate: 0.5,
            burst: 3.0,
        };
    });
    let summary = plain.url("/api/summary");
    let statuses: Vec<u16> = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]
        .iter()
        .map(|from| {
            get(
                &summary,
                &[("authorization", "Bearer nope"), ("x-forwarded-for", from)],
            )
            .status
        })
        .collect();
    assert_eq!(statuses, vec![401, 401, 401, 429]);
}

/// An HTTP/1.1 server on loopback that answers the first request on each
/// connection with keep-alive, then closes the connection when the next
/// request arrives on it: the race of an upstream that closes an idle
/// connection just as the gateway reuses it. Counts what it read.
struct ClosingUpstream {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ClosingUpstream {
    fn start() -> ClosingUpstream {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(16) {
                let Ok(mut conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    for served in 0.. {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            match conn.read(&mut byte) {
                                Ok(1) => head.push(byte[0]),
                                _ => return,
                            }
                        }
                        let head = String::from_utf8_lossy(&head).to_string();
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        let mut body = vec![0u8; length];
                        conn.read_exact(&mut body).unwrap();
                        seen.lock()
                            .unwrap()
                            .push(head.lines().next().unwrap().to_string());
                        if served == 1 {
                            return; // closed under the second request
                        }
                        let reply = "{\"outcome\":\"ok\"}";
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                    }
                });
            }
        });
        ClosingUpstream { addr, requests }
    }

    fn seen(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

#[test]
fn a_get_is_sent_again_when_a_pooled_upstream_connection_dies_a_command_never() {
    let upstream = ClosingUpstream::start();
    let mut config = GatewayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &format!("http://{}", upstream.addr),
        Some(AdminKey::new(KEY.as_bytes())),
    );
    config.access_log = Some("/dev/null".into());
    config.bearer = Some(rs256_verifier());
    let gw = Gateway::start(config).unwrap();
    let t = bearer(&token(&claims("ana", "portal.r portal.w")));
    let url = |p: &str| format!("http://{}{p}", gw.local_addr());
    // The first GET opens a connection that goes back to the pool.
    assert_eq!(
        get(&url("/api/summary"), &[("authorization", &t)]).status,
        200
    );
    // The second finds it closed under it: sent again on a new one.
    let again = get(&url("/api/summary"), &[("authorization", &t)]);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        upstream.seen(),
        ["GET /summary HTTP/1.1"; 3],
        "one GET, the one that died, and its repeat"
    );
    // A command on the pooled connection dies the same way: 502, and it
    // reached the upstream once, never twice.
    let id = uuid::Uuid::now_v7();
    let command = post(
        &url(&format!("/api/services/{id}/commands")),
        &[("authorization", &t), ("content-type", "application/json")],
        r#"{"name":"check"}"#,
    );
    assert_eq!(command.status, 502, "{}", command.body);
    let posts = upstream
        .seen()
        .iter()
        .filter(|l| l.starts_with("POST "))
        .count();
    assert_eq!(posts, 1);
}

#[test]
fn the_gateway_never_proxies_service_sockets() {
    let stack = Stack::start(|_| {});
    let t = bearer(&token(&claims("ana", "portal.r portal.w")));
    for path in [
        "/ws/microservice",
        "/api/ws/microservice",
        "/api/ws/discovery",
    ] {
        let refused = ws(&stack, path, &[("authorization", t.clone())]);
        assert_eq!(refused.err(), Some(404), "{path}");
    }
    // Only the allowlist passes: nothing else of the admin plane either.
    for path in [
        "/api/metrics",
        "/metrics",
        "/api/services/..%2Fmetrics",
        "/services",
    ] {
        assert_eq!(
            get(&stack.url(path), &[("authorization", &t)]).status,
            404,
            "{path}"
        );
    }
    // The controller never saw a service connection.
    let summary = get(&stack.url("/api/summary"), &[("authorization", &t)]).json();
    let connections: u64 = summary["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(connections, 0, "{summary}");
    // The access log has a JSON line per request, with who asked.
    // (written by a thread of its own: it may lag the answer a little).
    let log = stack._dir.0.join("access.jsonl");
    eventually("the access log names the user", || {
        json_lines(&log)
            .iter()
            .any(|l| l["path"] == "/api/summary" && l["status"] == 200 && l["user"] == "ana")
    });
}

/// Query parameter `name` of a URL.
fn param(url: &str, name: &str) -> Option<String> {
    url.split_once('?')?.1.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

struct OidcStack {
    stack: Stack,
    idp: Provider,
}

fn oidc_stack() -> OidcStack {
    oidc_stack_with(None)
}

fn oidc_stack_with(write_group: Option<String>) -> OidcStack {
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let idp = Provider::start(&format!("{public}/auth/callback"));
    let issuer = idp.issuer();
    let stack = Stack::start(|c| {
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_url = Some(public.clone());
        c.oidc = Some(
            Oidc::discover(OidcConfig {
                issuer: issuer.clone(),
                client_id: oidc::CLIENT_ID.into(),
                client_secret: oidc::CLIENT_SECRET.into(),
                redirect_uri: format!("{public}/auth/callback"),
                scopes: vec!["portal.r".into(), "portal.w".into()],
                groups_claim: "groups".into(),
                read_group: None,
                write_group: write_group.clone(),
            })
            .unwrap(),
        );
        c.bearer = Some(
            Verifier::from_jwks_url(
                &format!("{issuer}/jwks"),
                Expect {
                    issuer: Some(issuer.clone()),
                    audience: Some(oidc::API_AUDIENCE.into()),
                },
                Duration::from_secs(1),
            )
            .unwrap(),
        );
    });
    OidcStack { stack, idp }
}

/// Starts a login: the provider's authorize URL and the login cookie.
fn start_login(s: &OidcStack, return_to: &str) -> (String, String) {
    let a = get(
        &s.stack.url(&format!("/auth/login?return_to={return_to}")),
        &[],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let (binding, attrs) = a.set_cookie("__Host-tether-login").unwrap();
    assert!(
        attrs.contains("SameSite=Lax") && attrs.contains("HttpOnly"),
        "{attrs}"
    );
    (a.header("location").unwrap().to_string(), binding)
}

/// The provider's answer to the authorize URL: the gateway callback URL.
fn authorize(url: &str) -> String {
    let a = get(url, &[]);
    assert!(
        a.status == 303 || a.status == 302,
        "{} {}",
        a.status,
        a.body
    );
    a.header("location").unwrap().to_string()
}

fn callback(url: &str, binding: Option<&str>) -> Answer {
    let cookie = binding.map(|b| format!("__Host-tether-login={b}"));
    let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
    get(url, &headers)
}

#[test]
fn the_oidc_code_flow_with_pkce_logs_a_browser_in() {
    let s = oidc_stack();
    let (authorize_url, binding) = start_login(&s, "/instances%3Fstatus%3DDOWN");
    assert!(authorize_url.starts_with(&format!("{}/authorize?", s.idp.issuer())));
    assert_eq!(
        param(&authorize_url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        param(&authorize_url, "client_id").as_deref(),
        Some(oidc::CLIENT_ID)
    );
    assert!(param(&authorize_url, "nonce").is_some());
    assert!(
        !authorize_url.contains("client_secret"),
        "the secret stays on the server"
    );
    let back = authorize(&authorize_url);
    assert!(
        back.starts_with(&s.stack.url("/auth/callback?code=")),
        "{back}"
    );
    // A callback from another browser (no login cookie, or another one)
    // gets nowhere and leaves the login to its own browser.
    assert_eq!(callback(&back, None).status, 400);
    assert_eq!(callback(&back, Some("someone-elses")).status, 400);
    let done = callback(&back, Some(&binding));
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.body.contains("url=/instances?status=DOWN"),
        "{}",
        done.body
    );
    let (session, attrs) = done.set_cookie("__Host-tether-session").unwrap();
    assert!(
        attrs.contains("SameSite=Strict") && attrs.contains("Secure"),
        "{attrs}"
    );
    assert!(!done.body.contains("eyJ"), "no token in the page");
    // The code is used once.
    assert_eq!(callback(&back, Some(&binding)).status, 400);
    assert_eq!(s.idp.seen(|x| x.code_grants), 1);
    // Two tabs of one browser log in at once: the second keeps the
    // browser's binding, and both callbacks finish.
    let tab = |cookie: &str| {
        let a = get(
            &s.stack.url("/auth/login?return_to=/"),
            &[("cookie", cookie)],
        );
        assert_eq!(a.status, 303, "{}", a.body);
        let (b, _) = a.set_cookie("__Host-tether-login").unwrap();
        (a.header("location").unwrap().to_string(), b)
    };
    let (first_url, first) = start_login(&s, "/");
    let (second_url, second) = tab(&format!("__Host-tether-login={first}"));
    assert_eq!(first, second, "one binding per browser");
    let (first_back, second_back) = (authorize(&first_url), authorize(&second_url));
    assert_eq!(callback(&second_back, Some(&second)).status, 200);
    assert_eq!(callback(&first_back, Some(&first)).status, 200);
    // A planted value that is not one of the gateway's is not reused.
    let (_, fresh) = tab("__Host-tether-login=planted");
    assert_ne!(fresh, "planted");
    let cookie = format!("__Host-tether-session={session}");
    let me = get(&s.stack.url("/auth/session"), &[("cookie", &cookie)]).json();
    assert_eq!(me["user"], "alice", "{me}");
    assert_eq!(me["canWrite"], true, "{me}");
    assert!(me.get("accessToken").is_none() && !me.to_string().contains("eyJ"));
    assert_eq!(
        get(&s.stack.url("/api/summary"), &[("cookie", &cookie)]).status,
        200
    );
    // The provider's access tokens also pass as API bearer tokens.
    let t = s.idp.access_token("ci", "portal.r");
    assert_eq!(
        get(
            &s.stack.url("/api/summary"),
            &[("authorization", &bearer(&t))]
        )
        .status,
        200
    );

    // A read-only user, from the scopes the provider granted.
    s.idp.login_as("bob", "openid portal.r");
    let (url, binding) = start_login(&s, "/");
    let done = callback(&authorize(&url), Some(&binding));
    let cookie = format!(
        "__Host-tether-session={}",
        done.set_cookie("__Host-tether-session").unwrap().0
    );
    let me = get(&s.stack.url("/auth/session"), &[("cookie", &cookie)]).json();
    assert_eq!(
        (me["user"].as_str(), me["canWrite"].as_bool()),
        (Some("bob"), Some(false))
    );
    let a = post(
        &s.stack.url("/api/commands"),
        &[
            ("cookie", &cookie),
            ("origin", &s.stack.origin()),
            ("x-tether-csrf", me["csrf"].as_str().unwrap()),
        ],
        r#"{"name":"shutdown","serviceId":"svc"}"#,
    );
    assert_eq!(a.status, 403, "{}", a.body);

    // A code the provider refuses ends the login with an error page.
    let (url, binding) = start_login(&s, "/");
    let state = param(&url, "state").unwrap();
    let forged = s
        .stack
        .url(&format!("/auth/callback?code=made-up&state={state}"));
    let a = callback(&forged, Some(&binding));
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(a.set_cookie("__Host-tether-session").is_none());
    assert!(
        s.idp
            .seen(|x| x.refused.iter().any(|r| r == "unknown or used code"))
    );
    // The provider's own error comes back to the browser as a failure.
    let a = get(
        &s.stack.url("/auth/callback?error=access_denied&state=x"),
        &[],
    );
    assert_eq!(a.status, 401);
}

#[test]
fn an_oidc_session_refreshes_its_tokens_on_the_server() {
    let s = oidc_stack();
    s.idp.expires_in(1);
    let (url, binding) = start_login(&s, "/");
    let done = callback(&authorize(&url), Some(&binding));
    let cookie = format!(
        "__Host-tether-session={}",
        done.set_cookie("__Host-tether-session").unwrap().0
    );
    assert_eq!(
        get(&s.stack.url("/api/summary"), &[("cookie", &cookie)]).status,
        200
    );
    assert_eq!(s.idp.seen(|x| x.refresh_grants), 0);
    std::thread::sleep(Duration::from_millis(1500));
    // The access token expired: the gateway refreshes it with the refresh
    // token, once for requests that find it expired together (the
    // provider rotates refresh tokens: a second refresh would be refused
    // and end the session), and the browser notices nothing.
    let url = s.stack.url("/api/summary");
    let together: Vec<_> = (0..4)
        .map(|_| {
            let (url, cookie) = (url.clone(), cookie.clone());
            std::thread::spawn(move || get(&url, &[("cookie", &cookie)]).status)
        })
        .collect();
    for t in together {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(s.idp.seen(|x| x.refresh_grants), 1);
    assert_eq!(
        get(&s.stack.url("/auth/session"), &[("cookie", &cookie)]).json()["user"],
        "alice"
    );
}

#[test]
fn the_gateway_reaches_an_https_admin_plane_with_its_client_certificate() {
    use std::sync::Arc;
    use tether::admin::AdminTls;
    use tether::engine::tls::TlsFiles;
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    let ctl = controller(1);
    let mut admin = AdminConfig::new("127.0.0.1:0".parse().unwrap());
    admin.key = AdminKey::new(KEY.as_bytes());
    admin.tls = Some(Arc::new(
        AdminTls::https(TlsFiles {
            cert: keys.join("server.pem"),
            key: keys.join("server.key"),
            client_ca: Some(keys.join("ca.pem")),
        })
        .unwrap(),
    ));
    let admin = AdminServer::start(ctl.api(), admin).unwrap();
    let upstream = format!("https://localhost:{}", admin.local_addr().port());
    let gateway = |key: Option<AdminKey>, cert: bool| {
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), &upstream, key);
        config.upstream.ca = Some(keys.join("ca.pem"));
        if cert {
            config.upstream.client_cert = Some((keys.join("client.pem"), keys.join("client.key")));
        }
        config.bearer = Some(rs256_verifier());
        config.access_log = Some("/dev/null".into());
        Gateway::start(config)
    };
    let t = bearer(&token(&claims("ana", "portal.r")));
    // The client certificate alone authenticates the gateway.
    let gw = gateway(None, true).unwrap();
    let url = format!("http://{}/api/summary", gw.local_addr());
    let a = get(&url, &[("authorization", &t)]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        get(&format!("http://{}/readyz", gw.local_addr()), &[]).status,
        200
    );
    // Neither a certificate nor a key: refused at start.
    assert!(gateway(None, false).is_err());
    // A wrong key and no certificate: the admin plane refuses the gateway,
    // which says so with a 502 (a 401 would send a browser to log in again).
    let wrong = gateway(
        Some(AdminKey::new(b"not the admin key, 32 bytes long")),
        false,
    )
    .unwrap();
    let a = get(
        &format!("http://{}/api/summary", wrong.local_addr()),
        &[("authorization", &t)],
    );
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (502, Some("upstream_refused_gateway"))
    );
}

#[test]
fn with_a_write_group_only_its_members_may_send_commands() {
    let s = oidc_stack_with(Some("tether-admins".into()));
    let login = |user: &str, groups: &[&str]| {
        // Both are granted portal.w: the group decides.
        s.idp.login_as(user, "openid portal.r portal.w");
        s.idp.groups(groups);
        let (url, binding) = start_login(&s, "/");
        let done = callback(&authorize(&url), Some(&binding));
        let cookie = format!(
            "__Host-tether-session={}",
            done.set_cookie("__Host-tether-session").unwrap().0
        );
        get(&s.stack.url("/auth/session"), &[("cookie", &cookie)]).json()
    };
    let admin = login("alice", &["tether-admins", "staff"]);
    assert_eq!(
        (admin["user"].as_str(), admin["canWrite"].as_bool()),
        (Some("alice"), Some(true))
    );
    let other = login("mallory", &["staff"]);
    assert_eq!(other["canWrite"], false, "{other}");
    assert_eq!(other["scopes"], json!(["portal.r"]), "{other}");
}

#[test]
fn a_client_that_trickles_its_headers_is_cut() {
    let stack = Stack::start(|c| c.header_timeout = Duration::from_secs(1));
    assert_a_trickling_client_is_cut(stack.gw.local_addr());
    // Others are served meanwhile and after.
    assert_eq!(get(&stack.url("/healthz"), &[]).status, 200);
}
