//! Capacity planning from measured costs: `tether plan` (memory, CPU, fds,
//! ports and sysctls for N services, direct and chained) and `tether tune
//! check` (what this host lacks for N).
//!
//! The per-service costs come from a load test's `results.json` (`--from`),
//! or else from the runs built into the binary, the ones the README shows
//! (2 cores, Linux 6.18, io_uring): `loadtest/results/scale/results.json`
//! for the direct costs (fitted up to 1,000,000 services), and
//! `loadtest/results/compare/results.json` for the chained gateways'.
//! Costs scale with the kernel and the machine; measure yours.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::engine::FD_RESERVE;
use crate::results::{CompareResults, CompareRun, Fit, ResultsFile, ScaleResults, Topology};

/// The most shards one controller runs (`--shards`).
pub const MAX_SHARDS: u64 = 1024;

/// The committed `compare` run the built-in gateway costs are read from.
const BUILT_IN: &str = include_str!("../loadtest/results/compare/results.json");
const BUILT_IN_PATH: &str = "loadtest/results/compare/results.json";
/// The committed `scale` run the built-in direct costs are read from.
const BUILT_IN_SCALE: &str = include_str!("../loadtest/results/scale/results.json");
const BUILT_IN_SCALE_PATH: &str = "loadtest/results/scale/results.json";

/// The committed `cluster` run the built-in cluster costs are read from.
const BUILT_IN_CLUSTER: &str = include_str!("../loadtest/results/cluster/results.json");
const BUILT_IN_CLUSTER_PATH: &str = "loadtest/results/cluster/results.json";

/// What the cluster layer costs, from a `tether-loadtest cluster` run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCosts {
    #[serde(skip_deserializing)]
    pub source: String,
    /// etcd key and value bytes per instance.
    #[serde(alias = "bytes_per_instance")]
    pub bytes_per_instance: f64,
    /// A node's RSS per instance another node holds (its view).
    #[serde(alias = "view_bytes_per_instance")]
    pub view_bytes_per_instance: f64,
    #[serde(alias = "etcd_db_bytes")]
    pub etcd_db_bytes: f64,
    #[serde(alias = "etcd_keys")]
    pub etcd_keys: f64,
    /// After a SIGKILL: until the others' views dropped the node, with
    /// this lease TTL; and until 99 % of its services were registered
    /// again on the survivor, with this many services per node.
    #[serde(alias = "kill_converged_seconds")]
    pub kill_converged_seconds: f64,
    #[serde(alias = "lease_ttl_s")]
    pub lease_ttl_s: f64,
    #[serde(alias = "moved_99_seconds")]
    pub moved_99_seconds: f64,
    pub services: f64,
    pub nodes: f64,
}

impl ClusterCosts {
    pub fn built_in() -> ClusterCosts {
        let mut c: ClusterCosts =
            serde_json::from_str(BUILT_IN_CLUSTER).expect("the built-in cluster results parse");
        c.source = format!(
            "built in: {BUILT_IN_CLUSTER_PATH} ({} services over {} nodes)",
            c.services, c.nodes
        );
        c
    }
}

/// Several nodes on etcd (`tether plan --nodes K`): each is sized to hold
/// its share with one node down, and every node also holds the view of
/// all the others' instances.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPlan {
    pub services: u64,
    pub nodes: u64,
    pub costs: ClusterCosts,
    /// Services per node while all are up, and with one node down (what
    /// each node is sized for: `node`).
    pub services_per_node: u64,
    pub services_per_node_one_down: u64,
    /// Instances of the others each node's view holds, and its memory.
    pub remote_instances_per_node: u64,
    pub view_bytes_per_node: f64,
    /// The per-node plan's memory to provision plus the view.
    pub node_memory_to_provision_bytes: f64,
    pub etcd_keys: u64,
    pub etcd_kv_bytes: f64,
    /// etcd's database, at the measured bytes per key (one revision each;
    /// history until compaction adds to it).
    pub etcd_db_bytes: f64,
    /// Transactions (≤ 128 ops) to publish every service once: a full
    /// re-registration of the cluster.
    pub etcd_txns_to_publish_all: u64,
    /// A node lost: its services move to the K-1 others, each taking this
    /// many, in about this long at the measured registration rate.
    pub failover_services_per_survivor: u64,
    pub failover_seconds: f64,
    /// The per-node plan (for `services_per_node_one_down`).
    pub node: Plan,
}

impl ClusterPlan {
    pub fn new(services: u64, nodes: u64, node: Plan, costs: ClusterCosts) -> ClusterPlan {
        assert!(nodes >= 2, "a cluster has two nodes or more");
        let per_node = services.div_ceil(nodes);
        let remote = services - per_node.min(services);
        let view = remote as f64 * costs.view_bytes_per_instance;
        let per_key_db = costs.etcd_db_bytes / costs.etcd_keys.max(1.0);
        let failover = per_node.div_ceil(nodes - 1);
        ClusterPlan {
            services,
            nodes,
            services_per_node: per_node,
            services_per_node_one_down: node.services,
            remote_instances_per_node: remote,
            view_bytes_per_node: view,
            node_memory_to_provision_bytes: node.controller_memory_to_provision_bytes + view,
            etcd_keys: services + nodes,
            etcd_kv_bytes: services as f64 * costs.bytes_per_instance,
            etcd_db_bytes: (services + nodes) as f64 * per_key_db,
            etcd_txns_to_publish_all: services.div_ceil(crate::cluster::MAX_TXN_OPS as u64),
            failover_services_per_survivor: failover,
            failover_seconds: failover as f64 / node.costs.registrations_per_second.max(1.0),
            node,
            costs,
        }
    }

    pub fn render(&self) -> String {
        let mib = |b: f64| format!("{:.0} MiB", b / 1048576.0);
        let mut s = format!(
            "tether plan: {} services over {} controller nodes on etcd\n\
             cluster costs: {}\n\n",
            self.services, self.nodes, self.costs.source
        );
        s.push_str(&format!(
            "per node:\n  \
             services              {} while all are up; sized for {} (one node down)\n  \
             view of the others    {} instances, {} ({:.0} B each, measured)\n  \
             memory to provision   {} (the node below + its view)\n  \
             run                   tether controller --cluster etcd://… --node-id nI --shards {} --ping-interval {}s\n\n",
            self.services_per_node,
            self.services_per_node_one_down,
            self.remote_instances_per_node,
            mib(self.view_bytes_per_node),
            self.costs.view_bytes_per_instance,
            mib(self.node_memory_to_provision_bytes),
            self.node.shards,
            self.node.ping_interval_seconds
        ));
        s.push_str(&format!(
            "etcd (3 members, tuning/kubernetes/cluster.yaml):\n  \
             keys                  {} (one per instance, one per node; one lease per node)\n  \
             keys + values         {} ({:.0} B per instance)\n  \
             database              ~{} at the measured {:.0} B per key (history until compaction adds to it)\n  \
             publish everything    {} transactions of ≤ 128 ops (a cluster-wide re-registration); 0 writes at rest\n  \
             quota                 keep --quota-backend-bytes ≥ 4 × the database (etcd's default is 2 GiB)\n\n",
            self.etcd_keys,
            mib(self.etcd_kv_bytes),
            self.costs.bytes_per_instance,
            mib(self.etcd_db_bytes),
            self.costs.etcd_db_bytes / self.costs.etcd_keys.max(1.0),
            self.etcd_txns_to_publish_all
        ));
        s.push_str(&format!(
            "a node lost (SIGKILL):\n  \
             its services          {} to each of the {} others, ~{:.1} s at {:.0} registrations/s (measured: 99 % of {:.0} moved in {:.1} s)\n  \
             the others' views     drop it once its lease TTL runs out (measured {:.1} s with {:.0} s)\n\n",
            self.failover_services_per_survivor,
            self.nodes - 1,
            self.failover_seconds,
            self.node.costs.registrations_per_second,
            self.costs.services / self.costs.nodes.max(1.0),
            self.costs.moved_99_seconds,
            self.costs.kill_converged_seconds,
            self.costs.lease_ttl_s
        ));
        s.push_str(&format!(
            "each node, as one controller holding {} services:\n\n",
            self.services_per_node_one_down
        ));
        s.push_str(&self.node.render());
        s
    }
}

/// What one service costs, as the load test measures it.
#[derive(Clone, Debug, Default, Serialize)]
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
    /// Registrations per second one controller kept up with in a ramp (the
    /// rate the load test offered, not a ceiling).
    pub registrations_per_second: f64,
    /// RSS of a chained gateway per proxied service: tether's relay, nginx.
    pub relay_user_bytes: f64,
    pub nginx_user_bytes: f64,
    /// Figures the results file did not have, taken from the built-in run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defaulted: Vec<&'static str>,
}

impl Costs {
    /// The costs of the committed runs (see the module comment): the
    /// `scale` run's direct figures over the `compare` run's.
    pub fn built_in() -> Costs {
        let file: ResultsFile<CompareResults> =
            serde_json::from_str(BUILT_IN).expect("the built-in results are a compare run");
        let source = format!(
            "built in: {BUILT_IN_PATH} ({}, {} cores, Linux {})",
            file.meta.started, file.meta.cores, file.meta.kernel
        );
        let compare = Costs::from_compare(&file.results, source, &Costs::default())
            .expect("the built-in results have a direct run");
        let scale: ResultsFile<ScaleResults> =
            serde_json::from_str(BUILT_IN_SCALE).expect("the built-in scale results parse");
        let largest = scale
            .results
            .points
            .iter()
            .map(|p| p.services)
            .max()
            .unwrap_or(0);
        let source = format!(
            "built in: {BUILT_IN_SCALE_PATH} (direct, up to {largest} services; {}, {} cores, Linux {}), gateways from {BUILT_IN_PATH}",
            scale.meta.started, scale.meta.cores, scale.meta.kernel
        );
        let mut costs = Costs::from_scale(&scale.results, source, &compare);
        // The scale run's largest point started 67 shards (126 MiB of
        // buffer rings and tables) and ramped at what its swarms offered:
        // the compare run's small controller is the fairer fixed cost, and
        // its rate the one the planner has always quoted.
        costs.controller_fixed_bytes = compare.controller_fixed_bytes;
        costs.registrations_per_second = compare.registrations_per_second;
        // Filled from the compare run is not "defaulted" for the built-in.
        costs.defaulted.clear();
        costs
    }

    /// Costs from a load-test `results.json` (`compare` or `scale`); what
    /// the file lacks is taken from the built-in run and listed in
    /// `defaulted`.
    pub fn from_results(path: &Path) -> anyhow::Result<Costs> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        #[derive(serde::Deserialize)]
        struct Scenario {
            scenario: Option<String>,
        }
        let scenario: Scenario = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results.json", path.display()))?;
        let source = format!(
            "{} ({})",
            path.display(),
            scenario.scenario.as_deref().unwrap_or("?")
        );
        let parse_err = || format!("{} does not hold what its scenario writes", path.display());
        let costs = match scenario.scenario.as_deref() {
            Some("compare") => {
                let file: ResultsFile<CompareResults> =
                    serde_json::from_str(&text).with_context(parse_err)?;
                Costs::from_compare(&file.results, source, &Costs::built_in())
            }
            Some("scale") => {
                let file: ResultsFile<ScaleResults> =
                    serde_json::from_str(&text).with_context(parse_err)?;
                Ok(Costs::from_scale(&file.results, source, &Costs::built_in()))
            }
            other => bail!(
                "a results.json of the `compare` or `scale` scenario is needed (this one is {other:?})"
            ),
        };
        costs.with_context(|| format!("{}", path.display()))
    }

    fn from_compare(runs: &CompareResults, source: String, base: &Costs) -> anyhow::Result<Costs> {
        let mut found = Found::default();
        let direct = runs
            .largest(Topology::Direct)
            .context("no direct run in the file")?;
        let n = Some(direct.services as f64)
            .filter(|n| *n > 0.0)
            .context("direct run without services")?;
        found.controller_user_bytes =
            measured(direct.controller.rss_growth_kb as f64).map(|kb| kb * 1024.0 / n);
        found.controller_fixed_bytes =
            measured(direct.controller.rss_start_kb as f64).map(|kb| kb * 1024.0);
        // Both ends of every connection ran on the measuring machine.
        found.kernel_bytes_per_socket =
            measured(direct.kernel_sunreclaim_growth_kb as f64).map(|kb| kb * 1024.0 / (2.0 * n));
        found.cpu_seconds_per_ping = match (
            measured(direct.controller.cpu_seconds_hold),
            measured(direct.pings_during_hold),
        ) {
            (Some(cpu), Some(pings)) if pings > 0.0 => Some(cpu / pings),
            _ => None,
        };
        found.registrations_per_second = measured(direct.registrations_per_second);
        let gateway_bytes = |r: &CompareRun| {
            let gateway = r.gateway.as_ref()?;
            Some(measured(gateway.rss_growth_kb as f64)? * 1024.0 / measured(r.services as f64)?)
        };
        found.relay_user_bytes = runs.largest(Topology::Relay).and_then(gateway_bytes);
        found.nginx_user_bytes = runs.largest(Topology::Nginx).and_then(gateway_bytes);
        Ok(found.over(base, source))
    }

    fn from_scale(scale: &ScaleResults, source: String, base: &Costs) -> Costs {
        let mut found = Found::default();
        let slope = |fit: &Option<Fit>| fit.as_ref().and_then(|f| measured(f.slope));
        found.controller_user_bytes = slope(&scale.fit.user_bytes_per_service);
        found.kernel_bytes_per_socket = slope(&scale.fit.kernel_bytes_per_service).map(|b| b / 2.0);
        let pings: f64 = scale
            .points
            .iter()
            .filter_map(|p| measured(p.pings_during_hold))
            .sum();
        if pings > 0.0 {
            let cpu: f64 = scale
                .points
                .iter()
                .filter_map(|p| measured(p.cpu_seconds_hold))
                .sum();
            found.cpu_seconds_per_ping = Some(cpu / pings);
        }
        if let Some(p) = scale.points.iter().max_by_key(|p| p.services) {
            found.controller_fixed_bytes = measured(p.rss_start_kb as f64).map(|kb| kb * 1024.0);
            if p.registration_seconds > 0.0 {
                found.registrations_per_second =
                    measured(p.services as f64 / p.registration_seconds);
            }
        }
        found.over(base, source)
    }
}

/// A figure as measured: finite and not negative, else not usable.
fn measured(x: f64) -> Option<f64> {
    Some(x).filter(|x| x.is_finite() && *x >= 0.0)
}

/// The figures one results file has.
#[derive(Default)]
struct Found {
    controller_user_bytes: Option<f64>,
    controller_fixed_bytes: Option<f64>,
    kernel_bytes_per_socket: Option<f64>,
    cpu_seconds_per_ping: Option<f64>,
    registrations_per_second: Option<f64>,
    relay_user_bytes: Option<f64>,
    nginx_user_bytes: Option<f64>,
}

impl Found {
    fn over(self, base: &Costs, source: String) -> Costs {
        let mut defaulted = Vec::new();
        let mut take = |name: &'static str, found: Option<f64>, base: f64| {
            found.unwrap_or_else(|| {
                defaulted.push(name);
                base
            })
        };
        Costs {
            source,
            controller_user_bytes: take(
                "controller user bytes",
                self.controller_user_bytes,
                base.controller_user_bytes,
            ),
            controller_fixed_bytes: take(
                "controller fixed bytes",
                self.controller_fixed_bytes,
                base.controller_fixed_bytes,
            ),
            kernel_bytes_per_socket: take(
                "kernel bytes per socket",
                self.kernel_bytes_per_socket,
                base.kernel_bytes_per_socket,
            ),
            cpu_seconds_per_ping: take(
                "CPU per ping",
                self.cpu_seconds_per_ping,
                base.cpu_seconds_per_ping,
            ),
            registrations_per_second: take(
                "registration rate",
                self.registrations_per_second,
                base.registrations_per_second,
            ),
            relay_user_bytes: take("relay bytes", self.relay_user_bytes, base.relay_user_bytes),
            nginx_user_bytes: take("nginx bytes", self.nginx_user_bytes, base.nginx_user_bytes),
            defaulted,
        }
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
    /// False when even `MAX_SHARDS` shards cannot hold N in one process:
    /// run several controllers.
    pub fits_one_controller: bool,
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

/// fds one shard's table needs for its share of `services`: the engine
/// keeps FD_RESERVE + shards of each table for itself.
fn fds_per_table(services: u64, shards: u64) -> u64 {
    services.div_ceil(shards) + FD_RESERVE as u64 + shards
}

/// `net.ipv4.ip_local_port_range`, inclusive.
fn port_range() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok());
    Some((it.next()?, it.next()?))
}

/// Ports of `net.ipv4.ip_local_port_range` (28,232 by default).
pub fn ephemeral_ports() -> u64 {
    port_range().map_or(28_232, |(lo, hi)| hi.saturating_sub(lo) + 1)
}

/// The hard RLIMIT_NOFILE (the controller raises its soft limit to it).
pub fn nofile_hard() -> u64 {
    crate::engine::sys::nofile_hard_limit().unwrap_or(1024)
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
                gateway_sockets: services.saturating_mul(2),
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
        let mut shards = cores.max(1);
        while shards < MAX_SHARDS && fds_per_table(services, shards) > nofile {
            shards += 1;
        }
        let pings = n / ping_interval_seconds.max(0.1);
        Plan {
            services,
            ping_interval_seconds,
            pings_per_second: pings,
            controller_cores_for_pings: pings * costs.cpu_seconds_per_ping,
            full_reregistration_seconds: n / costs.registrations_per_second.max(1.0),
            nofile,
            shards,
            connections_per_shard: services.div_ceil(shards),
            fits_one_controller: fds_per_table(services, shards) <= nofile,
            relay: chained("chained (tether relay)", costs.relay_user_bytes),
            nginx: chained("chained (nginx)", costs.nginx_user_bytes),
            direct,
            controller_memory_to_provision_bytes: controller_memory * 1.5,
            loadtest_source_addresses: services.div_ceil(10_000),
            sysctls: vec![
                ("net.core.somaxconn".into(), 65_535),
                ("net.ipv4.tcp_max_syn_backlog".into(), 65_535),
                // Every socket is a file; twice N leaves room for the rest.
                (
                    "fs.file-max".into(),
                    services.saturating_mul(2).max(1_048_576),
                ),
                // One shard's table.
                (
                    "fs.nr_open".into(),
                    fds_per_table(services, shards).max(1_048_576),
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
        if !self.costs.defaulted.is_empty() {
            s.insert_str(
                s.len() - 1,
                &format!(
                    "not in that file, so from the built-in run: {}\n",
                    self.costs.defaulted.join(", ")
                ),
            );
        }
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
             re-registering all    {:.1} s at {:.0}/s (the rate measured; a restart brings every agent back within its first backoff, 0-1 s)\n  \
             shards                {} ({} connections each; RLIMIT_NOFILE {} per shard's fd table)\n  \
             run                   tether controller --shards {} --ping-interval {}s\n",
            mib(self.controller_memory_to_provision_bytes),
            self.controller_cores_for_pings,
            self.pings_per_second,
            self.costs.cpu_seconds_per_ping * 1e6,
            self.full_reregistration_seconds,
            self.costs.registrations_per_second,
            self.shards,
            self.connections_per_shard,
            self.nofile,
            self.shards,
            self.ping_interval_seconds
        ));
        if !self.fits_one_controller {
            s.push_str(&format!(
                "  NOTE                  {} shards cannot hold {} services with {} fds per table: raise RLIMIT_NOFILE or run several controllers\n",
                self.shards, self.services, self.nofile
            ));
        }
        s.push_str(
            "\nsysctls, at least (tuning/sysctl.d-99-tether.conf; keep any higher value the host has):\n",
        );
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

/// A size such as `8GiB`, `512MiB`, `64KiB`, `2G` (powers of 1024 either
/// way) or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?} is not a size like 8GiB, 512MiB or 1048576")),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 8GiB, 512MiB or 1048576"))?;
    Ok((n * (1u64 << shift) as f64) as u64)
}

/// Bytes for people: `1.5 GiB`, `640 MiB`, `12 KiB`.
pub fn show_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// The memory this process may use, and where that figure comes from: its
/// cgroup's limit (v2 `memory.max`, or v1 `memory.limit_in_bytes`) when it
/// has one below RAM, else RAM (`MemTotal`).
pub fn memory_limit() -> (u64, &'static str) {
    let ram = meminfo_bytes("MemTotal").unwrap_or(1 << 30);
    match cgroup_memory_limit() {
        Some(limit) if limit < ram => (limit, "cgroup limit"),
        _ => (ram, "RAM"),
    }
}

fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read =
        |path: String| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_end_matches('/');
        let found = if controllers.is_empty() {
            // v2 ("max" does not parse: no limit).
            read(format!("/sys/fs/cgroup{path}/memory.max"))
                .or_else(|| read(format!("/sys/fs/cgroup/unified{path}/memory.max")))
        } else if controllers.split(',').any(|c| c == "memory") {
            // v1; inside a cgroup namespace the path may not be mounted.
            read(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
                .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes".into()))
        } else {
            None
        };
        if found.is_some() {
            return found;
        }
    }
    None
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

/// The listen queue each of `shards` SO_REUSEPORT listeners needs to hold
/// its share of `services` reconnecting at once (the kernel caps a queue
/// at 65535).
pub fn listen_queue_want(services: u64, shards: u64) -> u64 {
    services.div_ceil(shards.max(1)).clamp(128, 65_535)
}

/// A warning for the controller's start when net.core.somaxconn caps its
/// listen queues below what its shards can hold (`None` when it does not,
/// or cannot be read).
pub fn listen_queue_warning(shards: u64, conns_per_shard: u64) -> Option<String> {
    let somaxconn = sysctl("net.core.somaxconn")?;
    listen_queue_shortfall(somaxconn, shards, conns_per_shard)
}

fn listen_queue_shortfall(somaxconn: u64, shards: u64, conns_per_shard: u64) -> Option<String> {
    let want = listen_queue_want(shards.saturating_mul(conns_per_shard), shards);
    (somaxconn < want).then(|| {
        format!(
            "net.core.somaxconn is {somaxconn}: each of the {shards} listen queues holds that many of the {conns_per_shard} connections its shard takes, so a reconnect wave after a restart overflows them and waits on SYN retries (seconds each); raise it to {want} (tuning/sysctl.d-99-tether.conf, or `tether tune check`)"
        )
    })
}

/// What this host lacks to hold `plan.services` directly with a controller
/// of `shards` shards (its `--shards`; one per core by default), listening
/// on `listen_port`. Run it as and where the controller runs: it reads the
/// limits of its own process.
pub fn check_host(plan: &Plan, shards: u64, listen_port: u16) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut add = |what: &str, ok: bool, found: String, fix: String| {
        checks.push(Check {
            what: what.into(),
            ok,
            found,
            fix,
        });
    };
    let shards = shards.clamp(1, MAX_SHARDS);
    let per_shard = fds_per_table(plan.services, shards);
    let hard = nofile_hard();
    let more_shards = if plan.fits_one_controller {
        format!("; or run `tether controller --shards {}`", plan.shards)
    } else {
        String::new()
    };
    add(
        &format!("RLIMIT_NOFILE per fd table (--shards {shards})"),
        hard >= per_shard,
        format!(
            "hard {hard}, soft {} (the controller raises soft to hard)",
            crate::engine::sys::nofile_limit().unwrap_or(0)
        ),
        format!(
            "≥ {per_shard}: LimitNOFILE= in the systemd unit (tuning/tether.service) or tuning/limits.d-tether.conf{more_shards}"
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
    let files = plan.services.saturating_add(10_000);
    add(
        "fs.file-max",
        file_max >= files,
        file_max.to_string(),
        format!("≥ {files}: sysctl -w fs.file-max={}", files.max(1_048_576)),
    );
    for name in ["net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"] {
        let v = sysctl(name).unwrap_or(0);
        // After a controller restart every agent reconnects within its
        // first backoff (0-1 s), faster than the controller accepts. Each
        // shard listens on its own SO_REUSEPORT socket with its own queue,
        // so each should hold its share of the wave, up to the kernel's
        // 65535 ceiling.
        let want = listen_queue_want(plan.services, shards);
        add(
            name,
            v >= want,
            v.to_string(),
            format!(
                "≥ {want}, each of {shards} listeners' share of a reconnect wave: sysctl -w {name}={}",
                want.max(4096)
            ),
        );
    }
    // Connections through a Service VIP or a stateful firewall each hold a
    // conntrack entry for as long as they live.
    if let Some(max) = sysctl("net.netfilter.nf_conntrack_max") {
        let want = plan.services.saturating_add(plan.services / 4);
        add(
            "net.netfilter.nf_conntrack_max (conntrack is loaded)",
            max >= want,
            max.to_string(),
            format!(
                "≥ {want} if service connections pass conntrack (a Service VIP, a stateful firewall): sysctl -w net.netfilter.nf_conntrack_max={want}, or exempt the port (NOTRACK)"
            ),
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
    if let Some((lo, hi)) = port_range() {
        let inside = (lo..=hi).contains(&u64::from(listen_port));
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
    #[test]
    fn listen_queues_are_sized_per_shard() {
        use super::{listen_queue_shortfall, listen_queue_want};
        assert_eq!(listen_queue_want(300_000, 20), 15_000);
        assert_eq!(listen_queue_want(10, 2), 128);
        assert_eq!(listen_queue_want(1_000_000, 4), 65_535);
        let warned = listen_queue_shortfall(4096, 20, 15_000).expect("4096 < 15000");
        assert!(warned.contains("raise it to 15000"), "{warned}");
        assert!(listen_queue_shortfall(65_535, 20, 15_000).is_none());
    }

    use super::*;

    #[test]
    fn sizes_parse_and_show() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err() && parse_size("5 parsecs").is_err());
        assert_eq!(show_size(3 << 29), "1.5 GiB");
        assert_eq!(show_size(640 << 20), "640 MiB");
        let (limit, source) = memory_limit();
        assert!(limit > 0 && (source == "RAM" || source == "cgroup limit"));
    }

    #[test]
    fn chained_needs_twice_the_sockets_and_more_memory() {
        let plan = Plan::new(100_000, 30.0, 20_000, 2, Costs::built_in());
        assert_eq!(plan.direct.controller_sockets, 100_000);
        assert_eq!(plan.relay.gateway_sockets, 200_000);
        assert!(plan.relay.total_memory_bytes > 1.9 * plan.direct.total_memory_bytes);
        assert!(plan.nginx.total_memory_bytes > plan.relay.total_memory_bytes);
        // 20,000 fds per table: 100,000 services need 6 shards.
        assert_eq!(plan.shards, 6);
        assert!(plan.connections_per_shard + FD_RESERVE as u64 + plan.shards <= 20_000);
        assert!(plan.fits_one_controller);
        assert!(plan.render().contains("tether controller --shards 6"));
        // More than 1,024 shards can hold: several controllers, and no overflow.
        let huge = Plan::new(u64::MAX / 4, 30.0, 20_000, 2, Costs::built_in());
        assert_eq!(huge.shards, MAX_SHARDS);
        assert!(!huge.fits_one_controller);
        assert!(huge.render().contains("several controllers"));
        assert!((plan.pings_per_second - 100_000.0 / 30.0).abs() < 1e-6);
        let text = plan.render();
        assert!(
            text.contains("controller sockets") && text.contains("net.core.somaxconn = 65535"),
            "{text}"
        );
    }

    #[test]
    fn the_built_in_costs_are_the_committed_run() {
        let costs = Costs::built_in();
        assert!(costs.defaulted.is_empty(), "{:?}", costs.defaulted);
        assert!(costs.source.contains(BUILT_IN_PATH), "{}", costs.source);
        // Plausible, not pinned: the committed run may be redone.
        assert!((100.0..2_000.0).contains(&costs.controller_user_bytes));
        assert!((1_000.0..10_000.0).contains(&costs.kernel_bytes_per_socket));
        assert!(costs.nginx_user_bytes > costs.relay_user_bytes);
        assert!(costs.cpu_seconds_per_ping > 0.0 && costs.registrations_per_second > 0.0);
    }

    #[test]
    fn a_cluster_sizes_each_node_for_one_down_and_counts_etcd() {
        let costs = ClusterCosts::built_in();
        assert!(costs.view_bytes_per_instance > 0.0 && costs.bytes_per_instance > 0.0);
        let node = Plan::new(1_000_000, 30.0, 1 << 20, 16, Costs::built_in());
        let c = ClusterPlan::new(3_000_000, 4, node, costs);
        assert_eq!(
            (c.services_per_node, c.services_per_node_one_down),
            (750_000, 1_000_000)
        );
        assert_eq!(c.remote_instances_per_node, 2_250_000);
        assert_eq!(
            (c.etcd_keys, c.etcd_txns_to_publish_all),
            (3_000_004, 23_438)
        );
        assert_eq!(c.failover_services_per_survivor, 250_000);
        assert!(
            c.node_memory_to_provision_bytes
                > c.node.controller_memory_to_provision_bytes + 2_250_000.0 * 100.0
        );
        let text = c.render();
        assert!(text.contains("sized for 1000000 (one node down)"), "{text}");
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
        assert_eq!(costs.nginx_user_bytes, Costs::built_in().nginx_user_bytes);
        assert_eq!(costs.defaulted, ["nginx bytes"]);
        std::fs::write(&path, r#"{"scenario":"zombie"}"#).unwrap();
        assert!(format!("{:#}", Costs::from_results(&path).unwrap_err()).contains("compare"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
