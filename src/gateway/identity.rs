//! Who a gateway caller is: a user from a bearer JWT (API clients) or
//! from a browser session, with the scopes that say what they may do
//! (`portal.r` to read, `portal.w` to send mutating commands).
//!
//! Bearer tokens are checked by `crate::jwt` (signature against a JWKS,
//! or the HS256 dev key under `--dev`; `iss`, `aud`, `exp`/`nbf` with a
//! minute's leeway). The user is the token's `sub` (else `client_id` or
//! `azp`, as client-credentials tokens name their client).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::jwt::{Scopes, Verifier};

pub const READ_SCOPE: &str = "portal.r";
pub const WRITE_SCOPE: &str = "portal.w";
/// `iss` and `aud` of the tokens `tether token` mints for `--dev`.
pub const DEV_ISSUER: &str = "tether-dev";
pub const DEV_AUDIENCE: &str = "tether-gateway";
/// Longest user name taken from a token (it travels in a header and the
/// audit log).
const MAX_USER: usize = 128;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// The portal scopes it holds (others are dropped).
    pub scopes: Vec<String>,
}

impl User {
    pub fn can_read(&self) -> bool {
        self.has(READ_SCOPE) || self.has(WRITE_SCOPE)
    }

    pub fn can_write(&self) -> bool {
        self.has(WRITE_SCOPE)
    }

    fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// `X-Tether-Scopes` for the admin plane.
    pub fn scopes_header(&self) -> String {
        self.scopes.join(" ")
    }
}

#[derive(Deserialize)]
pub(crate) struct UserClaims {
    sub: Option<String>,
    client_id: Option<String>,
    azp: Option<String>,
    #[serde(default)]
    scope: Option<Scopes>,
    #[serde(default)]
    scp: Option<Scopes>,
    #[serde(default)]
    exp: Option<u64>,
}

/// Only the portal scopes matter here; `portal.w` implies reading.
pub(crate) fn portal_scopes<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut scopes: Vec<String> = names
        .filter(|s| *s == READ_SCOPE || *s == WRITE_SCOPE)
        .map(str::to_owned)
        .collect();
    scopes.sort();
    scopes.dedup();
    scopes
}

/// A user name fit for a header and a log line.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_USER
        || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(format!(
            "the token's subject must be 1-{MAX_USER} printable ASCII characters"
        ));
    }
    Ok(())
}

impl UserClaims {
    pub(crate) fn user(self) -> Result<User, String> {
        let scopes = portal_scopes(
            [&self.scope, &self.scp]
                .into_iter()
                .flatten()
                .flat_map(|s| s.names()),
        );
        let name = [self.sub, self.client_id, self.azp]
            .into_iter()
            .flatten()
            .next()
            .ok_or("the token names no subject (sub, client_id or azp)")?;
        check_name(&name)?;
        Ok(User { name, scopes })
    }
}

/// Verifies an API client's bearer token.
pub fn bearer_user(verifier: &Verifier, token: &str) -> Result<User, String> {
    bearer(verifier, token).map(|(user, _)| user)
}

/// The user of a bearer token, and when the token expires (Unix seconds).
pub fn bearer(verifier: &Verifier, token: &str) -> Result<(User, Option<u64>), String> {
    let claims = verifier.decode::<UserClaims>(token)?;
    let exp = claims.exp;
    Ok((claims.user()?, exp))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An HS256 token for `--dev` gateways holding `key`: `sub` = `user`, the
/// scopes, valid for `ttl`.
pub fn mint_dev_token(
    key: &[u8],
    user: &str,
    scopes: &[&str],
    ttl: Duration,
) -> Result<String, String> {
    check_name(user)?;
    let now = unix_now();
    let claims = serde_json::json!({
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": user,
        "scope": scopes.join(" "),
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs().max(1),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

/// Where `--dev` keeps its signing key when no file is named (created
/// 0600 on first use; `tether token` reads the same file).
pub fn default_dev_key_path() -> std::path::PathBuf {
    crate::admin::access::runtime_path("gateway-dev.key")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::Expect;

    fn dev() -> Verifier {
        Verifier::shared_secret(
            b"a dev key of thirty-two bytes...",
            Expect {
                issuer: Some(DEV_ISSUER.into()),
                audience: Some(DEV_AUDIENCE.into()),
            },
        )
    }

    #[test]
    fn a_minted_dev_token_names_its_user_and_portal_scopes() {
        let key = b"a dev key of thirty-two bytes...";
        let t = mint_dev_token(key, "ana", &["portal.w"], Duration::from_secs(60)).unwrap();
        let user = bearer_user(&dev(), &t).unwrap();
        assert_eq!(user.name, "ana");
        assert!(user.can_write() && user.can_read());
        let t = mint_dev_token(key, "ro", &["portal.r", "openid"], Duration::from_secs(60));
        let user = bearer_user(&dev(), &t.unwrap()).unwrap();
        assert_eq!(user.scopes, vec!["portal.r".to_string()]);
        assert!(user.can_read() && !user.can_write());
        let other = mint_dev_token(
            b"another key, also 32 bytes long.",
            "x",
            &[],
            Duration::from_secs(60),
        );
        assert!(bearer_user(&dev(), &other.unwrap()).is_err());
        assert!(mint_dev_token(key, "bad\nname", &[], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn scopes_come_from_scope_or_scp_as_text_or_list() {
        let claims: UserClaims = serde_json::from_value(serde_json::json!({
            "client_id": "ci-bot", "scp": ["portal.r", "x"], "scope": "a,portal.w"
        }))
        .unwrap();
        let user = claims.user().unwrap();
        assert_eq!(user.name, "ci-bot");
        assert_eq!(user.scopes, vec!["portal.r", "portal.w"]);
        let none: UserClaims =
            serde_json::from_value(serde_json::json!({"scope": "portal.r"})).unwrap();
        assert!(none.user().is_err());
    }
}
