//! Browser sessions, kept on the gateway: the browser holds only a random
//! id in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict, Path=/);
//! the user, scopes, CSRF token and any OIDC tokens stay here. Bounded in
//! number, with an idle and an absolute lifetime. Pending OIDC logins
//! (state, PKCE verifier, nonce) are kept the same way, for minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::identity::User;

/// `n` random bytes from the kernel, base64url without padding.
pub fn random_token(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the kernel gives random bytes");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What an OIDC session holds to stay valid: refreshed on the server.
#[derive(Clone, Debug)]
pub struct OidcTokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// When the access token expires (refresh before using it past this).
    pub expires: Instant,
    pub id_token: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub user: User,
    /// Sent back by the UI in `X-Tether-CSRF` (and in the WebSocket
    /// subprotocol) on every state-changing request.
    pub csrf: String,
    pub created: Instant,
    pub last_used: Instant,
    pub oidc: Option<OidcTokens>,
    /// Held while the session's tokens are refreshed, so requests that
    /// find them expired at once refresh once (a provider that rotates
    /// refresh tokens would refuse the second).
    pub refreshing: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Becomes true when the session ends (logout, expiry, eviction): the
    /// WebSockets it opened close then.
    pub ended: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Session {
    /// When it ends at the latest (its absolute lifetime).
    pub fn deadline(&self, limits: &SessionLimits) -> Instant {
        self.created + limits.absolute
    }
}

/// A login on its way through the identity provider.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub verifier: String,
    pub nonce: String,
    /// Where the browser goes once logged in (a local path).
    pub return_to: String,
    /// The value of the login cookie that binds the callback to the
    /// browser that started it.
    pub binding: String,
    pub created: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub max_sessions: usize,
    pub idle: Duration,
    pub absolute: Duration,
    pub max_pending: usize,
    pub pending_ttl: Duration,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits {
            max_sessions: 10_000,
            idle: Duration::from_secs(8 * 3600),
            absolute: Duration::from_secs(24 * 3600),
            max_pending: 1_000,
            pending_ttl: Duration::from_secs(600),
        }
    }
}

pub struct Sessions {
    limits: SessionLimits,
    live: Mutex<HashMap<String, Session>>,
    pending: Mutex<HashMap<String, PendingLogin>>,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Sessions {
        Sessions {
            limits,
            live: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn expired(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_used) > self.limits.idle
            || now.duration_since(s.created) > self.limits.absolute
    }

    /// A new session for `user`: its id (the cookie's value). When full,
    /// expired sessions go first, then the least recently used.
    pub fn create(&self, user: User, oidc: Option<OidcTokens>) -> (String, Session) {
        let now = Instant::now();
        let id = random_token(32);
        let session = Session {
            user,
            csrf: random_token(24),
            created: now,
            last_used: now,
            oidc,
            refreshing: Default::default(),
            ended: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
        };
        let mut live = self.live.lock().unwrap();
        if live.len() >= self.limits.max_sessions {
            live.retain(|_, s| {
                let keep = !self.expired(s, now);
                if !keep {
                    s.ended.send_replace(true);
                }
                keep
            });
        }
        if live.len() >= self.limits.max_sessions
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            && let Some(evicted) = live.remove(&oldest)
        {
            evicted.ended.send_replace(true);
        }
        live.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session `id`, touched.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut live = self.live.lock().unwrap();
        let session = live.get_mut(id)?;
        if self.expired(session, now) {
            if let Some(gone) = live.remove(id) {
                gone.ended.send_replace(true);
            }
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    /// Replaces a session's user and tokens (after a refresh).
    pub fn update(&self, id: &str, user: User, oidc: Option<OidcTokens>) {
        if let Some(s) = self.live.lock().unwrap().get_mut(id) {
            s.user = user;
            s.oidc = oidc;
        }
    }

    /// The live session `id`, not touched (for open sockets' checks).
    pub fn alive(&self, id: &str) -> Option<Session> {
        let live = self.live.lock().unwrap();
        let session = live.get(id)?;
        (!self.expired(session, Instant::now())).then(|| session.clone())
    }

    /// Ends a session: its WebSockets close.
    pub fn remove(&self, id: &str) -> Option<Session> {
        let gone = self.live.lock().unwrap().remove(id);
        if let Some(s) = &gone {
            s.ended.send_replace(true);
        }
        gone
    }

    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    pub fn count(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// Keeps a pending login under its `state` (each lives `pending_ttl`
    /// at most); when too many are pending the oldest goes, so a flood of
    /// started logins cannot lock everyone out.
    pub fn start_login(&self, state: String, login: PendingLogin) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap();
        pending.retain(|_, p| now.duration_since(p.created) <= self.limits.pending_ttl);
        if pending.len() >= self.limits.max_pending
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.created)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(state, login);
    }

    /// Takes the pending login of `state` (once: a replayed callback finds
    /// nothing) if `binding` (the login cookie) is the one it was started
    /// with; a callback from another browser leaves it in place.
    pub fn finish_login(
        &self,
        state: &str,
        binding: Option<&str>,
    ) -> Result<PendingLogin, &'static str> {
        let mut pending = self.pending.lock().unwrap();
        let login = pending
            .get(state)
            .ok_or("this login is unknown, used or expired")?;
        if !binding.is_some_and(|b| same_secret(b, &login.binding)) {
            return Err("this login was started in another browser");
        }
        let login = pending.remove(state).expect("just found");
        if login.created.elapsed() > self.limits.pending_ttl {
            return Err("this login is unknown, used or expired");
        }
        Ok(login)
    }
}

/// Compares secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    crate::admin::access::same_bytes(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: &str) -> User {
        User {
            name: n.into(),
            scopes: vec!["portal.r".into()],
        }
    }

    #[test]
    fn sessions_are_bounded_and_expire() {
        let sessions = Sessions::new(SessionLimits {
            max_sessions: 2,
            idle: Duration::from_millis(200),
            ..SessionLimits::default()
        });
        let (a, _) = sessions.create(user("a"), None);
        std::thread::sleep(Duration::from_millis(5));
        let (b, _) = sessions.create(user("b"), None);
        let (c, _) = sessions.create(user("c"), None);
        assert_eq!(sessions.count(), 2);
        assert!(sessions.get(&a).is_none(), "the least recently used went");
        assert_eq!(sessions.get(&b).unwrap().user.name, "b");
        assert_eq!(sessions.get(&c).unwrap().user.name, "c");
        std::thread::sleep(Duration::from_millis(250));
        assert!(sessions.get(&b).is_none(), "idle too long");
        assert_ne!(a, b);
        assert!(a.len() >= 43, "32 random bytes");
    }

    #[test]
    fn a_pending_login_is_taken_once() {
        let sessions = Sessions::new(SessionLimits {
            max_pending: 1,
            ..SessionLimits::default()
        });
        let login = PendingLogin {
            verifier: "v".into(),
            nonce: "n".into(),
            return_to: "/".into(),
            binding: "b".into(),
            created: Instant::now(),
        };
        sessions.start_login("s0".into(), login.clone());
        std::thread::sleep(Duration::from_millis(2));
        let mut newer = login.clone();
        newer.created = Instant::now();
        sessions.start_login("s1".into(), newer);
        assert!(
            sessions.finish_login("s0", Some("b")).is_err(),
            "the oldest went"
        );
        assert!(sessions.finish_login("s1", None).is_err(), "no cookie");
        assert!(
            sessions.finish_login("s1", Some("x")).is_err(),
            "another browser"
        );
        assert!(
            sessions.finish_login("s1", Some("b")).is_ok(),
            "still there"
        );
        assert!(sessions.finish_login("s1", Some("b")).is_err(), "replayed");
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
    }
}
