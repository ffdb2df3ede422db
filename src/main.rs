//! The `tether` command: controller, agent (one service or a swarm).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use tether::admin::audit::AuditConfig;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::agent::{Agent, Backoff, Controllers, NoTools, ServiceSpec, parse_source_ips};
use tether::controller::auth::{Auth, AuthPolicy};
use tether::controller::{Controller, ControllerConfig, default_host_id};
use tether::engine::{EngineConfig, IoChoice, sys};
use tether::relay::{Relay, RelayConfig};

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "A control plane that holds one direct WebSocket per service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: services connect to ws://ADDR/ws/microservice.
    Controller(Box<ControllerArgs>),
    /// Run one service's agent, or a swarm of simulated services.
    Agent(Box<AgentArgs>),
    /// The gateway in front of human admins: login (OIDC, or --dev), bearer
    /// JWTs, the admin API proxied, the Admin UI. Services never use it.
    Gateway(Box<GatewayArgs>),
    /// Mint a token for a --dev gateway (`--scope portal.w` to send commands).
    Token(TokenArgs),
    /// A controller's summary, from its admin API.
    Status(StatusArgs),
    /// List a controller's registered services, from its admin API.
    Services(ServicesArgs),
    /// A capacity plan for N services, direct and chained, from measured costs.
    Plan(PlanArgs),
    /// Host tuning: `tune check --services N` says what this host lacks.
    Tune(TuneArgs),
}

#[derive(Args)]
struct PlanArgs {
    /// Services the controller is to hold.
    #[arg(long)]
    services: u64,
    /// The controller's --ping-interval.
    #[arg(long, value_parser = duration, default_value = "30s")]
    ping_interval: Duration,
    /// Per-service costs from a load test's results.json (`compare` or
    /// `scale`) instead of the built-in ones.
    #[arg(long)]
    from: Option<std::path::PathBuf>,
    /// fds per fd table on the controller's host [default: this host's
    /// hard RLIMIT_NOFILE].
    #[arg(long)]
    nofile: Option<u64>,
    /// Cores of the controller's host [default: this host's].
    #[arg(long)]
    cores: Option<u64>,
    /// Controller nodes on etcd (`--cluster`) sharing the services: each
    /// is sized to hold its share with one node down, plus its view of
    /// the others; etcd's keys, size and writes are planned too.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    nodes: u64,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TuneArgs {
    #[command(subcommand)]
    command: TuneCommand,
}

#[derive(Subcommand)]
enum TuneCommand {
    /// Check this host for N services: fds, sysctls, memory, CPU, kernel.
    /// Exits 1 if something is missing.
    Check {
        #[arg(long)]
        services: u64,
        #[arg(long, value_parser = duration, default_value = "30s")]
        ping_interval: Duration,
        /// The port services connect to.
        #[arg(long, default_value_t = 8438)]
        listen_port: u16,
        /// The controller's --shards [default: one per core, as the
        /// controller's own default].
        #[arg(long)]
        shards: Option<u64>,
        #[arg(long)]
        from: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s or 500ms: {e}"))
}

#[derive(Args)]
struct ControllerArgs {
    /// Address for service connections (dual stack with [::]).
    #[arg(long, env = "CONTROLLER_ADDR", default_value = "[::]:8438")]
    listen: SocketAddr,
    /// Shards (threads, each with its own fd table); default: one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// I/O driver: io_uring where the kernel has it (>= 6.0), else epoll.
    #[arg(long, env = "TETHER_IO", default_value = "auto")]
    io: IoChoice,
    /// How often each registered service is pinged.
    #[arg(long, value_parser = duration, default_value = "30s")]
    ping_interval: Duration,
    /// How long a ping may go unanswered before the service is down.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pong_timeout: Duration,
    /// Connections per shard; past it new upgrades are told 1013.
    /// Default: just under RLIMIT_NOFILE.
    #[arg(long)]
    max_conns_per_shard: Option<usize>,
    /// Sockets one source address may hold in their handshakes (upgrade or
    /// registration in progress), node-wide; past it, its new sockets are
    /// closed at accept. 0: no bound. Default: an eighth of the node's
    /// handshake room (shards × 1,024), at least 1,024.
    #[arg(long)]
    max_handshakes_per_source: Option<u32>,
    /// Connections one source address may hold, node-wide; past it, its
    /// new sockets are closed at accept. 0 (default): no bound. Set it above
    /// the most instances one host (or NAT address) runs.
    #[arg(long, default_value_t = 0)]
    max_conns_per_source: u32,
    /// service/register must arrive within this after the upgrade.
    #[arg(long, value_parser = duration, default_value = "10s")]
    register_timeout: Duration,
    /// This controller's hostId (the `host` claim of service tokens).
    #[arg(long)]
    host_id: Option<String>,
    /// Serve the service endpoints under this path prefix, for an ingress
    /// that routes by path: `/controller` serves
    /// `/controller/ws/microservice` and `/controller/ws/discovery`.
    #[arg(long, env = "TETHER_BASE_PATH", default_value = "", value_parser = tether::controller::valid_base_path)]
    base_path: String,
    /// Verify service JWTs with this HS256 shared key (file), for development.
    #[arg(long, conflicts_with_all = ["auth_jwks", "auth_jwks_url"])]
    auth_shared_key_file: Option<std::path::PathBuf>,
    /// Verify service JWTs (RS256/ES256) with the keys of this JWKS file.
    #[arg(long, conflicts_with = "auth_jwks_url")]
    auth_jwks: Option<std::path::PathBuf>,
    /// Verify service JWTs (RS256/ES256) with the keys of the JWKS at this
    /// URL: fetched at start, again every 10 minutes, and when a token
    /// names an unknown kid (at most once per 10 s).
    #[arg(long)]
    auth_jwks_url: Option<String>,
    /// With auth on: tokens must carry this `iss`.
    #[arg(long)]
    auth_issuer: Option<String>,
    /// With auth on: tokens' `aud` must hold this.
    #[arg(long)]
    auth_audience: Option<String>,
    /// With auth on: the scope `service/register` needs (`none`: no scope).
    /// Discovery always needs `portal.r`.
    #[arg(long, default_value = tether::controller::auth::REGISTER_SCOPE)]
    auth_register_scope: String,
    /// Most nodes in one discovery snapshot.
    #[arg(long, default_value_t = 10_000)]
    max_snapshot_nodes: usize,
    /// Default timeout of commands sent to services.
    #[arg(long, value_parser = duration, default_value = "10s")]
    command_timeout: Duration,
    /// The admin API (REST, /events, /metrics, /ctrl/mcp). Callers need the
    /// admin key; only they may say who they act for (X-Tether-User,
    /// X-Tether-Scopes).
    #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = "127.0.0.1:8439")]
    admin: SocketAddr,
    /// The admin key's file (created, mode 0600, with a random key if it
    /// does not exist). Default: $XDG_RUNTIME_DIR/tether/admin-PORT.key,
    /// else /tmp/tether-UID/admin-PORT.key; `tether status` reads the same.
    #[arg(long, env = "TETHER_ADMIN_KEY_FILE")]
    admin_key_file: Option<std::path::PathBuf>,
    /// A Host name the admin API answers to, besides localhost's and the
    /// --admin address (repeatable; e.g. the Service's DNS name).
    #[arg(long = "admin-allow-host")]
    admin_allow_hosts: Vec<String>,
    /// Serve the open probes (/healthz, /readyz, /metrics) on this address
    /// too, e.g. for a kubelet or Prometheus that must not hold the key.
    #[arg(long)]
    admin_health: Option<SocketAddr>,
    /// Run active-active with other controller nodes, sharing what each
    /// holds through etcd: etcd://HOST:PORT[,HOST:PORT…]. Needs --node-id
    /// and the admin API. Without it the node runs alone and needs no etcd.
    #[arg(long, requires = "node_id", value_name = "etcd://HOST:PORT")]
    cluster: Option<String>,
    /// This node's name in the cluster (unique; A-Z a-z 0-9 . _ -).
    #[arg(long, env = "TETHER_NODE_ID")]
    node_id: Option<String>,
    /// A node that stops keeping its etcd lease alive (killed, cut off)
    /// leaves the others' view this long after.
    #[arg(long, value_parser = duration, default_value = "10s")]
    cluster_lease_ttl: Duration,
    /// Every key of the cluster in etcd is under this prefix.
    #[arg(long, default_value = "/tether/v1/")]
    cluster_prefix: String,
    /// The URL other nodes reach this node's admin API at, for commands
    /// they forward (default: http(s)://the --admin address).
    #[arg(long)]
    cluster_admin_url: Option<String>,
    /// Hosts the other nodes' admin URLs may name (comma-separated or
    /// repeated; loopback is always allowed): commands and the shared
    /// admin key are forwarded only there, whatever etcd says.
    #[arg(long, value_delimiter = ',')]
    cluster_peer_host: Vec<String>,
    /// Authenticate to etcd as this user (etcd's auth enabled; the user's
    /// role needs read and write on --cluster-prefix); with
    /// --cluster-password-file.
    #[arg(long, requires = "cluster_password_file")]
    cluster_user: Option<String>,
    /// The etcd user's password, read from this file (owner-only, as the
    /// admin key; one line).
    #[arg(long, requires = "cluster_user")]
    cluster_password_file: Option<std::path::PathBuf>,
    /// Reach etcd over TLS (https), trusting the CA in this PEM file for
    /// etcd's certificate.
    #[arg(long, requires = "cluster")]
    cluster_ca: Option<std::path::PathBuf>,
    /// This node's client certificate chain (PEM) for an etcd that asks for
    /// one (--client-cert-auth); with --cluster-key and --cluster-ca.
    #[arg(long, requires_all = ["cluster_key", "cluster_ca"])]
    cluster_cert: Option<std::path::PathBuf>,
    /// The private key (PEM, owner-only) of --cluster-cert.
    #[arg(long, requires = "cluster_cert")]
    cluster_key: Option<std::path::PathBuf>,
    /// Serve the admin API over HTTPS with this certificate chain (PEM);
    /// with --admin-tls-key. Reloaded on SIGHUP.
    #[arg(long, requires = "admin_tls_key")]
    admin_tls_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "admin_tls_cert")]
    admin_tls_key: Option<std::path::PathBuf>,
    /// With admin TLS: a client certificate this CA signed (the gateway's)
    /// authenticates its connection in place of the admin key.
    #[arg(long, requires = "admin_tls_cert")]
    admin_tls_client_ca: Option<std::path::PathBuf>,
    /// Run without the admin API.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// A browser origin allowed to call the admin API (repeatable). Browsers
    /// send Origin on WebSockets and cross-origin requests; without this
    /// flag none may call it directly (use the gateway).
    #[arg(long = "admin-allow-origin")]
    admin_allow_origins: Vec<String>,
    /// Append every admin command to this JSON-lines file (fsync'd in
    /// batches, rotated at 64 MiB, 5 kept). Without it, to the log.
    #[arg(long)]
    audit_log: Option<std::path::PathBuf>,
    /// Serve wss:// with this certificate chain (PEM); with --tls-key.
    /// Reloaded on SIGHUP (new handshakes only; open connections stay).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM, PKCS#8, SEC1 or PKCS#1) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// With TLS: services must present a client certificate this CA (PEM)
    /// signed (mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// The memory this controller may use (e.g. 8GiB). Buffered bytes (input
    /// being reassembled, output queued or in flight) may take half of it,
    /// split evenly over the shards. Default: the cgroup's limit, else RAM.
    #[arg(long, env = "TETHER_MEMORY_BUDGET", value_parser = tether::plan::parse_size)]
    memory_budget: Option<u64>,
    /// On SIGTERM/SIGINT: services are told `session/draining`, then closed
    /// with 1001 spread over this long, so they do not all reconnect at
    /// once. A second signal exits at once. 0s closes all at once.
    #[arg(long, value_parser = duration, default_value = "30s")]
    drain_period: Duration,
    /// Registrations per second this node (or the one replacing it) can
    /// take in a reconnect wave. A drain's `session/draining` asks
    /// tether's agents to spread their first reconnect over services /
    /// rate (1 s to 10 min). A 2-core node took ~34,000/s plain in the
    /// herd runs; with TLS each core takes ~4,000 handshakes/s, so set
    /// about 3,000 × cores there.
    #[arg(long, default_value_t = tether::controller::DEFAULT_RECONNECT_RATE,
          value_parser = clap::value_parser!(u32).range(1..))]
    reconnect_rate: u32,
}

#[derive(Args)]
struct GatewayArgs {
    /// Relay /ws/microservice instead: terminate each service's WebSocket
    /// and open one to the controller, answering pings locally (as
    /// terminating proxies do). For the load test's measurements only.
    #[arg(long)]
    chained: bool,
    /// Default 127.0.0.1:8440 ([::]:8440 with --chained).
    #[arg(long, env = "TETHER_GATEWAY_ADDR")]
    listen: Option<SocketAddr>,
    /// The controller's admin API (http:// or https://). With --chained:
    /// its service endpoint, host:port (default 127.0.0.1:8438).
    #[arg(long, env = "TETHER_ADMIN_URL")]
    upstream: Option<String>,
    /// The admin key's file (default: the controller's default for the
    /// upstream's port).
    #[arg(long, env = "TETHER_ADMIN_KEY_FILE")]
    upstream_key_file: Option<std::path::PathBuf>,
    /// For an https:// upstream: the CA (PEM) that signed its certificate.
    #[arg(long)]
    upstream_ca: Option<std::path::PathBuf>,
    /// For an https:// upstream: the gateway's client certificate (PEM),
    /// which the admin plane's --admin-tls-client-ca trusts in place of
    /// the key; with --upstream-key.
    #[arg(long, requires = "upstream_key")]
    upstream_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "upstream_cert")]
    upstream_key: Option<std::path::PathBuf>,
    /// The URL browsers use to reach this gateway (its origin is allowed;
    /// the OIDC redirect is PUBLIC_URL/auth/callback). Default: from
    /// --listen.
    #[arg(long)]
    public_url: Option<String>,
    /// Another browser origin allowed to call (repeatable).
    #[arg(long = "allow-origin")]
    allow_origins: Vec<String>,
    /// Development: a built-in login page and a signing key of its own
    /// (`tether token` mints tokens for it); no identity provider. Only on
    /// a loopback address.
    #[arg(long, conflicts_with_all = ["oidc_issuer", "jwks", "jwks_url"])]
    dev: bool,
    /// --dev's HS256 key file (created 0600 when missing).
    #[arg(long)]
    dev_key_file: Option<std::path::PathBuf>,
    /// Verify API clients' bearer JWTs (RS256/ES256) with this JWKS file.
    #[arg(long, conflicts_with = "jwks_url")]
    jwks: Option<std::path::PathBuf>,
    /// … or with the JWKS at this URL (refreshed every 10 minutes and on an
    /// unknown kid). Default with --oidc-issuer: the issuer's jwks_uri.
    #[arg(long)]
    jwks_url: Option<String>,
    /// Bearer tokens' `iss` (default: --oidc-issuer).
    #[arg(long)]
    issuer: Option<String>,
    /// Bearer tokens' `aud` must hold this; without it no bearer tokens
    /// are taken (browser sessions only).
    #[arg(long)]
    audience: Option<String>,
    /// Browser login with this OIDC issuer (authorization code + PKCE).
    #[arg(long, requires_all = ["oidc_client_id", "oidc_client_secret_file"])]
    oidc_issuer: Option<String>,
    #[arg(long)]
    oidc_client_id: Option<String>,
    /// The file holding the OIDC client's secret.
    #[arg(long)]
    oidc_client_secret_file: Option<std::path::PathBuf>,
    /// Scopes asked for at login.
    #[arg(long, default_value = "openid profile portal.r portal.w")]
    oidc_scopes: String,
    /// The ID token claim listing the user's groups or roles.
    #[arg(long, default_value = "groups")]
    oidc_groups_claim: String,
    /// Only members of this group (in --oidc-groups-claim) may read.
    #[arg(long)]
    oidc_read_group: Option<String>,
    /// Only members of this group may send mutating commands (portal.w).
    /// Without it, the scopes the provider grants decide.
    #[arg(long)]
    oidc_write_group: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); with --tls-key.
    /// Reloaded on SIGHUP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Requests per second per user, sustained (429 past it).
    #[arg(long, default_value_t = 20.0)]
    rate_limit: f64,
    /// Requests per user that may come at once.
    #[arg(long, default_value_t = 60.0)]
    rate_burst: f64,
    /// Largest request body.
    #[arg(long, value_parser = tether::plan::parse_size, default_value = "64KiB")]
    max_body: u64,
    /// WebSockets one user may hold open.
    #[arg(long, default_value_t = 8)]
    max_sockets_per_user: usize,
    /// The JSON access log (appended); default stdout.
    #[arg(long)]
    access_log: Option<std::path::PathBuf>,
    /// Networks of the proxies in front of the gateway (an ingress, a load
    /// balancer), comma-separated: from them, X-Forwarded-For names the
    /// client for per-address limits and the access log. Default: none
    /// (the header is ignored).
    #[arg(long, value_name = "CIDR,…")]
    trusted_proxy: Vec<String>,
    /// Source addresses for the relay's own connections (--chained).
    #[arg(long)]
    upstream_source_ips: Option<String>,
    /// Relay threads, each its own fd table, ~9,000 pairs each (--chained).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct TokenArgs {
    /// Scopes the token carries (repeatable): portal.r, portal.w.
    #[arg(long = "scope", default_value = "portal.r")]
    scopes: Vec<String>,
    /// The token's subject.
    #[arg(long, default_value = "dev")]
    user: String,
    #[arg(long, value_parser = duration, default_value = "1h")]
    ttl: Duration,
    /// The dev gateway's key file (default: its default).
    #[arg(long)]
    dev_key_file: Option<std::path::PathBuf>,
}

impl AdminClientArgs {
    fn connect(&self) -> anyhow::Result<cli::AdminClient> {
        cli::AdminClient::new(
            &self.admin,
            self.admin_key_file.as_deref(),
            self.admin_ca.as_deref(),
        )
    }
}

#[derive(Args)]
struct AdminClientArgs {
    /// The controller's admin API.
    #[arg(
        long,
        env = "TETHER_ADMIN_URL",
        default_value = "http://127.0.0.1:8439"
    )]
    admin: String,
    /// The admin key's file (default: the controller's default for the
    /// --admin URL's port).
    #[arg(long, env = "TETHER_ADMIN_KEY_FILE")]
    admin_key_file: Option<std::path::PathBuf>,
    /// For an https:// --admin: trust this CA (PEM) instead of the web's.
    #[arg(long)]
    admin_ca: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    client: AdminClientArgs,
}

#[derive(Args)]
struct ServicesArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    #[arg(long)]
    service_id: Option<String>,
    #[arg(long)]
    env_tag: Option<String>,
    /// up or down.
    #[arg(long)]
    status: Option<String>,
    /// Case-insensitive substring of id, serviceId, address, version, tags.
    #[arg(long)]
    q: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// The nextCursor of a previous page (of the same query and sort).
    #[arg(long)]
    cursor: Option<String>,
    /// Order by serviceId, status, address, version, envTag, shard,
    /// connectedAt, lastSeenAt or rttMs; a leading - for descending
    /// (`--sort=-lastSeenAt`).
    #[arg(long, allow_hyphen_values = true)]
    sort: Option<String>,
}

#[derive(Args)]
struct AgentArgs {
    /// The controller's service endpoint (ws:// or wss://), or several
    /// nodes' comma-separated: a connection that fails, closes or is
    /// drained moves to the next.
    #[arg(long, default_value = "ws://127.0.0.1:8438/ws/microservice")]
    controller: Controllers,
    /// For wss://: trust this CA (PEM) instead of the web's root CAs.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    #[arg(long)]
    service_id: String,
    /// Simulate N services in this process instead of one.
    #[arg(long)]
    swarm: Option<usize>,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.9.
    #[arg(long)]
    source_ips: Option<String>,
    /// Swarm worker threads (each its own fd table); default: N / 15,000.
    #[arg(long)]
    threads: Option<usize>,
    /// New connections per second on the first ramp; reconnects follow
    /// each service's own backoff, unpaced, as independent services do.
    #[arg(long, default_value_t = 5_000.0)]
    connect_rate: f64,
    /// Spread the swarm over this many serviceIds (ID-0 … ID-k).
    #[arg(long, default_value_t = 1)]
    distinct_ids: usize,
    /// With several --controller nodes: spread the swarm's services over
    /// them (by index) instead of starting every one at the first.
    #[arg(long)]
    spread_controllers: bool,
    /// Offset of this swarm's service indexes (keeps addresses distinct across swarms).
    #[arg(long, default_value_t = 0)]
    index_offset: usize,
    #[arg(long)]
    env_tag: Option<String>,
    #[arg(long, default_value = "1.0.0")]
    version: String,
    #[arg(long, default_value = "https")]
    protocol: String,
    /// The address other services reach this one at (single agent).
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    #[arg(long, default_value_t = 8443)]
    port: u16,
    /// The registration JWT.
    #[arg(long, env = "TETHER_JWT")]
    jwt: Option<String>,
    /// Reconnect after exactly min(60s, 1s·2^n): no jitter (herd experiments).
    #[arg(long)]
    no_jitter: bool,
    /// Spread the first reconnect after a connection that lived over this
    /// window (a node's services do not all come back in the same second
    /// after it crashes). A controller's `session/draining` may ask for
    /// a longer one. Default: 1s, the first backoff.
    #[arg(long, value_parser = duration)]
    reconnect_window: Option<Duration>,
    /// Send a WebSocket ping this often (light-fabric clients use 30s).
    #[arg(long, value_parser = duration)]
    client_ping: Option<Duration>,
    /// Stop by itself after this long.
    #[arg(long, value_parser = duration)]
    exit_after: Option<Duration>,
    /// Swarm: time a discovery/lookup round trip this often from sampled
    /// services (the whole path, relays included); p50/p99 since all of
    /// the swarm registered are printed each second.
    #[arg(long, value_parser = duration)]
    probe_every: Option<Duration>,
    /// Swarm: one service in this many probes.
    #[arg(long, default_value_t = 100)]
    probe_one_in: usize,
}

fn main() -> anyhow::Result<()> {
    // Before anything else allocates much: see the function's comment.
    let thp = sys::disable_transparent_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Signals are taken by the main thread only: block them before any
    // other thread starts so every thread inherits the mask.
    sys::block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    if let Err(e) = thp {
        tracing::warn!(
            "cannot opt out of transparent huge pages ({e}); RSS will be rounded up to 2 MiB regions"
        );
    }
    if matches!(
        cli.command,
        Command::Controller(_) | Command::Agent(_) | Command::Gateway(_)
    ) {
        raise_nofile();
    }
    match cli.command {
        Command::Controller(args) => controller(*args),
        Command::Agent(args) => agent(*args),
        Command::Gateway(args) => gateway(*args),
        Command::Token(args) => token(args),
        Command::Status(args) => cli::status(&args.client.connect()?, args.client.json),
        Command::Services(args) => {
            let query = cli::ServicesQuery {
                service_id: args.service_id,
                env_tag: args.env_tag,
                status: args.status,
                q: args.q,
                limit: args.limit,
                cursor: args.cursor,
                sort: args.sort,
            };
            cli::services(&args.client.connect()?, &query, args.client.json)
        }
        Command::Plan(args) => {
            // With several nodes, each must hold its share with one down.
            let per_node = match args.nodes {
                1 => args.services,
                k => args.services.div_ceil(k - 1),
            };
            let plan = make_plan(
                per_node,
                args.ping_interval,
                args.from.as_deref(),
                args.nofile,
                args.cores,
            )?;
            if args.nodes > 1 {
                let costs = tether::plan::ClusterCosts::built_in();
                let cluster =
                    tether::plan::ClusterPlan::new(args.services, args.nodes, plan, costs);
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&cluster)?);
                } else {
                    print!("{}", cluster.render());
                }
            } else if args.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.render());
            }
            Ok(())
        }
        Command::Tune(TuneArgs {
            command:
                TuneCommand::Check {
                    services,
                    ping_interval,
                    listen_port,
                    shards,
                    from,
                    json,
                },
        }) => {
            let plan = make_plan(services, ping_interval, from.as_deref(), None, None)?;
            let shards = shards.unwrap_or_else(|| host_cores() as u64);
            let checks = tether::plan::check_host(&plan, shards, listen_port);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                println!(
                    "tether tune check: {services} services, a controller of {shards} shards, on this host"
                );
                print!("{}", tether::plan::render_checks(&checks));
            }
            let missing = checks.iter().filter(|c| !c.ok).count();
            if missing > 0 {
                bail!("{missing} check(s) failed; see the fixes above and tuning/README.md");
            }
            Ok(())
        }
    }
}

/// This host's cores: the default number of shards and relay threads.
fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. Shards (and the relay's
/// and swarm's threads) size their fd tables from the soft limit, and service
/// managers and container runtimes often start a process with a soft 1024
/// under a hard limit hundreds of times higher.
fn raise_nofile() {
    let before = tether::engine::sys::nofile_limit().ok();
    match tether::engine::sys::raise_nofile_limit() {
        Ok(after) if before.is_some_and(|b| b < after) => {
            tracing::info!(
                from = before,
                to = after,
                "raised the soft RLIMIT_NOFILE to the hard limit"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "cannot raise RLIMIT_NOFILE to its hard limit ({e}); fd tables are sized to the soft limit"
        ),
    }
}

fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let shards = args.shards.unwrap_or_else(host_cores);
    let mut engine = EngineConfig::new(args.listen, shards);
    engine.io = args.io;
    engine.ping_interval = args.ping_interval;
    engine.pong_timeout = args.pong_timeout;
    engine.admit_timeout = args.register_timeout;
    if let Some(max) = args.max_handshakes_per_source {
        engine.max_handshakes_per_source = max;
    }
    engine.max_conns_per_source = args.max_conns_per_source;
    if let Some(max) = args.max_conns_per_shard {
        engine.max_conns_per_shard = max;
    }
    if let Some(warning) =
        tether::plan::listen_queue_warning(shards as u64, engine.max_conns_per_shard as u64)
    {
        tracing::warn!("{warning}");
    }
    let (budget, budget_source) = match args.memory_budget {
        Some(bytes) => (bytes, "--memory-budget"),
        None => tether::plan::memory_limit(),
    };
    engine.buffer_budget = (budget / 2).max(1 << 20) as usize;
    let budget_line = format!(
        "memory budget {} ({budget_source}): buffers up to {}, {} per shard",
        tether::plan::show_size(budget),
        tether::plan::show_size(engine.buffer_budget as u64),
        tether::plan::show_size((engine.buffer_budget / shards.max(1)) as u64),
    );
    let bound = |n: u32, what: &str| {
        if n == 0 {
            format!("no bound on {what}")
        } else {
            format!("at most {n} {what}")
        }
    };
    let admission_line = format!(
        "per source address: {}, {}; per shard: at most {} sockets in their handshakes",
        bound(
            engine.max_handshakes_per_source,
            "sockets in their handshakes"
        ),
        bound(engine.max_conns_per_source, "connections"),
        engine.max_unadmitted_per_shard,
    );
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = tether::engine::tls::TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            };
            Some(std::sync::Arc::new(
                tether::engine::tls::TlsAcceptor::new(files).map_err(anyhow::Error::msg)?,
            ))
        }
        _ => None,
    };
    engine.tls = tls.clone();
    let max_conns = engine.max_conns_per_shard;
    let mut config = ControllerConfig::new(engine);
    config.host_id = args.host_id.unwrap_or_else(default_host_id);
    config.base_path = args.base_path;
    let config_base_path = config.base_path.clone();
    config.registry.max_snapshot_nodes = args.max_snapshot_nodes;
    config.command_timeout = args.command_timeout;
    config.reconnect_rate = args.reconnect_rate;
    let policy = AuthPolicy {
        host_id: config.host_id.clone(),
        issuer: args.auth_issuer,
        audience: args.auth_audience,
        register_scope: Some(args.auth_register_scope).filter(|s| s != "none" && !s.is_empty()),
    };
    let auth = match (
        &args.auth_shared_key_file,
        &args.auth_jwks,
        &args.auth_jwks_url,
    ) {
        (Some(path), _, _) => {
            let key =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Some(Auth::shared_secret(trim_ascii(&key), policy))
        }
        (_, Some(path), _) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(Auth::from_jwks(&json, policy).map_err(anyhow::Error::msg)?)
        }
        (_, _, Some(url)) => Some(
            Auth::from_jwks_url(url, policy, tether::controller::auth::MIN_REFRESH)
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let auth_mode = if auth.is_some() { "on" } else { "off" };
    let controller = Controller::start(config, auth).context("the controller could not start")?;
    let admin = if args.no_admin {
        None
    } else {
        let mut admin = AdminConfig::new(args.admin);
        admin.audit = args.audit_log.map(AuditConfig::new);
        admin.allowed_origins = args.admin_allow_origins;
        admin.allowed_hosts.extend(args.admin_allow_hosts);
        admin.health_listen = args.admin_health;
        // Other nodes reach this one by its --cluster-admin-url: its host
        // must pass the Host check.
        if let Some(host) = args
            .cluster_admin_url
            .as_deref()
            .and_then(tether::cluster::url_host)
        {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            admin.allowed_hosts.push(host);
        }
        if let (Some(cert), Some(key)) = (args.admin_tls_cert, args.admin_tls_key) {
            let files = tether::engine::tls::TlsFiles {
                cert,
                key,
                client_ca: args.admin_tls_client_ca,
            };
            admin.tls = Some(std::sync::Arc::new(
                tether::admin::AdminTls::https(files).map_err(anyhow::Error::msg)?,
            ));
        }
        let admin_tls = admin.tls.clone();
        if args.admin.port() == 0 && args.admin_key_file.is_none() {
            anyhow::bail!(
                "--admin with port 0 needs --admin-key-file (the default file is named by the port)"
            );
        }
        // The default path is in a place others could reach first.
        let private = args.admin_key_file.is_none();
        let key_file = args
            .admin_key_file
            .unwrap_or_else(|| tether::admin::access::default_key_path(args.admin.port()));
        admin.key = tether::admin::access::AdminKey::load_or_create(&key_file, private)
            .map_err(anyhow::Error::msg)?;
        let server =
            AdminServer::start(controller.api(), admin).context("the admin API could not start")?;
        Some((server, key_file, admin_tls))
    };
    let cluster = match &args.cluster {
        None => None,
        Some(spec) => {
            let Some((server, _, admin_tls)) = &admin else {
                anyhow::bail!(
                    "--cluster needs the admin API (other nodes forward commands to it): drop --no-admin"
                );
            };
            let tls = cluster_tls(
                args.cluster_ca.as_deref(),
                args.cluster_cert.as_deref(),
                args.cluster_key.as_deref(),
            )?;
            let endpoints = tether::cluster::parse_endpoints(spec, tls.is_some())
                .map_err(anyhow::Error::msg)?;
            let node_id = args.node_id.clone().unwrap_or_default();
            let mut config = tether::cluster::ClusterConfig::new(endpoints, &node_id);
            config.lease_ttl = args.cluster_lease_ttl;
            config.prefix = args.cluster_prefix.clone();
            config.peer_hosts = args.cluster_peer_host.clone();
            config.tls = tls;
            if let (Some(user), Some(file)) = (&args.cluster_user, &args.cluster_password_file) {
                let password = read_secret_file(file, "--cluster-password-file")?;
                config.user = Some((user.clone(), password));
            }
            config.admin_url = args.cluster_admin_url.clone().unwrap_or_else(|| {
                let scheme = if admin_tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", server.local_addr())
            });
            let cluster = tether::cluster::Cluster::start(config, controller.api())
                .map_err(anyhow::Error::msg)
                .context("the cluster layer could not start")?;
            let cluster = std::sync::Arc::new(cluster);
            let _ = server.cluster().set(cluster.clone());
            tracing::info!(
                "cluster: node {node_id} on etcd {spec} (lease {:?})",
                args.cluster_lease_ttl
            );
            Some(cluster)
        }
    };
    let admin_line = admin
        .as_ref()
        .map_or("admin off".to_string(), |(a, key_file, admin_tls)| {
            let health = a
                .health_addr()
                .map_or(String::new(), |h| format!(", probes on {h}"));
            format!(
                "admin on {}{} (key in {}{health})",
                if admin_tls.is_some() { "https://" } else { "" },
                a.local_addr(),
                key_file.display()
            )
        });
    println!(
        "tether controller ready: listening on {} ({}{} shards, {}, up to {} connections per shard, auth {}, {})",
        controller.local_addr(),
        if tls.is_some() { "TLS, " } else { "" },
        controller.shards(),
        controller.io(),
        max_conns,
        auth_mode,
        admin_line
    );
    // On stderr: stdout carries the one ready line scripts wait for.
    tracing::info!("{budget_line}");
    tracing::info!("{admission_line}");
    if !config_base_path.is_empty() {
        tracing::info!(
            "services connect to {config_base_path}/ws/microservice and {config_base_path}/ws/discovery"
        );
    }
    // SIGHUP reloads the certificates; a bad file leaves the old one.
    let admin_tls = admin.as_ref().and_then(|(_, _, t)| t.clone());
    let reload = || {
        let reloads = [
            tls.as_ref().map(|t| (t.files().cert.clone(), t.reload())),
            admin_tls
                .as_ref()
                .map(|t| (t.files().cert.clone(), t.reload())),
        ];
        if reloads.iter().all(Option::is_none) {
            tracing::info!("SIGHUP: no TLS to reload");
        }
        for (cert, reloaded) in reloads.into_iter().flatten() {
            match reloaded {
                Ok(()) => {
                    tracing::info!("SIGHUP: reloaded {} for new TLS handshakes", cert.display())
                }
                Err(e) => tracing::error!("SIGHUP: {e}; the certificate in use stays"),
            }
        }
    };
    loop {
        if let Some(sig) = sys::wait_for_signal(Duration::from_secs(3600))? {
            if sig == libc::SIGHUP {
                reload();
                continue;
            }
            tracing::info!(
                signal = sig,
                "stopping: draining over {} (a second signal exits at once)",
                humantime::format_duration(args.drain_period)
            );
            break;
        }
    }
    // Drain: not ready, no new upgrades, services told, closes spread.
    let api = controller.api();
    api.drain(args.drain_period);
    let until = Instant::now() + args.drain_period + Duration::from_secs(2);
    while api.drain_left() > 0 && Instant::now() < until {
        if let Some(sig) = sys::wait_for_signal(Duration::from_millis(100))? {
            if sig == libc::SIGHUP {
                reload();
                continue;
            }
            tracing::info!(signal = sig, "second signal: exiting now");
            break;
        }
    }
    // Not ready first (load balancers stop sending, no new commands), then
    // the admin API (bounded: live streams are ended), then the shards.
    controller.api().set_stopping();
    // The others drop this node's instances now (the lease is revoked),
    // not a TTL later.
    if let Some(cluster) = &cluster {
        cluster.stop();
    }
    if let Some((admin, _, _)) = admin {
        admin.shutdown();
    }
    controller.shutdown();
    Ok(())
}

fn make_plan(
    services: u64,
    ping_interval: Duration,
    from: Option<&std::path::Path>,
    nofile: Option<u64>,
    cores: Option<u64>,
) -> anyhow::Result<tether::plan::Plan> {
    if ping_interval < Duration::from_millis(100) {
        bail!("--ping-interval must be at least 100ms (the controller's timer tick)");
    }
    let costs = match from {
        Some(path) => tether::plan::Costs::from_results(path)?,
        None => tether::plan::Costs::built_in(),
    };
    let cores = cores.unwrap_or_else(|| host_cores() as u64);
    Ok(tether::plan::Plan::new(
        services,
        ping_interval.as_secs_f64(),
        nofile.unwrap_or_else(tether::plan::nofile_hard),
        cores,
        costs,
    ))
}

fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if args.chained {
        return chained_gateway(args);
    }
    use tether::gateway::identity::{DEV_AUDIENCE, DEV_ISSUER, default_dev_key_path};
    use tether::gateway::{Gateway, GatewayConfig, oidc};
    use tether::jwt::{Expect, Verifier};
    let listen = args
        .listen
        .unwrap_or_else(|| "127.0.0.1:8440".parse().expect("an address"));
    let upstream = args
        .upstream
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:8439".into());
    // The admin key: named, or the controller's default file for the
    // upstream's port; not needed when a client certificate stands in.
    let key = match (&args.upstream_key_file, &args.upstream_cert) {
        (None, Some(_)) => None,
        (file, _) => Some(
            tether::admin::access::AdminKey::for_url(&upstream, file.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let mut config = GatewayConfig::new(listen, &upstream, key);
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    anyhow::ensure!(
        !args.dev || listen.ip().is_loopback(),
        "--dev logs anyone in: it listens on a loopback address only, not {listen}"
    );
    anyhow::ensure!(
        args.public_url.is_some() || !listen.ip().is_unspecified(),
        "listening on {listen}, the gateway cannot tell its own URL: pass --public-url (the URL browsers use)"
    );
    if let Some(url) = &args.public_url {
        tether::gateway::check_public_url(url).map_err(anyhow::Error::msg)?;
    }
    // Without --public-url: the bound address's (known once bound).
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{listen}"));
    config.public_url = args.public_url.clone();
    config.allowed_origins = args.allow_origins.clone();
    config.upstream.ca = args.upstream_ca.clone();
    config.upstream.client_cert = args.upstream_cert.clone().zip(args.upstream_key.clone());
    config.rate = tether::gateway::limits::RateLimit {
        rate: args.rate_limit,
        burst: args.rate_burst.max(1.0),
    };
    anyhow::ensure!(args.rate_limit > 0.0, "--rate-limit must be above 0");
    config.max_body = usize::try_from(args.max_body).unwrap_or(usize::MAX);
    config.max_sockets_per_user = args.max_sockets_per_user;
    config.access_log = args.access_log.clone();
    config.trusted_proxies =
        tether::gateway::forwarded::TrustedProxies::parse(&args.trusted_proxy.join(","))
            .map_err(|e| anyhow::anyhow!("--trusted-proxy: {e}"))?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let files = tether::engine::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        };
        config.tls = Some(Arc::new(
            tether::admin::AdminTls::https(files).map_err(anyhow::Error::msg)?,
        ));
    }
    let mode;
    if args.dev {
        let (path, private) = match &args.dev_key_file {
            Some(p) => (p.clone(), false),
            None => (default_dev_key_path(), true),
        };
        let dev_key = tether::admin::access::AdminKey::load_or_create(&path, private)
            .map_err(anyhow::Error::msg)?;
        config.bearer = Some(Verifier::shared_secret(
            dev_key.as_bytes(),
            Expect {
                issuer: Some(DEV_ISSUER.into()),
                audience: Some(DEV_AUDIENCE.into()),
            },
        ));
        config.dev_login = true;
        mode = format!("dev login; tokens from `tether token` ({})", path.display());
    } else {
        if let Some(issuer) = &args.oidc_issuer {
            let secret_file = args
                .oidc_client_secret_file
                .as_ref()
                .expect("clap requires it");
            let secret = read_secret_file(secret_file, "--oidc-client-secret-file")?;
            let oidc = oidc::Oidc::discover(oidc::OidcConfig {
                issuer: issuer.clone(),
                client_id: args.oidc_client_id.clone().expect("clap requires it"),
                client_secret: secret.trim().to_string(),
                redirect_uri: format!("{}/auth/callback", public_url.trim_end_matches('/')),
                scopes: args
                    .oidc_scopes
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                groups_claim: args.oidc_groups_claim.clone(),
                read_group: args.oidc_read_group.clone(),
                write_group: args.oidc_write_group.clone(),
            })
            .map_err(anyhow::Error::msg)?;
            if args.oidc_write_group.is_none() {
                tracing::warn!(
                    "without --oidc-write-group, portal.w comes from the scopes {issuer} grants: make sure it grants portal.w only to those who may send commands"
                );
            }
            config.oidc = Some(oidc);
        }
        let issuer = args.issuer.clone().or_else(|| args.oidc_issuer.clone());
        let jwks_url = args
            .jwks_url
            .clone()
            .or_else(|| config.oidc.as_ref().map(|o| o.jwks_uri.clone()));
        if let Some(audience) = &args.audience {
            anyhow::ensure!(
                issuer.is_some(),
                "bearer tokens need --issuer (or --oidc-issuer): tokens from any issuer would pass"
            );
            let expect = Expect {
                issuer,
                audience: Some(audience.clone()),
            };
            config.bearer = Some(match (&args.jwks, &jwks_url) {
                (Some(file), _) => {
                    let json = std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    Verifier::from_jwks(&json, expect).map_err(anyhow::Error::msg)?
                }
                (None, Some(url)) => Verifier::from_jwks_url(url, expect, tether::jwt::MIN_REFRESH)
                    .map_err(anyhow::Error::msg)?,
                (None, None) => bail!("--audience needs --jwks or --jwks-url (or --oidc-issuer)"),
            });
        } else if args.jwks.is_some() || args.jwks_url.is_some() {
            bail!("--jwks and --jwks-url need --audience: tokens for any audience would pass");
        }
        anyhow::ensure!(
            config.oidc.is_some() || config.bearer.is_some(),
            "the gateway needs a way to log users in: --oidc-issuer, --jwks/--jwks-url with --audience, or --dev"
        );
        mode = [
            config
                .oidc
                .as_ref()
                .map(|o| format!("OIDC login with {}", o.issuer())),
            config.bearer.as_ref().map(|_| "bearer JWTs".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
    }
    let tls = config.tls.clone();
    let gateway = Gateway::start(config).map_err(anyhow::Error::msg)?;
    println!(
        "tether gateway ready: {} (listening on {}) to the admin API at {upstream} ({mode})",
        gateway.public_origin(),
        gateway.local_addr()
    );
    loop {
        if let Some(sig) = sys::wait_for_signal(Duration::from_secs(3600))? {
            if sig == libc::SIGHUP {
                match &tls {
                    Some(tls) => match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: reloaded the gateway's certificate"),
                        Err(e) => tracing::error!("SIGHUP: {e}; the certificate in use stays"),
                    },
                    None => tracing::info!("SIGHUP: no TLS to reload"),
                }
                continue;
            }
            tracing::info!(signal = sig, "gateway stopping");
            break;
        }
    }
    gateway.shutdown();
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    use tether::gateway::identity::{default_dev_key_path, mint_dev_token};
    let (path, private) = match &args.dev_key_file {
        Some(p) => (p.clone(), false),
        None => (default_dev_key_path(), true),
    };
    let key = tether::admin::access::AdminKey::load_or_create(&path, private)
        .map_err(anyhow::Error::msg)?;
    let scopes: Vec<&str> = args
        .scopes
        .iter()
        .flat_map(|s| s.split([' ', ',']))
        .filter(|s| !s.is_empty())
        .collect();
    let token = mint_dev_token(key.as_bytes(), &args.user, &scopes, args.ttl)
        .map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}

fn chained_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let listen = args
        .listen
        .unwrap_or_else(|| "[::]:8440".parse().expect("an address"));
    let upstream: SocketAddr = args
        .upstream
        .as_deref()
        .unwrap_or("127.0.0.1:8438")
        .parse()
        .context("--chained's --upstream is the controller's service endpoint, host:port")?;
    let sources = args
        .upstream_source_ips
        .as_deref()
        .map(parse_source_ips)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let threads = args.threads.unwrap_or_else(host_cores);
    let config = RelayConfig {
        listen,
        upstream,
        upstream_sources: sources.unwrap_or_default(),
        threads,
    };
    let relay = Relay::start(config).context("the relay could not start")?;
    println!(
        "tether gateway ready: chained relay on {} to {} ({threads} threads, up to {} services each)",
        relay.local_addr(),
        upstream,
        tether::relay::PAIRS_PER_THREAD
    );
    while sys::wait_for_signal(Duration::from_secs(3600))?.is_none() {}
    relay.stop();
    Ok(())
}

/// --cluster-ca, --cluster-cert and --cluster-key, read and parsed as the
/// listeners' TLS files are (engine::tls), the key only its owner may read;
/// their PEM as the etcd client takes it.
fn cluster_tls(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Option<tether::cluster::EtcdTls>> {
    use tether::engine::tls;
    let Some(ca) = ca else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let roots = tls::load_roots(ca)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read --cluster-ca {}", ca.display()))?;
    if roots.is_empty() {
        bail!(
            "--cluster-ca {} holds no PEM CERTIFICATE block",
            ca.display()
        );
    }
    let ca_pem = read(ca, "--cluster-ca")?;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => {
            // Owner-only, as every secret tether reads.
            let key_pem = read_secret_file(key, "--cluster-key")?;
            let files = tls::TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                client_ca: None,
            };
            tls::load_chain(&files)
                .map_err(anyhow::Error::msg)
                .context("--cluster-cert and --cluster-key")?;
            Some((read(cert, "--cluster-cert")?, key_pem.into_bytes()))
        }
        _ => None,
    };
    Ok(Some(tether::cluster::EtcdTls { ca_pem, identity }))
}

/// A secret (a password, a client secret) from a file only its owner may
/// read, trimmed; refused when others could read it or it is empty.
fn read_secret_file(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let show = path.display();
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{flag} {show}"))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        bail!("{flag} {show} may be read by others (mode {mode:o}): chmod 600 it");
    }
    let secret =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {flag} {show}"))?;
    let secret = secret.trim();
    if secret.is_empty() {
        bail!("{flag} {show} is empty");
    }
    Ok(secret.to_string())
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

fn agent(mut args: AgentArgs) -> anyhow::Result<()> {
    if let Some(ca) = &args.tls_ca {
        args.controller = args
            .controller
            .clone()
            .trusting(ca)
            .map_err(anyhow::Error::msg)?;
    }
    let backoff = Backoff {
        jitter: !args.no_jitter,
        first_window: args.reconnect_window,
        ..Backoff::default()
    };
    let deadline = args.exit_after.map(|d| Instant::now() + d);
    let sources = args
        .source_ips
        .as_deref()
        .map(parse_source_ips)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    match args.swarm {
        None => {
            let mut spec = ServiceSpec::new(&args.service_id, &args.address, args.port);
            spec.version = args.version;
            spec.protocol = args.protocol;
            spec.env_tag = args.env_tag;
            spec.jwt = args.jwt;
            let agent = Agent::start(args.controller.clone(), spec, Arc::new(NoTools), backoff)?;
            let mut announced = None;
            loop {
                let id = agent.runtime_instance_id();
                if id != announced {
                    match id {
                        Some(id) => println!("registered as {id} with {}", args.controller),
                        None => {
                            println!("not registered; reconnecting to {}", args.controller)
                        }
                    }
                    announced = id;
                }
                if deadline.is_some_and(|d| Instant::now() >= d)
                    || sys::wait_for_signal(Duration::from_millis(200))?.is_some()
                {
                    break;
                }
            }
            let deregistered = agent.deregister("interrupt", Duration::from_secs(5));
            println!(
                "{}",
                if deregistered {
                    "deregistered"
                } else {
                    "stopped without deregistering"
                }
            );
            agent.stop();
            Ok(())
        }
        Some(0) => bail!("--swarm needs at least one service"),
        Some(n) => {
            let mut config = SwarmConfig::new(args.controller, n);
            config.first_controller = (!args.spread_controllers).then_some(0);
            config.service_id = args.service_id;
            config.distinct_ids = args.distinct_ids.max(1);
            config.index_offset = args.index_offset;
            config.env_tag = args.env_tag.or(Some("prod".into()));
            config.threads = args.threads;
            config.sources = sources.unwrap_or_default();
            config.connect_rate = args.connect_rate;
            config.backoff = backoff;
            config.client_ping = args.client_ping;
            config.jwt = args.jwt;
            config.run_for = args.exit_after;
            config.probe_every = args.probe_every;
            config.probe_one_in = args.probe_one_in.max(1);
            swarm(config, deadline)
        }
    }
}

fn swarm(config: SwarmConfig, deadline: Option<Instant>) -> anyhow::Result<()> {
    let target = config.services as u64;
    let swarm = Swarm::start(config).context("the swarm could not start")?;
    let stats = swarm.stats().clone();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let mut all_at: Option<Duration> = None;
    let mut printed = Duration::ZERO;
    loop {
        // Until all are registered, look often so that the ramp's time is exact.
        let tick = if all_at.is_none() {
            Duration::from_millis(20)
        } else {
            Duration::from_secs(1)
        };
        let signal = sys::wait_for_signal(tick)?;
        let elapsed = swarm.started().elapsed();
        let registered = load(&stats.registered);
        if all_at.is_none() && registered >= target {
            all_at = Some(elapsed);
            // Latency probes time the steady state from here on.
            swarm.reset_probes();
            println!(
                "swarm: all {target} registered in {} ms ({:.0}/s)",
                elapsed.as_millis(),
                target as f64 / elapsed.as_secs_f64().max(1e-3)
            );
        }
        let done =
            signal.is_some() || deadline.is_some_and(|d| Instant::now() >= d) || !swarm.running();
        if elapsed < printed + Duration::from_secs(1) && !done {
            continue;
        }
        printed = elapsed;
        println!(
            "swarm: registered={registered} target={target} open={} registrations={} attempts={} connect_failures={} refused={} closed_by_controller={} moved={} elapsed_ms={}",
            load(&stats.open),
            load(&stats.registrations),
            load(&stats.connect_attempts),
            load(&stats.connect_failures),
            load(&stats.refused),
            load(&stats.closed_by_controller),
            load(&stats.moved),
            elapsed.as_millis()
        );
        let (probes, p50, p99) = swarm.probe_latency();
        if probes > 0 {
            println!("swarm: probes={probes} probe_p50_us={p50} probe_p99_us={p99}");
        }
        if done {
            break;
        }
    }
    swarm.stop();
    Ok(())
}
