//! `cluster`: N services split over 2–3 controller nodes on one real etcd
//! (started here, on loopback ports of its own), all as processes. It
//! measures what the nodes write to etcd during the registration wave and
//! at rest (transactions and operations per second, bytes per instance,
//! keys and database size as etcd counts them), how long every node's view
//! of the others takes to converge, and, after one node is SIGKILLed, how
//! long the others take to drop it (its lease TTL) and whether any of
//! their own services was marked down meanwhile.
//!
//! The tether binary must be built with `--features cluster`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::observe::{metric, scrape};
use crate::procs::{self, Proc};
use crate::topology::{self, Controller, SwarmSpec};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Services in all, split evenly over the nodes.
    #[arg(long, default_value_t = 100_000)]
    pub services: usize,
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Shards per node.
    #[arg(long, default_value_t = 8)]
    pub shards: usize,
    /// New connections per second, per node.
    #[arg(long, default_value_t = 10_000.0)]
    pub connect_rate: f64,
    /// Each node's --cluster-lease-ttl, in seconds.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: u64,
    /// Seconds of rest after the wave (no churn: what is written then).
    #[arg(long, default_value_t = 10)]
    pub hold: u64,
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd: PathBuf,
    #[arg(long)]
    pub tether: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Default, Clone, Copy)]
pub struct Writes {
    pub txns: f64,
    pub puts: f64,
    pub deletes: f64,
    pub bytes: f64,
}

impl Writes {
    fn of(nodes: &[String]) -> anyhow::Result<Writes> {
        let mut w = Writes::default();
        for admin in nodes {
            let m = scrape(admin)?;
            let op = |o: &str| metric(&m, &format!("tether_cluster_etcd_ops_total{{op=\"{o}\"}}"));
            w.txns += op("txn");
            w.puts += op("put");
            w.deletes += op("delete");
            w.bytes += metric(&m, "tether_cluster_etcd_bytes_total");
        }
        Ok(w)
    }

    fn since(self, before: Writes) -> Writes {
        Writes {
            txns: self.txns - before.txns,
            puts: self.puts - before.puts,
            deletes: self.deletes - before.deletes,
            bytes: self.bytes - before.bytes,
        }
    }
}

#[derive(Serialize)]
pub struct Rates {
    pub seconds: f64,
    pub txns_per_s: f64,
    pub ops_per_s: f64,
    pub bytes_per_s: f64,
}

fn rates(w: Writes, seconds: f64) -> Rates {
    let s = seconds.max(1e-3);
    Rates {
        seconds,
        txns_per_s: w.txns / s,
        ops_per_s: (w.puts + w.deletes) / s,
        bytes_per_s: w.bytes / s,
    }
}

#[derive(Serialize)]
pub struct ClusterReport {
    pub services: usize,
    pub nodes: usize,
    pub shards: usize,
    pub lease_ttl_s: u64,
    /// The registration wave: every service registered on its node.
    pub wave_seconds: f64,
    pub registrations_per_s: f64,
    /// From the wave's start until every node saw every other's services.
    pub converged_seconds: f64,
    pub wave_writes: Writes,
    pub wave_rates: Rates,
    /// Ops per transaction during the wave (at most 128).
    pub ops_per_txn: f64,
    /// Key and value bytes written per instance put.
    pub bytes_per_instance: f64,
    /// RSS growth of a node that holds no service, per instance of the
    /// others it sees: what each node's view of the cluster costs.
    pub view_bytes_per_instance: f64,
    pub hold_writes: Writes,
    pub hold_rates: Rates,
    /// As etcd counts them (its /metrics) once the wave has settled.
    pub etcd_keys: f64,
    pub etcd_db_bytes: f64,
    /// After the last node was SIGKILLed: until the others' views had
    /// dropped it and its services.
    pub kill_converged_seconds: f64,
    /// Until the first of its instances left a survivor's view (its lease
    /// expired in etcd).
    pub kill_first_drop_seconds: f64,
    /// After the kill: until all its services had registered again on the
    /// survivors (each knows every node's address), and how many did.
    pub moved_seconds: f64,
    /// Until 99 % of them had (the rest back off after a refused try).
    pub moved_99_seconds: f64,
    pub moved: f64,
    /// The kernel's listen-queue overflows meanwhile (a reconnect wave
    /// larger than net.core.somaxconn × shards waits on SYN retries).
    pub listen_overflows: f64,
    /// Full re-publications by the survivors (the first, and one per cut
    /// from their event log).
    pub survivor_resyncs: f64,
    /// The surviving nodes' own services marked down during all this.
    pub false_downs: f64,
}

/// etcd on loopback ports of its own, its data in a temporary directory.
pub(crate) struct Etcd {
    proc: Option<Proc>,
    dir: PathBuf,
    pub(crate) client: String,
}

impl Etcd {
    pub(crate) fn start(binary: &Path) -> anyhow::Result<Etcd> {
        if !binary.exists() {
            bail!(
                "{} is missing: install Debian's etcd-server",
                binary.display()
            );
        }
        let client_port = procs::free_port()?;
        let peer_port = procs::free_port_after(client_port)?;
        let dir = std::env::temp_dir().join(format!("tether-loadtest-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(binary);
        cmd.args(["--name", "lt", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("lt={peer}")])
            .args(["--logger", "zap", "--log-level", "error"]);
        let proc = Proc::spawn("etcd", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client_port)).is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not listen within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Etcd {
            proc: Some(proc),
            dir,
            client,
        })
    }

    fn metrics(&self) -> anyhow::Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        Ok(agent
            .get(&format!("{}/metrics", self.client))
            .call()
            .context("etcd /metrics")?
            .body_mut()
            .read_to_string()?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each node's count of the others' instances, from its /metrics.
fn remote_counts(admins: &[String]) -> Vec<f64> {
    admins
        .iter()
        .map(|a| scrape(a).map_or(-1.0, |m| metric(&m, "tether_cluster_remote_instances")))
        .collect()
}

/// Up instances the nodes hold themselves, summed.
fn local_up(admins: &[String]) -> f64 {
    admins
        .iter()
        .map(|a| scrape(a).map_or(0.0, |m| metric(&m, "tether_services{status=\"up\"}")))
        .sum()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<f64> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(started.elapsed().as_secs_f64())
}

pub fn run(args: ClusterArgs) -> anyhow::Result<ClusterReport> {
    if !(2..=3).contains(&args.nodes) {
        bail!("--nodes is 2 or 3");
    }
    let tether = procs::tether_binary(args.tether.as_deref())?;
    let etcd = Etcd::start(&args.etcd)?;
    let url = format!("etcd://{}", etcd.client.trim_start_matches("http://"));
    // The nodes of a cluster share one admin key (they forward commands):
    // the first node creates the file, the others read it.
    let key_file = etcd.dir.join("admin.key");
    let key = key_file.to_string_lossy().into_owned();
    let ttl = format!("{}s", args.lease_ttl);
    let mut nodes: Vec<Controller> = Vec::new();
    for i in 0..args.nodes {
        let id = format!("n{i}");
        let extra = [
            "--cluster",
            url.as_str(),
            "--node-id",
            id.as_str(),
            "--cluster-lease-ttl",
            ttl.as_str(),
            "--admin-key-file",
            key.as_str(),
        ];
        let node = topology::controller_with(&tether, args.shards, &extra)
            .context("a cluster node did not start (is tether built with --features cluster?)")?;
        nodes.push(node);
    }
    // One more node that holds no service: its RSS growth is the view's
    // cost per remote instance (what every node pays for the others').
    let observer = topology::controller_with(
        &tether,
        1,
        &[
            "--cluster",
            url.as_str(),
            "--node-id",
            "observer",
            "--cluster-lease-ttl",
            ttl.as_str(),
            "--admin-key-file",
            key.as_str(),
        ],
    )?;
    let admins: Vec<String> = nodes.iter().map(|n| n.admin.clone()).collect();
    let per_node = args.services / args.nodes;
    let total = per_node * args.nodes;
    // In sync (its view empty) before the wave starts.
    wait_for("the observer joins", Duration::from_secs(30), || {
        scrape(&observer.admin).is_ok_and(|m| metric(&m, "tether_cluster_stale") == 0.0)
    })?;
    let observer_rss_before = procs::status_kb(observer.proc.pid(), "VmRSS")?;
    let before = Writes::of(&admins)?;
    // The wave: every node's swarms ramp at once.
    let started = Instant::now();
    // Each node's swarms ramp at once, from threads of their own that live
    // until the end: a child's parent-death signal follows the thread that
    // spawned it, not the process.
    let (keep_tx, keep_rx) = std::sync::mpsc::channel::<()>();
    let keep_rx = std::sync::Arc::new(std::sync::Mutex::new(keep_rx));
    let mut ramps = Vec::new();
    let mut spawners = Vec::new();
    let listens: Vec<String> = nodes.iter().map(|n| n.listen.clone()).collect();
    for (i, node) in nodes.iter().enumerate() {
        let (tether, listen, rate) = (tether.clone(), node.listen.clone(), args.connect_rate);
        // Each service knows every node, its own first: the killed node's
        // move to the survivors.
        let also: Vec<String> = listens.iter().filter(|l| **l != listen).cloned().collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let keep = keep_rx.clone();
        spawners.push(std::thread::spawn(move || {
            let mut spec = SwarmSpec::new(&listen, per_node);
            spec.connect_rate = rate;
            spec.group = 10 + i as u8;
            spec.index_base = i * per_node;
            spec.also = also;
            let _ = done_tx.send(topology::start_swarms(&tether, &spec));
            // Until the scenario ends (the sender is dropped).
            let _ = keep.lock().map(|rx| rx.recv());
        }));
        ramps.push(done_rx);
    }
    let mut swarms: Vec<Vec<Proc>> = Vec::new();
    for ramp in ramps {
        let (procs, _) = ramp.recv().context("a ramp thread ended")??;
        swarms.push(procs);
    }
    let wave_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{total} services registered on {} nodes in {wave_seconds:.1} s",
        args.nodes
    );
    let mut last = Vec::new();
    wait_for(
        "every node sees the others",
        Duration::from_secs(120),
        || {
            // A service whose connection failed in the ramp may have moved
            // to another node: each node sees all but what it holds.
            last = remote_counts(&admins);
            let own: Vec<f64> = admins
                .iter()
                .map(|a| local_up(std::slice::from_ref(a)))
                .collect();
            own.iter().sum::<f64>() == total as f64
                && last.iter().zip(&own).all(|(&n, &o)| n == total as f64 - o)
        },
    )
    .with_context(|| format!("each node's count of the others: {last:?}, {total} in all"))?;
    let converged_seconds = started.elapsed().as_secs_f64();
    wait_for(
        "the observer sees every service",
        Duration::from_secs(60),
        || remote_counts(std::slice::from_ref(&observer.admin))[0] == total as f64,
    )?;
    // Settled: the view's strings and tables in place.
    std::thread::sleep(Duration::from_secs(2));
    let observer_rss_growth_kb =
        procs::status_kb(observer.proc.pid(), "VmRSS")?.saturating_sub(observer_rss_before);
    let view_bytes_per_instance = observer_rss_growth_kb as f64 * 1024.0 / total as f64;
    let wave_writes = Writes::of(&admins)?.since(before);
    // At rest: what the nodes write with no churn.
    let at_rest = Writes::of(&admins)?;
    std::thread::sleep(Duration::from_secs(args.hold));
    let hold_writes = Writes::of(&admins)?.since(at_rest);
    let em = etcd.metrics()?;
    let etcd_keys = metric(&em, "etcd_debugging_mvcc_keys_total");
    let etcd_db_bytes = metric(&em, "etcd_mvcc_db_total_size_in_bytes");
    let downs_before: f64 = admins[..args.nodes - 1]
        .iter()
        .map(|a| {
            scrape(a).map_or(0.0, |m| {
                metric(&m, "tether_registry_events_total{kind=\"down\"}")
            })
        })
        .sum();
    // SIGKILL the last node: nothing of it revokes its lease.
    let local_before = local_up(&admins[..args.nodes - 1]);
    // What the victim holds (services that moved in the ramp included),
    // and what each survivor sees before the kill.
    let victim_holds = local_up(&admins[args.nodes - 1..]);
    let seen_before = remote_counts(&admins[..args.nodes - 1]);
    let overflows_before = procs::netstat("TcpExt", "ListenOverflows")?;
    let victim = nodes.pop().expect("two nodes or more");
    let victim_swarms = swarms.pop().expect("its swarms");
    let killed = Instant::now();
    // Not waited for here: the kernel's teardown of its sockets takes
    // seconds at this size, and the lease runs out meanwhile.
    victim.proc.signal(libc::SIGKILL);
    let survivors = &admins[..args.nodes - 1];
    // One watch of both: the survivors' views dropping the killed node,
    // and its services registering again on the survivors.
    let (mut first_drop, mut converged, mut moved_most, mut moved_all) = (None, None, None, None);
    let mut on_survivors = 0.0;
    let mut last_print = 0.0;
    let moved_goal = victim_holds;
    wait_for(
        "the others drop the killed node and take its services",
        Duration::from_secs(args.lease_ttl * 3 + 120),
        || {
            let t = killed.elapsed().as_secs_f64();
            let counts = remote_counts(survivors);
            if first_drop.is_none() && counts.iter().zip(&seen_before).any(|(&n, &b)| n < b) {
                first_drop = Some(t);
            }
            // Each survivor sees what the others hold (the killed node's
            // services that moved to them included).
            let local: Vec<f64> = survivors
                .iter()
                .map(|a| local_up(std::slice::from_ref(a)))
                .collect();
            let sum: f64 = local.iter().sum();
            let settled = counts.iter().zip(&local).all(|(&n, &own)| n == sum - own);
            if converged.is_none() && settled {
                converged = Some(t);
            }
            on_survivors = local_up(survivors) - local_before;
            if moved_most.is_none() && on_survivors >= 0.99 * moved_goal {
                moved_most = Some(t);
            }
            if moved_all.is_none() && on_survivors >= moved_goal {
                moved_all = Some(t);
            }
            if t - last_print >= 1.0 {
                last_print = t;
                eprintln!("{t:.1} s after the kill: views {counts:?}, {on_survivors} moved");
            }
            converged.is_some() && moved_all.is_some()
        },
    )
    .with_context(|| format!("{on_survivors} of {victim_holds} moved"))?;
    let kill_converged_seconds = converged.unwrap_or_default();
    let (moved_99_seconds, moved_seconds) = (
        moved_most.unwrap_or_default(),
        moved_all.unwrap_or_default(),
    );
    let listen_overflows = procs::netstat("TcpExt", "ListenOverflows")? - overflows_before;
    let resyncs: f64 = survivors
        .iter()
        .map(|a| {
            scrape(a).map_or(0.0, |m| {
                metric(&m, "tether_cluster_etcd_ops_total{op=\"resync\"}")
            })
        })
        .sum();
    let downs_after: f64 = survivors
        .iter()
        .map(|a| {
            scrape(a).map_or(0.0, |m| {
                metric(&m, "tether_registry_events_total{kind=\"down\"}")
            })
        })
        .sum();
    victim.proc.kill();
    observer.proc.stop(Duration::from_secs(5));
    for s in victim_swarms {
        s.stop(Duration::from_secs(5));
    }
    for (procs, node) in swarms.into_iter().zip(nodes) {
        topology::stop_all(procs, node);
    }
    drop(keep_tx);
    for s in spawners {
        let _ = s.join();
    }
    let ops = wave_writes.puts + wave_writes.deletes;
    Ok(ClusterReport {
        services: total,
        nodes: args.nodes,
        shards: args.shards,
        lease_ttl_s: args.lease_ttl,
        wave_seconds,
        registrations_per_s: total as f64 / wave_seconds,
        converged_seconds,
        wave_rates: rates(wave_writes, converged_seconds),
        ops_per_txn: ops / wave_writes.txns.max(1.0),
        bytes_per_instance: wave_writes.bytes / wave_writes.puts.max(1.0),
        view_bytes_per_instance,
        wave_writes,
        hold_rates: rates(hold_writes, args.hold as f64),
        hold_writes,
        etcd_keys,
        etcd_db_bytes,
        kill_converged_seconds,
        kill_first_drop_seconds: first_drop.unwrap_or(kill_converged_seconds),
        moved_seconds,
        moved_99_seconds,
        moved: on_survivors,
        listen_overflows: listen_overflows as f64,
        survivor_resyncs: resyncs,
        false_downs: downs_after - downs_before,
    })
}

pub fn print(r: &ClusterReport) {
    println!(
        "cluster: {} services over {} nodes ({} shards each), etcd lease TTL {} s",
        r.services, r.nodes, r.shards, r.lease_ttl_s
    );
    println!(
        "wave: registered in {:.1} s ({:.0}/s); every node saw the others after {:.1} s",
        r.wave_seconds, r.registrations_per_s, r.converged_seconds
    );
    println!(
        "etcd writes during the wave: {:.0} txns ({:.0}/s), {:.0} ops ({:.0}/s, {:.1} per txn), {:.1} MB ({:.2} MB/s)",
        r.wave_writes.txns,
        r.wave_rates.txns_per_s,
        r.wave_writes.puts + r.wave_writes.deletes,
        r.wave_rates.ops_per_s,
        r.ops_per_txn,
        r.wave_writes.bytes / 1e6,
        r.wave_rates.bytes_per_s / 1e6
    );
    println!(
        "bytes per instance (key + value): {:.0}; etcd holds {:.0} keys, db {:.1} MB",
        r.bytes_per_instance,
        r.etcd_keys,
        r.etcd_db_bytes / 1e6
    );
    println!(
        "a node's view of the others: {:.0} B of RSS per remote instance (a node holding no service, seeing all {})",
        r.view_bytes_per_instance, r.services
    );
    println!(
        "at rest ({:.0} s, no churn): {:.0} txns, {:.0} ops written",
        r.hold_rates.seconds,
        r.hold_writes.txns,
        r.hold_writes.puts + r.hold_writes.deletes
    );
    println!(
        "node killed (SIGKILL): its first instance left the others' views after {:.1} s, the last after {:.1} s; false downs on the survivors: {:.0}",
        r.kill_first_drop_seconds, r.kill_converged_seconds, r.false_downs
    );
    println!(
        "its services moved: {:.0} registered again on the survivors, 99 % of them {:.1} s after the kill, all {:.1} s after ({:.0} listen-queue overflows)",
        r.moved, r.moved_99_seconds, r.moved_seconds, r.listen_overflows
    );
    println!(
        "full re-publications by the survivors: {:.0}",
        r.survivor_resyncs
    );
}
