//! Starting what a scenario measures: a controller (with its admin API),
//! a chained relay (tether's, or nginx's when installed), and swarm
//! processes that register simulated services.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procs::{self, Proc};
use crate::progress;

pub struct Controller {
    pub proc: Proc,
    /// host:port of the service endpoint.
    pub listen: String,
    pub port: u16,
    /// http://host:port of the admin API.
    pub admin: String,
    pub admin_port: u16,
    /// Its I/O driver as its ready line says ("io_uring" or "epoll").
    pub io: String,
}

/// A controller on free ports, with extra flags (e.g. `--io epoll`).
pub fn controller_with(tether: &Path, shards: usize, extra: &[&str]) -> anyhow::Result<Controller> {
    let port = procs::free_port()?;
    let admin_port = procs::free_port_after(port)?;
    controller_at(tether, port, admin_port, shards, extra)
}

pub fn controller(tether: &Path, shards: usize) -> anyhow::Result<Controller> {
    controller_with(tether, shards, &[])
}

/// A controller on the given ports (a restart reuses its predecessor's).
pub fn controller_at(
    tether: &Path,
    port: u16,
    admin_port: u16,
    shards: usize,
    extra: &[&str],
) -> anyhow::Result<Controller> {
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let mut cmd = Command::new(tether);
    cmd.args([
        "controller",
        "--listen",
        &listen,
        "--admin",
        &admin,
        "--shards",
        &shards.to_string(),
        // The scenarios stop it to measure what follows a stop (a herd of
        // reconnects): at once, as before drains existed, unless one asks.
        "--drain-period",
        "0s",
    ])
    .args(extra);
    let mut proc = Proc::spawn("controller", cmd)?;
    let ready = proc.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("tether controller ready")
    })?;
    let io = if ready.contains(", io_uring,") {
        "io_uring"
    } else {
        "epoll"
    }
    .to_string();
    Ok(Controller {
        proc,
        listen,
        port,
        admin: format!("http://{admin}"),
        admin_port,
        io,
    })
}

/// Connections per source address (each address has ~28k ephemeral ports
/// toward one listener; staying well under keeps connects fast).
const PER_SOURCE: usize = 10_000;

/// Source addresses for the services `offset..offset + n` of a group: from
/// 127.0.<group>.2 on, ~10,000 services each.
pub fn source_range_in(group: u8, offset: usize, n: usize) -> String {
    let first = 2 + offset / PER_SOURCE;
    let last = (2 + (offset + n.max(1) - 1) / PER_SOURCE).max(first);
    assert!(
        last < 255,
        "more than 2.5 million services from one loopback /24"
    );
    format!("127.0.{group}.{first}-127.0.{group}.{last}")
}

/// A group of swarm processes.
pub struct SwarmSpec<'a> {
    /// host:port they connect to (a controller, or a relay).
    pub target: &'a str,
    pub services: usize,
    pub per_swarm: usize,
    /// New connections per second, shared by the group's processes.
    pub connect_rate: f64,
    pub service_id: &'a str,
    /// Source addresses come from 127.0.<group>.x; the services' registered
    /// addresses from `index_base` on (distinct across groups).
    pub group: u8,
    pub index_base: usize,
    pub extra: Vec<String>,
    /// Other controller nodes (host:port) the services move to, in order,
    /// when `target` closes or cannot be reached.
    pub also: Vec<String>,
    /// Connect with wss://, trusting this CA.
    pub tls_ca: Option<PathBuf>,
}

impl<'a> SwarmSpec<'a> {
    pub fn new(target: &'a str, services: usize) -> SwarmSpec<'a> {
        SwarmSpec {
            target,
            services,
            per_swarm: 50_000,
            connect_rate: 5_000.0,
            service_id: "svc",
            group: 0,
            index_base: 0,
            extra: Vec::new(),
            also: Vec::new(),
            tls_ca: None,
        }
    }
}

/// The test certificate of this repository (tests/keys: for loopback
/// measurements only): the controller's `--tls-cert`/`--tls-key`
/// arguments, and the CA its swarms trust.
pub fn test_tls() -> ([String; 4], PathBuf) {
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/keys");
    let arg = |name: &str| keys.join(name).to_string_lossy().into_owned();
    (
        [
            "--tls-cert".into(),
            arg("server.pem"),
            "--tls-key".into(),
            arg("server.key"),
        ],
        keys.join("ca.pem"),
    )
}

/// Starts the group and waits until every service registered; returns the
/// processes and how long the ramp took.
pub fn start_swarms(tether: &Path, spec: &SwarmSpec<'_>) -> anyhow::Result<(Vec<Proc>, f64)> {
    let started = Instant::now();
    let mut swarms = Vec::new();
    let mut offset = 0;
    while offset < spec.services {
        let n = spec.per_swarm.min(spec.services - offset);
        let mut cmd = Command::new(tether);
        let distinct = if spec.service_id == "svc" { "100" } else { "1" };
        let scheme = if spec.tls_ca.is_some() { "wss" } else { "ws" };
        let controllers: Vec<String> = std::iter::once(spec.target)
            .chain(spec.also.iter().map(String::as_str))
            .map(|t| format!("{scheme}://{t}/ws/microservice"))
            .collect();
        cmd.args([
            "agent",
            "--controller",
            &controllers.join(","),
            "--service-id",
            spec.service_id,
        ])
        .args(["--swarm", &n.to_string(), "--distinct-ids", distinct])
        .args(["--index-offset", &(spec.index_base + offset).to_string()])
        .args([
            "--source-ips",
            &source_range_in(spec.group, offset, n),
            "--exit-after",
            "30m",
        ])
        .args([
            "--connect-rate",
            &format!(
                "{:.0}",
                (spec.connect_rate * n as f64 / spec.services as f64).max(1.0)
            ),
        ])
        .args(&spec.extra);
        if let Some(ca) = &spec.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        swarms.push(Proc::spawn_with(
            &format!("swarm-{}@{offset}", spec.service_id),
            cmd,
            libc::SIGKILL,
        )?);
        offset += n;
    }
    let ramp_limit = Duration::from_secs(60 + spec.services as u64 / 500);
    let bar = progress::bar(
        spec.services as u64,
        &format!("registering {}", spec.service_id),
    );
    let mut registered = vec![0u64; swarms.len()];
    // Each process's own "all N registered in X ms" (its clock starts as it does).
    let mut took_ms: Vec<Option<u64>> = vec![None; swarms.len()];
    while took_ms.iter().any(Option::is_none) {
        for (i, swarm) in swarms.iter_mut().enumerate() {
            for line in swarm.lines_so_far() {
                if let Some(v) = word_after(&line, "swarm: registered=") {
                    registered[i] = v;
                }
                if line.contains(" registered in ") {
                    took_ms[i] = word_after(&line, " registered in ");
                }
            }
            anyhow::ensure!(!swarm.exited(), "{} exited while registering", swarm.name);
        }
        bar.set_position(registered.iter().sum());
        anyhow::ensure!(
            started.elapsed() < ramp_limit,
            "only {} of {} services registered within {ramp_limit:?}",
            registered.iter().sum::<u64>(),
            spec.services
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let seconds = took_ms.iter().flatten().max().copied().unwrap_or(0) as f64 / 1000.0;
    eprintln!(
        "{} {} services registered in {seconds:.1} s",
        spec.services, spec.service_id
    );
    Ok((swarms, seconds))
}

/// The number right after `prefix` in `line`.
fn word_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The swarm's latest probe figures: (count, p50 µs, p99 µs).
pub fn probe_latency(swarms: &mut [Proc]) -> Option<(u64, u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    for swarm in swarms {
        for line in swarm.lines_so_far() {
            let Some(rest) = line.strip_prefix("swarm: probes=") else {
                continue;
            };
            let field = |name: &str| -> Option<u64> {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
            };
            let count = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let (Some(p50), Some(p99)) = (field("probe_p50_us="), field("probe_p99_us=")) {
                // The largest process's figures stand for the group.
                if best.is_none_or(|b| count > b.0) {
                    best = Some((count, p50, p99));
                }
            }
        }
    }
    best
}

/// A chained relay: tether's own (`gateway --chained`) or nginx.
pub struct Relay {
    pub proc: Proc,
    pub listen: String,
    pub port: u16,
    /// nginx: its workers (their RSS and CPU count too).
    pub workers_of: Option<u32>,
    _dir: Option<PathBuf>,
}

/// tether's relay for `services`, to the controller's port; on `port`, or
/// a free one.
pub fn tether_relay(
    tether: &Path,
    upstream: &str,
    services: usize,
    port: Option<u16>,
) -> anyhow::Result<Relay> {
    let port = match port {
        Some(p) => p,
        None => procs::free_port_after(18_500)?,
    };
    let listen = format!("127.0.0.1:{port}");
    let threads = services.div_ceil(8_000).max(2);
    let mut cmd = Command::new(tether);
    cmd.args([
        "gateway",
        "--chained",
        "--listen",
        &listen,
        "--upstream",
        upstream,
    ])
    .args([
        "--upstream-source-ips",
        &source_range_in(1, 0, services),
        "--threads",
        &threads.to_string(),
    ]);
    let mut proc = Proc::spawn("relay", cmd)?;
    proc.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("tether gateway ready")
    })?;
    Ok(Relay {
        proc,
        listen,
        port,
        workers_of: None,
        _dir: None,
    })
}

/// nginx's split_clients lines spreading connections evenly over
/// `sources` addresses 127.0.2.2… (percentages take two decimals at most;
/// the last takes the rest).
fn split_clients(sources: usize) -> String {
    let share = (10_000 / sources) as f64 / 100.0;
    (0..sources)
        .map(|i| {
            let pct = if i + 1 == sources {
                "*".to_string()
            } else {
                format!("{share:.2}%")
            };
            format!("        {pct} 127.0.2.{};\n", 2 + i)
        })
        .collect()
}

/// The nginx binary, if installed.
pub fn nginx_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/nginx",
        "/usr/bin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// nginx as a chained WebSocket proxy (transparent: frames, pings
/// included, pass through), with a config written for `services`: enough
/// workers for RLIMIT_NOFILE, upstream sources spread like a swarm's.
pub fn nginx_relay(
    upstream_port: u16,
    services: usize,
    dir: &Path,
    port: Option<u16>,
) -> anyhow::Result<Relay> {
    let nginx = nginx_binary().context("nginx is not installed")?;
    let port = match port {
        Some(p) => p,
        None => procs::free_port_after(18_700)?,
    };
    std::fs::create_dir_all(dir)?;
    // nginx resolves relative paths against its prefix (-p): give it absolute ones.
    let dir = &std::fs::canonicalize(dir)?;
    let nofile = 20_000usize.min(procs::nofile().unwrap_or(20_000));
    // worker_connections counts both sides of every pair. SO_REUSEPORT
    // spreads clients by hash, unevenly: keep 30% spare.
    let per_worker = nofile - 200;
    let pairs = per_worker / 2;
    let workers = (services * 13 / 10).div_ceil(pairs).max(2);
    let split = split_clients(services.div_ceil(10_000).max(1));
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\nworker_rlimit_nofile {nofile};\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections {per_worker}; multi_accept on; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    scgi_temp_path {dir}/scgi;\n\
             split_clients \"$remote_addr$remote_port\" $upstream_source {{\n{split}    }}\n\
             server {{\n        listen 127.0.0.1:{port} reuseport backlog=65535;\n\
                 location /ws/microservice {{\n            proxy_pass http://127.0.0.1:{upstream_port};\n\
                     proxy_http_version 1.1;\n            proxy_set_header Upgrade $http_upgrade;\n\
                     proxy_set_header Connection \"upgrade\";\n            proxy_bind $upstream_source;\n\
                     proxy_read_timeout 3600s;\n            proxy_send_timeout 3600s;\n        }}\n    }}\n}}\n",
        dir = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-c").arg(&conf_path).arg("-p").arg(dir);
    let proc = Proc::spawn("nginx", cmd)?;
    let listen = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&listen).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nginx did not listen on {listen}; see {}/error.log",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let master = proc.pid();
    Ok(Relay {
        proc,
        listen,
        port,
        workers_of: Some(master),
        _dir: Some(dir.to_path_buf()),
    })
}

impl Relay {
    /// SIGINT (both tether's relay and nginx stop at once on it), then the
    /// process handle's SIGTERM/SIGKILL.
    pub fn stop(self) {
        self.proc.stop(Duration::from_secs(10));
    }
    /// The relay's processes (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.proc.pid()];
        if let Some(master) = self.workers_of {
            pids.extend(procs::children(master));
        }
        pids
    }
}

pub fn stop_all(swarms: Vec<Proc>, controller: Controller) {
    for swarm in swarms {
        swarm.stop(Duration::from_secs(10));
    }
    controller.proc.stop(Duration::from_secs(10));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_sources_split_within_a_hundred_percent() {
        assert_eq!(split_clients(1), "        * 127.0.2.2;\n");
        assert_eq!(
            split_clients(3),
            "        33.33% 127.0.2.2;\n        33.33% 127.0.2.3;\n        * 127.0.2.4;\n"
        );
        assert!(split_clients(10).starts_with("        10.00% 127.0.2.2;\n"));
        assert_eq!(source_range_in(1, 0, 100_000), "127.0.1.2-127.0.1.11");
    }
}
