//! `capacity`: N services on one controller, ramped then held. Prints what
//! an SRE plans a node with: registration rate, controller RSS growth per
//! service, kernel memory per socket, controller CPU per 10,000 pings at
//! the default 30 s interval, and downs during the hold (false downs:
//! every simulated service stays healthy).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::{procs, topology};

#[derive(clap::Args)]
pub struct CapacityArgs {
    #[arg(long, default_value_t = 300_000)]
    pub services: usize,
    #[arg(long, default_value_t = 16)]
    pub shards: usize,
    /// The controller's I/O driver: uring or epoll.
    #[arg(long, default_value = "uring")]
    pub io: String,
    /// Seconds to hold after the ramp.
    #[arg(long, default_value_t = 120)]
    pub hold: u64,
    /// New connections per second, in all.
    #[arg(long, default_value_t = 10_000.0)]
    pub connect_rate: f64,
    #[arg(long, default_value_t = 50_000)]
    pub per_swarm: usize,
    /// After the hold, count the controller's syscalls for this many
    /// seconds with `strace -c -f` (slows it while it runs, so it comes
    /// after the CPU figures); 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub syscalls: u64,
    /// Services connect with wss:// (the repository's test certificate).
    #[arg(long)]
    pub tls: bool,
    #[arg(long)]
    pub tether: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct Syscalls {
    pub seconds: u64,
    pub pings: u64,
    pub total: u64,
    pub per_ping: f64,
    /// (syscall, calls), most first.
    pub top: Vec<(String, u64)>,
}

#[derive(Serialize)]
pub struct CapacityReport {
    pub io: String,
    pub tls: bool,
    pub services: usize,
    pub shards: usize,
    pub registered: u64,
    pub registration_seconds: f64,
    pub registrations_per_second: f64,
    pub connect_rate: f64,
    pub controller_rss_start_kb: u64,
    pub controller_rss_loaded_kb: u64,
    /// After the hold: what the pings' buffers and timers left behind.
    pub controller_rss_after_hold_kb: u64,
    pub user_bytes_per_service: f64,
    pub user_bytes_per_service_after_hold: f64,
    /// Controller utime+stime over the ramp, per registration.
    pub controller_cpu_us_per_registration: f64,
    pub kernel_slab_bytes_per_socket: f64,
    pub kernel_sunreclaim_bytes_per_socket: f64,
    pub sockstat_tcp_mem_delta_pages: i64,
    pub hold_seconds: u64,
    pub pings_during_hold: u64,
    /// Checks that found life of the service's own and sent no ping.
    pub pings_skipped_during_hold: u64,
    pub controller_cpu_seconds_during_hold: f64,
    pub cpu_seconds_per_10k_pings: f64,
    pub downs_during_hold: u64,
    pub syscalls: Option<Syscalls>,
    pub kernel: String,
}

/// A counter or gauge as a whole number.
fn metric(text: &str, name: &str) -> u64 {
    crate::observe::metric(text, name) as u64
}

fn scrape(admin: &str) -> anyhow::Result<String> {
    crate::observe::scrape(admin)
}

pub fn run(args: CapacityArgs) -> anyhow::Result<CapacityReport> {
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let (tls_args, ca) = topology::test_tls();
    let mut extra = vec!["--io", &args.io];
    if args.tls {
        extra.extend(tls_args.iter().map(String::as_str));
    }
    let controller = topology::controller_with(&tether, args.shards, &extra)?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = controller.proc.pid();
    let rss_start = procs::status_kb(pid, "VmRSS")?;
    let kernel0 = procs::KernelMemory::now()?;
    let cpu_start = procs::cpu_seconds(pid)?;
    eprintln!(
        "controller ({}{}, {} shards) pid {pid}: VmRSS {rss_start} kB after start",
        args.io,
        if args.tls { ", TLS" } else { "" },
        args.shards
    );

    let (swarms, registration_seconds) = {
        let mut spec = topology::SwarmSpec::new(&controller.listen, args.services);
        spec.per_swarm = args.per_swarm;
        spec.connect_rate = args.connect_rate;
        spec.tls_ca = args.tls.then_some(ca);
        topology::start_swarms(&tether, &spec)?
    };
    let cpu_ramp = procs::cpu_seconds(pid)? - cpu_start;
    eprintln!(
        "{} registered in {registration_seconds:.1} s; settling 5 s",
        args.services
    );
    std::thread::sleep(Duration::from_secs(5));
    let rss_loaded = procs::status_kb(pid, "VmRSS").context("the controller died")?;
    let grown = procs::KernelMemory::since(kernel0)?;
    let (slab, sunr, sock) = (grown.slab_kb, grown.sunreclaim_kb, grown.tcp_mem_pages);

    let before = scrape(&controller.admin)?;
    let cpu_before = procs::cpu_seconds(pid)?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(args.hold) {
        std::thread::sleep(
            Duration::from_secs(10)
                .min(Duration::from_secs(args.hold).saturating_sub(started.elapsed())),
        );
        eprintln!(
            "holding: {:.0} s of {}",
            started.elapsed().as_secs_f64(),
            args.hold
        );
    }
    let cpu = procs::cpu_seconds(pid)? - cpu_before;
    let after = scrape(&controller.admin)?;
    let rss_after_hold = procs::status_kb(pid, "VmRSS").context("the controller died")?;
    let skipped = metric(&after, "tether_pings_skipped_total")
        - metric(&before, "tether_pings_skipped_total");
    let pings =
        metric(&after, "tether_pings_sent_total") - metric(&before, "tether_pings_sent_total");
    let downs = metric(&after, "tether_downs_total") - metric(&before, "tether_downs_total");
    let registered =
        metric(&after, "tether_services") - metric(&after, "tether_services{status=\"down\"}");
    let syscalls = if args.syscalls > 0 {
        Some(count_syscalls(&controller.admin, pid, args.syscalls)?)
    } else {
        None
    };
    topology::stop_all(swarms, controller);

    let n = args.services as f64;
    let sockets = 2.0 * n;
    Ok(CapacityReport {
        tls: args.tls,
        io: args.io,
        services: args.services,
        shards: args.shards,
        registered,
        registration_seconds,
        registrations_per_second: n / registration_seconds,
        connect_rate: args.connect_rate,
        controller_rss_start_kb: rss_start,
        controller_rss_loaded_kb: rss_loaded,
        controller_rss_after_hold_kb: rss_after_hold,
        user_bytes_per_service: (rss_loaded as f64 - rss_start as f64) * 1024.0 / n,
        user_bytes_per_service_after_hold: (rss_after_hold as f64 - rss_start as f64) * 1024.0 / n,
        controller_cpu_us_per_registration: cpu_ramp * 1e6 / n,
        kernel_slab_bytes_per_socket: slab as f64 * 1024.0 / sockets,
        kernel_sunreclaim_bytes_per_socket: sunr as f64 * 1024.0 / sockets,
        sockstat_tcp_mem_delta_pages: sock,
        hold_seconds: args.hold,
        pings_during_hold: pings,
        pings_skipped_during_hold: skipped,
        controller_cpu_seconds_during_hold: cpu,
        cpu_seconds_per_10k_pings: if pings > 0 {
            cpu * 10_000.0 / pings as f64
        } else {
            f64::NAN
        },
        downs_during_hold: downs,
        syscalls,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    })
}

/// `strace -c -f` on the controller for `seconds`; pings over the same window.
fn count_syscalls(admin: &str, pid: u32, seconds: u64) -> anyhow::Result<Syscalls> {
    let out = std::env::temp_dir().join(format!("tether-strace-{pid}.txt"));
    let before = metric(&scrape(admin)?, "tether_pings_sent_total");
    let status = std::process::Command::new("timeout")
        .args([
            "-s",
            "INT",
            &seconds.to_string(),
            "strace",
            "-c",
            "-f",
            "-q",
            "-o",
        ])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .status()
        .context("running strace (install it: apt-get install strace)")?;
    let pings = metric(&scrape(admin)?, "tether_pings_sent_total") - before;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("strace wrote nothing ({status})"))?;
    let _ = std::fs::remove_file(&out);
    // Rows: % time, seconds, usecs/call, calls, [errors], syscall.
    let mut rows: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = (*f.last()?).to_string();
            let calls = f.get(3)?.parse().ok()?;
            Some((name, calls))
        })
        .collect();
    let total = rows
        .iter()
        .find(|(n, _)| n == "total")
        .map(|(_, c)| *c)
        .unwrap_or(0);
    rows.retain(|(n, _)| n != "total");
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    rows.truncate(6);
    Ok(Syscalls {
        seconds,
        pings,
        total,
        per_ping: total as f64 / pings.max(1) as f64,
        top: rows,
    })
}

pub fn print(r: &CapacityReport) {
    println!(
        "driver                          {}{}",
        r.io,
        if r.tls { ", wss:// (TLS 1.3)" } else { "" }
    );
    println!(
        "services registered             {} of {} ({} shards)",
        r.registered, r.services, r.shards
    );
    println!(
        "registration                    {:.1} s, {:.0} services/s (swarm connect rate {:.0}/s)",
        r.registration_seconds, r.registrations_per_second, r.connect_rate
    );
    println!(
        "controller VmRSS start/loaded   {} kB / {} kB",
        r.controller_rss_start_kb, r.controller_rss_loaded_kb
    );
    println!(
        "user memory per service         {:.0} bytes after the ramp, {:.0} after the hold (VmRSS {} kB)",
        r.user_bytes_per_service,
        r.user_bytes_per_service_after_hold,
        r.controller_rss_after_hold_kb
    );
    println!(
        "controller CPU per registration {:.1} µs (utime+stime over the ramp, its pings included)",
        r.controller_cpu_us_per_registration
    );
    println!(
        "kernel per socket (both ends)   {:.0} bytes Slab, {:.0} bytes SUnreclaim; sockstat TCP mem {:+} pages",
        r.kernel_slab_bytes_per_socket,
        r.kernel_sunreclaim_bytes_per_socket,
        r.sockstat_tcp_mem_delta_pages
    );
    println!(
        "hold {} s: pings {} sent, {} skipped; controller CPU {:.2} s = {:.3} s per 10,000 pings",
        r.hold_seconds,
        r.pings_during_hold,
        r.pings_skipped_during_hold,
        r.controller_cpu_seconds_during_hold,
        r.cpu_seconds_per_10k_pings
    );
    println!(
        "downs during the hold           {} (every service stayed healthy: these are false downs)",
        r.downs_during_hold
    );
    if let Some(s) = &r.syscalls {
        let top: Vec<String> = s.top.iter().map(|(n, c)| format!("{n} {c}")).collect();
        println!(
            "syscalls ({} s under strace)     {} for {} pings = {:.2} per ping; most: {}",
            s.seconds,
            s.total,
            s.pings,
            s.per_ping,
            top.join(", ")
        );
    }
    println!("kernel                          {}", r.kernel);
}
