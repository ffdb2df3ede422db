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
    ]);
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

/// Source addresses for `n` services: ~10,000 per address, from 127.0.0.2.
pub fn source_range(n: usize) -> String {
    let count = n.div_ceil(10_000).clamp(1, 250);
    format!("127.0.0.2-127.0.0.{}", 1 + count)
}

/// Swarm processes registering `services` (100 serviceIds, distinct
/// addresses); returns once all are registered, and how long that took.
pub fn swarms(
    tether: &Path,
    listen: &str,
    services: usize,
    per_swarm: usize,
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
        .args(["--source-ips", &source_range(n), "--exit-after", "30m"]);
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
