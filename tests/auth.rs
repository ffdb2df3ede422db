//! Service authentication: a registration's jwt (HS256 shared key, an
//! ES256 or RS256 JWKS from a file or a URL), its host, service, issuer,
//! audience, time and scope claims; bearer tokens on /ws/discovery.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::keys::rs256_key;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tether::controller::Controller;
use tether::controller::auth::{Auth, AuthPolicy};
use tether::metrics::BadInput;

const SECRET: &[u8] = b"a development secret";
const HOST: &str = "controller-a";

fn exp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn now() -> u64 {
    exp() - 3600
}

fn policy() -> AuthPolicy {
    AuthPolicy::new(HOST)
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn with_auth(auth: Auth) -> Controller {
    let mut config = config(1);
    config.host_id = HOST.into();
    Controller::start(config, Some(auth)).unwrap()
}

fn register_with(c: &mut Client, jwt: Option<&str>) -> Value {
    let mut params = register_params("user", "10.0.0.1", 8443);
    if let Some(jwt) = jwt {
        params["jwt"] = jwt.into();
    }
    c.call("service/register", params)
}

#[test]
fn hs256_tokens_are_checked_for_signature_host_and_service() {
    let ctl = with_auth(Auth::shared_secret(SECRET, policy()));
    let addr = ctl.local_addr();

    let good = hs256(json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()}));
    let mut c = Client::connect(addr, "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&good))["result"]["status"],
        "registered"
    );
    // A "Bearer " prefix is tolerated; service_id/cid/sub are fallbacks.
    let mut c2 = Client::connect(addr, "/ws/microservice");
    let by_sub = hs256(json!({"host": HOST, "sub": "user", "scope": ["portal.w"], "exp": exp()}));
    let mut params = register_params("user", "10.0.0.2", 8443);
    params["jwt"] = format!("Bearer {by_sub}").into();
    assert_eq!(
        c2.call("service/register", params)["result"]["status"],
        "registered"
    );

    let refused: Vec<(&str, Option<String>)> = vec![
        ("no jwt", None),
        (
            "another host",
            Some(hs256(
                json!({"host": "controller-b", "sid": "user", "exp": exp()}),
            )),
        ),
        (
            "another service",
            Some(hs256(
                json!({"host": HOST, "sid": "billing", "scope": "portal.w", "exp": exp()}),
            )),
        ),
        (
            "expired",
            Some(hs256(
                json!({"host": HOST, "sid": "user", "exp": 1_000_000}),
            )),
        ),
        (
            "wrong key",
            Some(
                encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()}),
                    &EncodingKey::from_secret(b"other"),
                )
                .unwrap(),
            ),
        ),
        ("garbage", Some("not.a.token".into())),
    ];
    for (i, (what, jwt)) in refused.iter().enumerate() {
        let mut c = Client::connect(addr, "/ws/microservice");
        let reply = register_with(&mut c, jwt.as_deref());
        assert_eq!(reply["error"]["code"], -32002, "{what}: {reply}");
        assert_eq!(c.expect_close(), Some(1008), "{what}");
        assert_eq!(bad_count(ctl.stats(), BadInput::Unauthorized), i as u64 + 1);
    }
    assert_eq!(ctl.counts().up, 2);
}

#[test]
fn discovery_needs_a_bearer_token_when_auth_is_on() {
    let ctl = with_auth(Auth::shared_secret(SECRET, policy()));
    let addr = ctl.local_addr();
    let mut c = Client::tcp(addr);
    assert_eq!(c.upgrade("/ws/discovery", None), 401);
    let token = hs256(json!({"host": HOST, "sub": "portal", "scope": "portal.r", "exp": exp()}));
    let mut c = Client::tcp(addr);
    assert_eq!(
        c.upgrade("/ws/discovery", Some(&format!("Bearer {token}"))),
        101
    );
    assert!(c.call("discovery/lookup", json!({"serviceId": "user"}))["result"]["nodes"].is_array());
    // A valid signature is not enough: another host's token, one that
    // names no service, and one without portal.r are all refused.
    for (what, claims) in [
        (
            "another host",
            json!({"host": "controller-b", "sub": "portal", "scope": "portal.r", "exp": exp()}),
        ),
        (
            "no service claim",
            json!({"host": HOST, "scope": "portal.r", "exp": exp()}),
        ),
        (
            "no portal.r",
            json!({"host": HOST, "sub": "portal", "scope": "portal.w", "exp": exp()}),
        ),
        (
            "expired",
            json!({"host": HOST, "sub": "portal", "scope": "portal.r", "exp": now() - 600}),
        ),
    ] {
        let mut c = Client::tcp(addr);
        let bearer = format!("Bearer {}", hs256(claims));
        assert_eq!(c.upgrade("/ws/discovery", Some(&bearer)), 401, "{what}");
    }
}

#[test]
fn register_needs_its_scope_and_discovery_on_its_socket_needs_portal_r() {
    let ctl = with_auth(Auth::shared_secret(SECRET, policy()));
    let addr = ctl.local_addr();
    // Signed, this host, this service, but no portal.w.
    let read_only = hs256(json!({"host": HOST, "sid": "user", "scope": "portal.r", "exp": exp()}));
    let mut c = Client::connect(addr, "/ws/microservice");
    let reply = register_with(&mut c, Some(&read_only));
    assert_eq!(reply["error"]["code"], -32002, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("portal.w"),
        "{reply}"
    );
    assert_eq!(c.expect_close(), Some(1008));
    // portal.w alone registers; a lookup on that socket (as light-4j's
    // Java client sends) is refused, and the service stays connected.
    let write_only = hs256(json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()}));
    let mut c = Client::connect(addr, "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&write_only))["result"]["status"],
        "registered"
    );
    let reply = c.call("discovery/lookup", json!({"serviceId": "user"}));
    assert_eq!(reply["error"]["code"], -32002, "{reply}");
    assert!(
        !c.sees_eof(std::time::Duration::from_millis(300)),
        "still connected"
    );
    assert_eq!(ctl.counts().up, 1);
    // Both scopes: lookups on the registration socket are served.
    let both =
        hs256(json!({"host": HOST, "sid": "user", "scope": "portal.r portal.w", "exp": exp()}));
    let mut c = Client::connect(addr, "/ws/microservice");
    let mut params = register_params("user", "10.0.0.2", 8443);
    params["jwt"] = both.into();
    assert_eq!(
        c.call("service/register", params)["result"]["status"],
        "registered"
    );
    assert_eq!(
        c.call("discovery/lookup", json!({"serviceId": "user"}))["result"]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A controller configured to need no register scope.
    let mut open = policy();
    open.register_scope = None;
    let ctl = with_auth(Auth::shared_secret(SECRET, open));
    let bare = hs256(json!({"host": HOST, "sid": "user", "exp": exp()}));
    let mut c = Client::connect(ctl.local_addr(), "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&bare))["result"]["status"],
        "registered"
    );
}

#[test]
fn issuer_audience_and_time_are_checked_when_configured() {
    let mut strict = policy();
    strict.issuer = Some("https://idp.example".into());
    strict.audience = Some("tether".into());
    let ctl = with_auth(Auth::shared_secret(SECRET, strict));
    let addr = ctl.local_addr();
    let claims = |iss: &str, aud: &str, nbf: u64, exp: u64| json!({"host": HOST, "sid": "user", "scope": "portal.w", "iss": iss, "aud": aud, "nbf": nbf, "exp": exp});
    let good = hs256(claims("https://idp.example", "tether", now() - 10, exp()));
    let mut c = Client::connect(addr, "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&good))["result"]["status"],
        "registered"
    );
    for (what, token) in [
        (
            "wrong issuer",
            hs256(claims("https://evil.example", "tether", now() - 10, exp())),
        ),
        (
            "wrong audience",
            hs256(claims("https://idp.example", "other", now() - 10, exp())),
        ),
        (
            "expired past the leeway",
            hs256(claims(
                "https://idp.example",
                "tether",
                now() - 900,
                now() - 120,
            )),
        ),
        (
            "not yet valid past the leeway",
            hs256(claims("https://idp.example", "tether", now() + 600, exp())),
        ),
        (
            "no issuer",
            hs256(
                json!({"host": HOST, "sid": "user", "scope": "portal.w", "aud": "tether", "exp": exp()}),
            ),
        ),
        ("alg none", {
            let b64 =
                |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims("https://idp.example", "tether", now() - 10, exp()))
            )
        }),
    ] {
        let mut c = Client::connect(addr, "/ws/microservice");
        let reply = register_with(&mut c, Some(&token));
        assert_eq!(reply["error"]["code"], -32002, "{what}: {reply}");
    }
    // Within the leeway (60 s): a clock a little behind still registers.
    let late = hs256(claims(
        "https://idp.example",
        "tether",
        now() - 100,
        now() - 20,
    ));
    let mut c = Client::connect(addr, "/ws/microservice");
    let mut params = register_params("user", "10.0.0.2", 8443);
    params["jwt"] = late.into();
    assert_eq!(
        c.call("service/register", params)["result"]["status"],
        "registered"
    );
}

/// The RS256 test key (tests/keys, made for these tests only) and its JWK.
fn rs256(key: &EncodingKey, kid: &str, claims: Value) -> String {
    common::keys::rs256(key, kid, &claims)
}

/// A JWKS served over HTTP on loopback: the document can be replaced, and
/// every fetch is counted.
struct JwksServer {
    addr: std::net::SocketAddr,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl JwksServer {
    fn start(document: Value) -> JwksServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = std::sync::Arc::new(std::sync::Mutex::new(document.to_string()));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, f) = (doc.clone(), fetches.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                f.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let body = d.lock().unwrap().clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            addr,
            document: doc,
            fetches,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn rs256_keys_from_a_url_follow_a_rotation_at_a_bounded_rate() {
    use std::time::{Duration, Instant};
    let (old_key, old_jwk) = rs256_key("old");
    let server = JwksServer::start(json!({"keys": [old_jwk]}));
    let min_refresh = Duration::from_millis(500);
    let auth = Auth::from_jwks_url(&server.url(), policy(), min_refresh).unwrap();
    assert_eq!(server.fetches(), 1, "fetched at start");
    let ctl = with_auth(auth);
    let addr = ctl.local_addr();
    let claims = json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()});
    let mut c = Client::connect(addr, "/ws/microservice");
    let reply = register_with(&mut c, Some(&rs256(&old_key, "old", claims.clone())));
    assert_eq!(reply["result"]["status"], "registered", "{reply}");

    // The issuer rotates: the same key under a new kid, the old one gone.
    let (new_key, mut new_jwk) = rs256_key("new");
    new_jwk["kid"] = json!("new");
    *server.document.lock().unwrap() = json!({"keys": [new_jwk]}).to_string();
    let token = rs256(&new_key, "new", claims.clone());
    // A flood of unknown kids for 2 s: each refused at once, and the keys
    // fetched at most once per min_refresh.
    // Signed once: RS256 signing in a debug build is slow, and the flood
    // is about the controller's fetches, not the test's signatures.
    let unknown = rs256(&new_key, "unknown", claims.clone());
    let started = Instant::now();
    let mut refused = 0;
    let mut registered = false;
    let mut port = 2;
    while started.elapsed() < Duration::from_secs(2) {
        let mut c = Client::connect(addr, "/ws/microservice");
        let mut params = register_params("user", "10.0.0.1", port);
        port += 1;
        params["jwt"] = unknown.clone().into();
        let reply = c.call("service/register", params);
        assert_eq!(reply["error"]["code"], -32002, "{reply}");
        refused += 1;
        if !registered {
            let mut c = Client::connect(addr, "/ws/microservice");
            let mut params = register_params("user", "10.0.0.3", port);
            params["jwt"] = token.clone().into();
            registered = c.call("service/register", params)["result"]["status"] == "registered";
        }
    }
    let fetches = server.fetches();
    let bound = 1 + (started.elapsed().as_millis() / min_refresh.as_millis()) as u64 + 1;
    assert!(refused > 20, "{refused}");
    assert!(
        (2..=bound).contains(&fetches),
        "{fetches} fetches for {refused} unknown kids in 2 s (bound {bound})"
    );
    assert!(
        registered,
        "the new kid was fetched and its token registered"
    );
    // The old kid is gone from the document, so from the keys.
    let mut c = Client::connect(addr, "/ws/microservice");
    let reply = register_with(&mut c, Some(&rs256(&old_key, "old", claims)));
    assert_eq!(reply["error"]["code"], -32002, "{reply}");
}

#[test]
fn es256_tokens_verify_against_a_jwks() {
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let signing = SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
    let point = signing.verifying_key().to_encoded_point(false);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
                                 "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}]});
    let ctl = with_auth(Auth::from_jwks(&jwks.to_string(), policy()).unwrap());
    let pem = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = encode(
        &header,
        &json!({"host": HOST, "service_id": "user", "scp": ["portal.r", "portal.w"], "exp": exp()}),
        &key,
    )
    .unwrap();
    let mut c = Client::connect(ctl.local_addr(), "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&token))["result"]["status"],
        "registered"
    );
    // An HS256 token signed with anything is refused by a JWKS controller.
    let mut c = Client::connect(ctl.local_addr(), "/ws/microservice");
    let forged = hs256(json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()}));
    assert_eq!(
        register_with(&mut c, Some(&forged))["error"]["code"],
        -32002
    );
}

#[test]
fn an_authorization_header_on_the_upgrade_stands_in_for_the_jwt_field() {
    let ctl = with_auth(Auth::shared_secret(SECRET, policy()));
    let addr = ctl.local_addr();
    let token = hs256(json!({"host": HOST, "sid": "user", "scope": "portal.w", "exp": exp()}));
    let mut c = Client::tcp(addr);
    assert_eq!(
        c.upgrade("/ws/microservice", Some(&format!("Bearer {token}"))),
        101
    );
    assert_eq!(
        register_with(&mut c, None)["result"]["status"],
        "registered"
    );
    // The header names another service: refused at register.
    let other = hs256(json!({"host": HOST, "sid": "billing", "scope": "portal.w", "exp": exp()}));
    let mut c = Client::tcp(addr);
    assert_eq!(
        c.upgrade("/ws/microservice", Some(&format!("Bearer {other}"))),
        101
    );
    assert_eq!(register_with(&mut c, None)["error"]["code"], -32002);
    // An invalid header is refused at the upgrade.
    let mut c = Client::tcp(addr);
    assert_eq!(
        c.upgrade("/ws/microservice", Some("Bearer not.a.token")),
        401
    );
}

#[test]
fn a_refused_agent_reconnects_once_per_refusal() {
    use std::time::Duration;
    use tether::agent::Backoff;
    use tether::agent::swarm::{Swarm, SwarmConfig};
    let ctl = with_auth(Auth::shared_secret(SECRET, policy()));
    let url = format!("ws://{}/ws/microservice", ctl.local_addr())
        .parse()
        .unwrap();
    let mut config = SwarmConfig::new(url, 20);
    config.backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(80),
        jitter: true,
        first_window: None,
    };
    config.run_for = Some(Duration::from_secs(2));
    let swarm = Swarm::start(config).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let stats = swarm.stats().clone();
    swarm.stop();
    let (attempts, refused) = (load(&stats.connect_attempts), load(&stats.refused));
    assert!(
        refused >= 20,
        "every service was refused at least once ({refused})"
    );
    // Each refusal (an error and a close in one read) leads to one attempt.
    assert!(
        attempts <= refused + 20,
        "{attempts} attempts for {refused} refusals"
    );
    assert_eq!(load(&stats.open), 0);
}
