//! `herd`: the controller restarts (stopped, then started again on the
//! same ports) under N connected services; with the agents' full-jitter
//! backoff, and without jitter. Reports the reconnect curve, listen-queue
//! overflows and time to full recovery.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::Common;
use crate::observe::{Poller, peak_rate, rate_curve};
use crate::procs;
use crate::report::{Report, Section, meta, n};
use crate::topology;
use crate::{plots, progress};

#[derive(clap::Args, Debug)]
pub struct HerdArgs {
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Hold before the restart.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub before: Duration,
    /// How the controller goes: `kill` (SIGKILL, a crash: every socket
    /// closes at once) or `graceful` (SIGINT: it closes them with 1001,
    /// over a few seconds at large N).
    #[arg(long, value_enum, default_value = "kill")]
    pub stop: StopMode,
    /// Also run with the agents' first reconnect spread over this window
    /// (`tether agent --reconnect-window`), after the two default runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub reconnect_window: Option<Duration>,
    /// Give up waiting for recovery after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
    pub recovery_limit: Duration,
    /// Extra flags for both controllers, the one stopped and the one
    /// restarted, as abuse takes them (e.g. `--controller-args
    /// --max-handshakes-per-source 1000000`: a bound no source reaches,
    /// which still counts each source's peak; 0 counts nothing).
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    pub controller_args: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    Kill,
    Graceful,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub jitter: bool,
    /// The agents' first reconnect window, if one was set (else 1 s).
    pub reconnect_window_seconds: Option<f64>,
    pub services: usize,
    pub shards: usize,
    /// The old controller's graceful stop, and the new one's start.
    pub stop_seconds: f64,
    pub start_seconds: f64,
    /// From the stop's start until all services are registered again.
    pub recovery_seconds: Option<f64>,
    pub registered_again: f64,
    pub reconnect_peak_per_second: f64,
    /// TcpExt counters of /proc/net/netstat over the restart (machine-wide).
    pub listen_overflows: u64,
    pub listen_drops: u64,
    /// The new controller's accepted sockets per service (1.0: no socket
    /// wasted), and its work thrown away: sockets evicted before they
    /// registered, and sockets refused at accept (a per-source bound, or the
    /// connection bound).
    pub accepts_per_service: f64,
    pub evicted: u64,
    pub refused_at_accept: u64,
    /// Of those, refused by the per-source handshake bound.
    pub refused_source_handshakes: u64,
    /// The most sockets one source address held in their handshakes.
    pub source_handshakes_peak: u64,
    /// (seconds after the stop began, registrations per second).
    pub reconnect_curve: Vec<(f64, f64)>,
}

/// How a run's agents back off: its table row and plot label.
fn label(jitter: bool, window: Option<f64>) -> String {
    match (jitter, window) {
        (true, None) => "full jitter".into(),
        (false, None) => "no jitter".into(),
        (true, Some(w)) => format!("full jitter, first over {w} s"),
        (false, Some(w)) => format!("no jitter, first after {w} s"),
    }
}

fn run_one(
    args: &HerdArgs,
    tether: &Path,
    jitter: bool,
    window: Option<Duration>,
) -> anyhow::Result<Run> {
    let services = args.services;
    let shards = args.common.shards_for(services);
    let window_seconds = window.map(|w| w.as_secs_f64());
    eprintln!(
        "== controller restart under {services} services, {}",
        label(jitter, window_seconds)
    );
    let extra: Vec<&str> = args.controller_args.iter().map(String::as_str).collect();
    let controller = topology::controller_with(tether, shards, &extra)?;
    let (port, admin_port, admin) = (
        controller.port,
        controller.admin_port,
        controller.admin.clone(),
    );
    let mut spec = args.common.swarm(&controller.listen, services);
    if !jitter {
        spec.extra.push("--no-jitter".into());
    }
    if let Some(w) = window {
        spec.extra.push("--reconnect-window".into());
        spec.extra.push(format!("{}ms", w.as_millis()));
    }
    let (swarms, _) = topology::start_swarms(tether, &spec)?;
    let poller = Poller::start(&admin, Duration::from_millis(100));
    progress::hold(args.before, "holding", || {});

    let overflows0 = procs::netstat("TcpExt", "ListenOverflows")?;
    let drops0 = procs::netstat("TcpExt", "ListenDrops")?;
    let began = Instant::now();
    match args.stop {
        StopMode::Kill => controller.proc.kill(),
        StopMode::Graceful => controller.proc.stop(Duration::from_secs(30)),
    }
    let stop_seconds = began.elapsed().as_secs_f64();
    let restarted = Instant::now();
    // After a SIGKILL the kernel may hold the old listener a moment longer
    // (io_uring tears a ring down in the background): retry, as a
    // supervisor would.
    let controller = loop {
        match topology::controller_at(tether, port, admin_port, shards, &extra) {
            Ok(c) => break c,
            Err(e) if restarted.elapsed() < Duration::from_secs(30) => {
                eprintln!("restart: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    let start_seconds = restarted.elapsed().as_secs_f64();
    let bar = progress::bar(services as u64, "registered again");
    let mut recovered = None;
    while began.elapsed() < args.recovery_limit {
        std::thread::sleep(Duration::from_millis(100));
        let Some(s) = poller.last().filter(|s| s.at >= restarted) else {
            continue;
        };
        bar.set_position(s.up as u64);
        if s.up >= services as f64 {
            recovered = Some(s.at.duration_since(began).as_secs_f64());
            break;
        }
    }
    bar.finish_and_clear();
    // A second more of the curve's tail.
    std::thread::sleep(Duration::from_secs(1));
    let text = crate::observe::scrape(&controller.admin).unwrap_or_default();
    let accepted = crate::observe::metric(&text, "tether_accepted_total");
    let evicted = crate::observe::metric_where(
        &text,
        "tether_connections_cut_total",
        "reason=\"evicted_unadmitted\"",
    );
    let refused_at_accept = crate::observe::metric(&text, "tether_admission_refused_total");
    let refused_source_handshakes = crate::observe::metric_where(
        &text,
        "tether_admission_refused_total",
        "reason=\"source_handshakes\"",
    );
    let source_handshakes_peak = crate::observe::metric(&text, "tether_source_handshakes_peak");
    let samples = poller.samples();
    drop(poller);
    let listen_overflows = procs::netstat("TcpExt", "ListenOverflows")? - overflows0;
    let listen_drops = procs::netstat("TcpExt", "ListenDrops")? - drops0;
    for swarm in swarms {
        swarm.stop(Duration::from_secs(10));
    }
    controller.proc.stop(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));

    // Only the new controller's counters (they start at zero).
    let after: Vec<_> = samples.into_iter().filter(|s| s.at >= restarted).collect();
    let registrations = |s: &crate::observe::Sample| s.registered;
    let mut curve = vec![(0.0, 0.0)];
    curve.extend(rate_curve(&after, began, registrations));
    let run = Run {
        jitter,
        reconnect_window_seconds: window_seconds,
        services,
        shards,
        stop_seconds,
        start_seconds,
        recovery_seconds: recovered,
        registered_again: after.last().map_or(0.0, |s| s.up),
        reconnect_peak_per_second: peak_rate(&after, began, Duration::from_secs(1), registrations),
        listen_overflows,
        listen_drops,
        accepts_per_service: accepted / services.max(1) as f64,
        evicted: evicted as u64,
        refused_at_accept: refused_at_accept as u64,
        refused_source_handshakes: refused_source_handshakes as u64,
        source_handshakes_peak: source_handshakes_peak as u64,
        reconnect_curve: curve,
    };
    eprintln!(
        "{}: recovered in {} s, peak {} registrations/s, {} listen overflows",
        label(jitter, window_seconds),
        run.recovery_seconds.map_or_else(|| "n/a".into(), n),
        n(run.reconnect_peak_per_second),
        run.listen_overflows
    );
    Ok(run)
}

pub fn run(args: HerdArgs) -> anyhow::Result<Report> {
    let tether = args.common.tether()?;
    let out = crate::report::out_dir(&args.common.out, "herd");
    let mut variants = vec![(true, None), (false, None)];
    if let Some(w) = args.reconnect_window {
        variants.push((true, Some(w)));
    }
    let runs = variants
        .iter()
        .map(|(j, w)| run_one(&args, &tether, *j, *w))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut table = Section::new(
        "Controller restarted under load",
        &[
            "backoff",
            "services",
            "recovery s",
            "registered again",
            "peak registrations/s",
            "ListenOverflows",
            "ListenDrops",
            "accepts/service",
            "evicted",
            "refused at accept (per-source handshakes)",
            "most handshakes per source",
            "stop s",
            "start s",
        ],
    );
    for r in &runs {
        table.row(vec![
            label(r.jitter, r.reconnect_window_seconds),
            r.services.to_string(),
            r.recovery_seconds.map_or(
                format!(
                    "not within {}",
                    humantime::format_duration(args.recovery_limit)
                ),
                n,
            ),
            n(r.registered_again),
            n(r.reconnect_peak_per_second),
            r.listen_overflows.to_string(),
            r.listen_drops.to_string(),
            format!("{:.3}", r.accepts_per_service),
            r.evicted.to_string(),
            format!("{} ({})", r.refused_at_accept, r.refused_source_handshakes),
            r.source_handshakes_peak.to_string(),
            n(r.stop_seconds),
            n(r.start_seconds),
        ]);
    }
    table.note(format!(
        "The controller was stopped by {}.",
        match args.stop {
            StopMode::Kill => "SIGKILL (a crash: every socket closed at once)",
            StopMode::Graceful => "SIGINT (it closed every socket with 1001 before exiting)",
        }
    ));
    table.note("Recovery: from the old controller's stop until the new one has every service registered. ListenOverflows/ListenDrops are machine-wide TcpExt counters over the restart: connects the listen queue turned away, each retried by the client's TCP after a second or more. Accepts/service, evicted and refused at accept are the new controller's (/metrics): sockets it took per service registered again, those it evicted before they registered (to make room in its handshake table) and those refused at accept (a per-source bound, or the connection bound); each of those clients came back later, with a longer backoff.");
    std::fs::create_dir_all(&out)?;
    let series: Vec<plots::Series> = runs
        .iter()
        .map(|r| plots::Series {
            label: label(r.jitter, r.reconnect_window_seconds),
            points: r.reconnect_curve.clone(),
        })
        .collect();
    plots::lines(
        &out.join("herd.svg"),
        "Registrations at the restarted controller",
        "seconds after the stop began",
        "registrations per second",
        &series,
    )?;
    let report = Report {
        scenario: "herd".into(),
        meta: meta(&tether),
        config: serde_json::json!({
            "services": args.services,
            "beforeSeconds": args.before.as_secs_f64(),
            "stop": args.stop,
            "reconnectWindowSeconds": args.reconnect_window.map(|w| w.as_secs_f64()),
            "controllerArgs": args.controller_args,
            "common": args.common.config(),
        }),
        results: serde_json::json!({ "runs": runs }),
        sections: vec![table],
        plots: vec![("herd.svg".into(), "Reconnect curves".into())],
    };
    report.write(&out)?;
    Ok(report)
}
