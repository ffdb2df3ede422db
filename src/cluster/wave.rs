//! A registration wave's etcd writes without the sockets behind it: the
//! cluster layer's own transactions (`Batch`, ≤ `MAX_TXN_OPS` puts on one
//! lease, sent through its `Pipeline`) of instance values as `encode_instance` writes them, paced at a
//! rate per second and flushed per tick, as a node's coalesced writes are.
//! What the load test runs to tell whether etcd here absorbs a wave faster
//! than the machine's swarms can register (2 cores top out near 15k/s).
//! It never touches a registry, and cleans up by revoking its lease.

use std::time::Duration;
#[cfg(feature = "cluster")]
use {
    super::codec::{Keys, encode_instance},
    super::etcd::{Batch, Pipeline, unary},
    super::{MAX_TXN_OPS, Stats},
    crate::registry::{Node, NodeAddress, Status},
    etcd_client::Client,
    std::sync::Arc,
    std::time::Instant,
    uuid::Uuid,
};

#[derive(Clone, Debug)]
pub struct WaveConfig {
    /// An etcd client URL (`http://127.0.0.1:2379`).
    pub endpoint: String,
    /// Keys go under this prefix, node `wave`.
    pub prefix: String,
    /// Instances registered per second.
    pub rate: u64,
    pub instances: u64,
    /// Transactions in flight at once (the cluster layer has 4).
    pub in_flight: usize,
    /// How often the due instances are written (the cluster's flush tick).
    pub flush: Duration,
}

#[derive(Clone, Debug)]
pub struct WaveReport {
    pub instances: u64,
    /// From the first write to the last acknowledged.
    pub elapsed: Duration,
    /// How long the wave itself lasts at its rate: `elapsed` past it is
    /// how far the writes fell behind.
    pub scheduled: Duration,
    pub txns: u64,
    pub puts: u64,
    /// Keys and values written.
    pub bytes: u64,
    pub txn_ms_p50: f64,
    pub txn_ms_p99: f64,
    pub txn_ms_max: f64,
}

impl WaveReport {
    /// Puts per second achieved.
    pub fn puts_per_second(&self) -> f64 {
        self.puts as f64 / self.elapsed.as_secs_f64()
    }

    /// Whether etcd kept pace: the last write was acknowledged within a
    /// tick and a transaction's p99 of the wave's end.
    pub fn kept_pace(&self, flush: Duration) -> bool {
        let slack = flush + Duration::from_secs_f64(self.txn_ms_p99 / 1000.0);
        self.elapsed <= self.scheduled + slack
    }
}

#[cfg(feature = "cluster")]
/// An instance as the swarms register them: 100 services, one version and
/// envTag, a tag, distinct addresses.
fn instance(i: u64) -> Node {
    let at = crate::controller::now_ms();
    Node {
        runtime_instance_id: Uuid::now_v7(),
        service_id: Arc::from(format!("svc-{}", i % 100)),
        env_tag: Arc::from("prod"),
        version: Arc::from("1.0.0"),
        protocol: Arc::from("https"),
        address: NodeAddress::Ip(
            std::net::Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff)).into(),
        ),
        address_derived: false,
        port: 8443,
        tags_json: Arc::from(r#"{"zone":"a"}"#),
        connected_at_ms: at,
        last_seen_ms: at,
        status: Status::Up,
        shard: 0,
        rtt_us: None,
    }
}

/// Runs one wave against etcd and reports it.
pub fn run(config: &WaveConfig) -> Result<WaveReport, String> {
    if config.rate == 0 || config.instances == 0 || config.in_flight == 0 {
        return Err("a wave needs a rate, instances and at least one transaction in flight".into());
    }
    #[cfg(not(feature = "cluster"))]
    return Err("this tether was built without the cluster layer (--features cluster)".into());
    #[cfg(feature = "cluster")]
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?
        .block_on(wave(config))
}

#[cfg(feature = "cluster")]
async fn wave(config: &WaveConfig) -> Result<WaveReport, String> {
    let mut client = unary("connect", Client::connect([&config.endpoint], None)).await?;
    // Not kept alive: long enough for the wave at its rate, and a minute.
    let ttl = 60 + config.instances / config.rate;
    let lease = unary("lease grant", client.lease_grant(ttl as i64, None))
        .await?
        .id();
    let keys = Keys::new(&config.prefix);
    let stats = Stats::default();
    let mut pipe = Pipeline::new(&client, &stats, config.in_flight);
    pipe.latency = Some(hdrhistogram::Histogram::new(3).expect("3 significant figures"));
    let mut tick = tokio::time::interval(config.flush);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut written = 0;
    while written < config.instances {
        tick.tick().await;
        let due =
            ((started.elapsed().as_secs_f64() * config.rate as f64) as u64).min(config.instances);
        // As a flush writes its dirty set: batches as they fill, then
        // every one acknowledged before the next tick's.
        let mut batch = Batch::default();
        for i in written..due {
            let n = instance(i);
            batch.put(
                keys.instance("wave", &n.runtime_instance_id),
                encode_instance(&n),
                lease,
            );
            if batch.len() == MAX_TXN_OPS {
                pipe.push(std::mem::take(&mut batch)).await?;
            }
        }
        pipe.push(batch).await?;
        pipe.finish().await?;
        written = due;
    }
    let elapsed = started.elapsed();
    // Revoking the lease deletes every key of the wave.
    unary("lease revoke", client.lease_revoke(lease)).await?;
    let read = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    let latency = pipe.latency.take().expect("asked for");
    drop(pipe);
    Ok(WaveReport {
        instances: config.instances,
        elapsed,
        scheduled: Duration::from_secs_f64(config.instances as f64 / config.rate as f64),
        txns: read(&stats.txns),
        puts: read(&stats.puts),
        bytes: read(&stats.bytes),
        txn_ms_p50: ms(latency.value_at_quantile(0.5)),
        txn_ms_p99: ms(latency.value_at_quantile(0.99)),
        txn_ms_max: ms(latency.max()),
    })
}
