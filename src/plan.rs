//! Capacity planning from measured costs: `tether plan` (memory, CPU, fds,
//! ports and sysctls for N services, direct and chained) and `tether tune
//! check` (what this host lacks for N).
//!
//! The per-service costs come from the load test's `results.json`
//! (`--from`), or else from the defaults below, which are the figures of
//! `loadtest/results/` (a 2-core Linux 6.18 machine, io_uring, 100,000
//! services). Costs scale with the kernel and the machine; measure yours.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use crate::engine::FD_RESERVE;

/// What one service costs, as the load test measures it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Costs {
    /// Where these figures come from.
    pub source: String,
    /// Controller RSS per registered service, bytes.
    pub controller_user_bytes: f64,
    /// Controller RSS with no service, bytes.
    pub controller_fixed_bytes: f64,
    /// Unreclaimable kernel memory per idle TCP socket (one end), bytes.
    pub kernel_bytes_per_socket: f64,
    /// Controller CPU per ping sent and answered, seconds.
    pub cpu_seconds_per_ping: f64,
    /// Registrations per second one controller took in a ramp.
    pub registrations_per_second: f64,
    /// RSS of a chained gateway per proxied service: tether's relay, nginx.
    pub relay_user_bytes: f64,
    pub nginx_user_bytes: f64,
}

impl Default for Costs {
    /// loadtest/results/compare (100,000 services; io_uring; Linux 6.18;
    /// 2 cores) and loadtest/results/scale.
    fn default() -> Costs {
        Costs {
            source: "built-in defaults (loadtest/results/, measured 2026-11-23 on 2 cores, Linux 6.18, io_uring)".into(),
            controller_user_bytes: 229.0,
            controller_fixed_bytes: 20.0 * 1048576.0,
            kernel_bytes_per_socket: 3_300.0,
            cpu_seconds_per_ping: 6.1e-6,
            registrations_per_second: 9_900.0,
            relay_user_bytes: 376.0,
            nginx_user_bytes: 18_500.0,
        }
    }
}

impl Costs {
    /// Costs from a load-test `results.json` (`compare` or `scale`); what
    /// the file lacks keeps its default.
    pub fn from_results(path: &Path) -> anyhow::Result<Costs> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let mut costs = Costs {
            source: format!(
                "{} ({})",
                path.display(),
                json["scenario"].as_str().unwrap_or("?")
            ),
            ..Costs::default()
        };
        let num = |v: &Value| v.as_f64().filter(|x| x.is_finite());
        match json["scenario"].as_str() {
            Some("compare") => {
                let runs = json["results"]["runs"]
                    .as_array()
                    .context("no results.runs")?;
                // Per topology, its run at the largest N.
                let largest = |topology: &str| {
                    runs.iter()
                        .filter(|r| r["topology"] == topology)
                        .max_by_key(|r| r["services"].as_u64().unwrap_or(0))
                };
                let direct = largest("direct").context("no direct run in the file")?;
                let n = num(&direct["services"])
                    .filter(|n| *n > 0.0)
                    .context("direct run without services")?;
                if let Some(kb) = num(&direct["controller"]["rssGrowthKb"]) {
                    costs.controller_user_bytes = kb * 1024.0 / n;
                }
                if let Some(kb) = num(&direct["controller"]["rssStartKb"]) {
                    costs.controller_fixed_bytes = kb * 1024.0;
                }
                // Both ends of every connection ran on the measuring machine.
                if let Some(kb) = num(&direct["kernelSunreclaimGrowthKb"]) {
                    costs.kernel_bytes_per_socket = kb * 1024.0 / (2.0 * n);
                }
                if let (Some(cpu), Some(pings)) = (
                    num(&direct["controller"]["cpuSecondsHold"]),
                    num(&direct["pingsDuringHold"]),
                ) && pings > 0.0
                {
                    costs.cpu_seconds_per_ping = cpu / pings;
                }
                if let Some(rate) = num(&direct["registrationsPerSecond"]) {
                    costs.registrations_per_second = rate;
                }
                let gateway_bytes = |r: &Value| {
                    Some(num(&r["gateway"]["rssGrowthKb"])? * 1024.0 / num(&r["services"])?)
                };
                if let Some(b) = largest("relay").and_then(gateway_bytes) {
                    costs.relay_user_bytes = b;
                }
                if let Some(b) = largest("nginx").and_then(gateway_bytes) {
                    costs.nginx_user_bytes = b;
                }
            }
            Some("scale") => {
                let fit = &json["results"]["fit"];
                if let Some(b) = num(&fit["userBytesPerService"]["slope"]) {
                    costs.controller_user_bytes = b;
                }
                if let Some(b) = num(&fit["kernelBytesPerService"]["slope"]) {
                    costs.kernel_bytes_per_socket = b / 2.0;
                }
                let points = json["results"]["points"]
                    .as_array()
                    .context("no results.points")?;
                let sum = |k: &str| points.iter().filter_map(|p| num(&p[k])).sum::<f64>();
                if sum("pingsDuringHold") > 0.0 {
                    costs.cpu_seconds_per_ping = sum("cpuSecondsHold") / sum("pingsDuringHold");
                }
                if let Some(p) = points
                    .iter()
                    .max_by_key(|p| p["services"].as_u64().unwrap_or(0))
                    && let (Some(n), Some(s)) =
                        (num(&p["services"]), num(&p["registrationSeconds"]))
                    && s > 0.0
                {
                    costs.registrations_per_second = n / s;
                }
            }
            other => bail!(
                "{}: a results.json of the `compare` or `scale` scenario is needed (this one is {other:?})",
                path.display()
            ),
        }
        Ok(costs)
    }
}

/// One topology's needs at N services.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Needs {
    pub topology: &'static str,
    pub controller_sockets: u64,
    pub gateway_sockets: u64,
    pub controller_memory_bytes: f64,
    pub gateway_memory_bytes: f64,
    /// Controller and gateway, user and kernel.
    pub total_memory_bytes: f64,
    /// Source addresses the gateway needs toward one controller ip:port.
    pub gateway_source_addresses: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub services: u64,
    pub ping_interval_seconds: f64,
    pub costs: Costs,
    pub pings_per_second: f64,
    pub controller_cores_for_pings: f64,
    /// Seconds for every service to register again after a restart, at
    /// the measured rate.
    pub full_reregistration_seconds: f64,
    /// fds one table may hold (RLIMIT_NOFILE the controller gets).
    pub nofile: u64,
    pub shards: u64,
    pub connections_per_shard: u64,
    pub direct: Needs,
    pub relay: Needs,
    pub nginx: Needs,
    /// Memory to give a controller node: direct total with 50% headroom
    /// (socket buffers grow under traffic).
    pub controller_memory_to_provision_bytes: f64,
    /// Source addresses a one-machine load test needs (10,000 each).
    pub loadtest_source_addresses: u64,
    pub sysctls: Vec<(String, u64)>,
}

/// Ports of `net.ipv4.ip_local_port_range` (28,232 by default).
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().filter_map(|v| v.parse::<u64>().ok());
            Some(it.next_back()? - it.next()? + 1)
        })
        .unwrap_or(28_232)
}

/// The hard RLIMIT_NOFILE (the controller raises its soft limit to it).
pub fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    }
}

impl Plan {
    pub fn new(
        services: u64,
        ping_interval_seconds: f64,
        nofile: u64,
        cores: u64,
        costs: Costs,
    ) -> Plan {
        let n = services as f64;
        let kernel = costs.kernel_bytes_per_socket;
        let controller_memory =
            costs.controller_fixed_bytes + n * (costs.controller_user_bytes + kernel);
        let ports = ephemeral_ports().max(1);
        let chained = |topology, gateway_user: f64| {
            let gateway_memory = n * (gateway_user + 2.0 * kernel);
            Needs {
                topology,
                controller_sockets: services,
                gateway_sockets: 2 * services,
                controller_memory_bytes: controller_memory,
                gateway_memory_bytes: gateway_memory,
                total_memory_bytes: controller_memory + gateway_memory,
                gateway_source_addresses: services.div_ceil(ports),
            }
        };
        let direct = Needs {
            topology: "direct",
            controller_sockets: services,
            gateway_sockets: 0,
            controller_memory_bytes: controller_memory,
            gateway_memory_bytes: 0.0,
            total_memory_bytes: controller_memory,
            gateway_source_addresses: 0,
        };
        let per_table = nofile.saturating_sub(FD_RESERVE as u64 + 64).max(1);
        let shards = cores.max(services.div_ceil(per_table)).max(1);
        let pings = n / ping_interval_seconds.max(0.001);
        Plan {
            services,
            ping_interval_seconds,
            pings_per_second: pings,
            controller_cores_for_pings: pings * costs.cpu_seconds_per_ping,
            full_reregistration_seconds: n / costs.registrations_per_second.max(1.0),
            nofile,
            shards,
            connections_per_shard: services.div_ceil(shards),
            relay: chained("chained (tether relay)", costs.relay_user_bytes),
            nginx: chained("chained (nginx)", costs.nginx_user_bytes),
            direct,
            controller_memory_to_provision_bytes: controller_memory * 1.5,
            loadtest_source_addresses: services.div_ceil(10_000),
            sysctls: vec![
                ("net.core.somaxconn".into(), 65_535),
                ("net.ipv4.tcp_max_syn_backlog".into(), 65_535),
                // Every socket is a file; twice N leaves room for the rest.
                ("fs.file-max".into(), (2 * services).max(1_048_576)),
                // One shard's table.
                (
                    "fs.nr_open".into(),
                    (services.div_ceil(shards) + FD_RESERVE as u64 + 64).max(1_048_576),
                ),
            ],
            costs,
        }
    }

    pub fn render(&self) -> String {
        let mib = |b: f64| format!("{:.0} MiB", b / 1048576.0);
        let mut s = format!(
            "tether plan: {} services, each pinged every {}s\ncosts: {}\n\n",
            self.services, self.ping_interval_seconds, self.costs.source
        );
        s.push_str(&format!(
            "per service: controller {:.0} B user + {:.0} B kernel per socket; tether relay {:.0} B, nginx {:.0} B user per proxied service\n\n",
            self.costs.controller_user_bytes,
            self.costs.kernel_bytes_per_socket,
            self.costs.relay_user_bytes,
            self.costs.nginx_user_bytes
        ));
        s.push_str(&format!(
            "{:<28}{:>18}{:>26}{:>20}\n",
            "", "direct", "chained (tether relay)", "chained (nginx)"
        ));
        let row = |label: &str, f: &dyn Fn(&Needs) -> String| {
            format!(
                "{label:<28}{:>18}{:>26}{:>20}\n",
                f(&self.direct),
                f(&self.relay),
                f(&self.nginx)
            )
        };
        s.push_str(&row("controller sockets", &|n| {
            n.controller_sockets.to_string()
        }));
        s.push_str(&row("gateway sockets", &|n| n.gateway_sockets.to_string()));
        s.push_str(&row("controller memory", &|n| {
            mib(n.controller_memory_bytes)
        }));
        s.push_str(&row("gateway memory", &|n| mib(n.gateway_memory_bytes)));
        s.push_str(&row("total memory", &|n| mib(n.total_memory_bytes)));
        s.push_str(&row("  × direct", &|n| {
            format!(
                "{:.2}",
                n.total_memory_bytes / self.direct.total_memory_bytes
            )
        }));
        s.push_str(&row("gateway source addresses", &|n| {
            n.gateway_source_addresses.to_string()
        }));
        s.push_str(&format!(
            "\ncontroller:\n  memory to provision   {} (direct total + 50% for socket buffers under traffic)\n  \
             CPU for pings         {:.2} cores ({:.0} pings/s at {:.1} µs each)\n  \
             re-registering all    {:.1} s at {:.0}/s after a restart (agents spread it with jitter)\n  \
             shards                {} ({} connections each; RLIMIT_NOFILE {} per shard's fd table)\n",
            mib(self.controller_memory_to_provision_bytes),
            self.controller_cores_for_pings,
            self.pings_per_second,
            self.costs.cpu_seconds_per_ping * 1e6,
            self.full_reregistration_seconds,
            self.costs.registrations_per_second,
            self.shards,
            self.connections_per_shard,
            self.nofile
        ));
        s.push_str("\nsysctls (tuning/sysctl.d-99-tether.conf):\n");
        for (k, v) in &self.sysctls {
            s.push_str(&format!("  {k} = {v}\n"));
        }
        s.push_str(&format!(
            "\nchained only: the gateway opens one connection per service to the controller's ip:port; with {} ephemeral ports it needs {} source addresses (or as many controller addresses).\n\
             load test from one machine: {} client source addresses (127.0.0.2…, 10,000 each).\n",
            ephemeral_ports(),
            self.relay.gateway_source_addresses,
            self.loadtest_source_addresses
        ));
        s
    }
}

/// One finding of `tune check`.
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    /// What the host has.
    pub found: String,
    /// What it needs, and how to get it, when it lacks it.
    pub fix: String,
}

fn sysctl(name: &str) -> Option<u64> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn meminfo_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn kernel_at_least(major: u64, minor: u64) -> Option<(bool, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u64>().ok());
    let (a, b) = (parts.next()?, parts.next()?);
    Some(((a, b) >= (major, minor), release.trim().to_string()))
}

/// What this host lacks to hold `plan.services` directly with
/// `plan.shards` shards, listening on `listen_port`.
pub fn check_host(plan: &Plan, listen_port: u16) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut add = |what: &str, ok: bool, found: String, fix: String| {
        checks.push(Check {
            what: what.into(),
            ok,
            found,
            fix,
        });
    };
    let per_shard = plan.connections_per_shard + FD_RESERVE as u64 + plan.shards;
    let hard = nofile_hard();
    add(
        "RLIMIT_NOFILE (hard) per shard's fd table",
        hard >= per_shard,
        hard.to_string(),
        format!(
            "≥ {per_shard} for {} shards: LimitNOFILE= in the systemd unit (tuning/tether.service) or tuning/limits.d-tether.conf; or run more shards (--shards)",
            plan.shards
        ),
    );
    let nr_open = sysctl("fs.nr_open").unwrap_or(0);
    add(
        "fs.nr_open",
        nr_open >= per_shard,
        nr_open.to_string(),
        format!("≥ {per_shard}: sysctl -w fs.nr_open={per_shard}"),
    );
    let file_max = sysctl("fs.file-max").unwrap_or(0);
    let files = plan.services + 10_000;
    add(
        "fs.file-max",
        file_max >= files,
        file_max.to_string(),
        format!("≥ {files}: sysctl -w fs.file-max={}", 2 * plan.services),
    );
    for name in ["net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"] {
        let v = sysctl(name).unwrap_or(0);
        // A reconnect wave arrives at the registration rate; a second's
        // worth must fit the queue (up to the kernel's 65535 ceiling).
        let want = (plan.costs.registrations_per_second as u64)
            .clamp(4_096, 65_535)
            .min(plan.services.max(128));
        add(
            name,
            v >= want,
            v.to_string(),
            format!("≥ {want} (reconnect waves after a restart): sysctl -w {name}=65535"),
        );
    }
    let available = meminfo_bytes("MemAvailable").unwrap_or(0);
    let need = plan.controller_memory_to_provision_bytes as u64;
    add(
        "memory available",
        available >= need,
        format!("{} MiB", available / 1048576),
        format!(
            "≥ {} MiB for {} services (tether plan)",
            need / 1048576,
            plan.services
        ),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    add(
        "CPU for pings",
        plan.controller_cores_for_pings <= cores / 2.0,
        format!("{cores} cores"),
        format!(
            "pings need {:.2} cores at one every {}s: a longer --ping-interval or more cores",
            plan.controller_cores_for_pings, plan.ping_interval_seconds
        ),
    );
    if let Some((ok, release)) = kernel_at_least(6, 0) {
        add(
            "kernel ≥ 6.0 (io_uring driver)",
            ok,
            release,
            "older kernels run the epoll driver (--io epoll), which works as well".into(),
        );
    }
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (bounds.next(), bounds.next()) {
        let inside = (lo..=hi).contains(&listen_port);
        add(
            "listen port outside the ephemeral range",
            !inside,
            format!("{listen_port} vs {lo}-{hi}"),
            format!(
                "outgoing connections may take port {listen_port}: net.ipv4.ip_local_reserved_ports={listen_port}"
            ),
        );
    }
    checks
}

pub fn render_checks(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let mark = if c.ok { "ok     " } else { "MISSING" };
        s.push_str(&format!("{mark} {:<44} {}\n", c.what, c.found));
        if !c.ok {
            s.push_str(&format!("        → {}\n", c.fix));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_needs_twice_the_sockets_and_more_memory() {
        let plan = Plan::new(100_000, 30.0, 20_000, 2, Costs::default());
        assert_eq!(plan.direct.controller_sockets, 100_000);
        assert_eq!(plan.relay.gateway_sockets, 200_000);
        assert!(plan.relay.total_memory_bytes > 1.9 * plan.direct.total_memory_bytes);
        assert!(plan.nginx.total_memory_bytes > plan.relay.total_memory_bytes);
        // 20,000 fds per table: 100,000 services need 6 shards.
        assert_eq!(plan.shards, 6);
        assert!(plan.connections_per_shard + FD_RESERVE as u64 + 64 <= 20_000);
        assert!((plan.pings_per_second - 100_000.0 / 30.0).abs() < 1e-6);
        let text = plan.render();
        assert!(
            text.contains("controller sockets") && text.contains("net.core.somaxconn = 65535"),
            "{text}"
        );
    }

    #[test]
    fn reads_costs_from_compare_results() {
        let dir = std::env::temp_dir().join(format!("tether-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        let results = serde_json::json!({
            "scenario": "compare",
            "results": {"runs": [
                {"topology": "direct", "services": 1000, "controller": {"rssGrowthKb": 250, "rssStartKb": 10_000,
                 "cpuSecondsHold": 0.5, "cpuSecondsRamp": 0.1}, "kernelSunreclaimGrowthKb": 6_000,
                 "pingsDuringHold": 100_000.0, "registrationsPerSecond": 5000.0},
                {"topology": "relay", "services": 1000, "gateway": {"rssGrowthKb": 500}},
            ]},
        });
        std::fs::write(&path, results.to_string()).unwrap();
        let costs = Costs::from_results(&path).unwrap();
        assert_eq!(costs.controller_user_bytes, 256.0);
        assert_eq!(costs.kernel_bytes_per_socket, 3072.0);
        assert_eq!(costs.cpu_seconds_per_ping, 5e-6);
        assert_eq!(costs.relay_user_bytes, 512.0);
        assert_eq!(costs.nginx_user_bytes, Costs::default().nginx_user_bytes);
        std::fs::write(&path, r#"{"scenario":"zombie"}"#).unwrap();
        assert!(
            Costs::from_results(&path)
                .unwrap_err()
                .to_string()
                .contains("compare")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
