//! The cluster layer's one session with etcd at a time, on the cluster
//! thread's runtime: grant the lease and keep it alive, publish the node
//! record and every local up instance, list the cluster from one revision,
//! then watch from the next while coalesced local changes are written.
//! Any error ends the session; `run` marks the view stale and starts a new
//! one after a pause (a new lease: the old one's keys that were not
//! written again expire with it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::codec::{NodeRecord, encode_instance};
use super::view::View;
use super::{MAX_TXN_OPS, Shared};
use crate::controller::Api;
use crate::registry::{Query, Status};

/// Each request to etcd gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per page of a list.
const LIST_PAGE: i64 = 4096;
/// Records read from the registry per lock.
const REGISTRY_CHUNK: usize = 1024;
/// Largest watch response read. etcd batches events: a registration wave
/// makes responses of many MB, and a node's lease expiry deletes all its
/// keys in one revision (50,000 deletes: ~5 MB). Fragments are not asked
/// for: etcd 3.4 builds them by re-measuring the growing message at each
/// event (quadratic), which took ~25 s for one node's 50,000 deletes.
const MAX_WATCH_MESSAGE: usize = 64 << 20;
/// Transactions a node has in flight to etcd at once (see `Pipeline`).
const TXNS_IN_FLIGHT: usize = 4;
/// Pauses between sessions grow to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Fail = String;

pub(super) async fn unary<T>(
    what: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let text = e.to_string();
            let auth = [
                "user name is empty",
                "permission denied",
                "authentication failed",
            ]
            .iter()
            .any(|m| text.contains(m));
            let hint = if auth {
                " (etcd's auth is on: give --cluster-user and --cluster-password-file, a user \
                 whose role may read and write --cluster-prefix)"
            } else {
                tls_hint(&format!("{e:?}"))
            };
            Err(format!("etcd {what}: {text}{hint}"))
        }
        Err(_) => Err(format!("etcd {what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// What to do about a TLS failure, from the error's whole chain (tonic's
/// transport error says only "transport error" at the top).
fn tls_hint(chain: &str) -> &'static str {
    let chain = chain.to_ascii_lowercase();
    let has = |m: &str| chain.contains(m);
    if has("invalidcontenttype") || has("corruptmessage") || has("invalid http version") {
        " (etcd and this node disagree on TLS: give --cluster-ca (and --cluster-cert, \
         --cluster-key) when etcd serves https, and none when it serves http)"
    } else if has("unknownissuer") || has("notvalidforname") || has("invalid peer certificate") {
        " (etcd's certificate is not one --cluster-ca signed for the endpoint's host: give \
         --cluster-ca the CA that signed it)"
    } else if has("certificaterequired") || has("badcertificate") {
        " (etcd wants a client certificate it trusts: give --cluster-cert and --cluster-key, \
         signed by a CA in etcd's --trusted-ca-file)"
    } else {
        ""
    }
}

/// A session's error, with the hint a plaintext node needs when etcd
/// serves only TLS: such an etcd closes the connection on the HTTP/2
/// preface, which hyper reports as "broken pipe" or "connection reset"
/// while it writes, "connection closed" while it waits for the answer.
/// Only where a session starts: a plain etcd that restarts closes
/// connections too, and that needs no TLS advice.
fn plaintext_hint(tls: bool, e: String) -> String {
    let closed = ["broken pipe", "connection reset", "connection closed"];
    let starting = e.starts_with("etcd connect") || e.starts_with("etcd lease grant");
    if !tls && starting && closed.iter().any(|c| e.contains(c)) {
        format!("{e} (etcd closed the connection: if it serves https, give --cluster-ca)")
    } else {
        e
    }
}

/// Sessions until `stopped`.
pub(super) async fn run(shared: Arc<Shared>, api: Arc<Api>, mut stopped: oneshot::Receiver<()>) {
    let mut backoff = Duration::from_millis(250);
    // The last session's lease: the next session takes the node record
    // over from it (a lease etcd still keeps, or one it let expire).
    let mut last_lease = None;
    loop {
        let started = Instant::now();
        let Err(e) = session(&shared, &api, &mut stopped, &mut last_lease).await else {
            return;
        };
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        let e = plaintext_hint(shared.config.tls.is_some(), e);
        shared
            .view
            .lock()
            .unwrap()
            .set_stale(crate::controller::now_ms());
        tracing::warn!(
            "cluster: {e}; serving this node's sockets and the last view (stale) meanwhile"
        );
        *shared.last_error.lock().unwrap() = Some(e);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = &mut stopped => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// What woke the session's loop.
enum Wake {
    Stop,
    /// The lease or the watch was lost: the session ends.
    Lost(String),
    Flush,
}

/// Applies the watch's events to the view as they come; on a compaction
/// lists again and watches anew; says why when the watch is lost.
async fn follow(
    shared: Arc<Shared>,
    api: Arc<Api>,
    mut client: Client,
    mut watch: WatchStream,
    lost: oneshot::Sender<String>,
) {
    let why = loop {
        let resp = match watch.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break "etcd ended the watch".to_string(),
            Err(e) => break format!("etcd watch: {e}"),
        };
        if resp.canceled() {
            if resp.compact_revision() == 0 {
                break format!("etcd cancelled the watch: {}", resp.cancel_reason());
            }
            // Compacted past where the watch stood: list afresh.
            tracing::info!(
                "cluster: watch compacted at revision {}; listing again",
                resp.compact_revision()
            );
            match list_and_watch(&shared, &api, &mut client).await {
                Ok(w) => watch = w,
                Err(e) => break e,
            }
            continue;
        }
        let (changed, arrived) = {
            let mut view = shared.view.lock().unwrap();
            apply(&mut view, &resp);
            (view.take_changed(), view.take_arrived())
        };
        supersede_moved(&shared, &api, &mut client, &arrived).await;
        // With the view let go: the registry is locked before the view
        // (discovery reads the view under the registry), never after.
        if !changed.is_empty() {
            api.remote_instances_changed(changed.iter().map(|(s, e, p)| (&**s, &**e, &**p)));
        }
    };
    let _ = lost.send(why);
}

/// A thread that moves the local event log's changes into a dirty set as
/// they come, so the session never falls behind the log while it waits on
/// etcd; `cut` says the log dropped the subscription (it fell behind
/// anyway, in a burst larger than its queue) and a resync is due.
struct Collector {
    dirty: Arc<Mutex<HashSet<Uuid>>>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(api: &Api) -> Result<Collector, Fail> {
        let events = api
            .subscribe_events(None)
            .map_err(|e| format!("the local event log: {e}"))?
            .1;
        let dirty = Arc::new(Mutex::new(HashSet::new()));
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, c, st) = (dirty.clone(), cut.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("tether-cluster-events".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match events.recv_timeout(Duration::from_millis(100)) {
                        Ok(e) => {
                            d.lock().unwrap().insert(e.runtime_instance_id);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            c.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the cluster's event thread: {e}"))?;
        Ok(Collector {
            dirty,
            cut,
            stop,
            thread: Some(thread),
        })
    }

    fn take(&self) -> HashSet<Uuid> {
        std::mem::take(&mut self.dirty.lock().unwrap())
    }

    /// Ids taken that still need writing.
    fn give_back(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.dirty.lock().unwrap().extend(ids);
    }

    fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn session(
    shared: &Arc<Shared>,
    api: &Arc<Api>,
    stopped: &mut oneshot::Receiver<()>,
    last_lease: &mut Option<i64>,
) -> Result<(), Fail> {
    let config = &shared.config;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &config.user {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(t);
    }
    let mut client = unary("connect", Client::connect(&config.endpoints, Some(options))).await?;
    let ttl = config.lease_ttl.as_secs() as i64;
    let lease = unary("lease grant", client.lease_grant(ttl, None))
        .await?
        .id();
    shared.stats.leases.fetch_add(1, Ordering::Relaxed);
    let (lease_lost_tx, mut lease_lost) = oneshot::channel();
    let keeper = Task(tokio::spawn(keep_alive(
        client.clone(),
        lease,
        config.lease_ttl,
        lease_lost_tx,
    )));
    // Subscribed before the instances are read, so no change falls between.
    let mut events = Collector::start(api)?;
    let record = NodeRecord {
        admin: config.admin_url.clone(),
        epoch: api.events_epoch().to_string(),
        started_at_ms: crate::controller::now_ms(),
    };
    let record = serde_json::to_vec(&record).expect("records serialize");
    let previous = last_lease.replace(lease);
    if let Err(e) = claim_node(shared, &mut client, lease, previous, record).await {
        // Another node holds the id: this lease would only expire unused.
        let _ = unary("lease revoke", client.lease_revoke(lease)).await;
        *last_lease = previous;
        return Err(e);
    }
    resync(shared, api, &mut client, lease, &events).await?;
    if let Some(old) = previous {
        // Every key of this node is on the new lease now: what is still on
        // the old one is stale (a cut-off session's leftovers).
        let _ = unary("lease revoke", client.lease_revoke(old)).await;
    }
    let watch = list_and_watch(shared, api, &mut client).await?;
    *shared.last_error.lock().unwrap() = None;
    tracing::info!(
        "cluster: node {} in sync with etcd ({} other instances)",
        config.node_id,
        shared.view.lock().unwrap().instance_count()
    );
    // The watch is read by a task of its own, so it never waits on this
    // loop's writes (a watcher that reads slowly is caught up by etcd from
    // its database, in batches: the view would lag the cluster).
    let (watch_lost_tx, mut watch_lost) = oneshot::channel();
    let _watcher = Task(tokio::spawn(follow(
        shared.clone(),
        api.clone(),
        client.clone(),
        watch,
        watch_lost_tx,
    )));

    let mut flush = tokio::time::interval(config.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            _ = &mut *stopped => Wake::Stop,
            lost = &mut lease_lost => Wake::Lost(lost.unwrap_or_else(|_| "the lease keeper ended".into())),
            lost = &mut watch_lost => Wake::Lost(lost.unwrap_or_else(|_| "the watch ended".into())),
            _ = flush.tick() => Wake::Flush,
        };
        match wake {
            Wake::Stop => {
                // Flush what is pending, then revoke: the others drop this
                // node's instances now, not a TTL later.
                let _ = write_dirty(shared, api, &mut client, lease, events.take()).await;
                drop(keeper);
                let _ = unary("lease revoke", client.lease_revoke(lease)).await;
                return Ok(());
            }
            Wake::Lost(why) => return Err(why),
            Wake::Flush if events.was_cut() => {
                // Cut from the event log (a burst beyond its queue): start
                // again from everything the registry holds.
                events = Collector::start(api)?;
                resync(shared, api, &mut client, lease, &events).await?;
            }
            Wake::Flush => write_dirty(shared, api, &mut client, lease, events.take()).await?,
        }
    }
}

/// Writes this node's record `n/{node}` on `lease`: created if no node
/// holds the id, or taken over from this process's previous lease. Refused
/// while another live node holds the id, so that two processes given the
/// same `--node-id` never overwrite (and delete) each other's keys.
async fn claim_node(
    shared: &Shared,
    client: &mut Client,
    lease: i64,
    previous: Option<i64>,
    record: Vec<u8>,
) -> Result<(), Fail> {
    let key = shared.keys.node(&shared.config.node_id);
    let put = || {
        TxnOp::put(
            key.clone(),
            record.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    let absent = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
    let txn = Txn::new().when([absent]).and_then([put()]);
    if unary("txn", client.txn(txn)).await?.succeeded() {
        return Ok(());
    }
    if let Some(previous) = previous {
        let ours = Compare::lease(key.clone(), CompareOp::Equal, previous);
        let txn = Txn::new().when([ours]).and_then([put()]);
        if unary("txn", client.txn(txn)).await?.succeeded() {
            return Ok(());
        }
    }
    let holder = unary("get", client.get(key.clone(), None)).await?;
    let admin = holder
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok())
        .map_or_else(|| "unknown".to_string(), |r| r.admin);
    Err(format!(
        "node id {:?} is held by another live node (admin API {admin}): give every node \
         its own --node-id. If that was this node before a crash, its lease expires \
         within {:?} and this node joins then",
        shared.config.node_id, shared.config.lease_ttl
    ))
}

/// Aborts a session's task (keep-alive, watch) with the session.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `lease` alive every TTL/3 until it is lost (an answer of TTL 0,
/// no answer for a TTL, a broken stream), then says why.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, lost: oneshot::Sender<String>) {
    let why = async {
        let (mut keeper, mut answers) =
            unary("lease keep-alive", client.lease_keep_alive(lease)).await?;
        let mut tick = tokio::time::interval(ttl / 3);
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if answered.elapsed() > ttl {
                        return Err::<(), Fail>(format!("the lease went unanswered for {ttl:?}"));
                    }
                    unary("lease keep-alive", keeper.keep_alive()).await?;
                }
                m = answers.message() => match m {
                    Ok(Some(r)) if r.ttl() > 0 => answered = Instant::now(),
                    Ok(Some(_)) => return Err("the lease expired".into()),
                    Ok(None) => return Err("etcd ended the lease keep-alive".into()),
                    Err(e) => return Err(format!("etcd lease keep-alive: {e}")),
                },
            }
        }
    }
    .await;
    if let Err(why) = why {
        let _ = lost.send(why);
    }
}

/// Writes the current state of each dirty instance: a put of its value if
/// it is up here, else a delete. In transactions of at most `MAX_TXN_OPS`.
async fn write_dirty(
    shared: &Shared,
    api: &Api,
    client: &mut Client,
    lease: i64,
    dirty: HashSet<Uuid>,
) -> Result<(), Fail> {
    if dirty.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = dirty.into_iter().collect();
    let me = &shared.config.node_id;
    // Each id once: the transactions in flight touch disjoint keys.
    let mut pipe = Pipeline::new(client, &shared.stats, TXNS_IN_FLIGHT);
    let mut batch = Batch::default();
    for chunk in ids.chunks(REGISTRY_CHUNK) {
        let nodes = api.nodes(chunk);
        for (id, node) in chunk.iter().zip(nodes) {
            let key = shared.keys.instance(me, id);
            match node.filter(|n| n.status == Status::Up) {
                Some(n) => batch.put(key, encode_instance(&n), lease),
                None => batch.delete(key),
            }
            if batch.len() == MAX_TXN_OPS {
                pipe.push(std::mem::take(&mut batch)).await?;
            }
        }
    }
    pipe.push(batch).await?;
    pipe.finish().await
}

/// Every up instance of the registry, written again, and every key of this
/// node's that no longer names one deleted (a new lease, or a cut from the
/// event log: the changes in between are not known one by one).
async fn resync(
    shared: &Shared,
    api: &Api,
    client: &mut Client,
    lease: i64,
    events: &Collector,
) -> Result<(), Fail> {
    shared.stats.resyncs.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    // A change collected before page k is read is in that page's read if
    // the page (or a later one) holds the instance: it need not be written again from the
    // dirty set. Only the others are (read earlier, or not up any more),
    // so a resync that runs beside a registration wave writes it once.
    let mut changed: HashMap<Uuid, u32> = HashMap::new();
    let me = &shared.config.node_id;
    let up = Query {
        status: Some(Status::Up),
        ..Default::default()
    };
    let mut cursor = 0;
    let mut pipe = Pipeline::new(client, &shared.stats, TXNS_IN_FLIGHT);
    let mut batch = Batch::default();
    let mut read_at: HashMap<Uuid, u32> = HashMap::new();
    for k in 0u32.. {
        for id in events.take() {
            // The latest collection counts: a change after the page that
            // read the instance (a deregistration, say) must be written.
            changed.insert(id, k);
        }
        let page = api.page_uncounted(up.clone(), cursor, REGISTRY_CHUNK);
        for n in &page.items {
            read_at.insert(n.runtime_instance_id, k);
            batch.put(
                shared.keys.instance(me, &n.runtime_instance_id),
                encode_instance(n),
                lease,
            );
            if batch.len() == MAX_TXN_OPS {
                pipe.push(std::mem::take(&mut batch)).await?;
            }
        }
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    changed.retain(|id, k| read_at.get(id).is_none_or(|read| read < k));
    events.give_back(changed.into_keys());
    let here = read_at;
    pipe.push(std::mem::take(&mut batch)).await?;
    pipe.finish().await?;
    // What etcd still has of this node that is not up here any more.
    let mut gone = Vec::new();
    let mine = shared.keys.instances_of(me);
    list(client, mine.as_bytes(), true, |key, _, _| {
        if let Some(super::codec::KeyKind::Instance(_, id)) = shared.keys.parse(key)
            && !here.contains_key(&id)
        {
            gone.push(key.to_string());
        }
    })
    .await?;
    let stale = gone.len();
    for key in gone {
        batch.delete(key);
        if batch.len() == MAX_TXN_OPS {
            pipe.push(std::mem::take(&mut batch)).await?;
        }
    }
    pipe.push(batch).await?;
    pipe.finish().await?;
    tracing::info!(
        "cluster: {} instances published again, {stale} stale keys deleted, in {:?}",
        here.len(),
        started.elapsed()
    );
    Ok(())
}

/// Every key under `prefix` at one revision, page by page; that revision.
async fn list(
    client: &mut Client,
    prefix: &[u8],
    keys_only: bool,
    mut each: impl FnMut(&str, &[u8], i64),
) -> Result<i64, Fail> {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if keys_only {
            options = options.with_keys_only();
        }
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let resp = unary("list", client.get(start.clone(), Some(options))).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            if let Ok(key) = kv.key_str() {
                each(key, kv.value(), kv.create_revision());
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(revision),
        }
    }
}

/// Operations for one transaction.
#[derive(Default)]
pub(super) struct Batch {
    ops: Vec<TxnOp>,
    puts: u64,
    deletes: u64,
    bytes: u64,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.ops.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub(super) fn put(&mut self, key: String, value: Vec<u8>, lease: i64) {
        self.bytes += (key.len() + value.len()) as u64;
        self.puts += 1;
        self.ops.push(TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        ));
    }

    fn delete(&mut self, key: String) {
        self.bytes += key.len() as u64;
        self.deletes += 1;
        self.ops.push(TxnOp::delete(key, None));
    }

    /// One transaction of what it holds; counted in `s` once etcd took it.
    async fn send(mut self, s: &super::Stats, mut client: Client) -> Result<(), Fail> {
        // `Pipeline::push` sends no empty batch.
        assert!(
            !self.ops.is_empty() && self.ops.len() <= MAX_TXN_OPS,
            "a txn holds 1..=MAX_TXN_OPS ops (etcd refuses bigger ones)"
        );
        let ops = std::mem::take(&mut self.ops);
        unary("txn", client.txn(Txn::new().and_then(ops))).await?;
        s.txns.fetch_add(1, Ordering::Relaxed);
        s.puts
            .fetch_add(std::mem::take(&mut self.puts), Ordering::Relaxed);
        s.deletes
            .fetch_add(std::mem::take(&mut self.deletes), Ordering::Relaxed);
        s.bytes
            .fetch_add(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        Ok(())
    }
}

/// Transactions sent with up to `max` in flight: one at a time, etcd here
/// took 37,700–49,200 puts/s over eight runs and mostly fell behind a
/// 50,000/s wave (each waits for its commit); four at a time
/// it keeps pace with a 50,000/s wave (`tether-loadtest etcd-wave`). The
/// caller keeps the transactions in flight on disjoint keys.
pub(super) struct Pipeline<'a> {
    client: Client,
    stats: &'a super::Stats,
    max: usize,
    in_flight: FuturesUnordered<BoxFuture<'a, Result<Duration, Fail>>>,
    /// Each transaction's round trip, in µs, when asked for (the wave).
    pub(super) latency: Option<hdrhistogram::Histogram<u64>>,
}

impl<'a> Pipeline<'a> {
    pub(super) fn new(client: &Client, stats: &'a super::Stats, max: usize) -> Pipeline<'a> {
        assert!(max >= 1, "at least one transaction in flight");
        Pipeline {
            client: client.clone(),
            stats,
            max,
            in_flight: FuturesUnordered::new(),
            latency: None,
        }
    }

    fn took(&mut self, sent: Result<Duration, Fail>) -> Result<(), Fail> {
        let took = sent?;
        if let Some(h) = &mut self.latency {
            let _ = h.record(took.as_micros() as u64);
        }
        Ok(())
    }

    /// Sends `batch` once fewer than `max` are in flight (an empty one is
    /// nothing to send); the first failure of any is returned.
    pub(super) async fn push(&mut self, batch: Batch) -> Result<(), Fail> {
        if batch.is_empty() {
            return Ok(());
        }
        while self.in_flight.len() >= self.max {
            let sent = self.in_flight.next().await.expect("in flight");
            self.took(sent)?;
        }
        let (stats, client) = (self.stats, self.client.clone());
        self.in_flight.push(Box::pin(async move {
            let started = Instant::now();
            batch.send(stats, client).await.map(|()| started.elapsed())
        }));
        Ok(())
    }

    /// Waits for every transaction in flight.
    pub(super) async fn finish(&mut self) -> Result<(), Fail> {
        while let Some(sent) = self.in_flight.next().await {
            self.took(sent)?;
        }
        Ok(())
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Lists the whole cluster at one revision into a fresh view (swapped in
/// whole: no half list is ever served), then watches from the next.
async fn list_and_watch(
    shared: &Shared,
    api: &Api,
    client: &mut Client,
) -> Result<WatchStream, Fail> {
    let config = &shared.config;
    let prefix = shared.keys.all().as_bytes().to_vec();
    let mut fresh = View::new(
        &config.node_id,
        shared.keys.clone(),
        config.max_remote_instances,
    );
    let revision = list(client, &prefix, false, |key, value, created| {
        fresh.put_created(key, value, created)
    })
    .await?;
    shared.stats.lists.fetch_add(1, Ordering::Relaxed);
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut watcher = client
        .watch_client()
        .max_decoding_message_size(MAX_WATCH_MESSAGE);
    let watch = unary("watch", watcher.watch(prefix, Some(options))).await?;
    fresh.revision = revision;
    fresh.stale = false;
    fresh.take_changed();
    // A service that moved while this node was away from etcd: its old
    // record here goes too.
    let arrived = fresh.take_arrived();
    let old = {
        let mut view = shared.view.lock().unwrap();
        fresh.dropped += view.dropped;
        fresh.malformed += view.malformed;
        std::mem::replace(&mut *view, fresh)
    };
    // Freed with the view let go (millions of entries: discovery waits on
    // the view with the registry locked).
    drop(old);
    api.all_remote_instances_changed();
    supersede_moved(shared, api, client, &arrived).await;
    Ok(watch)
}

/// Records here of identities that just registered on another node are
/// superseded (their sockets closed with 4000), as a second registration
/// on one node supersedes the first. Which registration is newer is
/// settled without trusting the nodes' clocks alone: this node's key for
/// its record must have been created in etcd before the other's, and its
/// UUID v7 be older too; when the two disagree (a key re-created after an
/// etcd outage, a clock far off) both records stay, and the stale one
/// goes with its socket or its pong deadline.
async fn supersede_moved(
    shared: &Shared,
    api: &Api,
    client: &mut Client,
    arrived: &[(super::view::RemoteInstance, i64)],
) {
    if arrived.is_empty() {
        return;
    }
    let moved: Vec<_> = arrived
        .iter()
        .map(|(r, _)| {
            let v = &r.value;
            crate::registry::MovedInstance {
                service_id: &v.service_id,
                env_tag: &v.env_tag,
                address: &v.address,
                port: v.port,
                node: &r.node,
            }
        })
        .collect();
    let mut superseded = 0u64;
    for (i, local) in api.moved_candidates(&moved) {
        let (remote, remote_created) = &arrived[i];
        let key = shared.keys.instance(&shared.config.node_id, &local);
        let ours = match unary("get", client.get(key, None)).await {
            Ok(r) => r.kvs().first().map(|kv| kv.create_revision()),
            Err(e) => {
                tracing::warn!("cluster: cannot order {local} against {}: {e}", remote.id);
                continue;
            }
        };
        // No key yet: this node's record is too new to be written (< one
        // flush), so it is the newer one.
        let older_in_etcd = ours.is_some_and(|created| created < *remote_created);
        if older_in_etcd && local < remote.id && api.supersede_moved(&local, &moved[i]) {
            superseded += 1;
        }
    }
    if superseded > 0 {
        shared
            .stats
            .superseded
            .fetch_add(superseded, Ordering::Relaxed);
        tracing::info!(
            "cluster: {superseded} services registered on another node: their records here superseded"
        );
    }
}

fn apply(view: &mut View, resp: &etcd_client::WatchResponse) {
    for event in resp.events() {
        let Some(kv) = event.kv() else { continue };
        let Ok(key) = kv.key_str() else { continue };
        match event.event_type() {
            EventType::Put => view.put_created(key, kv.value(), kv.create_revision()),
            EventType::Delete => view.delete(key),
        }
    }
    if let Some(h) = resp.header() {
        view.revision = view.revision.max(h.revision());
    }
}

#[cfg(test)]
mod tests {
    use super::{plaintext_hint, prefix_end};

    #[test]
    fn a_plaintext_node_refused_by_a_tls_etcd_is_told_to_give_its_ca() {
        // The three ways hyper words it, as seen from a TLS-only etcd 3.5.
        for e in [
            "etcd connect: transport error: broken pipe (os error 32)",
            "etcd lease grant: grpc request error: connection reset by peer",
            "etcd lease grant: grpc request error: code: 'The operation was cancelled', \
             source: tonic::transport::Error(Transport, hyper::Error(Canceled, \"connection closed\"))",
        ] {
            assert!(
                plaintext_hint(false, e.into()).ends_with("give --cluster-ca)"),
                "{e}"
            );
            assert_eq!(plaintext_hint(true, e.into()), e, "a TLS node is not told");
        }
        // Mid-session (a plain etcd restarting): no TLS advice.
        let put = "etcd put: grpc request error: connection reset by peer";
        assert_eq!(plaintext_hint(false, put.into()), put);
    }

    #[test]
    fn a_prefix_ends_where_its_last_byte_grows() {
        assert_eq!(prefix_end(b"/t/"), b"/t0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
