//! tether-loadtest: runs the controller, chained relays and swarms of
//! simulated services as real processes on loopback and reports what they
//! cost, per ../shared/MEASURING.md.
//!
//! The scenarios (`scale`, `compare`, `zombie`, `redeploy`, `herd`)
//! write `results.json`, `report.md` and SVG plots into `--out DIR`; the
//! older single-figure ones (`memory`, `admin`, `capacity`) print and
//! optionally write JSON.

mod abuse;
mod admin;
mod capacity;
mod cluster;
mod common;
mod compare;
mod floor;
mod herd;
mod memory;
mod observe;
mod plots;
mod procs;
mod progress;
mod redeploy;
mod report;
mod scale;
mod sockets;
mod topology;
mod ui;
mod wave;
mod zombie;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tether-loadtest",
    about = "Measure tether on this machine: direct vs gateway-chained"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N swept, direct: controller memory and CPU per service (fitted).
    Scale(scale::ScaleArgs),
    /// The same N direct and chained: connections, memory, CPU, latency.
    Compare(compare::CompareArgs),
    /// Freeze K services (SIGSTOP): time until the controller reports each down.
    Zombie(zombie::ZombieArgs),
    /// Restart the gateway during a hold: false downs, reconnect wave, recovery.
    Redeploy(redeploy::RedeployArgs),
    /// Restart the controller: reconnect curve with and without jitter.
    Herd(herd::HerdArgs),
    /// Controller RSS growth per registered idle service, kernel memory per socket.
    Memory(memory::MemoryArgs),
    /// Latency of the admin API's service listing at N services.
    Admin(admin::AdminArgs),
    /// N services ramped and held: memory, registration rate, ping cost, false downs.
    Capacity(capacity::CapacityArgs),
    /// Issue 10's attacks, one after another: controller RSS before, at peak and after, cuts, bystanders served.
    Abuse(abuse::AbuseArgs),
    /// The floor the controller's CPU is held against: a minimal epoll
    /// server (accept, 101, one answer per registration, pings); `scale`
    /// starts it by itself.
    Floor(floor::FloorArgs),
    /// The gateway's added latency against the admin plane, side by side,
    /// and the Admin UI's speed in headless Chromium, at N services.
    Ui(ui::UiArgs),
    /// N services over 2-3 controller nodes on one etcd (started here):
    /// etcd writes during the wave and at rest, bytes per instance, view
    /// convergence, and a node SIGKILLed (tether built --features cluster).
    Cluster(cluster::ClusterArgs),
    /// The cluster layer's etcd transactions alone, at a registration
    /// wave's rate (default 50,000/s) on an etcd started here: does etcd
    /// keep pace, one transaction in flight and several (tether built
    /// --features cluster).
    EtcdWave(wave::WaveArgs),
}

fn write_json<T: serde::Serialize>(
    path: Option<std::path::PathBuf>,
    value: &T,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    report::mark_start();
    let report = match Cli::parse().scenario {
        Scenario::Scale(args) => scale::run(args)?,
        Scenario::Compare(args) => compare::run(args)?,
        Scenario::Zombie(args) => zombie::run(args)?,
        Scenario::Redeploy(args) => redeploy::run(args)?,
        Scenario::Herd(args) => herd::run(args)?,
        Scenario::Memory(args) => {
            let json = args.json.clone();
            let report = memory::run(args)?;
            memory::print(&report);
            return write_json(json, &report);
        }
        Scenario::Capacity(args) => {
            let json = args.json.clone();
            let report = capacity::run(args)?;
            capacity::print(&report);
            return write_json(json, &report);
        }
        Scenario::Abuse(args) => {
            let json = args.json.clone();
            let report = abuse::run(args)?;
            abuse::print(&report);
            return write_json(json, &report);
        }
        Scenario::Floor(args) => return floor::run(args),
        Scenario::Cluster(args) => {
            let json = args.json.clone();
            let report = cluster::run(args)?;
            cluster::print(&report);
            return write_json(json, &report);
        }
        Scenario::EtcdWave(args) => {
            let json = args.json.clone();
            let report = wave::run(args)?;
            wave::print(&report);
            return write_json(json, &report);
        }
        Scenario::Ui(args) => {
            let json = args.json.clone();
            let report = ui::run(args)?;
            ui::print(&report);
            return write_json(json, &report);
        }
        Scenario::Admin(args) => {
            let json = args.json.clone();
            let report = admin::run(args)?;
            admin::print(&report);
            return write_json(json, &report);
        }
    };
    report.print();
    Ok(())
}
