//! The load test's `results.json`, as types: the `tether-loadtest` crate
//! writes them and `tether plan` reads them back, so a renamed field is a
//! compile error on both sides rather than a figure silently missing.
//!
//! Owns only the shapes (field names are camelCase on the wire, except
//! `meta`, whose names are older). A field a file lacks (an older harness,
//! a hand-made file) reads as zero; a run or a fit it lacks is `None`, and
//! the planner then takes those figures from its built-in run and says so. Never does: measure or compute; the
//! harness measures, the planner computes.

use serde::{Deserialize, Serialize};

/// Where a run's services connect: the controller itself, or a chained proxy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Services connect to the controller (tether's design).
    #[default]
    Direct,
    /// Through `tether gateway --chained`: terminates sockets, answers pings.
    Relay,
    /// Through nginx as a WebSocket proxy: passes frames (pings too) through.
    Nginx,
}

impl Topology {
    pub fn label(self) -> &'static str {
        match self {
            Topology::Direct => "direct",
            Topology::Relay => "chained (tether relay)",
            Topology::Nginx => "chained (nginx)",
        }
    }
}

/// What every run records about itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Meta {
    pub tether_version: String,
    pub kernel: String,
    pub cores: usize,
    pub started: String,
    /// Wall time from the start of the run to its report.
    #[serde(default)]
    pub seconds: f64,
    pub command: String,
}

/// One results file: which scenario, when and where, its configuration and
/// its figures (`R`: `CompareResults`, `ScaleResults`, or a `Value` for
/// scenarios nothing reads back).
#[derive(Serialize, Deserialize, Debug)]
pub struct ResultsFile<R> {
    pub scenario: String,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default)]
    pub config: serde_json::Value,
    pub results: R,
    #[serde(default)]
    pub plots: Vec<String>,
}

/// What one process (or nginx's master and workers) holds and costs.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcFigures {
    pub processes: usize,
    pub rss_start_kb: u64,
    pub rss_kb: u64,
    pub rss_growth_kb: i64,
    /// Established TCP connections it holds (from /proc/net/tcp).
    pub connections: usize,
    /// Distinct sockets in its fd tables (all threads' tables).
    pub socket_fds: usize,
    pub cpu_seconds_ramp: f64,
    pub cpu_seconds_hold: f64,
}

/// One topology at one N in a `compare` run.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct CompareRun {
    pub topology: Topology,
    pub services: usize,
    pub shards: usize,
    /// The controller's I/O driver (io_uring sockets are direct
    /// descriptors: they take no slot in any fd table).
    pub io: String,
    pub registered_up: f64,
    pub registration_seconds: f64,
    pub registrations_per_second: f64,
    pub controller: ProcFigures,
    pub gateway: Option<ProcFigures>,
    /// Connections the simulated services hold (one each, in both topologies).
    pub service_connections: usize,
    pub kernel_slab_growth_kb: i64,
    pub kernel_sunreclaim_growth_kb: i64,
    /// TCP pages in use by sockets' buffers (/proc/net/sockstat "mem").
    pub sockstat_tcp_mem_growth_pages: i64,
    /// RSS growth of controller and gateway plus the growth of unreclaimable
    /// kernel slab (all sockets, the services' ends included).
    pub total_memory_bytes: f64,
    pub memory_per_service_bytes: f64,
    pub user_memory_per_service_bytes: f64,
    pub kernel_memory_per_service_bytes: f64,
    /// discovery/lookup round trips timed by sampled services once all of
    /// their swarm process had registered (the hold, mostly).
    pub probes: u64,
    pub probe_p50_ms: Option<f64>,
    pub probe_p99_ms: Option<f64>,
    /// The controller's ping round trips during the hold (to the relay
    /// when chained through tether's).
    pub controller_ping_rtt_p50_ms: Option<f64>,
    pub controller_ping_rtt_p99_ms: Option<f64>,
    pub pings_during_hold: f64,
    pub downs_during_hold: f64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct CompareResults {
    pub runs: Vec<CompareRun>,
}

impl CompareResults {
    /// The run of `topology` at the largest N.
    pub fn largest(&self, topology: Topology) -> Option<&CompareRun> {
        self.runs
            .iter()
            .filter(|r| r.topology == topology)
            .max_by_key(|r| r.services)
    }
}

/// One N of a `scale` run (direct only).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct ScalePoint {
    pub services: usize,
    pub shards: usize,
    pub rss_start_kb: u64,
    pub rss_kb: u64,
    pub user_bytes: f64,
    pub kernel_slab_bytes: f64,
    pub kernel_sunreclaim_bytes: f64,
    pub registration_seconds: f64,
    pub cpu_seconds_ramp: f64,
    pub cpu_seconds_hold: f64,
    pub pings_during_hold: f64,
    /// Pings sent while the swarms were still registering.
    pub pings_during_ramp: f64,
    /// The floor (`tether-loadtest floor`: accept, 101, one answer per
    /// registration, pings) in the same run, against swarms started the
    /// same way.
    pub floor: Option<FloorPoint>,
}

/// The floor server's figures at one N, measured as the controller's are.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct FloorPoint {
    pub registration_seconds: f64,
    pub cpu_seconds_ramp: f64,
    pub cpu_seconds_hold: f64,
    pub pings_during_hold: f64,
    pub pings_during_ramp: f64,
    pub rss_start_kb: u64,
    pub rss_kb: u64,
}

/// y = intercept + slope·x, least squares.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    pub r2: f64,
}

/// The lines a `scale` run fits over its points (none with fewer than two).
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ScaleFits {
    pub user_bytes_per_service: Option<Fit>,
    pub kernel_bytes_per_service: Option<Fit>,
    pub total_bytes_per_service: Option<Fit>,
    pub hold_cores_per_service: Option<Fit>,
    pub register_cpu_seconds_per_service: Option<Fit>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
pub struct ScaleResults {
    pub points: Vec<ScalePoint>,
    pub fit: ScaleFits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_runs_read_back_as_types() {
        let compare: ResultsFile<CompareResults> =
            serde_json::from_str(include_str!("../loadtest/results/compare/results.json"))
                .expect("compare results parse");
        assert_eq!(compare.scenario, "compare");
        let direct = compare
            .results
            .largest(Topology::Direct)
            .expect("a direct run");
        assert!(direct.services >= 10_000 && direct.gateway.is_none());
        assert!(
            compare
                .results
                .largest(Topology::Relay)
                .is_some_and(|r| r.gateway.is_some())
        );
        let scale: ResultsFile<ScaleResults> =
            serde_json::from_str(include_str!("../loadtest/results/scale/results.json"))
                .expect("scale results parse");
        assert!(scale.results.points.len() >= 2);
        assert!(
            scale
                .results
                .fit
                .user_bytes_per_service
                .is_some_and(|f| f.slope > 0.0)
        );
    }
}
