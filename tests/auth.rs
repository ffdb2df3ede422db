//! Service authentication: a registration's jwt (HS256 shared key or an
//! ES256 JWKS), its host claim, its service claim; bearer tokens on
//! /ws/discovery.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tether::controller::Controller;
use tether::controller::auth::Auth;
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
    let ctl = with_auth(Auth::shared_secret(SECRET, HOST));
    let addr = ctl.local_addr();

    let good = hs256(json!({"host": HOST, "sid": "user", "exp": exp()}));
    let mut c = Client::connect(addr, "/ws/microservice");
    assert_eq!(
        register_with(&mut c, Some(&good))["result"]["status"],
        "registered"
    );
    // A "Bearer " prefix is tolerated; service_id/cid/sub are fallbacks.
    let mut c2 = Client::connect(addr, "/ws/microservice");
    let by_sub = hs256(json!({"host": HOST, "sub": "user", "exp": exp()}));
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
            Some(hs256(json!({"host": HOST, "sid": "billing", "exp": exp()}))),
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
                    &json!({"host": HOST, "sid": "user", "exp": exp()}),
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
    let ctl = with_auth(Auth::shared_secret(SECRET, HOST));
    let addr = ctl.local_addr();
    let mut c = Client::tcp(addr);
    assert_eq!(c.upgrade("/ws/discovery", None), 401);
    let token = hs256(json!({"host": HOST, "sub": "portal", "exp": exp()}));
    let mut c = Client::tcp(addr);
    assert_eq!(
        c.upgrade("/ws/discovery", Some(&format!("Bearer {token}"))),
        101
    );
    assert!(c.call("discovery/lookup", json!({"serviceId": "user"}))["result"]["nodes"].is_array());
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
    let ctl = with_auth(Auth::from_jwks(&jwks.to_string(), HOST).unwrap());
    let pem = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = encode(
        &header,
        &json!({"host": HOST, "service_id": "user", "exp": exp()}),
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
    let forged = hs256(json!({"host": HOST, "sid": "user", "exp": exp()}));
    assert_eq!(
        register_with(&mut c, Some(&forged))["error"]["code"],
        -32002
    );
}

#[test]
fn an_authorization_header_on_the_upgrade_stands_in_for_the_jwt_field() {
    let ctl = with_auth(Auth::shared_secret(SECRET, HOST));
    let addr = ctl.local_addr();
    let token = hs256(json!({"host": HOST, "sid": "user", "exp": exp()}));
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
    let other = hs256(json!({"host": HOST, "sid": "billing", "exp": exp()}));
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
    let ctl = with_auth(Auth::shared_secret(SECRET, HOST));
    let url = format!("ws://{}/ws/microservice", ctl.local_addr())
        .parse()
        .unwrap();
    let mut config = SwarmConfig::new(url, 20);
    config.backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(80),
        jitter: true,
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
