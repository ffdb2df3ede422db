//! Scale-out: active-active controller nodes sharing what they hold through
//! etcd (`--cluster etcd://…`). No consensus of our own: etcd is the
//! shared state.
//!
//! Owns: this node's lease (ONE per node, never one per service, kept
//! alive every TTL/3), the publication of its up instances under its own
//! prefix (changes coalesced per tick and written in transactions of at
//! most `MAX_TXN_OPS`), and the view of the other nodes (list from one
//! revision, then watch from the next; after a compaction or a lost
//! connection, list again). Never touches a socket or a shard: it reads
//! the registry through `Api` and its event log, like the admin plane.
//!
//! While etcd is unreachable the node goes on serving its own sockets and
//! keeps its last view, flagged stale (`/cluster`, `/readyz` detail,
//! `tether_cluster_stale`), and it re-publishes everything once etcd is
//! back. Without `--cluster` none of this runs.

pub mod codec;
#[cfg(feature = "cluster")]
mod etcd;
pub mod view;
#[doc(hidden)]
pub mod wave;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use crate::controller::Api;
use codec::Keys;
use view::View;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

#[derive(Clone)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    pub node_id: String,
    /// The lease's TTL: a node that stops keeping it alive leaves the
    /// others' view this long after.
    pub lease_ttl: Duration,
    /// Every key of the cluster is under this.
    pub prefix: String,
    /// This node's admin API, named in its record for forwarded commands.
    pub admin_url: String,
    /// How often coalesced changes are written.
    pub flush_interval: Duration,
    /// Remote instances the view holds at most.
    pub max_remote_instances: usize,
    /// The hosts (names or addresses, as in the URLs) that peers' admin
    /// URLs may name: commands, and the shared admin key, are forwarded
    /// only there, whatever a node record in etcd says. Loopback is
    /// always allowed.
    pub peer_hosts: Vec<String>,
    /// etcd user and password, when etcd's auth is on.
    pub user: Option<(String, String)>,
    /// TLS to etcd (its endpoints are then https://).
    pub tls: Option<EtcdTls>,
}

/// What a node needs to reach etcd over TLS: the CA that signed etcd's
/// certificate and, when etcd asks for one (`--client-cert-auth`), this
/// node's certificate and key. All PEM.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    /// (certificate chain, private key).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the etcd password.
        f.debug_struct("ClusterConfig")
            .field("endpoints", &self.endpoints)
            .field("node_id", &self.node_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("prefix", &self.prefix)
            .field("admin_url", &self.admin_url)
            .field("flush_interval", &self.flush_interval)
            .field("max_remote_instances", &self.max_remote_instances)
            .field("peer_hosts", &self.peer_hosts)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("tls", &self.tls)
            .finish()
    }
}

impl ClusterConfig {
    pub fn new(endpoints: Vec<String>, node_id: &str) -> ClusterConfig {
        ClusterConfig {
            endpoints,
            node_id: node_id.to_string(),
            lease_ttl: Duration::from_secs(10),
            prefix: "/tether/v1/".into(),
            admin_url: String::new(),
            flush_interval: Duration::from_millis(100),
            max_remote_instances: 4_000_000,
            peer_hosts: Vec::new(),
            user: None,
            tls: None,
        }
    }
}

/// `etcd://host:port[,host:port…]` as etcd client URLs: https:// when the
/// node reaches etcd over TLS (`tls`), else http://.
pub fn parse_endpoints(spec: &str, tls: bool) -> Result<Vec<String>, String> {
    let scheme = if tls { "https" } else { "http" };
    let rest = spec
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("--cluster {spec:?}: give etcd://HOST:PORT[,HOST:PORT…]"))?;
    let endpoints: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|hp| format!("{scheme}://{hp}"))
        .collect();
    if endpoints.is_empty() {
        return Err(format!("--cluster {spec:?} names no etcd endpoint"));
    }
    Ok(endpoints)
}

/// The host of an http(s) URL, without brackets or port (`[::1]` → `::1`);
/// None for another scheme or a URL with user info.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return None;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

/// Whether `url` is http(s) to loopback or to one of `peer_hosts`.
pub fn peer_url_trusted(url: &str, peer_hosts: &[String]) -> bool {
    let Some(host) = url_host(url) else {
        return false;
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback
        || peer_hosts
            .iter()
            .any(|h| h.trim_matches(['[', ']']).eq_ignore_ascii_case(host))
}

/// What the cluster layer has done, for `/metrics` and `/cluster`.
#[derive(Default)]
pub struct Stats {
    /// Transactions written, and the puts and deletes in them.
    pub txns: AtomicU64,
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    /// Bytes of keys and values written.
    pub bytes: AtomicU64,
    /// Full lists of the cluster (the first, and after each compaction or
    /// reconnection).
    pub lists: AtomicU64,
    /// Leases granted (more than one: etcd was lost for longer than TTL).
    pub leases: AtomicU64,
    /// Times this node re-published everything it holds.
    pub resyncs: AtomicU64,
    /// Sessions with etcd that ended in an error.
    pub errors: AtomicU64,
    /// Local records superseded by a registration of the same identity on
    /// another node (the service moved there).
    pub superseded: AtomicU64,
}

// (Built, never run, without the feature.)
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct Shared {
    pub config: ClusterConfig,
    pub keys: Keys,
    pub view: Mutex<View>,
    pub stats: Stats,
    /// The last error, for `/cluster` and `/readyz`.
    pub last_error: Mutex<Option<String>>,
}

/// A running cluster layer; dropping it (or `stop`) revokes the lease, so
/// the others drop this node's instances at once.
pub struct Cluster {
    shared: Arc<Shared>,
    api: Arc<Api>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Cluster {
    /// Starts publishing what `api`'s registry holds and watching the
    /// others. Returns at once; etcd may not be reachable yet (the view is
    /// stale until it is).
    pub fn start(config: ClusterConfig, api: Arc<Api>) -> Result<Cluster, String> {
        codec::check_node_id(&config.node_id)?;
        #[cfg(not(feature = "cluster"))]
        {
            let _ = api;
            Err("this tether was built without the cluster layer: build it with \
                 `cargo build --release --features cluster` (needs protoc: Debian's protobuf-compiler)"
                .to_string())
        }
        #[cfg(feature = "cluster")]
        Cluster::spawn(config, api)
    }

    #[cfg(feature = "cluster")]
    fn spawn(config: ClusterConfig, api: Arc<Api>) -> Result<Cluster, String> {
        if config.endpoints.is_empty() {
            return Err("the cluster needs at least one etcd endpoint".into());
        }
        if config.lease_ttl < Duration::from_secs(2) {
            return Err("--cluster-lease-ttl must be at least 2s".into());
        }
        let keys = Keys::new(&config.prefix);
        let shared = Arc::new(Shared {
            view: Mutex::new(View::new(
                &config.node_id,
                keys.clone(),
                config.max_remote_instances,
            )),
            keys,
            config,
            stats: Stats::default(),
            last_error: Mutex::new(None),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        api.set_remote_instances(Some(Arc::new(Discovery(shared.clone()))));
        let runner = shared.clone();
        let cluster_api = api.clone();
        let thread = std::thread::Builder::new()
            .name("tether-cluster".into())
            .spawn(move || {
                // Two workers: the lease keep-alive and the watch go on
                // while the session reads registry pages (blocking, though
                // in short chunks) or waits on a write.
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("tether-cluster")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => return tracing::error!("cluster runtime: {e}"),
                };
                runtime.block_on(etcd::run(runner, api, stopped));
            })
            .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
        Ok(Cluster {
            shared,
            api: cluster_api,
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Whether the view is out of date (etcd not reached since it was).
    pub fn is_stale(&self) -> bool {
        self.shared.view.lock().unwrap().stale
    }

    /// Why the last session with etcd ended, while it is not back.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap().clone()
    }

    /// Whether commands may be forwarded to `url` (an admin URL from a
    /// node record): http(s) to loopback or to one of `peer_hosts`.
    pub fn trusts_peer_url(&self, url: &str) -> bool {
        peer_url_trusted(url, &self.shared.config.peer_hosts)
    }

    /// The node holding `id` up, and its admin URL, if another node does
    /// (and named one).
    pub fn holder_admin(&self, id: &uuid::Uuid) -> Option<(String, String)> {
        let view = self.shared.view.lock().unwrap();
        let (node, _) = view.holder(id)?;
        let admin = view.admin_of(node).filter(|a| !a.is_empty())?;
        Some((node.to_string(), admin.to_string()))
    }

    /// The other live nodes (their record in the view) and their admin URLs.
    pub fn peers(&self) -> Vec<(String, String)> {
        let view = self.shared.view.lock().unwrap();
        view.nodes()
            .filter(|(name, _)| ***name != *self.shared.config.node_id)
            .filter_map(|(name, n)| Some((name.to_string(), n.record.as_ref()?.admin.clone())))
            .collect()
    }

    /// The other nodes holding up instances that match (serviceId and
    /// envTag; all when None): each one's name, admin URL and count. A node
    /// whose record names no admin URL is listed with an empty one.
    pub fn peers_holding(
        &self,
        service_id: Option<&str>,
        env_tag: Option<&str>,
    ) -> Vec<(String, String, usize)> {
        let view = self.shared.view.lock().unwrap();
        let counts = view.count_by_node(service_id, env_tag);
        counts
            .into_iter()
            .map(|(node, n)| {
                let admin = view.admin_of(&node).unwrap_or_default().to_string();
                (node.to_string(), admin, n)
            })
            .collect()
    }

    /// Another node's up instance `id`, if one holds it.
    pub fn remote(&self, id: &uuid::Uuid) -> Option<view::RemoteInstance> {
        self.shared.view.lock().unwrap().remote(id)
    }

    /// Reads the view of the other nodes.
    pub fn with_view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.shared.view.lock().unwrap())
    }

    /// `/cluster`: this node, the others, and how the view stands.
    pub fn status_json(&self, local_up: usize) -> Value {
        let s = &self.shared.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let view = self.shared.view.lock().unwrap();
        let nodes: Vec<Value> = view
            .nodes()
            .map(|(name, node)| {
                let me = **name == *self.shared.config.node_id;
                json!({
                    "node": name.as_ref(),
                    "self": me,
                    "admin": node.record.as_ref().map(|r| r.admin.as_str()),
                    "epoch": node.record.as_ref().map(|r| r.epoch.as_str()),
                    // A node whose record is gone (its lease) while some of
                    // its instances are still being deleted is not live.
                    "live": node.record.is_some(),
                    "instances": if me { local_up } else { node.instances },
                })
            })
            .collect();
        json!({
            "node": self.shared.config.node_id,
            "localInstances": local_up,
            "remoteInstances": view.instance_count(),
            "stale": view.stale,
            "revision": view.revision,
            // Records here closed because their service registered on
            // another node.
            "supersededByOtherNodes": n(&s.superseded),
            "lastError": *self.shared.last_error.lock().unwrap(),
            "nodes": nodes,
            "etcd": {
                "endpoints": self.shared.config.endpoints,
                "leaseTtlSeconds": self.shared.config.lease_ttl.as_secs(),
                "txns": n(&s.txns),
                "puts": n(&s.puts),
                "deletes": n(&s.deletes),
                "bytes": n(&s.bytes),
                "lists": n(&s.lists),
                "leases": n(&s.leases),
                "resyncs": n(&s.resyncs),
                "errors": n(&s.errors),
                "droppedRemote": view.dropped,
                "malformedValues": view.malformed,
            },
        })
    }

    /// Leaves the cluster: pending changes are written, the lease is
    /// revoked (each within a bound), and the thread ends. Idempotent.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            // Discovery shows this node's own from now on.
            self.api.set_remote_instances(None);
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

/// The view, as discovery merges it: other nodes' up instances as
/// registry nodes. `connectedAt` is the registration time inside the
/// instance's UUID v7; `lastSeenAt` is now while the view is in sync (the
/// holder deletes the key within its pong timeout of a silence), else when
/// it turned stale.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
struct Discovery(Arc<Shared>);

impl crate::registry::RemoteInstances for Discovery {
    fn matching(
        &self,
        filter: &crate::registry::Filter,
        limit: usize,
        out: &mut Vec<crate::registry::Node>,
    ) -> bool {
        let view = self.0.view.lock().unwrap();
        let now = crate::controller::now_ms();
        let seen = if view.stale { view.stale_since_ms } else { now };
        view.matching(
            &filter.service_id,
            filter.env_tag.as_deref(),
            filter.protocol.as_deref(),
            limit,
            |id, v| out.push(view::registry_node(id, v, seen)),
        )
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.shared.config.node_id)
            .field("endpoints", &self.shared.config.endpoints)
            .finish()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_only_to_trusted_peer_hosts() {
        let peers = ["n2.internal".to_string(), "10.0.0.9".to_string()];
        for ok in [
            "http://127.0.0.1:8439",
            "https://[::1]:8439/",
            "http://localhost:1",
            "http://N2.internal:8439",
            "https://10.0.0.9:8439",
        ] {
            assert!(peer_url_trusted(ok, &peers), "{ok}");
        }
        for bad in [
            "http://evil.example:8439",
            "http://10.0.0.99:8439",
            "ftp://127.0.0.1:1",
            "http://127.0.0.1@evil.example/",
            "127.0.0.1:8439",
            "http://:8439",
        ] {
            assert!(!peer_url_trusted(bad, &peers), "{bad}");
        }
    }

    #[test]
    fn endpoints_come_from_an_etcd_url() {
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379,127.0.0.2:2379", false).unwrap(),
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert_eq!(
            parse_endpoints("etcd://[::1]:2379", true).unwrap(),
            ["https://[::1]:2379"]
        );
        assert!(parse_endpoints("http://127.0.0.1:2379", false).is_err());
        assert!(parse_endpoints("etcd://", false).is_err());
    }
}
