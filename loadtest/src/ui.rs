//! `ui`: the Admin UI and the gateway at N services (300,000 by default).
//!
//! - The gateway's added latency per proxied request: the same requests
//!   made straight to the admin plane (with the admin key) and through the
//!   gateway (`tether gateway --dev`, a bearer token from `tether token`),
//!   interleaved one by one in the same run, on kept-alive connections.
//! - The UI's speed, in headless Chromium (ui/e2e/perf.mjs, Performance
//!   API): time to the table's first page, to a filtered page, and to a
//!   page sorted on the server (from a click on a column header).
//!
//! The gateway runs with its rate limit lifted (`--rate-limit 1000000`):
//! this measures latency, not the limiter.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procs::Proc;
use crate::{procs, topology};

#[derive(clap::Args)]
pub struct UiArgs {
    #[arg(long, default_value_t = 300_000)]
    pub services: usize,
    #[arg(long, default_value_t = 20)]
    pub shards: usize,
    /// Requests per kind, each made both ways.
    #[arg(long, default_value_t = 1_000)]
    pub requests: usize,
    /// Browser runs (each: first page, a filter, a search).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Skip the browser part (no Chromium here).
    #[arg(long)]
    pub no_browser: bool,
    #[arg(long, default_value_t = 10_000.0)]
    pub connect_rate: f64,
    #[arg(long)]
    pub tether: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct Side {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Serialize)]
pub struct Added {
    pub query: String,
    pub requests: usize,
    pub direct: Side,
    pub gateway: Side,
    /// Gateway p50 minus direct p50.
    pub added_p50_ms: f64,
    pub ratio_p50: f64,
}

#[derive(Serialize)]
pub struct Browser {
    pub kind: String,
    pub runs: usize,
    /// Medians over the runs.
    pub user_visible_ms: f64,
    pub request_to_rows_ms: f64,
    pub total: u64,
}

#[derive(Serialize)]
pub struct UiReport {
    pub services: usize,
    pub shards: usize,
    pub added: Vec<Added>,
    pub browser: Vec<Browser>,
}

fn histogram_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One GET, timed; an error status is an error.
fn timed(agent: &ureq::Agent, url: &str, auth: &str) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut r = agent
        .get(url)
        .header("authorization", auth)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()?;
    if !r.status().is_success() || !body.starts_with('{') {
        bail!("GET {url}: HTTP {}", r.status());
    }
    Ok(started.elapsed().as_micros().max(1) as u64)
}

fn side_by_side(
    agent: &ureq::Agent,
    (admin, admin_auth): (&str, &str),
    (gateway, token): (&str, &str),
    label: &str,
    paths: &[String],
) -> anyhow::Result<Added> {
    let mut direct = Histogram::<u64>::new(3)?;
    let mut through = Histogram::<u64>::new(3)?;
    for (i, path) in paths.iter().enumerate() {
        // Alternate which goes first, so neither always finds the caches warm.
        let d = || timed(agent, &format!("{admin}{path}"), admin_auth);
        let g = || timed(agent, &format!("{gateway}/api{path}"), token);
        let (a, b) = if i % 2 == 0 {
            let a = d()?;
            (a, g()?)
        } else {
            let b = g()?;
            (d()?, b)
        };
        direct.record(a)?;
        through.record(b)?;
    }
    let (d50, g50) = (histogram_ms(&direct, 0.5), histogram_ms(&through, 0.5));
    Ok(Added {
        query: label.into(),
        requests: paths.len(),
        direct: Side {
            p50_ms: d50,
            p99_ms: histogram_ms(&direct, 0.99),
        },
        gateway: Side {
            p50_ms: g50,
            p99_ms: histogram_ms(&through, 0.99),
        },
        added_p50_ms: g50 - d50,
        ratio_p50: g50 / d50,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn browser(ui: &Path, gateway: &str, runs: usize) -> anyhow::Result<Vec<Browser>> {
    let out = Command::new("node")
        .current_dir(ui)
        .args(["e2e/perf.mjs", gateway, &runs.to_string(), "svc-42", "10.0.7."])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run node (the browser part needs node, ui/node_modules and chromium; or pass --no-browser)")?;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !out.status.success() || !lines.iter().any(|l| l["done"] == true) {
        bail!("the browser measurement failed: {lines:?}");
    }
    let mut results = Vec::new();
    for kind in [
        "first page",
        "filtered by serviceId",
        "substring search (q)",
        "sorted by serviceId",
    ] {
        let of: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == kind).collect();
        let visible = if kind == "first page" {
            "fromNavigationMs"
        } else {
            "fromKeystrokeMs"
        };
        results.push(Browser {
            kind: kind.into(),
            runs: of.len(),
            user_visible_ms: median(of.iter().filter_map(|l| l[visible].as_f64()).collect()),
            request_to_rows_ms: median(
                of.iter()
                    .filter_map(|l| l["requestToRowsMs"].as_f64())
                    .collect(),
            ),
            total: of.first().and_then(|l| l["total"].as_u64()).unwrap_or(0),
        });
    }
    Ok(results)
}

pub fn run(args: UiArgs) -> anyhow::Result<UiReport> {
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui");
    if !args.no_browser && !ui.join("node_modules/playwright-core").exists() {
        bail!(
            "the browser part needs `npm ci` in ui/ (and /usr/bin/chromium); or pass --no-browser"
        );
    }
    let controller = topology::controller(&tether, args.shards)?;
    let (swarms, seconds) = {
        let mut spec = topology::SwarmSpec::new(&controller.listen, args.services);
        spec.connect_rate = args.connect_rate;
        topology::start_swarms(&tether, &spec)?
    };
    eprintln!("{} services registered in {seconds:.1} s", args.services);
    let dir = std::env::temp_dir().join(format!("tether-loadtest-ui-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dev_key = dir.join("dev.key");
    let dev_key = dev_key.to_string_lossy().into_owned();
    let mut cmd = Command::new(&tether);
    cmd.args([
        "gateway",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &controller.admin,
        "--dev-key-file",
        &dev_key,
        "--access-log",
        "/dev/null",
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
    ]);
    let mut gateway = Proc::spawn("gateway", cmd)?;
    let ready = gateway.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("tether gateway ready")
    })?;
    let gateway_url = ready
        .split_whitespace()
        .nth(3)
        .context("the gateway's ready line names no URL")?
        .to_string();
    let token = Command::new(&tether)
        .args([
            "token",
            "--scope",
            "portal.r",
            "--user",
            "loadtest",
            "--dev-key-file",
            &dev_key,
        ])
        .output()?;
    let token = format!("Bearer {}", String::from_utf8(token.stdout)?.trim());
    let admin_auth = crate::observe::admin_bearer(&controller.admin)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    std::thread::sleep(Duration::from_secs(2));
    let n = args.requests;
    let first: Vec<String> = (0..n).map(|_| "/services?limit=100".into()).collect();
    let by_service: Vec<String> = (0..n)
        .map(|i| format!("/services?limit=100&serviceId=svc-{}", i % 100))
        .collect();
    let sorted: Vec<String> = (0..n)
        .map(|i| {
            let key = ["serviceId", "-lastSeenAt", "address", "rttMs"][i % 4];
            format!("/services?limit=100&sort={key}")
        })
        .collect();
    let summary: Vec<String> = (0..n).map(|_| "/summary?top=20".into()).collect();
    let one: Vec<String> = {
        let mut r = agent
            .get(&format!("{}/services?limit=1000", controller.admin))
            .header("authorization", &admin_auth)
            .call()?;
        let page: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
        let ids: Vec<String> = page["items"]
            .as_array()
            .context("no items")?
            .iter()
            .filter_map(|i| i["runtimeInstanceId"].as_str().map(str::to_owned))
            .collect();
        (0..n)
            .map(|i| format!("/services/{}", ids[i % ids.len()]))
            .collect()
    };
    let sides = (
        (controller.admin.as_str(), admin_auth.as_str()),
        (gateway_url.as_str(), token.as_str()),
    );
    let added = vec![
        side_by_side(&agent, sides.0, sides.1, "GET /services?limit=100", &first)?,
        side_by_side(
            &agent,
            sides.0,
            sides.1,
            "GET /services?limit=100&serviceId=…",
            &by_service,
        )?,
        side_by_side(
            &agent,
            sides.0,
            sides.1,
            "GET /services?limit=100&sort=…",
            &sorted,
        )?,
        side_by_side(&agent, sides.0, sides.1, "GET /services/{id}", &one)?,
        side_by_side(&agent, sides.0, sides.1, "GET /summary?top=20", &summary)?,
    ];
    let browser = if args.no_browser {
        Vec::new()
    } else {
        browser(&ui, &gateway_url, args.runs)?
    };
    gateway.stop(Duration::from_secs(5));
    topology::stop_all(swarms, controller);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(UiReport {
        services: args.services,
        shards: args.shards,
        added,
        browser,
    })
}

pub fn print(r: &UiReport) {
    println!(
        "gateway's added latency at {} services, {} shards (sequential, interleaved, kept-alive)",
        r.services, r.shards
    );
    println!(
        "{:<40} {:>8} {:>11} {:>11} {:>12} {:>12} {:>9} {:>7}",
        "query",
        "requests",
        "direct p50",
        "direct p99",
        "gateway p50",
        "gateway p99",
        "added ms",
        "ratio"
    );
    for a in &r.added {
        println!(
            "{:<40} {:>8} {:>11.3} {:>11.3} {:>12.3} {:>12.3} {:>9.3} {:>6.2}×",
            a.query,
            a.requests,
            a.direct.p50_ms,
            a.direct.p99_ms,
            a.gateway.p50_ms,
            a.gateway.p99_ms,
            a.added_p50_ms,
            a.ratio_p50
        );
    }
    if !r.browser.is_empty() {
        println!("Admin UI in headless Chromium (Performance API, medians)");
        println!(
            "{:<24} {:>5} {:>18} {:>20} {:>10}",
            "view", "runs", "user-visible ms", "request→rows ms", "matched"
        );
        for b in &r.browser {
            println!(
                "{:<24} {:>5} {:>18.1} {:>20.1} {:>10}",
                b.kind, b.runs, b.user_visible_ms, b.request_to_rows_ms, b.total
            );
        }
        println!(
            "(first page: from navigation start; filters: from the keystroke, the UI's 250 ms debounce included; sorted: from the click on the header)"
        );
    }
}
