//! `redeploy`: the gateway restarts during a hold, as every deploy of it
//! does. Chained, every service's socket to the controller goes with it:
//! false downs, then a reconnect wave. Direct, the gateway (here an idle
//! relay that no service uses, standing for the admins' BFF) restarts
//! without touching the services.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::{Common, Stack, Topology, runnable};
use crate::observe::{Poller, Sample, peak_rate, rate_curve};
use crate::report::{Report, Section, meta, n};
use crate::topology;
use crate::{plots, progress};

#[derive(clap::Args, Debug)]
pub struct RedeployArgs {
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,relay,nginx"
    )]
    pub topologies: Vec<Topology>,
    /// Hold before the restart.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub before: Duration,
    /// Watch at least this long after the restart (for late false downs).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub after: Duration,
    /// Give up waiting for recovery after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
    pub recovery_limit: Duration,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub topology: Topology,
    pub services: usize,
    pub shards: usize,
    /// Instances the controller took out of discovery while they were
    /// alive: `down` plus `deregistered` (disconnected) events.
    pub false_downs: f64,
    pub down_events: f64,
    pub deregistered_events: f64,
    pub reregistrations: f64,
    /// Highest registrations per second over any 1 s window.
    pub reconnect_peak_per_second: f64,
    /// From the restart's start until all services are up again (0 if
    /// they never left).
    pub recovery_seconds: Option<f64>,
    pub restart_seconds: f64,
    /// (seconds after the restart began, registrations per second).
    pub reconnect_curve: Vec<(f64, f64)>,
}

fn run_one(
    args: &RedeployArgs,
    tether: &Path,
    topology: Topology,
    dir: &Path,
) -> anyhow::Result<Run> {
    let services = args.services;
    let shards = args.common.shards_for(services);
    eprintln!(
        "== {}: {services} services, gateway restarted after {:?}",
        topology.label(),
        args.before
    );
    let mut stack = Stack::start(tether, topology, services, shards, &[], dir)?;
    // Direct: a gateway stands beside, in no service's path.
    let mut beside = match topology {
        Topology::Direct => Some(topology::tether_relay(
            tether,
            &stack.controller.listen,
            1,
            None,
        )?),
        _ => None,
    };
    let spec = args.common.swarm(stack.target(), services);
    let (swarms, _) = topology::start_swarms(tether, &spec)?;
    let poller = Poller::start(&stack.controller.admin, Duration::from_millis(100));
    progress::hold(args.before, "holding", || {});

    let began = Instant::now();
    let base = poller
        .last()
        .ok_or_else(|| anyhow::anyhow!("no metrics from the controller"))?;
    match beside.take() {
        Some(gateway) => {
            let port = gateway.port;
            gateway.stop();
            beside = Some(topology::tether_relay(
                tether,
                &stack.controller.listen,
                1,
                Some(port),
            )?);
        }
        None => stack.restart_relay(tether)?,
    }
    let restart_seconds = began.elapsed().as_secs_f64();
    let lost = |s: &Sample| (s.down - base.down) + (s.deregistered - base.deregistered);
    let bar = progress::bar(services as u64, "services up");
    let mut recovered: Option<f64> = None;
    while began.elapsed() < args.recovery_limit {
        std::thread::sleep(Duration::from_millis(100));
        let Some(s) = poller.last() else { continue };
        bar.set_position(s.up as u64);
        // Up again, and every lost one registered again.
        let whole = s.up >= services as f64 && s.registered - base.registered >= lost(&s);
        if whole && recovered.is_none() {
            recovered = Some(if lost(&s) == 0.0 {
                0.0
            } else {
                s.at.duration_since(began).as_secs_f64()
            });
        }
        if recovered.is_some() && began.elapsed() >= args.after {
            break;
        }
        if !whole {
            recovered = None;
        }
    }
    bar.finish_and_clear();
    let samples = poller.samples();
    drop(poller);
    let last = *samples.last().expect("sampled");
    if let Some(g) = beside {
        g.stop();
    }
    stack.stop(swarms);
    std::thread::sleep(Duration::from_secs(2));

    let registrations = |s: &Sample| s.registered;
    let run = Run {
        topology,
        services,
        shards,
        false_downs: lost(&last),
        down_events: last.down - base.down,
        deregistered_events: last.deregistered - base.deregistered,
        reregistrations: last.registered - base.registered,
        reconnect_peak_per_second: peak_rate(
            &samples,
            began,
            Duration::from_secs(1),
            registrations,
        ),
        recovery_seconds: recovered,
        restart_seconds,
        reconnect_curve: rate_curve(&samples, began - Duration::from_secs(1), registrations),
    };
    eprintln!(
        "{}: {} false downs, peak {} reconnects/s, recovered in {} s",
        topology.label(),
        n(run.false_downs),
        n(run.reconnect_peak_per_second),
        run.recovery_seconds.map_or_else(|| "n/a".into(), n)
    );
    Ok(run)
}

pub fn run(args: RedeployArgs) -> anyhow::Result<Report> {
    let tether = args.common.tether()?;
    let out = crate::report::out_dir(&args.common.out, "redeploy");
    let (topologies, skipped) = runnable(&args.topologies);
    let runs = topologies
        .iter()
        .map(|t| run_one(&args, &tether, *t, &out))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut table = Section::new(
        "Gateway restarted during a hold",
        &[
            "topology",
            "services",
            "false downs",
            "down / deregistered events",
            "re-registrations",
            "reconnect peak /s",
            "recovery s",
            "restart s",
        ],
    );
    for r in &runs {
        table.row(vec![
            r.topology.label().into(),
            r.services.to_string(),
            n(r.false_downs),
            format!("{} / {}", n(r.down_events), n(r.deregistered_events)),
            n(r.reregistrations),
            n(r.reconnect_peak_per_second),
            r.recovery_seconds.map_or(
                format!(
                    "not within {}",
                    humantime::format_duration(args.recovery_limit)
                ),
                n,
            ),
            n(r.restart_seconds),
        ]);
    }
    table.note("Every service stays alive throughout: each instance the controller takes out of discovery (a `down` or a `deregistered` event) is a false down. Recovery: from the restart's start until every service is up again. Direct: the restarted gateway is in no service's path.");
    for why in &skipped {
        table.note(why.clone());
    }
    std::fs::create_dir_all(&out)?;
    let series: Vec<plots::Series> = runs
        .iter()
        .map(|r| plots::Series {
            label: r.topology.label().into(),
            points: r.reconnect_curve.clone(),
        })
        .collect();
    plots::lines(
        &out.join("reconnects.svg"),
        "Registrations at the controller around a gateway restart",
        "seconds after the restart began",
        "registrations per second",
        &series,
    )?;
    let report = Report {
        scenario: "redeploy".into(),
        meta: meta(&tether),
        config: serde_json::json!({
            "services": args.services,
            "topologies": topologies,
            "skipped": skipped,
            "beforeSeconds": args.before.as_secs_f64(),
            "common": args.common.config(),
        }),
        results: serde_json::json!({ "runs": runs }),
        sections: vec![table],
        plots: vec![("reconnects.svg".into(), "Reconnect curves".into())],
    };
    report.write(&out)?;
    Ok(report)
}
