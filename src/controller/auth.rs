//! Service authentication (PROTOCOL.md, `service/register` and
//! `/ws/discovery`): a JWT verified against a shared key (HS256, for
//! development) or a JWKS (RS256/ES256, from a file or a URL). Every token
//! must name this controller (`host`), name a service (`sid`,
//! `service_id`, `cid`, `sub`, the first present), pass `exp`/`nbf` (with
//! `LEEWAY`), and match `iss`/`aud` when they are configured. A
//! registration's token must name the serviceId it registers and carry the
//! register scope (`portal.w` by default); discovery needs `portal.r`.
//!
//! A JWKS from a URL is fetched at start and kept. A token whose `kid` is
//! unknown is refused at once (verification runs on shard threads, which
//! never wait on the network) and asks the refresher thread for a fetch,
//! at most one per `MIN_REFRESH`; the keys are also fetched again every
//! `REFRESH` so a rotation is seen without such a token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The least time between two fetches of a JWKS URL.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// A JWKS URL is fetched again at least this often.
pub const REFRESH: Duration = Duration::from_secs(600);
/// The longest a JWKS fetch may take, and the largest document read.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: u64 = 1 << 20;
/// The scope discovery needs (light-4j #998).
pub const READ_SCOPE: &str = "portal.r";
/// The scope registration needs by default (light-4j #998).
pub const REGISTER_SCOPE: &str = "portal.w";

/// What a token must say besides its signature.
#[derive(Clone, Debug)]
pub struct AuthPolicy {
    pub host_id: String,
    /// `iss` must equal this, when set.
    pub issuer: Option<String>,
    /// `aud` must hold this, when set.
    pub audience: Option<String>,
    /// The scope `service/register` needs; `None` needs none.
    pub register_scope: Option<String>,
}

impl AuthPolicy {
    /// Host check only, and the default register scope.
    pub fn new(host_id: &str) -> AuthPolicy {
        AuthPolicy {
            host_id: host_id.into(),
            issuer: None,
            audience: None,
            register_scope: Some(REGISTER_SCOPE.into()),
        }
    }
}

type KeySet = Vec<(Option<String>, DecodingKey)>;
/// A JWKS's keys, replaced whole by the refresher.
type SharedKeys = Arc<RwLock<Arc<KeySet>>>;

enum Keys {
    Shared(DecodingKey),
    Jwks(SharedKeys),
}

pub struct Auth {
    policy: AuthPolicy,
    keys: Keys,
    /// Set when a JWKS URL's keys should be fetched again.
    refresh: Option<Arc<Refresh>>,
}

/// A verified token: the service it names, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub service: String,
    /// It carries the register scope (or none is needed).
    pub may_register: bool,
    /// It carries `portal.r`.
    pub may_discover: bool,
}

#[derive(serde::Deserialize)]
struct Claims {
    host: Option<String>,
    sid: Option<String>,
    service_id: Option<String>,
    cid: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    scope: Option<Scopes>,
    #[serde(default)]
    scp: Option<Scopes>,
}

/// `scope`/`scp`: a string of names split by spaces or commas, or a list.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Scopes {
    Text(String),
    List(Vec<String>),
}

impl Scopes {
    fn has(&self, wanted: &str) -> bool {
        match self {
            Scopes::Text(t) => t.split([' ', ',']).any(|s| s == wanted),
            Scopes::List(l) => l.iter().any(|s| s == wanted),
        }
    }
}

fn parse_jwks(json: &str) -> Result<KeySet, String> {
    let set: JwkSet =
        serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key in the JWKS: {e}"))?;
        keys.push((jwk.common.key_id.clone(), key));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no keys".into());
    }
    Ok(keys)
}

impl Auth {
    /// HS256 with a shared secret.
    pub fn shared_secret(secret: &[u8], policy: AuthPolicy) -> Auth {
        Auth {
            policy,
            keys: Keys::Shared(DecodingKey::from_secret(secret)),
            refresh: None,
        }
    }

    /// The public keys of a JWKS document (RS256/ES256), chosen by `kid`.
    pub fn from_jwks(json: &str, policy: AuthPolicy) -> Result<Auth, String> {
        Ok(Auth {
            policy,
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
        policy: AuthPolicy,
        min_refresh: Duration,
    ) -> Result<Auth, String> {
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
        Ok(Auth {
            policy,
            keys: Keys::Jwks(keys),
            refresh: Some(refresh),
        })
    }

    pub fn policy(&self) -> &AuthPolicy {
        &self.policy
    }

    /// JWKS fetches so far (0 without a URL).
    pub fn fetches(&self) -> u64 {
        self.refresh
            .as_ref()
            .map_or(0, |r| r.state.lock().unwrap().fetches)
    }

    fn claims(&self, token: &str) -> Result<Claims, String> {
        let header = decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY.as_secs();
            v.validate_nbf = true;
            // A configured claim must be present, not only right when it is.
            match &self.policy.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    v.required_spec_claims.insert("aud".into());
                }
                None => v.validate_aud = false,
            }
            if let Some(iss) = &self.policy.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            v
        };
        let check = |key: &DecodingKey, algorithms: &[Algorithm]| {
            if !algorithms.contains(&header.alg) {
                return Err(format!("algorithm {:?} is not accepted", header.alg));
            }
            decode::<Claims>(token, key, &validation(header.alg))
                .map(|d| d.claims)
                .map_err(|e| format!("token rejected: {e}"))
        };
        match &self.keys {
            Keys::Shared(key) => check(key, &[Algorithm::HS256]),
            Keys::Jwks(keys) => {
                let keys = keys.read().unwrap().clone();
                let Some((_, key)) = keys
                    .iter()
                    .find(|(kid, _)| header.kid.is_none() || *kid == header.kid)
                else {
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

    /// Verifies a token (signature, time, issuer, audience, `host`, a
    /// service claim) and says what it may do. A `Bearer ` prefix is
    /// tolerated.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let claims = self.claims(token)?;
        if claims.host.as_deref() != Some(self.policy.host_id.as_str()) {
            return Err(format!(
                "the token's host claim is not this controller's hostId ({})",
                self.policy.host_id
            ));
        }
        let has = |scope: &str| {
            [&claims.scope, &claims.scp]
                .into_iter()
                .flatten()
                .any(|s| s.has(scope))
        };
        let may_register = self.policy.register_scope.as_deref().is_none_or(has);
        let may_discover = has(READ_SCOPE);
        let service = [claims.sid, claims.service_id, claims.cid, claims.sub]
            .into_iter()
            .flatten()
            .next()
            .ok_or("the token names no service (sid, service_id, cid or sub)")?;
        Ok(Verified {
            service,
            may_register,
            may_discover,
        })
    }

    /// Checks the `jwt` of a `service/register` for `service_id`.
    pub fn check_service(&self, jwt: Option<&str>, service_id: &str) -> Result<Verified, String> {
        let verified = self.verify(jwt.ok_or("the registration carries no jwt")?)?;
        self.check_registrant(&verified, service_id)?;
        Ok(verified)
    }

    /// A verified token may register `service_id`: it names it, and has
    /// the register scope.
    pub fn check_registrant(&self, verified: &Verified, service_id: &str) -> Result<(), String> {
        if verified.service != service_id {
            return Err(format!(
                "the token is for service {:?}, not {service_id:?}",
                verified.service
            ));
        }
        if !verified.may_register {
            return Err(format!(
                "the token lacks the scope {} that registering needs",
                self.policy.register_scope.as_deref().unwrap_or("")
            ));
        }
        Ok(())
    }

    /// Checks an `Authorization: Bearer` header on `/ws/discovery`.
    pub fn check_discovery(&self, header: Option<&str>) -> Result<(), String> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or("no bearer token")?;
        let verified = self.verify(token)?;
        if !verified.may_discover {
            return Err(format!("the token lacks the scope {READ_SCOPE}"));
        }
        Ok(())
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

    /// Until the keys' `Auth` is dropped: fetch when asked (at most once
    /// per `min_refresh`) and every `REFRESH`.
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
                        // Wake now and then to notice the Auth is gone.
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

fn fetch(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot fetch the JWKS from {url}: {e}"))?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_string()
        .map_err(|e| format!("cannot read the JWKS from {url}: {e}"))
}
