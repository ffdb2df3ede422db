//! tether-loadtest: runs the controller and swarms of simulated services
//! as real processes on loopback and reports what they cost, per
//! ../shared/MEASURING.md. Scenarios grow with the load-test issue; today:
//! `memory`, `admin` and `capacity`.

mod admin;
mod capacity;
mod memory;
mod procs;
mod topology;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tether-loadtest", about = "Measure tether on this machine")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Controller RSS growth per registered idle service, kernel memory per socket.
    Memory(memory::MemoryArgs),
    /// Latency of the admin API's service listing at N services.
    Admin(admin::AdminArgs),
    /// N services ramped and held: memory, registration rate, ping cost, false downs.
    Capacity(capacity::CapacityArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Memory(args) => {
            let json = args.json.clone();
            let report = memory::run(args)?;
            memory::print(&report);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
        }
        Scenario::Capacity(args) => {
            let json = args.json.clone();
            let report = capacity::run(args)?;
            capacity::print(&report);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
        }
        Scenario::Admin(args) => {
            let json = args.json.clone();
            let report = admin::run(args)?;
            admin::print(&report);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
        }
    }
    Ok(())
}
