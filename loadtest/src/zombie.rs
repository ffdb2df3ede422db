//! `zombie`: K services freeze without closing their sockets (SIGSTOP of
//! the swarm process that holds exactly them); how long until the
//! controller reports each one down, direct and chained.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::{Common, Stack, Topology, runnable};
use crate::observe::Watcher;
use crate::report::{Report, Section, meta, n, opt};
use crate::topology::{self, SwarmSpec};
use crate::{plots, progress};

#[derive(clap::Args, Debug)]
pub struct ZombieArgs {
    /// Healthy services alongside the zombies.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Services frozen (one swarm process holds exactly these).
    #[arg(long, default_value_t = 100)]
    pub zombies: usize,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,relay,nginx"
    )]
    pub topologies: Vec<Topology>,
    /// The controller's ping interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub ping_interval: Duration,
    /// How long a ping may go unanswered (the controller's --pong-timeout).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub pong_timeout: Duration,
    /// How long to wait for detections [default: 2 × (interval + timeout) + 5 s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// Every simulated service (the zombies too, until frozen) pings the
    /// controller this often itself, as light-fabric's client does.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub client_ping: Option<Duration>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub topology: Topology,
    pub services: usize,
    pub zombies: usize,
    pub shards: usize,
    pub detected: usize,
    pub detected_percent: f64,
    /// Seconds from SIGSTOP to each zombie's `down` event, sorted.
    pub detection_seconds: Vec<f64>,
    pub detection_p50_seconds: Option<f64>,
    pub detection_p99_seconds: Option<f64>,
    pub detection_max_seconds: Option<f64>,
    /// `down` or `deregistered` events of healthy services meanwhile.
    pub false_downs: usize,
    pub waited_seconds: f64,
    /// The controller's liveness checks from the freeze to the end: pings
    /// it sent, and checks that needed none (the peer's own life).
    pub pings_sent: f64,
    pub pings_skipped: f64,
    /// Each second from the freeze: (seconds, pings sent per second,
    /// checks skipped per second).
    pub ping_curve: Vec<(f64, f64, f64)>,
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    (!sorted.is_empty())
        .then(|| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1])
}

fn run_one(
    args: &ZombieArgs,
    tether: &Path,
    topology: Topology,
    dir: &Path,
) -> anyhow::Result<Run> {
    let total = args.services + args.zombies;
    let shards = args.common.shards_for(total);
    eprintln!(
        "== {}: {} services, {} to freeze",
        topology.label(),
        args.services,
        args.zombies
    );
    let flags = [
        "--ping-interval".to_string(),
        humantime::format_duration(args.ping_interval).to_string(),
        "--pong-timeout".to_string(),
        humantime::format_duration(args.pong_timeout).to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let stack = Stack::start(tether, topology, total, shards, &flags, dir)?;
    let client_ping: Vec<String> = args.client_ping.map_or_else(Vec::new, |d| {
        vec![
            "--client-ping".into(),
            humantime::format_duration(d).to_string(),
        ]
    });
    let mut healthy = args.common.swarm(stack.target(), args.services);
    healthy.extra.extend(client_ping.iter().cloned());
    let (mut swarms, _) = topology::start_swarms(tether, &healthy)?;
    let mut frozen = SwarmSpec::new(stack.target(), args.zombies);
    frozen.per_swarm = args.zombies;
    frozen.service_id = "zombie";
    frozen.group = 3;
    frozen.index_base = args.services;
    frozen.connect_rate = args.common.connect_rate.min(args.zombies as f64 * 10.0);
    frozen.extra.extend(client_ping);
    let (zombie_procs, _) = topology::start_swarms(tether, &frozen)?;
    anyhow::ensure!(zombie_procs.len() == 1, "the zombies must be one process");
    let watcher = Watcher::start(&stack.controller.admin)?;

    // Settle past the first pings every service gets when it is admitted.
    std::thread::sleep(args.ping_interval + args.pong_timeout);
    let pings = || {
        crate::observe::scrape(&stack.controller.admin).map(|t| {
            (
                crate::observe::metric(&t, "tether_pings_sent_total"),
                crate::observe::metric(&t, "tether_pings_skipped_total"),
            )
        })
    };
    let pings_before = pings()?;
    let frozen_at = Instant::now();
    zombie_procs[0].signal(libc::SIGSTOP);
    let wait = args
        .wait
        .unwrap_or(2 * (args.ping_interval + args.pong_timeout) + Duration::from_secs(5));
    let bar = progress::bar(args.zombies as u64, "zombies detected");
    let mut first_down: HashMap<String, f64> = HashMap::new();
    let mut ping_curve = Vec::new();
    let (mut last_at, mut last) = (frozen_at, pings_before);
    while frozen_at.elapsed() < wait {
        if last_at.elapsed() >= Duration::from_secs(1) {
            let (now, count) = (Instant::now(), pings()?);
            let dt = now.duration_since(last_at).as_secs_f64();
            ping_curve.push((
                now.duration_since(frozen_at).as_secs_f64(),
                (count.0 - last.0) / dt,
                (count.1 - last.1) / dt,
            ));
            (last_at, last) = (now, count);
        }
        for e in watcher.events() {
            if e.service.starts_with("zombie")
                && (e.kind == "down" || e.kind == "deregistered")
                && e.at >= frozen_at
            {
                first_down
                    .entry(e.id.clone())
                    .or_insert(e.at.duration_since(frozen_at).as_secs_f64());
            }
        }
        bar.set_position(first_down.len() as u64);
        if first_down.len() >= args.zombies {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let waited = frozen_at.elapsed().as_secs_f64();
    let false_downs = watcher
        .events()
        .iter()
        .filter(|e| {
            !e.service.starts_with("zombie") && (e.kind == "down" || e.kind == "deregistered")
        })
        .count();
    drop(watcher);
    let pings_after = pings()?;
    zombie_procs[0].signal(libc::SIGCONT);
    swarms.extend(zombie_procs);
    stack.stop(swarms);
    std::thread::sleep(Duration::from_secs(2));

    let mut times: Vec<f64> = first_down.into_values().collect();
    times.sort_by(f64::total_cmp);
    let run = Run {
        topology,
        services: args.services,
        zombies: args.zombies,
        shards,
        detected: times.len(),
        detected_percent: 100.0 * times.len() as f64 / args.zombies.max(1) as f64,
        detection_p50_seconds: quantile(&times, 0.5),
        detection_p99_seconds: quantile(&times, 0.99),
        detection_max_seconds: times.last().copied(),
        detection_seconds: times,
        false_downs,
        waited_seconds: waited,
        pings_sent: pings_after.0 - pings_before.0,
        pings_skipped: pings_after.1 - pings_before.1,
        ping_curve,
    };
    eprintln!(
        "{}: {}/{} detected, p50 {} s, max {} s; controller pings {} sent, {} skipped",
        topology.label(),
        run.detected,
        run.zombies,
        run.detection_p50_seconds.map_or_else(|| "n/a".into(), n),
        run.detection_max_seconds.map_or_else(|| "n/a".into(), n),
        run.pings_sent,
        run.pings_skipped
    );
    Ok(run)
}

pub fn run(args: ZombieArgs) -> anyhow::Result<Report> {
    let tether = args.common.tether()?;
    let out = crate::report::out_dir(&args.common.out, "zombie");
    let (topologies, skipped) = runnable(&args.topologies);
    let runs = topologies
        .iter()
        .map(|t| run_one(&args, &tether, *t, &out))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut table = Section::new(
        "Frozen services detected",
        &[
            "topology",
            "frozen",
            "detected",
            "%",
            "p50 s",
            "p99 s",
            "max s",
            "false downs",
            "waited s",
            "pings sent",
            "pings skipped",
        ],
    );
    for r in &runs {
        table.row(vec![
            r.topology.label().into(),
            r.zombies.to_string(),
            r.detected.to_string(),
            n(r.detected_percent),
            opt(r.detection_p50_seconds),
            opt(r.detection_p99_seconds),
            opt(r.detection_max_seconds),
            r.false_downs.to_string(),
            n(r.waited_seconds),
            format!("{:.0}", r.pings_sent),
            format!("{:.0}", r.pings_skipped),
        ]);
    }
    table.note(format!(
        "Controller pings a service silent for {} and gives it {} to answer, so a frozen service is due down between {} and {} after it froze (plus the timer wheel's tick; a service that pinged on its own gets a hundredth of the interval more, at least two ticks). A terminating relay answers the controller's pings itself: behind it a frozen service stays up.{}",
        humantime::format_duration(args.ping_interval),
        humantime::format_duration(args.pong_timeout),
        humantime::format_duration(args.pong_timeout),
        humantime::format_duration(args.ping_interval + args.pong_timeout),
        args.client_ping.map_or(String::new(), |d| format!(
            " Every service pinged the controller every {} itself (--client-ping): its pings are counted from the freeze to the end.",
            humantime::format_duration(d)
        )),
    ));
    for why in &skipped {
        table.note(why.clone());
    }
    std::fs::create_dir_all(&out)?;
    let samples: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| (r.topology.label().to_string(), r.detection_seconds.clone()))
        .collect();
    plots::cdf(
        &out.join("detection-cdf.svg"),
        "Time to detect a frozen service",
        "seconds after SIGSTOP",
        &samples,
    )?;
    let curve = |r: &Run, pick: fn(&(f64, f64, f64)) -> f64| {
        r.ping_curve
            .iter()
            .map(|p| (p.0, pick(p)))
            .collect::<Vec<_>>()
    };
    let series: Vec<plots::Series> = runs
        .iter()
        .filter(|r| r.topology == Topology::Direct)
        .flat_map(|r| {
            [
                plots::Series {
                    label: "pings sent".into(),
                    points: curve(r, |p| p.1),
                },
                plots::Series {
                    label: "checks skipped (the service's own life)".into(),
                    points: curve(r, |p| p.2),
                },
            ]
        })
        .collect();
    let mut plotted = vec![("detection-cdf.svg".into(), "Detection-time CDF".into())];
    if series.iter().any(|s| !s.points.is_empty()) {
        plots::lines(
            &out.join("pings.svg"),
            "Controller liveness checks per second, direct",
            "seconds after SIGSTOP",
            "per second",
            &series,
        )?;
        plotted.push(("pings.svg".into(), "Pings sent vs skipped".into()));
    }
    let report = Report {
        scenario: "zombie".into(),
        meta: meta(&tether),
        config: serde_json::json!({
            "services": args.services,
            "zombies": args.zombies,
            "topologies": topologies,
            "skipped": skipped,
            "pingIntervalSeconds": args.ping_interval.as_secs_f64(),
            "pingTimeoutSeconds": args.pong_timeout.as_secs_f64(),
            "common": args.common.config(),
        }),
        results: serde_json::json!({ "runs": runs }),
        sections: vec![table],
        plots: plotted,
    };
    report.write(&out)?;
    Ok(report)
}
