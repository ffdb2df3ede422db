//! What the scenarios share: their common flags, the topologies under
//! test and starting them.

use std::path::{Path, PathBuf};

use crate::procs::{self, Proc};
use crate::topology::{self, Controller, Relay};

#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Where results.json, report.md and the plots go
    /// [default: loadtest-out/<scenario>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The tether binary [default: next to this one].
    #[arg(long)]
    pub tether: Option<PathBuf>,
    /// Controller shards [default: one per core, more so that none holds
    /// over 15,000 services (RLIMIT_NOFILE is per fd table)].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Services per swarm process.
    #[arg(long, default_value_t = 50_000)]
    pub per_swarm: usize,
    /// New connections per second while ramping, over all swarm processes.
    #[arg(long, default_value_t = 10_000.0)]
    pub connect_rate: f64,
}

impl Common {
    pub fn shards_for(&self, services: usize) -> usize {
        self.shards.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.max(services.div_ceil(15_000))
        })
    }

    pub fn tether(&self) -> anyhow::Result<PathBuf> {
        procs::tether_binary(self.tether.as_deref())
    }

    /// A swarm group of `services` to `target`, paced and split per these flags.
    pub fn swarm<'a>(&self, target: &'a str, services: usize) -> topology::SwarmSpec<'a> {
        let mut spec = topology::SwarmSpec::new(target, services);
        spec.per_swarm = self.per_swarm;
        spec.connect_rate = self.connect_rate;
        spec
    }

    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "perSwarm": self.per_swarm,
            "connectRate": self.connect_rate,
            "shards": self.shards,
        })
    }
}

pub use tether::results::Topology;

/// The topologies asked for that can run here; nginx is skipped, and the
/// reason returned, when it is not installed.
pub fn runnable(asked: &[Topology]) -> (Vec<Topology>, Vec<String>) {
    let mut skipped = Vec::new();
    let run = asked
        .iter()
        .copied()
        .filter(|t| {
            let ok = *t != Topology::Nginx || topology::nginx_binary().is_some();
            if !ok {
                let why = "nginx: skipped, not installed (apt-get install nginx-light)".to_string();
                eprintln!("{why}");
                skipped.push(why);
            }
            ok
        })
        .collect();
    (run, skipped)
}

/// A controller and, chained, the relay in front of it.
pub struct Stack {
    pub topology: Topology,
    pub controller: Controller,
    pub relay: Option<Relay>,
    services: usize,
    dir: PathBuf,
}

impl Stack {
    /// `dir` holds what a relay needs on disk (nginx's config and logs).
    pub fn start(
        tether: &Path,
        topology: Topology,
        services: usize,
        shards: usize,
        controller_flags: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Stack> {
        let controller = topology::controller_with(tether, shards, controller_flags)?;
        let relay = Stack::relay(tether, topology, &controller, services, dir, None)?;
        Ok(Stack {
            topology,
            controller,
            relay,
            services,
            dir: dir.to_path_buf(),
        })
    }

    fn relay(
        tether: &Path,
        topology: Topology,
        controller: &Controller,
        services: usize,
        dir: &Path,
        port: Option<u16>,
    ) -> anyhow::Result<Option<Relay>> {
        Ok(match topology {
            Topology::Direct => None,
            Topology::Relay => Some(topology::tether_relay(
                tether,
                &controller.listen,
                services,
                port,
            )?),
            Topology::Nginx => Some(topology::nginx_relay(
                controller.port,
                services,
                &dir.join("nginx"),
                port,
            )?),
        })
    }

    /// host:port services connect to.
    pub fn target(&self) -> &str {
        self.relay
            .as_ref()
            .map_or(&self.controller.listen, |r| &r.listen)
    }

    /// Stops the relay (as a redeploy does: SIGTERM) and starts a new one
    /// on the same port.
    pub fn restart_relay(&mut self, tether: &Path) -> anyhow::Result<()> {
        let Some(old) = self.relay.take() else {
            anyhow::bail!("no relay in the direct topology")
        };
        let port = old.port;
        old.stop();
        self.relay = Stack::relay(
            tether,
            self.topology,
            &self.controller,
            self.services,
            &self.dir,
            Some(port),
        )?;
        Ok(())
    }

    pub fn stop(self, swarms: Vec<Proc>) {
        for swarm in swarms {
            swarm.stop(std::time::Duration::from_secs(10));
        }
        if let Some(relay) = self.relay {
            relay.stop();
        }
        self.controller
            .proc
            .stop(std::time::Duration::from_secs(10));
    }
}
