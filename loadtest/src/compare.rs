//! `compare`: the same N services direct and chained, side by side:
//! connections each process holds, their memory (user and kernel), CPU,
//! registration rate and round-trip latency.

use std::path::Path;
use std::time::Duration;

use crate::common::{Common, Stack, Topology, runnable};
use crate::observe::{self, histogram_quantile_between, metric};
use crate::procs::{self, Proc};
use crate::report::{Report, Section, meta, n, opt};
use crate::sockets;
use crate::topology;
use crate::{plots, progress};
use tether::results::{CompareResults, CompareRun as Run, ProcFigures};

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Services; a comma-separated list runs each (memory vs N is plotted).
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub services: Vec<usize>,
    /// Topologies to run (nginx is skipped when not installed).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,relay,nginx"
    )]
    pub topologies: Vec<Topology>,
    /// Hold after the ramp, for steady-state CPU and latency.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub hold: Duration,
    /// The controller's ping interval.
    #[arg(long, default_value = "5s")]
    pub ping_interval: String,
    /// Sampled services time a discovery/lookup round trip this often.
    #[arg(long, default_value = "1s")]
    pub probe_every: String,
    /// One service in this many is sampled.
    #[arg(long, default_value_t = 100)]
    pub probe_one_in: usize,
    #[command(flatten)]
    pub common: Common,
}

/// RSS and CPU of a set of pids, from a starting point.
struct Watch {
    pids: Vec<u32>,
    rss0: u64,
    cpu0: f64,
}

impl Watch {
    fn new(pids: Vec<u32>) -> Watch {
        let mut w = Watch {
            pids,
            rss0: 0,
            cpu0: 0.0,
        };
        (w.rss0, w.cpu0) = (w.rss(), w.cpu());
        w
    }
    fn rss(&self) -> u64 {
        self.pids
            .iter()
            .filter_map(|p| procs::status_kb(*p, "VmRSS").ok())
            .sum()
    }
    fn cpu(&self) -> f64 {
        self.pids
            .iter()
            .filter_map(|p| procs::cpu_seconds(*p).ok())
            .sum()
    }
    fn fds(&self) -> usize {
        self.pids.iter().map(|p| procs::socket_fds(*p)).sum()
    }
}

fn gateway_pids(stack: &Stack) -> Vec<u32> {
    stack.relay.as_ref().map_or(Vec::new(), |r| r.pids())
}

fn run_one(
    args: &CompareArgs,
    tether: &Path,
    topology: Topology,
    services: usize,
    dir: &Path,
) -> anyhow::Result<Run> {
    let shards = args.common.shards_for(services);
    eprintln!(
        "== {} with {services} services ({shards} shards)",
        topology.label()
    );
    let stack = Stack::start(
        tether,
        topology,
        services,
        shards,
        &["--ping-interval", &args.ping_interval],
        dir,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let controller = Watch::new(vec![stack.controller.proc.pid()]);
    let gateway = Watch::new(gateway_pids(&stack));
    let kernel0 = procs::KernelMemory::now()?;

    let mut spec = args.common.swarm(stack.target(), services);
    spec.extra = vec![
        "--probe-every".into(),
        args.probe_every.clone(),
        "--probe-one-in".into(),
        args.probe_one_in.to_string(),
    ];
    let (mut swarms, registration_seconds) = topology::start_swarms(tether, &spec)?;
    progress::hold(Duration::from_secs(3), "settling", || {});

    let (controller_cpu_ramp, gateway_cpu_ramp) = (
        controller.cpu() - controller.cpu0,
        gateway.cpu() - gateway.cpu0,
    );
    let grown = procs::KernelMemory::since(kernel0)?;
    let (slab, sunr, pages) = (grown.slab_kb, grown.sunreclaim_kb, grown.tcp_mem_pages);
    let (controller_rss, gateway_rss) = (controller.rss(), gateway.rss());
    let table = sockets::Table::read()?;
    let controller_port = stack.controller.port;
    let controller_conns = table.served_on(controller_port);
    let (gateway_conns, service_conns) = match &stack.relay {
        Some(relay) => (
            table.served_on(relay.port) + table.opened_to(controller_port),
            table.opened_to(relay.port),
        ),
        None => (0, table.opened_to(controller_port)),
    };
    let (controller_fds, gateway_fds) = (controller.fds(), gateway.fds());

    let before = observe::scrape(&stack.controller.admin)?;
    let (c1, g1) = (controller.cpu(), gateway.cpu());
    progress::hold(args.hold, "holding", || {});
    let (controller_cpu_hold, gateway_cpu_hold) = (controller.cpu() - c1, gateway.cpu() - g1);
    let after = observe::scrape(&stack.controller.admin)?;
    // Let the swarms print their latest probe figures.
    std::thread::sleep(Duration::from_millis(1100));
    let probe = topology::probe_latency(&mut swarms);
    let io = stack.controller.io.clone();
    stop(stack, swarms);

    let figures = |w: &Watch, rss: u64, conns, fds, ramp, hold| ProcFigures {
        processes: w.pids.len(),
        rss_start_kb: w.rss0,
        rss_kb: rss,
        rss_growth_kb: rss as i64 - w.rss0 as i64,
        connections: conns,
        socket_fds: fds,
        cpu_seconds_ramp: ramp,
        cpu_seconds_hold: hold,
    };
    let controller_figures = figures(
        &controller,
        controller_rss,
        controller_conns,
        controller_fds,
        controller_cpu_ramp,
        controller_cpu_hold,
    );
    let gateway_figures = (topology != Topology::Direct).then(|| {
        figures(
            &gateway,
            gateway_rss,
            gateway_conns,
            gateway_fds,
            gateway_cpu_ramp,
            gateway_cpu_hold,
        )
    });
    let user_kb =
        controller_figures.rss_growth_kb + gateway_figures.as_ref().map_or(0, |g| g.rss_growth_kb);
    let total = (user_kb + sunr) as f64 * 1024.0;
    let per = |v: f64| v / services as f64;
    let rtt = |q| {
        histogram_quantile_between(&before, &after, "tether_pong_rtt_seconds", q)
            .map(|s| s * 1000.0)
    };
    let run = Run {
        topology,
        services,
        shards,
        io,
        registered_up: metric(&after, "tether_services{status=\"up\"}"),
        registration_seconds,
        registrations_per_second: services as f64 / registration_seconds.max(1e-3),
        controller: controller_figures,
        gateway: gateway_figures,
        service_connections: service_conns,
        kernel_slab_growth_kb: slab,
        kernel_sunreclaim_growth_kb: sunr,
        sockstat_tcp_mem_growth_pages: pages,
        total_memory_bytes: total,
        memory_per_service_bytes: per(total),
        user_memory_per_service_bytes: per(user_kb as f64 * 1024.0),
        kernel_memory_per_service_bytes: per(sunr as f64 * 1024.0),
        probes: probe.map_or(0, |p| p.0),
        probe_p50_ms: probe.map(|p| p.1 as f64 / 1000.0),
        probe_p99_ms: probe.map(|p| p.2 as f64 / 1000.0),
        controller_ping_rtt_p50_ms: rtt(0.5),
        controller_ping_rtt_p99_ms: rtt(0.99),
        pings_during_hold: metric(&after, "tether_pings_sent_total")
            - metric(&before, "tether_pings_sent_total"),
        downs_during_hold: metric(&after, "tether_downs_total")
            - metric(&before, "tether_downs_total"),
    };
    eprintln!(
        "{}: {} B/service ({} user + {} kernel), controller holds {}, gateway {}",
        topology.label(),
        n(run.memory_per_service_bytes),
        n(run.user_memory_per_service_bytes),
        n(run.kernel_memory_per_service_bytes),
        controller_conns,
        gateway_conns
    );
    Ok(run)
}

fn stop(stack: Stack, swarms: Vec<Proc>) {
    stack.stop(swarms);
    // Let the kernel free the sockets before the next baseline.
    std::thread::sleep(Duration::from_secs(3));
}

pub fn run(args: CompareArgs) -> anyhow::Result<Report> {
    let tether = args.common.tether()?;
    let out = crate::report::out_dir(&args.common.out, "compare");
    let (topologies, skipped) = runnable(&args.topologies);
    let mut runs = Vec::new();
    for &services in &args.services {
        for &t in &topologies {
            runs.push(run_one(&args, &tether, t, services, &out)?);
        }
    }

    let mut held = Section::new(
        "Connections held",
        &[
            "topology",
            "services",
            "controller I/O",
            "controller conns",
            "gateway conns",
            "service conns",
            "controller socket fds",
            "gateway socket fds",
            "gateway processes",
        ],
    );
    let mut memory = Section::new(
        "Memory",
        &[
            "topology",
            "services",
            "controller RSS growth MiB",
            "gateway RSS growth MiB",
            "kernel slab growth MiB",
            "total MiB",
            "bytes per service",
            "× direct",
        ],
    );
    let mut cost = Section::new(
        "CPU and latency",
        &[
            "topology",
            "services",
            "registrations/s",
            "controller CPU s (ramp / hold)",
            "gateway CPU s (ramp / hold)",
            "lookup p50 / p99 ms",
            "controller ping RTT p50 / p99 ms",
            "downs in hold",
        ],
    );
    let mib = |kb: i64| n(kb as f64 / 1024.0);
    for r in &runs {
        let (t, s) = (r.topology.label().to_string(), r.services.to_string());
        let direct = runs
            .iter()
            .find(|d| d.services == r.services && d.topology == Topology::Direct);
        let ratio = direct.map_or("n/a".into(), |d| {
            format!(
                "{:.2}",
                r.memory_per_service_bytes / d.memory_per_service_bytes
            )
        });
        let g = r.gateway.as_ref();
        held.row(vec![
            t.clone(),
            s.clone(),
            r.io.clone(),
            r.controller.connections.to_string(),
            g.map_or("-".into(), |g| g.connections.to_string()),
            r.service_connections.to_string(),
            r.controller.socket_fds.to_string(),
            g.map_or("-".into(), |g| g.socket_fds.to_string()),
            g.map_or("-".into(), |g| g.processes.to_string()),
        ]);
        memory.row(vec![
            t.clone(),
            s.clone(),
            mib(r.controller.rss_growth_kb),
            g.map_or("-".into(), |g| mib(g.rss_growth_kb)),
            mib(r.kernel_sunreclaim_growth_kb),
            n(r.total_memory_bytes / 1048576.0),
            n(r.memory_per_service_bytes),
            ratio,
        ]);
        cost.row(vec![
            t,
            s,
            n(r.registrations_per_second),
            format!(
                "{} / {}",
                n(r.controller.cpu_seconds_ramp),
                n(r.controller.cpu_seconds_hold)
            ),
            g.map_or("-".into(), |g| {
                format!("{} / {}", n(g.cpu_seconds_ramp), n(g.cpu_seconds_hold))
            }),
            format!("{} / {}", opt(r.probe_p50_ms), opt(r.probe_p99_ms)),
            format!(
                "{} / {}",
                opt(r.controller_ping_rtt_p50_ms),
                opt(r.controller_ping_rtt_p99_ms)
            ),
            n(r.downs_during_hold),
        ]);
    }
    held.note("Connections are established TCP connections from /proc/net/tcp; socket fds are the distinct sockets in all of a process's fd tables (tether's shards and relay threads each have their own). On io_uring the controller's sockets are direct descriptors, registered with the ring, and take no fd-table slot: its count is then its listeners and admin sockets only.");
    memory.note("Kernel slab growth is `SUnreclaim` in /proc/meminfo and covers every socket on the machine, the services' own ends included (one per service in every topology). Total = RSS growth of controller and gateway + kernel slab growth.");
    cost.note(format!(
        "Lookup round trips: one service in {} times a discovery/lookup every {}, from when its swarm process had all its services registered; the controller's ping RTT is over the hold. Behind tether's relay the controller's ping RTT is its round trip to the relay, which answers for the service; nginx passes pings through to the service.",
        args.probe_one_in, args.probe_every
    ));
    for why in &skipped {
        held.note(why.clone());
    }

    let mut plots = Vec::new();
    let series: Vec<plots::Series> = topologies
        .iter()
        .map(|t| plots::Series {
            label: t.label().into(),
            points: runs
                .iter()
                .filter(|r| r.topology == *t)
                .map(|r| (r.services as f64, r.total_memory_bytes / 1048576.0))
                .collect(),
        })
        .collect();
    std::fs::create_dir_all(&out)?;
    plots::lines(
        &out.join("memory-vs-n.svg"),
        "Memory (user + kernel) vs services",
        "services",
        "MiB",
        &series,
    )?;
    plots.push((
        "memory-vs-n.svg".to_string(),
        "Memory vs N, direct and chained".to_string(),
    ));

    let report = Report {
        scenario: "compare".into(),
        meta: meta(&tether),
        config: serde_json::json!({
            "services": args.services,
            "topologies": topologies,
            "skipped": skipped,
            "holdSeconds": args.hold.as_secs_f64(),
            "pingInterval": args.ping_interval,
            "probeEvery": args.probe_every,
            "probeOneIn": args.probe_one_in,
            "common": args.common.config(),
        }),
        results: serde_json::to_value(CompareResults { runs })?,
        sections: vec![held, memory, cost],
        plots,
    };
    report.write(&out)?;
    Ok(report)
}
