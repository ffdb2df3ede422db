//! Many simulated services in one process: worker threads (each with its
//! own fd table, so one process can hold more sockets than RLIMIT_NOFILE),
//! spread over source addresses, ramping at a bounded connect rate.
//! Each simulated service has a distinct address (10.x.y.z) so identities
//! never collide, and realistic metadata (serviceIds spread over
//! `distinct_ids`, a version, an envTag, a zone tag).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::worker::{NoObserver, Probe, SwarmStats, Worker, WorkerConfig};
use super::{Backoff, Controllers, NoTools, ServiceSpec};
use crate::engine::io::StartGroup;

/// Connections one worker thread holds at most (one fd table each).
pub const MAX_PER_THREAD: usize = 15_000;

#[derive(Clone, Debug)]
pub struct SwarmConfig {
    /// Services are spread over these by index, and move to the next
    /// whenever a connection fails or ends.
    pub controllers: Controllers,
    /// None spreads the services over `controllers` by index; Some(i)
    /// starts them all at the `i`th.
    pub first_controller: Option<usize>,
    pub services: usize,
    pub service_id: String,
    /// serviceIds are `ID-0 … ID-(n-1)` when n > 1.
    pub distinct_ids: usize,
    /// Added to every simulated service's index (several swarms, distinct addresses).
    pub index_offset: usize,
    pub env_tag: Option<String>,
    pub threads: Option<usize>,
    pub sources: Vec<IpAddr>,
    /// New connections per second, in all.
    pub connect_rate: f64,
    pub backoff: Backoff,
    pub client_ping: Option<Duration>,
    pub jwt: Option<String>,
    pub run_for: Option<Duration>,
    /// Time a `discovery/lookup` round trip every this long from one
    /// service in `probe_one_in`.
    pub probe_every: Option<Duration>,
    pub probe_one_in: usize,
}

impl SwarmConfig {
    pub fn new(controllers: Controllers, services: usize) -> SwarmConfig {
        SwarmConfig {
            controllers,
            first_controller: None,
            services,
            service_id: "swarm".into(),
            distinct_ids: 1,
            index_offset: 0,
            env_tag: Some("prod".into()),
            threads: None,
            sources: Vec::new(),
            connect_rate: 5_000.0,
            backoff: Backoff::default(),
            client_ping: None,
            jwt: None,
            run_for: None,
            probe_every: None,
            probe_one_in: 100,
        }
    }

    fn spec(&self, index: usize) -> ServiceSpec {
        let i = index + self.index_offset;
        let service_id = if self.distinct_ids > 1 {
            format!("{}-{}", self.service_id, i % self.distinct_ids)
        } else {
            self.service_id.clone()
        };
        let address = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        let mut spec = ServiceSpec::new(&service_id, &address, 8443 + (i >> 24) as u16);
        spec.env_tag = self.env_tag.clone();
        spec.tags
            .insert("zone".into(), Value::from(["a", "b", "c"][i % 3]));
        spec.jwt = self.jwt.clone();
        spec
    }
}

pub struct Swarm {
    stats: Arc<SwarmStats>,
    probes: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Swarm {
    pub fn start(config: SwarmConfig) -> std::io::Result<Swarm> {
        let threads = config
            .threads
            .unwrap_or_else(|| config.services.div_ceil(MAX_PER_THREAD))
            .max(1);
        let stats = Arc::new(SwarmStats::default());
        stats
            .target
            .store(config.services as u64, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let probes = Arc::new(std::sync::Mutex::new(
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("valid bounds"),
        ));
        let worker = WorkerConfig {
            controllers: config.controllers.clone(),
            first_controller: config.first_controller,
            authorization: None,
            sources: config.sources.clone(),
            backoff: config.backoff,
            connect_rate: config.connect_rate / threads as f64,
            register_timeout: Duration::from_secs(30),
            client_ping: config.client_ping,
            stop: stop.clone(),
            deadline: config.run_for.map(|d| started + d),
            own_fd_table: true,
            probe: config.probe_every.map(|every| Probe {
                every,
                one_in: config.probe_one_in,
                probes: probes.clone(),
            }),
        };
        let per_thread = config.services.div_ceil(threads);
        let mut group = StartGroup::default();
        for t in 0..threads {
            let first = t * per_thread;
            let specs: Vec<Arc<ServiceSpec>> = (first..(first + per_thread).min(config.services))
                .map(|i| Arc::new(config.spec(i)))
                .collect();
            let (worker, stats) = (worker.clone(), stats.clone());
            group.spawn(format!("tether-swarm-{t}"), move |ready| {
                let tools = Arc::new(NoTools);
                let setup = Worker::new(worker, specs, first, tools, NoObserver, stats, None);
                ready.then_run(setup, Worker::run);
            });
        }
        let (handles, ready) = group.wait();
        // Dropped on failure: stops and joins the threads that did start.
        let swarm = Swarm {
            stats,
            probes,
            stop,
            threads: handles,
            started,
        };
        ready.map_err(|(t, why)| std::io::Error::other(format!("swarm thread {t}: {why}")))?;
        Ok(swarm)
    }

    pub fn stats(&self) -> &Arc<SwarmStats> {
        &self.stats
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Forgets the probes so far (the harness times the steady state,
    /// not the ramp).
    pub fn reset_probes(&self) {
        self.probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
    }

    /// Probe round trips so far: (count, p50 µs, p99 µs).
    pub fn probe_latency(&self) -> (u64, u64, u64) {
        let h = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        (h.len(), h.value_at_quantile(0.5), h.value_at_quantile(0.99))
    }

    pub fn registered(&self) -> u64 {
        self.stats.registered.load(Ordering::Relaxed)
    }

    /// Waits until `n` are registered at once, or the timeout.
    pub fn wait_registered(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.registered() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.registered() >= n
    }

    /// True while any worker runs (they stop at `run_for`).
    pub fn running(&self) -> bool {
        self.threads.iter().any(|t| !t.is_finished())
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.halt();
    }
}
