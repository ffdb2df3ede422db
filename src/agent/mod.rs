//! The client side: what a service runs to hold its connection to the
//! controller. `Agent` is the SDK for one Rust service; `swarm` runs many
//! simulated services in one process for tests and load tests. Both drive
//! the same sans-IO `Session` from the same epoll `worker`.
//!
//! Reconnects use exponential backoff with full jitter (PROTOCOL.md):
//! `sleep = random(0, min(cap, base·2^n))`, n reset after a connection
//! that lived longer than 10 s. The first reconnect after such a
//! connection is spread over the reconnect window instead (1 s unless
//! configured), or over the window a controller's `session/draining`
//! asked for (`reconnectWindowMs`, tether's addition): a node with many
//! services is not hit by all of them in the same second.

mod sdk;
pub mod session;
pub mod swarm;
mod worker;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::jsonrpc::RpcError;
use serde_json::{Map, Value};

pub use sdk::{Agent, AgentError};
pub use worker::{SwarmStats, WorkerConfig};

/// What a service registers as.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub service_id: String,
    pub version: String,
    pub protocol: String,
    pub address: String,
    pub port: u16,
    pub env_tag: Option<String>,
    pub tags: Map<String, Value>,
    pub jwt: Option<String>,
}

impl ServiceSpec {
    pub fn new(service_id: &str, address: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            service_id: service_id.into(),
            version: "1.0.0".into(),
            protocol: "https".into(),
            address: address.into(),
            port,
            env_tag: None,
            tags: Map::new(),
            jwt: None,
        }
    }
}

/// The tools a service answers besides the built-in `get_service_info`
/// and `check`.
pub trait Tools: Send + Sync {
    /// Descriptions for `tools/list`: `[{name, description, inputSchema}]`.
    fn list(&self) -> Vec<Value> {
        Vec::new()
    }

    /// Runs a tool; `None` if there is no such tool (answered -32601).
    fn call(&self, name: &str, arguments: Value) -> Option<Result<Value, RpcError>> {
        let _ = (name, arguments);
        None
    }
}

/// Only the built-in tools.
pub struct NoTools;

impl Tools for NoTools {}

pub(crate) fn builtin_tools() -> Vec<Value> {
    vec![
        serde_json::json!({"name": "get_service_info", "description": "The service's registration", "inputSchema": {"type": "object"}}),
        serde_json::json!({"name": "check", "description": "Health check", "inputSchema": {"type": "object"}}),
    ]
}

/// Reconnect delays.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Full jitter (the default). Without it every client waits exactly
    /// `min(cap, base·2^n)`: what the herd scenario compares against.
    pub jitter: bool,
    /// The first attempt after a connection that lived (attempt 0) waits
    /// up to this long; `base` unless set.
    pub first_window: Option<Duration>,
}

/// The longest reconnect window a controller may ask for.
pub const MAX_RECONNECT_WINDOW: Duration = Duration::from_secs(600);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter: true,
            first_window: None,
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based), attempt 0
    /// being the first after a connection that lived.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_within(attempt, self.first_window)
    }

    /// The same, with attempt 0 spread over `window` (None: `base`).
    pub fn delay_within(&self, attempt: u32, window: Option<Duration>) -> Duration {
        let ceiling = match (attempt, window) {
            (0, Some(window)) => window.min(MAX_RECONNECT_WINDOW),
            _ => self
                .base
                .saturating_mul(1u32 << attempt.min(20))
                .min(self.cap),
        };
        if self.jitter {
            ceiling.mul_f64(fastrand::f64())
        } else {
            ceiling
        }
    }
}

/// The wait a controller asks for in a close reason or an error message
/// ("… retry after 30s", as tether's 1013 and -32003 for an identity
/// conflict say), at most 10 minutes.
pub fn retry_hint(reason: &str) -> Option<Duration> {
    let reason = reason.to_ascii_lowercase();
    let at = reason.find("retry after ")? + "retry after ".len();
    let rest = &reason[at..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = rest[..digits].parse().ok()?;
    let unit = rest[digits..].trim_start();
    let secs = if unit.starts_with("ms") {
        return Some(Duration::from_millis(n).min(Duration::from_secs(600)));
    } else if unit.starts_with('s') {
        n
    } else if unit.starts_with('m') {
        n.saturating_mul(60)
    } else {
        return None;
    };
    Some(Duration::from_secs(secs.min(600)))
}

/// A controller WebSocket URL, `ws://HOST:PORT/PATH` or `wss://…`.
#[derive(Clone, Debug)]
pub struct ControllerUrl {
    pub addr: SocketAddr,
    /// What goes into the Host header.
    pub host: String,
    pub path: String,
    /// For `wss://`: how to trust the controller (the web's roots unless
    /// `trusting` names a CA).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ControllerUrl {
    /// For `wss://`: trust the CA certificates in `ca` (PEM) instead.
    pub fn trusting(mut self, ca: &std::path::Path) -> Result<ControllerUrl, String> {
        if self.tls.is_none() {
            return Err("a CA is only for wss:// URLs".into());
        }
        self.tls = Some(client_config(crate::engine::tls::load_roots(ca)?));
        Ok(self)
    }

    /// The name the certificate must carry: the host without its port.
    pub fn server_name(&self) -> Result<rustls::pki_types::ServerName<'static>, String> {
        let name = match self.host.rsplit_once(':') {
            Some((name, _)) => name,
            None => &self.host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| format!("{name}: not a TLS server name: {e}"))
    }
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl std::str::FromStr for ControllerUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let (rest, tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, None),
            (_, Some(rest)) => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                (rest, Some(client_config(roots)))
            }
            _ => return Err(format!("{url}: expected a ws:// or wss:// URL")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws/microservice"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:8438")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {with_port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {with_port} resolves to nothing"))?;
        let url = ControllerUrl {
            addr,
            host: with_port,
            path: path.to_string(),
            tls,
        };
        if url.tls.is_some() {
            url.server_name()?;
        }
        Ok(url)
    }
}

/// The controller nodes a service may connect to, in its order of
/// preference: `ws://n1:8438,ws://n2:8438` (one URL is a list of one).
/// A connection that fails, closes or is drained moves to the next node;
/// a service that registers again on another node supersedes its record
/// there (identity is the same).
#[derive(Clone, Debug)]
pub struct Controllers(Vec<ControllerUrl>);

impl Controllers {
    /// Most controller URLs one service takes.
    pub const MAX: usize = 16;

    pub fn new(urls: Vec<ControllerUrl>) -> Result<Controllers, String> {
        if urls.is_empty() {
            return Err("no controller URL given".into());
        }
        if urls.len() > Self::MAX {
            return Err(format!(
                "{} controller URLs: at most {} are taken",
                urls.len(),
                Self::MAX
            ));
        }
        Ok(Controllers(urls))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`th, counted round the list.
    pub fn get(&self, i: usize) -> &ControllerUrl {
        &self.0[i % self.0.len()]
    }

    pub fn first(&self) -> &ControllerUrl {
        &self.0[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &ControllerUrl> {
        self.0.iter()
    }

    /// For wss:// URLs: trust the CA certificates in `ca` (PEM) instead of
    /// the web's roots (ws:// URLs are left as they are).
    pub fn trusting(self, ca: &std::path::Path) -> Result<Controllers, String> {
        if self.0.iter().all(|u| u.tls.is_none()) {
            return Err("a CA is only for wss:// URLs".into());
        }
        let roots = client_config(crate::engine::tls::load_roots(ca)?);
        Ok(Controllers(
            self.0
                .into_iter()
                .map(|mut u| {
                    if u.tls.is_some() {
                        u.tls = Some(roots.clone());
                    }
                    u
                })
                .collect(),
        ))
    }
}

impl From<ControllerUrl> for Controllers {
    fn from(url: ControllerUrl) -> Controllers {
        Controllers(vec![url])
    }
}

impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, u) in self.0.iter().enumerate() {
            let scheme = if u.tls.is_some() { "wss" } else { "ws" };
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{scheme}://{}{}", u.host, u.path)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Controllers {
    type Err = String;

    fn from_str(urls: &str) -> Result<Self, Self::Err> {
        let urls = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<ControllerUrl>, String>>()?;
        Controllers::new(urls)
    }
}

/// Parses `127.0.0.2-127.0.0.9` (a range), `127.0.0.2,127.0.0.5` (a list) or one address.
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut ips = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((from, to)) => {
                let bad = || format!("{part}: expected FROM-TO with two IPv4 addresses");
                let from: std::net::Ipv4Addr = from.trim().parse().map_err(|_| bad())?;
                let to: std::net::Ipv4Addr = to.trim().parse().map_err(|_| bad())?;
                let (a, b) = (u32::from(from), u32::from(to));
                if b < a || b - a > 65_535 {
                    return Err(format!(
                        "{part}: the range is empty or larger than 65,536 addresses"
                    ));
                }
                ips.extend((a..=b).map(|ip| IpAddr::V4(ip.into())));
            }
            None => ips.push(
                part.parse()
                    .map_err(|_| format!("{part}: not an IP address"))?,
            ),
        }
    }
    if ips.is_empty() {
        return Err("no source addresses given".into());
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_s_retry_hint_is_read() {
        assert_eq!(
            retry_hint("identity conflict; retry after 30s"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_hint("retry after 2m"), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_hint("retry after 250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_hint("retry after 99999s"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            retry_hint("… second process registering the same identity? Retry after 30 s"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_hint("try again later"), None);
        assert_eq!(retry_hint("retry after soon"), None);
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let b = Backoff::default();
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= Duration::from_secs(60));
        }
        let fixed = Backoff { jitter: false, ..b };
        assert_eq!(fixed.delay(0), Duration::from_secs(1));
        assert_eq!(fixed.delay(3), Duration::from_secs(8));
        assert_eq!(fixed.delay(10), Duration::from_secs(60));
        let samples: Vec<Duration> = (0..50).map(|_| b.delay(5)).collect();
        assert!(
            samples.iter().any(|d| *d != samples[0]),
            "full jitter varies"
        );
    }

    #[test]
    fn the_first_reconnect_spreads_over_its_window() {
        let w = Duration::from_secs(20);
        let b = Backoff {
            first_window: Some(w),
            ..Backoff::default()
        };
        let firsts: Vec<Duration> = (0..400).map(|_| b.delay(0)).collect();
        assert!(firsts.iter().all(|d| *d <= w));
        // Spread over the window, not bunched in its first second.
        let late = firsts
            .iter()
            .filter(|d| **d > Duration::from_secs(10))
            .count();
        assert!(
            (100..=300).contains(&late),
            "{late} of 400 past half the window"
        );
        // Later attempts back off as before.
        assert!(b.delay(1) <= Duration::from_secs(2));
        // An explicit window (the worker passes a controller's hint),
        // bounded.
        let hinted = Backoff { jitter: false, ..b };
        assert_eq!(
            hinted.delay_within(0, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            hinted.delay_within(0, Some(Duration::from_secs(9999))),
            MAX_RECONNECT_WINDOW
        );
        assert_eq!(
            hinted.delay_within(2, Some(Duration::from_secs(5))),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn urls_and_source_ranges() {
        let url: ControllerUrl = "ws://127.0.0.1:9000/ws/discovery".parse().unwrap();
        assert_eq!(
            (url.addr.port(), url.path.as_str()),
            (9000, "/ws/discovery")
        );
        let url: ControllerUrl = "ws://127.0.0.1".parse().unwrap();
        assert_eq!(
            (url.addr.port(), url.path.as_str()),
            (8438, "/ws/microservice")
        );
        assert!("http://x".parse::<ControllerUrl>().is_err());
        let list: Controllers = "ws://127.0.0.1:1, ws://127.0.0.2:2/ws/microservice"
            .parse()
            .unwrap();
        assert_eq!((list.len(), list.get(3).addr.port()), (2, 2));
        assert_eq!(
            list.to_string(),
            "ws://127.0.0.1:1/ws/microservice,ws://127.0.0.2:2/ws/microservice"
        );
        assert!("".parse::<Controllers>().is_err());
        assert!("ws://127.0.0.1:1,http://x".parse::<Controllers>().is_err());
        assert_eq!(parse_source_ips("127.0.0.2-127.0.0.4").unwrap().len(), 3);
        assert_eq!(parse_source_ips("127.0.0.2, ::1").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
    }
}
