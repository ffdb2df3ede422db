//! `admin`: latency of the admin API's listing at N registered services,
//! `GET /services?limit=100`, first pages and deep pages, sequentially,
//! as one operator's UI would page through.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{procs, topology};

#[derive(clap::Args)]
pub struct AdminArgs {
    #[arg(long, default_value_t = 50_000)]
    pub services: usize,
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// Requests per kind of query.
    #[arg(long, default_value_t = 1_000)]
    pub requests: usize,
    #[arg(long, default_value_t = 50_000)]
    pub per_swarm: usize,
    #[arg(long)]
    pub tether: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct Latency {
    pub query: String,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize)]
pub struct AdminReport {
    pub services: usize,
    pub shards: usize,
    pub latencies: Vec<Latency>,
}

fn measure(
    agent: &ureq::Agent,
    base: &str,
    label: &str,
    paths: &[String],
) -> anyhow::Result<Latency> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for path in paths {
        let started = Instant::now();
        let mut response = agent
            .get(&format!("{base}{path}"))
            .call()
            .with_context(|| format!("GET {path}"))?;
        let body = response.body_mut().read_to_string()?;
        let micros = started.elapsed().as_micros() as u64;
        if !response.status().is_success() || !body.starts_with('{') {
            bail!("GET {path}: HTTP {}", response.status());
        }
        histogram.record(micros.max(1))?;
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(Latency {
        query: label.into(),
        requests: paths.len(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
    })
}

pub fn run(args: AdminArgs) -> anyhow::Result<AdminReport> {
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let controller = topology::controller(&tether, args.shards)?;
    let (swarms, seconds) = {
        let mut spec = topology::SwarmSpec::new(&controller.listen, args.services);
        spec.per_swarm = args.per_swarm;
        topology::start_swarms(&tether, &spec)?
    };
    eprintln!(
        "{} services registered in {seconds:.1} s; measuring {}",
        args.services, controller.admin
    );
    std::thread::sleep(Duration::from_secs(2));
    let agent = crate::observe::admin_agent(&controller.admin, None)?;
    let base = controller.admin.clone();
    // The cursors of successive pages, to measure pages deep in the list.
    let mut cursors = Vec::new();
    let mut cursor = String::new();
    while cursors.len() < args.requests {
        let mut r = agent
            .get(&format!("{base}/services?limit=100{cursor}"))
            .call()?;
        let page: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
        match page["nextCursor"].as_str() {
            Some(next) => {
                cursor = format!("&cursor={next}");
                cursors.push(cursor.clone());
            }
            None => cursor.clear(),
        }
    }
    let n = args.requests;
    let first: Vec<String> = (0..n).map(|_| "/services?limit=100".to_string()).collect();
    let deep: Vec<String> = cursors
        .iter()
        .map(|c| format!("/services?limit=100{c}"))
        .collect();
    let by_service: Vec<String> = (0..n)
        .map(|i| format!("/services?limit=100&serviceId=svc-{}", i % 100))
        .collect();
    let by_q: Vec<String> = (0..n)
        .map(|i| format!("/services?limit=100&q=10.0.{}.", i % 200))
        .collect();
    let latencies = vec![
        measure(
            &agent,
            &base,
            "GET /services?limit=100 (first page)",
            &first,
        )?,
        measure(
            &agent,
            &base,
            "GET /services?limit=100&cursor=… (every page in turn)",
            &deep,
        )?,
        measure(
            &agent,
            &base,
            "GET /services?limit=100&serviceId=… (filter, full count)",
            &by_service,
        )?,
        measure(
            &agent,
            &base,
            "GET /services?limit=100&q=… (substring, full scan)",
            &by_q,
        )?,
    ];
    topology::stop_all(swarms, controller);
    Ok(AdminReport {
        services: args.services,
        shards: args.shards,
        latencies,
    })
}

pub fn print(r: &AdminReport) {
    println!(
        "admin API latency at {} registered services, {} shards (sequential requests)",
        r.services, r.shards
    );
    println!(
        "{:<58} {:>8} {:>9} {:>9} {:>9}",
        "query", "requests", "p50 ms", "p99 ms", "max ms"
    );
    for l in &r.latencies {
        println!(
            "{:<58} {:>8} {:>9.2} {:>9.2} {:>9.2}",
            l.query, l.requests, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
}
