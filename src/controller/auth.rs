//! Service authentication (PROTOCOL.md, `service/register` and
//! `/ws/discovery`): a JWT verified against a shared key (HS256, for
//! development) or a JWKS (RS256/ES256), whose `host` claim must name this
//! controller and whose service claim (`sid`, `service_id`, `cid`, `sub`,
//! the first present) must equal the serviceId it registers.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

enum Keys {
    Shared(DecodingKey),
    Jwks(Vec<(Option<String>, DecodingKey)>),
}

pub struct Auth {
    host_id: String,
    keys: Keys,
}

#[derive(serde::Deserialize)]
struct Claims {
    host: Option<String>,
    sid: Option<String>,
    service_id: Option<String>,
    cid: Option<String>,
    sub: Option<String>,
}

impl Auth {
    /// HS256 with a shared secret.
    pub fn shared_secret(secret: &[u8], host_id: &str) -> Auth {
        Auth {
            host_id: host_id.into(),
            keys: Keys::Shared(DecodingKey::from_secret(secret)),
        }
    }

    /// The public keys of a JWKS document (RS256/ES256), chosen by `kid`.
    pub fn from_jwks(json: &str, host_id: &str) -> Result<Auth, String> {
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
        Ok(Auth {
            host_id: host_id.into(),
            keys: Keys::Jwks(keys),
        })
    }

    fn claims(&self, token: &str) -> Result<Claims, String> {
        let header = decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let (key, algorithms): (&DecodingKey, &[Algorithm]) = match &self.keys {
            Keys::Shared(key) => (key, &[Algorithm::HS256]),
            Keys::Jwks(keys) => {
                let key = keys
                    .iter()
                    .find(|(kid, _)| header.kid.is_none() || *kid == header.kid)
                    .map(|(_, k)| k)
                    .ok_or("no key in the JWKS matches the token's kid")?;
                (key, &[Algorithm::RS256, Algorithm::ES256])
            }
        };
        if !algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_aud = false;
        decode::<Claims>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| format!("token rejected: {e}"))
    }

    /// Verifies a service token (signature, expiry, `host` claim) and
    /// returns the service it names: the first of `sid`, `service_id`,
    /// `cid`, `sub`. A `Bearer ` prefix is tolerated.
    pub fn service_of(&self, token: &str) -> Result<String, String> {
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let claims = self.claims(token)?;
        if claims.host.as_deref() != Some(self.host_id.as_str()) {
            return Err(format!(
                "the token's host claim is not this controller's hostId ({})",
                self.host_id
            ));
        }
        [claims.sid, claims.service_id, claims.cid, claims.sub]
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| "the token names no service (sid, service_id, cid or sub)".into())
    }

    /// Checks the `jwt` of a `service/register` for `service_id`.
    pub fn check_service(&self, jwt: Option<&str>, service_id: &str) -> Result<(), String> {
        let named = self.service_of(jwt.ok_or("the registration carries no jwt")?)?;
        check_named(&named, service_id)
    }
}

/// The service a verified token names must be the one registering.
pub fn check_named(named: &str, service_id: &str) -> Result<(), String> {
    if named == service_id {
        Ok(())
    } else {
        Err(format!(
            "the token is for service {named:?}, not {service_id:?}"
        ))
    }
}

impl Auth {
    /// Checks an `Authorization: Bearer` header (on `/ws/discovery`).
    pub fn check_bearer(&self, header: Option<&str>) -> Result<(), String> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or("no bearer token")?;
        self.claims(token).map(drop)
    }
}
