//! Service authentication (PROTOCOL.md, `service/register` and
//! `/ws/discovery`): a JWT verified (`crate::jwt`) against a shared key
//! (HS256, for development) or a JWKS (RS256/ES256, from a file or a URL).
//! Every token must name this controller (`host`), name a service (`sid`,
//! `service_id`, `cid`, `sub`, the first present), pass `exp`/`nbf` (with
//! `LEEWAY`), and match `iss`/`aud` when they are configured. A
//! registration's token must name the serviceId it registers and carry the
//! register scope (`portal.w` by default); discovery needs `portal.r`.

use std::time::Duration;

use crate::jwt::{Expect, Scopes, Verifier};
pub use crate::jwt::{LEEWAY, MIN_REFRESH, REFRESH};

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

fn expect(policy: &AuthPolicy) -> Expect {
    Expect {
        issuer: policy.issuer.clone(),
        audience: policy.audience.clone(),
    }
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

pub struct Auth {
    policy: AuthPolicy,
    verifier: Verifier,
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

impl Auth {
    /// HS256 with a shared secret.
    pub fn shared_secret(secret: &[u8], policy: AuthPolicy) -> Auth {
        let verifier = Verifier::shared_secret(secret, expect(&policy));
        Auth { policy, verifier }
    }

    /// The public keys of a JWKS document (RS256/ES256), chosen by `kid`.
    pub fn from_jwks(json: &str, policy: AuthPolicy) -> Result<Auth, String> {
        let verifier = Verifier::from_jwks(json, expect(&policy))?;
        Ok(Auth { policy, verifier })
    }

    /// The keys of the JWKS at `url`, fetched now (an error if that
    /// fails) and kept fresh (`Verifier::from_jwks_url`).
    pub fn from_jwks_url(
        url: &str,
        policy: AuthPolicy,
        min_refresh: Duration,
    ) -> Result<Auth, String> {
        let verifier = Verifier::from_jwks_url(url, expect(&policy), min_refresh)?;
        Ok(Auth { policy, verifier })
    }

    pub fn policy(&self) -> &AuthPolicy {
        &self.policy
    }

    /// JWKS fetches so far (0 without a URL).
    pub fn fetches(&self) -> u64 {
        self.verifier.fetches()
    }

    fn claims(&self, token: &str) -> Result<Claims, String> {
        self.verifier.decode(token)
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
