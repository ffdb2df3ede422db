//! The gateway as a confidential OIDC client: the authorization-code flow
//! with PKCE (S256), against an issuer discovered from
//! `/.well-known/openid-configuration`. The code is exchanged, and tokens
//! are refreshed, on the server with the client's secret
//! (`client_secret_basic`); none reaches the browser. The ID token is
//! checked against the issuer's JWKS: signature, `iss`, `aud` (the client
//! id), times, and the login's `nonce`.
//!
//! The user's scopes are what the token endpoint granted (`scope` in its
//! answer), else the access token's own `scope`/`scp` when it is a JWT the
//! issuer signed.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;

use super::identity::{self, User, UserClaims, check_name, portal_scopes};
use super::session::OidcTokens;
use crate::jwt::{Expect, Verifier};

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct OidcConfig {
    /// The issuer URL (its discovery document is under it).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where the provider sends the browser back: the gateway's public
    /// URL + `/auth/callback`.
    pub redirect_uri: String,
    /// Asked for at login (`openid` is always added).
    pub scopes: Vec<String>,
    /// The ID token claim that lists the user's groups (or roles).
    pub groups_claim: String,
    /// When set, `portal.r` needs this group in `groups_claim` (else the
    /// granted scopes decide).
    pub read_group: Option<String>,
    /// When set, `portal.w` needs this group (else the granted scopes
    /// decide, so the provider must grant `portal.w` only to those who may
    /// send commands).
    pub write_group: Option<String>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    end_session_endpoint: Option<String>,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
}

pub struct Oidc {
    config: OidcConfig,
    authorization_endpoint: String,
    token_endpoint: String,
    pub jwks_uri: String,
    pub end_session_endpoint: Option<String>,
    /// ID tokens: `aud` is the client id.
    id_tokens: Verifier,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
struct IdClaims {
    sub: String,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl IdClaims {
    /// The groups (or roles) the claim `name` lists: a list, or one string.
    fn groups(&self, name: &str) -> Vec<String> {
        match self.rest.get(name) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(s)) => s.split([' ', ',']).map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The S256 challenge of a PKCE verifier.
pub fn challenge(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

impl Oidc {
    /// Reads the issuer's discovery document and keys (blocking).
    pub fn discover(config: OidcConfig) -> Result<Oidc, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let doc: Discovery = serde_json::from_str(&crate::jwt::fetch(&url)?)
            .map_err(|e| format!("the OIDC discovery document at {url}: {e}"))?;
        if doc.issuer != config.issuer {
            return Err(format!(
                "the OIDC discovery document names issuer {:?}, not {:?}",
                doc.issuer, config.issuer
            ));
        }
        if let Some(methods) = &doc.code_challenge_methods_supported
            && !methods.iter().any(|m| m == "S256")
        {
            return Err("the OIDC provider does not support PKCE with S256".into());
        }
        let id_tokens = Verifier::from_jwks_url(
            &doc.jwks_uri,
            Expect {
                issuer: Some(config.issuer.clone()),
                audience: Some(config.client_id.clone()),
            },
            crate::jwt::MIN_REFRESH,
        )?;
        Ok(Oidc {
            config,
            authorization_endpoint: doc.authorization_endpoint,
            token_endpoint: doc.token_endpoint,
            jwks_uri: doc.jwks_uri,
            end_session_endpoint: doc.end_session_endpoint,
            id_tokens,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Where the browser goes to log in.
    pub fn authorize_url(&self, state: &str, verifier: &str, nonce: &str) -> String {
        let mut scopes = vec!["openid".to_string()];
        scopes.extend(
            self.config
                .scopes
                .iter()
                .filter(|s| *s != "openid")
                .cloned(),
        );
        let sep = if self.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
            self.authorization_endpoint,
            encode(&self.config.client_id),
            encode(&self.config.redirect_uri),
            encode(&scopes.join(" ")),
            encode(state),
            encode(nonce),
            encode(&challenge(verifier)),
        )
    }

    fn token_request(&self, form: &[(&str, &str)]) -> Result<TokenResponse, String> {
        let basic = format!(
            "Basic {}",
            STANDARD.encode(format!(
                "{}:{}",
                encode(&self.config.client_id),
                encode(&self.config.client_secret)
            ))
        );
        let mut response = agent()
            .post(&self.token_endpoint)
            .header("authorization", &basic)
            .header("accept", "application/json")
            .send_form(form.iter().copied())
            .map_err(|e| format!("the token endpoint {}: {e}", self.token_endpoint))?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_string()
            .map_err(|e| format!("the token endpoint's answer: {e}"))?;
        if !status.is_success() {
            let body: String = body.chars().take(300).collect();
            return Err(format!("the token endpoint refused ({status}): {body}"));
        }
        let tokens: TokenResponse = serde_json::from_str(&body)
            .map_err(|e| format!("the token endpoint's answer is not a token response: {e}"))?;
        if let Some(t) = &tokens.token_type
            && !t.eq_ignore_ascii_case("bearer")
        {
            return Err(format!(
                "the token endpoint gave a {t:?} token, not a bearer one"
            ));
        }
        Ok(tokens)
    }

    /// The user and tokens of a token response. At login the ID token is
    /// required and its `nonce` checked; a refresh may come without one
    /// (OIDC Core 12.2): the session's user stays, and a new one must name
    /// the same subject.
    fn session_of(
        &self,
        tokens: TokenResponse,
        nonce: Option<&str>,
        access_tokens: Option<&Verifier>,
        previous: Option<(&OidcTokens, &User)>,
    ) -> Result<(User, OidcTokens), String> {
        let claims: Option<IdClaims> = match &tokens.id_token {
            Some(id) => Some(
                self.id_tokens
                    .decode(id)
                    .map_err(|e| format!("the ID token: {e}"))?,
            ),
            None if previous.is_some() => None,
            None => return Err("the token endpoint gave no ID token".into()),
        };
        if let Some(c) = &claims {
            if let Some(nonce) = nonce
                && c.nonce.as_deref() != Some(nonce)
            {
                return Err("the ID token's nonce is not this login's".into());
            }
            if let Some((_, user)) = previous
                && c.sub != user.name
            {
                return Err("the refreshed ID token names another user".into());
            }
            check_name(&c.sub)?;
        }
        let granted = match &tokens.scope {
            Some(granted) => portal_scopes(granted.split(' ')),
            None => access_tokens
                .and_then(|v| v.decode::<UserClaims>(&tokens.access_token).ok())
                .and_then(|c| c.user().ok())
                .map(|u| u.scopes)
                .unwrap_or_default(),
        };
        let name = match (&claims, previous) {
            (Some(c), _) => c.sub.clone(),
            (None, Some((_, user))) => user.name.clone(),
            (None, None) => unreachable!("refused above"),
        };
        let scopes = match &claims {
            Some(c) => self.scopes_of(&granted, &c.groups(&self.config.groups_claim)),
            // No new ID token: groups as they were at login.
            None if self.config.read_group.is_some() || self.config.write_group.is_some() => {
                previous.map(|(_, u)| u.scopes.clone()).unwrap_or_default()
            }
            None => granted,
        };
        let user = User { name, scopes };
        let lifetime = Duration::from_secs(tokens.expires_in.unwrap_or(300).min(86_400));
        let oidc = OidcTokens {
            access_token: tokens.access_token,
            refresh_token: tokens
                .refresh_token
                .or_else(|| previous.and_then(|(p, _)| p.refresh_token.clone())),
            expires: Instant::now() + lifetime,
            id_token: tokens
                .id_token
                .or_else(|| previous.and_then(|(p, _)| p.id_token.clone())),
        };
        Ok((user, oidc))
    }

    /// The portal scopes of a user: the granted ones, or, where a group is
    /// configured, membership of it (`portal.w` implies reading).
    fn scopes_of(&self, granted: &[String], groups: &[String]) -> Vec<String> {
        let has = |s: &str| granted.iter().any(|g| g == s);
        let member = |g: &Option<String>| g.as_ref().map(|g| groups.iter().any(|x| x == g));
        let write = member(&self.config.write_group).unwrap_or_else(|| has(identity::WRITE_SCOPE));
        let read =
            write || member(&self.config.read_group).unwrap_or_else(|| has(identity::READ_SCOPE));
        let mut scopes = Vec::new();
        if read {
            scopes.push(identity::READ_SCOPE.to_string());
        }
        if write {
            scopes.push(identity::WRITE_SCOPE.to_string());
        }
        scopes
    }

    /// Exchanges a callback's code (blocking).
    pub fn exchange(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
        access_tokens: Option<&Verifier>,
    ) -> Result<(User, OidcTokens), String> {
        let tokens = self.token_request(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.config.redirect_uri),
            ("code_verifier", verifier),
        ])?;
        self.session_of(tokens, Some(nonce), access_tokens, None)
    }

    /// Refreshes a session's tokens (blocking); an error ends the session.
    pub fn refresh(
        &self,
        previous: &OidcTokens,
        user: &User,
        access_tokens: Option<&Verifier>,
    ) -> Result<(User, OidcTokens), String> {
        let refresh = previous
            .refresh_token
            .as_deref()
            .ok_or("the session's access token expired and there is no refresh token")?;
        let tokens =
            self.token_request(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])?;
        self.session_of(tokens, None, access_tokens, Some((previous, user)))
    }

    /// Where the browser may go to end its session at the provider (with
    /// `client_id`, not the ID token: no token goes to the browser).
    pub fn logout_url(&self, after: &str) -> Option<String> {
        let end = self.end_session_endpoint.as_ref()?;
        let sep = if end.contains('?') { '&' } else { '?' };
        Some(format!(
            "{end}{sep}client_id={}&post_logout_redirect_uri={}",
            encode(&self.config.client_id),
            encode(after)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc_7636s_example() {
        // RFC 7636, appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(encode("a b/c~"), "a%20b%2Fc~");
    }
}
