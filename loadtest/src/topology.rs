//! Starting what a scenario measures: a controller (with its admin API)
//! and swarm processes that register N simulated services.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{self, Proc};

pub struct Controller {
    pub proc: Proc,
    /// ws://… service endpoint host:port.
    pub listen: String,
    /// http://… admin API.
    pub admin: String,
}

pub fn controller(tether: &Path, shards: usize) -> anyhow::Result<Controller> {
    controller_with(tether, shards, &[])
}

/// A controller with extra flags (e.g. `--io epoll`).
pub fn controller_with(tether: &Path, shards: usize, extra: &[&str]) -> anyhow::Result<Controller> {
    let port = procs::free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let admin_port = procs::free_port_after(port)?;
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
    ])
    .args(extra);
    let mut proc = Proc::spawn("controller", cmd)?;
    proc.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("tether controller ready")
    })?;
    Ok(Controller {
        proc,
        listen,
        admin: format!("http://{admin}"),
    })
}

/// Connections per source address (each address has ~28k ephemeral ports
/// toward one listener; staying well under keeps connects fast).
const PER_SOURCE: usize = 10_000;

/// Source addresses for the services `offset..offset + n`: their own
/// addresses, ~10,000 services each, from 127.0.0.2 on.
pub fn source_range(offset: usize, n: usize) -> String {
    let first = 2 + offset / PER_SOURCE;
    let last = (2 + (offset + n - 1) / PER_SOURCE).max(first);
    assert!(
        last < 255,
        "more than 2.5 million services on one loopback /24"
    );
    format!("127.0.0.{first}-127.0.0.{last}")
}

/// Swarm processes registering `services` (100 serviceIds, distinct
/// addresses); returns once all are registered, and how long that took.
pub fn swarms(
    tether: &Path,
    listen: &str,
    services: usize,
    per_swarm: usize,
) -> anyhow::Result<(Vec<Proc>, f64)> {
    swarms_at(tether, listen, services, per_swarm, 5_000.0)
}

/// `swarms` with a total connect rate (new connections per second, shared
/// by the swarm processes).
pub fn swarms_at(
    tether: &Path,
    listen: &str,
    services: usize,
    per_swarm: usize,
    connect_rate: f64,
) -> anyhow::Result<(Vec<Proc>, f64)> {
    let started = Instant::now();
    let mut swarms = Vec::new();
    let mut offset = 0;
    while offset < services {
        let n = per_swarm.min(services - offset);
        let mut cmd = Command::new(tether);
        cmd.args([
            "agent",
            "--controller",
            &format!("ws://{listen}/ws/microservice"),
            "--service-id",
            "svc",
        ])
        .args([
            "--swarm",
            &n.to_string(),
            "--distinct-ids",
            "100",
            "--index-offset",
            &offset.to_string(),
        ])
        .args([
            "--source-ips",
            &source_range(offset, n),
            "--exit-after",
            "30m",
        ])
        .args([
            "--connect-rate",
            &format!("{:.0}", connect_rate * n as f64 / services as f64),
        ]);
        swarms.push(Proc::spawn(&format!("swarm@{offset}"), cmd)?);
        offset += n;
    }
    let ramp_limit = Duration::from_secs(60 + services as u64 / 500);
    for swarm in &mut swarms {
        let line = swarm.wait_line(ramp_limit, |l| l.contains(" registered in "))?;
        eprintln!("{}: {line}", swarm.name);
    }
    Ok((swarms, started.elapsed().as_secs_f64()))
}

pub fn stop_all(swarms: Vec<Proc>, controller: Controller) {
    for swarm in swarms {
        swarm.stop(Duration::from_secs(10));
    }
    controller.proc.stop(Duration::from_secs(10));
}
