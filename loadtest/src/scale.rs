//! `scale`: N swept, direct; the controller's memory and CPU at each N and
//! a least-squares line through them (cost per service, fixed cost).

use std::path::Path;
use std::time::Duration;

use crate::common::{Common, Stack, Topology};
use crate::floor::Floor;
use crate::observe::{self, metric};
use crate::procs;
use crate::report::{Report, Section, meta, n};
use crate::topology;
use crate::{plots, progress};
use tether::results::{Fit, FloorPoint, ScaleFits, ScalePoint as Point, ScaleResults};

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// The N to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
    pub services: Vec<usize>,
    /// Hold at each N, for the CPU that pings cost.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub hold: Duration,
    /// The controller's ping interval.
    #[arg(long, default_value = "5s")]
    pub ping_interval: String,
    /// Skip the floor server (run before the controller at each N, on the
    /// same swarms, with as many threads as the controller has shards).
    #[arg(long)]
    pub no_floor: bool,
    /// Runs at each N (each a floor and a controller, one after the
    /// other): the report gives each run's ratios and their median, since
    /// one run's ratio moves by 10-30 % on a shared machine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    #[command(flatten)]
    pub common: Common,
}

pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let k = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / k, sy / k);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - intercept - slope * p.0).powi(2))
        .sum();
    Some(Fit {
        slope,
        intercept,
        r2: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            1.0
        },
    })
}

/// The floor at one N: the same swarms, ramp, settle and hold as the
/// controller gets, and the same ping interval.
fn run_floor(
    args: &ScaleArgs,
    tether: &Path,
    services: usize,
    shards: usize,
) -> anyhow::Result<FloorPoint> {
    eprintln!("== floor, {services} services ({shards} threads)");
    let mut floor = Floor::start(shards, &args.ping_interval)?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = floor.proc.pid();
    let (rss0, cpu0) = (procs::status_kb(pid, "VmRSS")?, procs::cpu_seconds(pid)?);
    let spec = args.common.swarm(&floor.listen, services);
    let (swarms, registration_seconds) = topology::start_swarms(tether, &spec)?;
    progress::hold(Duration::from_secs(3), "settling", || {});
    let rss = procs::status_kb(pid, "VmRSS")?;
    let cpu1 = procs::cpu_seconds(pid)?;
    let pings0 = floor.fresh_counter("pings")?;
    let cpu1b = procs::cpu_seconds(pid)?;
    progress::hold(args.hold, "holding", || {});
    let cpu2 = procs::cpu_seconds(pid)?;
    let pings1 = floor.fresh_counter("pings")?;
    let cpu2b = procs::cpu_seconds(pid)?;
    let accept_errors = floor.fresh_counter("accept_errors")?;
    anyhow::ensure!(
        accept_errors == 0,
        "the floor failed {accept_errors} accepts (out of fds?): its CPU is not a floor"
    );
    for swarm in swarms {
        swarm.stop(Duration::from_secs(10));
    }
    floor.proc.stop(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    Ok(FloorPoint {
        registration_seconds,
        cpu_seconds_ramp: cpu1 - cpu0,
        // The counters are read between two CPU readings: the mean of the two.
        cpu_seconds_hold: (cpu2 + cpu2b) / 2.0 - (cpu1 + cpu1b) / 2.0,
        pings_during_hold: pings1.saturating_sub(pings0) as f64,
        // Read up to a second after the ramp's CPU: close enough.
        pings_during_ramp: pings0 as f64,
        rss_start_kb: rss0,
        rss_kb: rss,
    })
}

fn run_one(args: &ScaleArgs, tether: &Path, services: usize, dir: &Path) -> anyhow::Result<Point> {
    let shards = args.common.shards_for(services);
    let floor = if args.no_floor {
        None
    } else {
        Some(run_floor(args, tether, services, shards)?)
    };
    eprintln!("== direct, {services} services ({shards} shards)");
    let stack = Stack::start(
        tether,
        Topology::Direct,
        services,
        shards,
        &["--ping-interval", &args.ping_interval],
        dir,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = stack.controller.proc.pid();
    let (rss0, cpu0) = (procs::status_kb(pid, "VmRSS")?, procs::cpu_seconds(pid)?);
    let kernel0 = procs::KernelMemory::now()?;
    let spec = args.common.swarm(stack.target(), services);
    let (swarms, registration_seconds) = topology::start_swarms(tether, &spec)?;
    progress::hold(Duration::from_secs(3), "settling", || {});
    let rss = procs::status_kb(pid, "VmRSS")?;
    let cpu1 = procs::cpu_seconds(pid)?;
    let grown = procs::KernelMemory::since(kernel0)?;
    let (slab, sunr) = (grown.slab_kb as f64, grown.sunreclaim_kb as f64);
    let before = observe::scrape(&stack.controller.admin)?;
    // The controller started with none sent.
    let pings_during_ramp = metric(&before, "tether_pings_sent_total");
    progress::hold(args.hold, "holding", || {});
    let cpu2 = procs::cpu_seconds(pid)?;
    let after = observe::scrape(&stack.controller.admin)?;
    stack.stop(swarms);
    std::thread::sleep(Duration::from_secs(3));
    Ok(Point {
        services,
        shards,
        rss_start_kb: rss0,
        rss_kb: rss,
        user_bytes: (rss as f64 - rss0 as f64) * 1024.0,
        kernel_slab_bytes: slab * 1024.0,
        kernel_sunreclaim_bytes: sunr * 1024.0,
        registration_seconds,
        cpu_seconds_ramp: cpu1 - cpu0,
        cpu_seconds_hold: cpu2 - cpu1,
        pings_during_hold: metric(&after, "tether_pings_sent_total")
            - metric(&before, "tether_pings_sent_total"),
        pings_during_ramp,
        floor,
    })
}

pub fn run(args: ScaleArgs) -> anyhow::Result<Report> {
    let tether = args.common.tether()?;
    let out = crate::report::out_dir(&args.common.out, "scale");
    let points = args
        .services
        .iter()
        .flat_map(|s| std::iter::repeat_n(*s, args.repeat as usize))
        .map(|s| run_one(&args, &tether, s, &out))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let xy = |f: &dyn Fn(&Point) -> f64| {
        points
            .iter()
            .map(|p| (p.services as f64, f(p)))
            .collect::<Vec<_>>()
    };
    let user = fit(&xy(&|p| p.user_bytes));
    let kernel = fit(&xy(&|p| p.kernel_sunreclaim_bytes));
    let total = fit(&xy(&|p| p.user_bytes + p.kernel_sunreclaim_bytes));
    let hold_s = args.hold.as_secs_f64();
    // CPU per service per second of hold (pings at the configured interval).
    let cpu = fit(&xy(&|p| p.cpu_seconds_hold / hold_s));
    let ramp = fit(&xy(&|p| p.cpu_seconds_ramp));

    let mut table = Section::new(
        "Direct topology, N swept",
        &[
            "services",
            "shards",
            "user MiB",
            "kernel slab MiB",
            "user B/service",
            "kernel B/service",
            "registration s",
            "CPU s ramp",
            "CPU s hold",
            "pings in hold",
        ],
    );
    for p in &points {
        let per = |v: f64| n(v / p.services as f64);
        table.row(vec![
            p.services.to_string(),
            p.shards.to_string(),
            n(p.user_bytes / 1048576.0),
            n(p.kernel_sunreclaim_bytes / 1048576.0),
            per(p.user_bytes),
            per(p.kernel_sunreclaim_bytes),
            n(p.registration_seconds),
            n(p.cpu_seconds_ramp),
            n(p.cpu_seconds_hold),
            n(p.pings_during_hold),
        ]);
    }
    let mut floor_table = Section::new(
        "Against the floor, same swarms, same run",
        &[
            "services",
            "µs per registration",
            "floor µs",
            "× floor",
            "net of pings µs",
            "floor µs",
            "× floor",
            "µs per ping",
            "floor µs",
            "× floor",
        ],
    );
    let against: Vec<(usize, AgainstFloor)> = points
        .iter()
        .filter_map(|p| Some((p.services, against_floor(p)?)))
        .collect();
    for (services, a) in &against {
        floor_table.row(vec![
            services.to_string(),
            n(a.register_us),
            n(a.floor_register_us),
            format!("{:.2}", a.register_us / a.floor_register_us),
            n(a.net_register_us),
            n(a.floor_net_register_us),
            format!("{:.2}", a.net_register_us / a.floor_net_register_us),
            n(a.ping_us),
            n(a.floor_ping_us),
            format!("{:.2}", a.ping_us / a.floor_ping_us),
        ]);
    }
    let medians = median_section(&against, args.repeat);
    floor_table.note(
        "The floor is `tether-loadtest floor`: one thread per controller shard, each with its own fd table and SO_REUSEPORT listener on level-triggered epoll; it accepts, answers the upgrade, answers each registration with a canned result and pings every connection once per interval. It runs first at each N, against swarm processes started the same way (same count, sources, connect rate), with the same settle and hold. CPU is the process's utime+stime; on loopback it includes the kernel's receive path of what the process sends, for both. A ramp longer than the ping interval pings the services registered first: \"net of pings\" takes those pings out at the hold's cost per ping."
            .to_string(),
    );
    let floor_ramp = fit(&points
        .iter()
        .filter_map(|p| {
            p.floor
                .as_ref()
                .map(|f| (p.services as f64, f.cpu_seconds_ramp))
        })
        .collect::<Vec<_>>());
    let mut fits = Section::new(
        "Fitted cost per service (least squares over N)",
        &["figure", "per service", "fixed", "r²"],
    );
    // (per-service scale and unit, fixed-cost unit)
    let row =
        |s: &mut Section, name: &str, f: Option<Fit>, scale: f64, unit: &str, fixed_unit: &str| {
            if let Some(f) = f {
                s.row(vec![
                    name.into(),
                    format!("{} {unit}", n(f.slope * scale)),
                    format!("{} {fixed_unit}", n(f.intercept)),
                    format!("{:.4}", f.r2),
                ]);
            }
        };
    row(&mut fits, "user memory", user, 1.0, "B", "B");
    row(
        &mut fits,
        "kernel memory (SUnreclaim, both ends)",
        kernel,
        1.0,
        "B",
        "B",
    );
    row(&mut fits, "total memory", total, 1.0, "B", "B");
    row(&mut fits, "CPU while holding", cpu, 1e6, "µcores", "cores");
    row(&mut fits, "CPU to register", ramp, 1e6, "µs", "s");
    row(
        &mut fits,
        "floor CPU to register",
        floor_ramp,
        1e6,
        "µs",
        "s",
    );
    // A silent service is pinged once per interval: say what was measured.
    let pings: f64 = points.iter().map(|p| p.pings_during_hold).sum();
    let service_seconds: f64 = points.iter().map(|p| p.services as f64 * hold_s).sum();
    fits.note(format!(
        "Kernel memory counts both ends of every connection (the swarm runs on this machine). CPU while holding: controller utime+stime over {} s, per second; per service in millionths of a core. The controller ran with --ping-interval {} and its default --pong-timeout (10s); measured, each service was pinged every {:.1} s ({:.1} µs of controller CPU per ping over all points).",
        n(hold_s),
        args.ping_interval,
        if pings > 0.0 { service_seconds / pings } else { f64::NAN },
        if pings > 0.0 {
            points.iter().map(|p| p.cpu_seconds_hold).sum::<f64>() * 1e6 / pings
        } else {
            f64::NAN
        }
    ));
    fits.note(
        "Kernel memory is the machine-wide SUnreclaim delta: other processes allocate and free slab too, so below ~10,000 services (~65 MiB of sockets) a point can be off by several MiB either way, even negative. The fit weighs the large N; its fixed term carries that noise."
            .to_string(),
    );
    std::fs::create_dir_all(&out)?;
    let mib = |f: &dyn Fn(&Point) -> f64| {
        points
            .iter()
            .map(|p| (p.services as f64, f(p) / 1048576.0))
            .collect::<Vec<_>>()
    };
    plots::lines(
        &out.join("scale-memory.svg"),
        "Controller memory vs services (direct)",
        "services",
        "MiB",
        &[
            plots::Series {
                label: "user (controller RSS)".into(),
                points: mib(&|p| p.user_bytes),
            },
            plots::Series {
                label: "kernel (SUnreclaim)".into(),
                points: mib(&|p| p.kernel_sunreclaim_bytes),
            },
        ],
    )?;
    plots::lines(
        &out.join("scale-cpu.svg"),
        "Controller CPU while holding vs services (direct)",
        "services",
        "cores",
        &[plots::Series {
            label: format!("ping every {}", args.ping_interval),
            points: xy(&|p| p.cpu_seconds_hold / hold_s),
        }],
    )?;
    let per_registration = |f: &dyn Fn(&Point) -> Option<f64>| {
        points
            .iter()
            .filter_map(|p| f(p).map(|cpu| (p.services as f64, cpu * 1e6 / p.services as f64)))
            .collect::<Vec<_>>()
    };
    plots::lines(
        &out.join("scale-register.svg"),
        "CPU per registration vs services (direct)",
        "services",
        "µs",
        &[
            plots::Series {
                label: "tether controller".into(),
                points: per_registration(&|p| Some(p.cpu_seconds_ramp)),
            },
            plots::Series {
                label: "floor (minimal epoll server)".into(),
                points: per_registration(&|p| p.floor.as_ref().map(|f| f.cpu_seconds_ramp)),
            },
        ],
    )?;
    let report = Report {
        scenario: "scale".into(),
        meta: meta(&tether),
        config: serde_json::json!({
            "services": args.services,
            "repeat": args.repeat,
            "holdSeconds": hold_s,
            "pingInterval": args.ping_interval,
            "common": args.common.config(),
        }),
        results: serde_json::to_value(ScaleResults {
            points,
            fit: ScaleFits {
                user_bytes_per_service: user,
                kernel_bytes_per_service: kernel,
                total_bytes_per_service: total,
                hold_cores_per_service: cpu,
                register_cpu_seconds_per_service: ramp,
            },
        })?,
        sections: [Some(table), Some(floor_table), medians, Some(fits)]
            .into_iter()
            .flatten()
            .collect(),
        plots: vec![
            ("scale-memory.svg".into(), "Memory vs N".into()),
            ("scale-cpu.svg".into(), "CPU vs N".into()),
            (
                "scale-register.svg".into(),
                "CPU per registration vs N, against the floor".into(),
            ),
        ],
    };
    report.write(&out)?;
    Ok(report)
}

/// One run's controller against its floor, in µs of CPU.
#[derive(Clone, Copy, Debug)]
struct AgainstFloor {
    register_us: f64,
    floor_register_us: f64,
    /// Registration less the ramp's pings at the hold's cost per ping.
    net_register_us: f64,
    floor_net_register_us: f64,
    ping_us: f64,
    floor_ping_us: f64,
}

fn against_floor(p: &Point) -> Option<AgainstFloor> {
    let f = p.floor.as_ref()?;
    let per_ping = |cpu: f64, pings: f64| {
        if pings > 0.0 {
            cpu * 1e6 / pings
        } else {
            f64::NAN
        }
    };
    let ping_us = per_ping(p.cpu_seconds_hold, p.pings_during_hold);
    let floor_ping_us = per_ping(f.cpu_seconds_hold, f.pings_during_hold);
    let per_reg = |cpu: f64| cpu * 1e6 / p.services as f64;
    let net = |cpu: f64, pings: f64, per_ping_us: f64| {
        per_reg(cpu) - pings * per_ping_us.max(0.0) / p.services as f64
    };
    Some(AgainstFloor {
        register_us: per_reg(p.cpu_seconds_ramp),
        floor_register_us: per_reg(f.cpu_seconds_ramp),
        net_register_us: net(p.cpu_seconds_ramp, p.pings_during_ramp, ping_us),
        floor_net_register_us: net(f.cpu_seconds_ramp, f.pings_during_ramp, floor_ping_us),
        ping_us,
        floor_ping_us,
    })
}

/// The median of `values` (NaNs left out); NaN if none is left.
fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Each N's ratios over its runs: the median, and the lowest and highest.
fn median_section(against: &[(usize, AgainstFloor)], repeat: u32) -> Option<Section> {
    if repeat < 2 {
        return None;
    }
    let mut section = Section::new(
        "Ratios to the floor, median of the runs at each N",
        &[
            "services",
            "runs",
            "registration × floor",
            "net of pings × floor",
            "ping × floor",
        ],
    );
    let mut ns: Vec<usize> = against.iter().map(|(s, _)| *s).collect();
    ns.dedup();
    for services in ns {
        let runs: Vec<AgainstFloor> = (against.iter())
            .filter(|(s, _)| *s == services)
            .map(|(_, a)| *a)
            .collect();
        let cell = |ratio: &dyn Fn(&AgainstFloor) -> f64| {
            let values: Vec<f64> = runs.iter().map(ratio).collect();
            let (lo, hi) = values
                .iter()
                .filter(|v| !v.is_nan())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(*v), hi.max(*v))
                });
            format!("{:.2} ({lo:.2}–{hi:.2})", median(values))
        };
        section.row(vec![
            services.to_string(),
            runs.len().to_string(),
            cell(&|a| a.register_us / a.floor_register_us),
            cell(&|a| a.net_register_us / a.floor_net_register_us),
            cell(&|a| a.ping_us / a.floor_ping_us),
        ]);
    }
    section.note(format!(
        "Each run starts a floor and then the controller against fresh swarms; the ratio is taken within the run, and the median over the {repeat} runs at each N is the figure to quote."
    ));
    Some(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_a_line() {
        let f = fit(&[(1.0, 12.0), (2.0, 14.0), (3.0, 16.0)]).unwrap();
        assert!(
            (f.slope - 2.0).abs() < 1e-9
                && (f.intercept - 10.0).abs() < 1e-9
                && (f.r2 - 1.0).abs() < 1e-9
        );
        assert!(fit(&[(1.0, 1.0)]).is_none());
    }

    #[test]
    fn the_median_leaves_out_runs_without_a_figure() {
        assert_eq!(median(vec![1.3, f64::NAN, 1.1, 1.2]), 1.2);
        assert_eq!(median(vec![1.4, 1.0]), 1.2);
        assert!(median(vec![f64::NAN]).is_nan());
    }
}
