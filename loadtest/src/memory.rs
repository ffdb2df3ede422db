//! `memory`: the controller's RSS growth per registered idle service, and
//! the kernel's memory per connection, measured as ../shared/MEASURING.md
//! defines them. One controller, swarm processes on 127.0.0.x, N services
//! with realistic metadata (100 serviceIds, a version, an envTag, a tag).

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::{procs, topology};

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Services to register.
    #[arg(long, default_value_t = 50_000)]
    pub services: usize,
    /// Controller shards.
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// The controller's I/O driver: auto, uring or epoll.
    #[arg(long, default_value = "auto")]
    pub io: String,
    /// Services per swarm process.
    #[arg(long, default_value_t = 50_000)]
    pub per_swarm: usize,
    /// Seconds to let the ramp settle before reading RSS.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// The tether binary (default: next to this one).
    #[arg(long)]
    pub tether: Option<std::path::PathBuf>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Measure plain and then wss:// (the repository's test certificate)
    /// at the same N, and print TLS's cost on top of plain.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Serialize)]
pub struct MemoryReport {
    /// Services connected with wss://.
    pub tls: bool,
    pub services: usize,
    pub shards: usize,
    pub controller_rss_start_kb: u64,
    pub controller_rss_loaded_kb: u64,
    pub user_bytes_per_service: f64,
    pub slab_delta_kb: i64,
    pub sunreclaim_delta_kb: i64,
    pub sockstat_tcp_mem_delta_pages: i64,
    /// Both ends run on this machine: 2 sockets per service.
    pub kernel_bytes_per_socket_slab: f64,
    pub kernel_bytes_per_socket_sockstat: f64,
    pub registration_seconds: f64,
    pub registrations_per_second: f64,
    /// Controller utime+stime over the ramp and settle.
    pub controller_cpu_seconds: f64,
    pub kernel: String,
}

/// One run per transport: plain, and with `--tls` wss:// after it.
pub fn run(args: MemoryArgs) -> anyhow::Result<Vec<MemoryReport>> {
    let mut reports = vec![run_once(&args, false)?];
    if args.tls {
        reports.push(run_once(&args, true)?);
    }
    Ok(reports)
}

fn run_once(args: &MemoryArgs, tls: bool) -> anyhow::Result<MemoryReport> {
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let (tls_args, ca) = topology::test_tls();
    let mut extra = vec!["--io", &args.io];
    if tls {
        extra.extend(tls_args.iter().map(String::as_str));
    }
    let controller = topology::controller_with(&tether, args.shards, &extra)?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = controller.proc.pid();
    let rss_start = procs::status_kb(pid, "VmRSS")?;
    let kernel0 = procs::KernelMemory::now()?;
    eprintln!(
        "controller pid {pid} on {}: VmRSS {rss_start} kB after start",
        controller.listen
    );
    let cpu_start = procs::cpu_seconds(pid)?;
    let (swarms, registration_seconds) = {
        let mut spec = topology::SwarmSpec::new(&controller.listen, args.services);
        spec.per_swarm = args.per_swarm;
        spec.tls_ca = tls.then_some(ca);
        topology::start_swarms(&tether, &spec)?
    };
    eprintln!(
        "all {} registered after {registration_seconds:.1} s; settling {} s",
        args.services, args.settle
    );
    std::thread::sleep(Duration::from_secs(args.settle));
    let rss_loaded = procs::status_kb(pid, "VmRSS").context("the controller died")?;
    let controller_cpu_seconds = procs::cpu_seconds(pid)? - cpu_start;
    let grown = procs::KernelMemory::since(kernel0)?;
    let (slab, sunr, sock) = (grown.slab_kb, grown.sunreclaim_kb, grown.tcp_mem_pages);
    topology::stop_all(swarms, controller);
    let n = args.services as f64;
    let sockets = 2.0 * n;
    Ok(MemoryReport {
        tls,
        services: args.services,
        shards: args.shards,
        controller_rss_start_kb: rss_start,
        controller_rss_loaded_kb: rss_loaded,
        user_bytes_per_service: (rss_loaded as f64 - rss_start as f64) * 1024.0 / n,
        slab_delta_kb: slab,
        sunreclaim_delta_kb: sunr,
        sockstat_tcp_mem_delta_pages: sock,
        kernel_bytes_per_socket_slab: slab as f64 * 1024.0 / sockets,
        kernel_bytes_per_socket_sockstat: sock as f64 * 4096.0 / sockets,
        registration_seconds,
        registrations_per_second: n / registration_seconds,
        controller_cpu_seconds,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    })
}

pub fn print(reports: &[MemoryReport]) {
    for r in reports {
        print_one(r);
    }
    if let [plain, tls] = reports {
        let n = plain.services as f64;
        println!("--- wss:// against plain, same N, same shards");
        println!(
            "TLS idle cost                  {:+.0} bytes per connection ({:.0} vs {:.0})",
            tls.user_bytes_per_service - plain.user_bytes_per_service,
            tls.user_bytes_per_service,
            plain.user_bytes_per_service
        );
        let per = |r: &MemoryReport| r.controller_cpu_seconds / n * 1e6;
        let handshake = per(tls) - per(plain);
        println!(
            "controller CPU per registration {:.1} µs wss vs {:.1} µs plain: {:.1} µs more, {:.0} handshakes per second per core",
            per(tls),
            per(plain),
            handshake,
            1e6 / handshake.max(1e-3)
        );
    }
}

fn print_one(r: &MemoryReport) {
    println!(
        "--- {}",
        if r.tls {
            "wss:// (TLS 1.3)"
        } else {
            "ws:// (plain)"
        }
    );
    println!("services registered            {}", r.services);
    println!("controller shards              {}", r.shards);
    println!(
        "controller VmRSS start/loaded  {} kB / {} kB",
        r.controller_rss_start_kb, r.controller_rss_loaded_kb
    );
    println!(
        "user memory per service        {:.0} bytes   (target <= 256)",
        r.user_bytes_per_service
    );
    println!(
        "kernel per socket (both ends)  {:.0} bytes Slab, {:.0} bytes sockstat TCP mem",
        r.kernel_bytes_per_socket_slab, r.kernel_bytes_per_socket_sockstat
    );
    println!(
        "  (Slab {:+} kB, SUnreclaim {:+} kB, sockstat {:+} pages)",
        r.slab_delta_kb, r.sunreclaim_delta_kb, r.sockstat_tcp_mem_delta_pages
    );
    println!(
        "registration                   {:.1} s, {:.0} services/s",
        r.registration_seconds, r.registrations_per_second
    );
    println!(
        "controller CPU (ramp + settle) {:.2} s",
        r.controller_cpu_seconds
    );
    println!("kernel                         {}", r.kernel);
}
