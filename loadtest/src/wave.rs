//! `etcd-wave`: can etcd on this machine take a registration wave faster
//! than its swarms can make one? The cluster layer's own transactions
//! (tether::cluster::wave: ≤ 128 puts on one lease, flushed per 100 ms
//! tick, through its pipeline) at a chosen rate, on a real etcd started
//! here, with 1, 2 or 4 (what the cluster layer uses) transactions in
//! flight.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tether::cluster::wave::{WaveConfig, WaveReport};

use crate::cluster::Etcd;

#[derive(Args, Debug)]
pub struct WaveArgs {
    /// Instances registered per second.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 100_000)]
    pub instances: u64,
    /// Transactions in flight to try, one wave each.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub in_flight: Vec<usize>,
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct WaveRow {
    pub in_flight: usize,
    pub seconds: f64,
    pub scheduled_seconds: f64,
    pub kept_pace: bool,
    pub puts_per_second: f64,
    pub txns: u64,
    pub txns_per_second: f64,
    pub ops_per_txn: f64,
    pub bytes_per_instance: f64,
    pub txn_ms_p50: f64,
    pub txn_ms_p99: f64,
    pub txn_ms_max: f64,
}

#[derive(Serialize, Debug)]
pub struct WaveResults {
    pub rate: u64,
    pub instances: u64,
    pub rows: Vec<WaveRow>,
}

const FLUSH: Duration = Duration::from_millis(100);

pub fn run(args: WaveArgs) -> anyhow::Result<WaveResults> {
    let mut rows = Vec::new();
    for (i, &in_flight) in args.in_flight.iter().enumerate() {
        // A fresh etcd for each, so one wave's history does not slow the next.
        let etcd = Etcd::start(&args.etcd)?;
        let config = WaveConfig {
            endpoint: etcd.client.clone(),
            prefix: format!("/tether-wave/{i}/"),
            rate: args.rate,
            instances: args.instances,
            in_flight,
            flush: FLUSH,
        };
        let r: WaveReport = tether::cluster::wave::run(&config)
            .map_err(anyhow::Error::msg)
            .context("the wave")?;
        let seconds = r.elapsed.as_secs_f64();
        rows.push(WaveRow {
            in_flight,
            seconds,
            scheduled_seconds: r.scheduled.as_secs_f64(),
            kept_pace: r.kept_pace(FLUSH),
            puts_per_second: r.puts_per_second(),
            txns: r.txns,
            txns_per_second: r.txns as f64 / seconds,
            ops_per_txn: r.puts as f64 / r.txns.max(1) as f64,
            bytes_per_instance: r.bytes as f64 / r.puts.max(1) as f64,
            txn_ms_p50: r.txn_ms_p50,
            txn_ms_p99: r.txn_ms_p99,
            txn_ms_max: r.txn_ms_max,
        });
    }
    Ok(WaveResults {
        rate: args.rate,
        instances: args.instances,
        rows,
    })
}

pub fn print(r: &WaveResults) {
    println!(
        "etcd-wave: {} instances at {}/s ({:.1} s of wave), transactions of ≤ {} puts flushed every {} ms",
        r.instances,
        r.rate,
        r.instances as f64 / r.rate as f64,
        tether::cluster::MAX_TXN_OPS,
        FLUSH.as_millis()
    );
    println!(
        "| txns in flight | took s | kept pace | puts/s | txns/s | puts/txn | B/instance | txn p50 / p99 / max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for w in &r.rows {
        println!(
            "| {} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} / {:.1} / {:.1} |",
            w.in_flight,
            w.seconds,
            if w.kept_pace { "yes" } else { "no" },
            w.puts_per_second,
            w.txns_per_second,
            w.ops_per_txn,
            w.bytes_per_instance,
            w.txn_ms_p50,
            w.txn_ms_p99,
            w.txn_ms_max
        );
    }
}
