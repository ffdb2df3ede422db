//! JWT verification shared by the controller (service tokens) and the
//! gateway (users' bearer tokens and OIDC ID tokens): the keys (an HS256
//! shared secret, or a JWKS of RS256/ES256 keys from a file or a URL), the
//! signature, `exp`/`nbf` with `LEEWAY`, and `iss`/`aud` when they are
//! configured. What the claims must say beyond that is the caller's.
//!
//! A JWKS from a URL is fetched at start and kept. A token whose `kid` is
//! unknown is refused at once (the controller verifies on shard threads,
//! which never wait on the network) and asks the refresher thread for a
//! fetch, at most one per `min_refresh`; the keys are also fetched again
//! every `REFRESH` so a rotation is seen without such a token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::de::DeserializeOwned;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The least time between two fetches of a JWKS URL.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// A JWKS URL is fetched again at least this often.
pub const REFRESH: Duration = Duration::from_secs(600);
/// The longest a JWKS fetch may take, and the largest document read.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: u64 = 1 << 20;

type KeySet = Vec<(Option<String>, DecodingKey)>;
/// A JWKS's keys, replaced whole by the refresher.
type SharedKeys = Arc<RwLock<Arc<KeySet>>>;

enum Keys {
    Shared(DecodingKey),
    Jwks(SharedKeys),
}

/// What a token must say besides its signature and times.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// `iss` must equal this, when set.
    pub issuer: Option<String>,
    /// `aud` must hold this, when set.
    pub audience: Option<String>,
}

/// Keys and the checks every token passes.
pub struct Verifier {
    expect: Expect,
    keys: Keys,
    /// Set when a JWKS URL's keys should be fetched again.
    refresh: Option<Arc<Refresh>>,
}

/// `scope`/`scp`: a string of names split by spaces or commas, or a list.
#[derive(serde::Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum Scopes {
    Text(String),
    List(Vec<String>),
}

impl Scopes {
    pub fn has(&self, wanted: &str) -> bool {
        self.names().any(|s| s == wanted)
    }

    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Scopes::Text(t) => Box::new(t.split([' ', ',']).filter(|s| !s.is_empty())),
            Scopes::List(l) => Box::new(l.iter().map(String::as_str)),
        }
    }
}

/// The signing keys of a JWKS. Keys for encryption (`use: enc`) and keys
/// this library cannot use are skipped (and logged), so one odd key in a
/// provider's set does not stop the others from verifying.
fn parse_jwks(json: &str) -> Result<KeySet, String> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS document: no keys list")?;
    let mut keys = Vec::new();
    for entry in entries {
        if entry.get("use").and_then(|u| u.as_str()) == Some("enc") {
            continue;
        }
        let parsed: Result<jsonwebtoken::jwk::Jwk, _> = serde_json::from_value(entry.clone());
        match parsed.map_err(|e| e.to_string()).and_then(|jwk| {
            DecodingKey::from_jwk(&jwk)
                .map(|k| (jwk.common.key_id.clone(), k))
                .map_err(|e| e.to_string())
        }) {
            Ok(key) => keys.push(key),
            Err(e) => tracing::warn!(
                "JWKS: skipping a key ({}): {e}",
                entry
                    .get("kid")
                    .and_then(|k| k.as_str())
                    .unwrap_or("no kid")
            ),
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signing keys".into());
    }
    Ok(keys)
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn shared_secret(secret: &[u8], expect: Expect) -> Verifier {
        Verifier {
            expect,
            keys: Keys::Shared(DecodingKey::from_secret(secret)),
            refresh: None,
        }
    }

    /// The public keys of a JWKS document (RS256/ES256), chosen by `kid`.
    pub fn from_jwks(json: &str, expect: Expect) -> Result<Verifier, String> {
        Ok(Verifier {
            expect,
            keys: Keys::Jwks(Arc::new(RwLock::new(Arc::new(parse_jwks(json)?)))),
            refresh: None,
        })
    }

    /// The keys of the JWKS at `url`, fetched now (an error if that
    /// fails) and kept fresh by a thread of its own: fetched again when a
    /// token names an unknown kid, at most once per `min_refresh`
    /// (`MIN_REFRESH` in production), and every `REFRESH`.
    pub fn from_jwks_url(
        url: &str,
        expect: Expect,
        min_refresh: Duration,
    ) -> Result<Verifier, String> {
        let keys: SharedKeys = Arc::new(RwLock::new(Arc::new(parse_jwks(&fetch(url)?)?)));
        let refresh = Arc::new(Refresh {
            min_refresh,
            ..Refresh::default()
        });
        let (weak, r, url) = (Arc::downgrade(&keys), refresh.clone(), url.to_string());
        std::thread::Builder::new()
            .name("tether-jwks".into())
            .spawn(move || r.run(&url, &weak))
            .map_err(|e| format!("cannot start the JWKS refresher: {e}"))?;
        Ok(Verifier {
            expect,
            keys: Keys::Jwks(keys),
            refresh: Some(refresh),
        })
    }

    pub fn expect(&self) -> &Expect {
        &self.expect
    }

    /// JWKS fetches so far (0 without a URL).
    pub fn fetches(&self) -> u64 {
        self.refresh
            .as_ref()
            .map_or(0, |r| r.state.lock().unwrap().fetches)
    }

    /// The claims of a token that passes the signature, time, issuer and
    /// audience checks. `alg: none` and algorithms the keys are not for
    /// are refused.
    pub fn decode<T: DeserializeOwned>(&self, token: &str) -> Result<T, String> {
        let header = decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY.as_secs();
            v.validate_nbf = true;
            // A configured claim must be present, not only right when it is.
            match &self.expect.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    v.required_spec_claims.insert("aud".into());
                }
                None => v.validate_aud = false,
            }
            if let Some(iss) = &self.expect.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            v
        };
        let check = |key: &DecodingKey, algorithms: &[Algorithm]| {
            if !algorithms.contains(&header.alg) {
                return Err(format!("algorithm {:?} is not accepted", header.alg));
            }
            decode::<T>(token, key, &validation(header.alg))
                .map(|d| d.claims)
                .map_err(|e| format!("token rejected: {e}"))
        };
        match &self.keys {
            Keys::Shared(key) => check(key, &[Algorithm::HS256]),
            Keys::Jwks(keys) => {
                let keys = keys.read().unwrap().clone();
                // A token without a kid is tried against every key.
                if header.kid.is_none() {
                    let mut last = Err("the JWKS holds no keys".to_string());
                    for (_, key) in keys.iter() {
                        last = check(key, &[Algorithm::RS256, Algorithm::ES256]);
                        if last.is_ok() {
                            break;
                        }
                    }
                    return last;
                }
                let Some((_, key)) = keys.iter().find(|(kid, _)| *kid == header.kid) else {
                    if let Some(r) = &self.refresh {
                        r.ask();
                        return Err(
                            "no key in the JWKS matches the token's kid; the keys are being fetched again: retry shortly".into(),
                        );
                    }
                    return Err("no key in the JWKS matches the token's kid".into());
                };
                check(key, &[Algorithm::RS256, Algorithm::ES256])
            }
        }
    }
}

#[derive(Default)]
struct RefreshState {
    asked: bool,
    fetches: u64,
}

/// The JWKS refresher's mailbox.
#[derive(Default)]
struct Refresh {
    state: Mutex<RefreshState>,
    wake: Condvar,
    /// Asked since the last fetch (a cheap check before the lock).
    pending: AtomicBool,
    min_refresh: Duration,
}

impl Refresh {
    fn ask(&self) {
        if !self.pending.swap(true, Ordering::Relaxed) {
            self.state.lock().unwrap().asked = true;
            self.wake.notify_one();
        }
    }

    /// Until the keys' `Verifier` is dropped: fetch when asked (at most
    /// once per `min_refresh`) and every `REFRESH`.
    fn run(&self, url: &str, held: &std::sync::Weak<RwLock<Arc<KeySet>>>) {
        let mut last = Instant::now();
        self.state.lock().unwrap().fetches = 1;
        loop {
            {
                let mut state = self.state.lock().unwrap();
                loop {
                    if held.strong_count() == 0 {
                        return;
                    }
                    let since = last.elapsed();
                    if (state.asked && since >= self.min_refresh) || since >= REFRESH {
                        break;
                    }
                    let wait = if state.asked {
                        self.min_refresh - since
                    } else {
                        // Wake now and then to notice the Verifier is gone.
                        (REFRESH - since).min(Duration::from_secs(1))
                    };
                    state = self.wake.wait_timeout(state, wait).unwrap().0;
                }
                state.asked = false;
                state.fetches += 1;
            }
            self.pending.store(false, Ordering::Relaxed);
            last = Instant::now();
            match fetch(url).and_then(|json| parse_jwks(&json)) {
                Ok(keys) => match held.upgrade() {
                    Some(held) => *held.write().unwrap() = Arc::new(keys),
                    None => return,
                },
                Err(e) => tracing::warn!("JWKS {url}: {e}; keeping the keys held"),
            }
        }
    }
}

/// GETs a small JSON document (a JWKS, an OIDC discovery document) with
/// a bounded time and size.
pub fn fetch(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_string()
        .map_err(|e| format!("cannot read {url}: {e}"))
}
