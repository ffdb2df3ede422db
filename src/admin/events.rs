//! `GET /events`: the event stream, as a WebSocket (when the request
//! upgrades) or as server-sent events (for curl).
//!
//! First a `hello` carrying the log's `epoch` and the last sequence number
//! before live events (the snapshot point), then every event with its
//! `epoch` and `seq`, in order and without gaps. `?since=SEQ&epoch=E` (or
//! SSE's `Last-Event-ID`, which is `E:SEQ`) replays the kept events after
//! SEQ first, or answers 410 when they are no longer kept or E is not this
//! start's epoch: the client then takes a fresh snapshot. A `since` without
//! its epoch is refused (400): after a restart it would name other events. A subscriber that falls behind its
//! bounded queue is cut (WebSocket close 1008, or a final `cut` SSE event)
//! and must resubscribe with `since`; it never makes the controller hold
//! more memory.
//!
//! One pump thread carries events from every subscription's std channel
//! into the streams' tasks, without ever blocking on one: a stream whose
//! queue is full is cut. A stream counts against `max_event_streams` until
//! its task ends, and a client that stops reading is dropped by the kernel
//! after `stream_send_timeout` (TCP_USER_TIMEOUT on admin sockets), SSE as
//! well as WebSocket.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{AppState, Reply, fail, respond};
use crate::registry::events::{Epoch, Event, ReplayError, Resume, Subscription};
use std::sync::Arc;

/// Events between the pump and one stream's task.
const BRIDGE: usize = 256;

/// Moves events from the event log's std channels into the streams'
/// tokio channels. Events are published on shard threads, which must never
/// touch the runtime's wakers (they signal through file descriptors the
/// shards' fd tables do not share); the pump lives in the process's own.
pub(crate) struct Pump {
    streams: std::sync::Mutex<Vec<(Subscription, mpsc::Sender<Event>)>>,
    /// Wakes the pump when a stream is added (with none it sleeps here).
    added: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl Pump {
    /// Starts the pump's thread; it ends once `halt` is called.
    pub(crate) fn start() -> std::io::Result<Arc<Pump>> {
        let pump = Arc::new(Pump {
            streams: std::sync::Mutex::new(Vec::new()),
            added: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let p = pump.clone();
        std::thread::Builder::new()
            .name("tether-admin-events".into())
            .spawn(move || Pump::run(&p))?;
        Ok(pump)
    }

    pub(crate) fn halt(&self) {
        // Under the lock: the pump checks `stop` and waits holding it, so
        // this notify cannot fall between the two.
        let _streams = self.streams.lock().unwrap();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.added.notify_all();
    }

    fn add(&self, events: Subscription, tx: mpsc::Sender<Event>) {
        self.streams.lock().unwrap().push((events, tx));
        self.added.notify_all();
    }

    /// Until halted, or until the server that owns it is gone.
    fn run(self: &Arc<Pump>) {
        use std::sync::mpsc::TryRecvError;
        while !self.stop.load(std::sync::atomic::Ordering::Relaxed) && Arc::strong_count(self) > 1 {
            let mut moved = false;
            let mut streams = self.streams.lock().unwrap();
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            if streams.is_empty() {
                // Nobody is watching: no polling until a stream is added
                // (the timeout re-checks whether the server is gone).
                let _ = self.added.wait_timeout(streams, Duration::from_secs(1));
                continue;
            }
            streams.retain(|(events, tx)| {
                loop {
                    // Room in the stream's queue first: a slow reader's
                    // events wait in its bounded queue in the log, which
                    // cuts it when that is full.
                    let room = match tx.try_reserve() {
                        Ok(room) => room,
                        Err(mpsc::error::TrySendError::Full(())) => return true,
                        // The stream ended: dropping `events` frees its
                        // place in the log.
                        Err(mpsc::error::TrySendError::Closed(())) => return false,
                    };
                    match events.try_recv() {
                        Ok(event) => {
                            room.send(event);
                            moved = true;
                        }
                        Err(TryRecvError::Empty) => return true,
                        // Cut by the log: dropping the sender ends the
                        // stream with `cut`.
                        Err(TryRecvError::Disconnected) => return false,
                    }
                }
            });
            drop(streams);
            if !moved {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct EventParams {
    since: Option<u64>,
    epoch: Option<String>,
    /// `cluster`: every node's events merged (SSE), each naming its node.
    scope: Option<String>,
}

/// Where to resume, from the query or from `Last-Event-ID` (`E:SEQ`).
fn resume_point(p: &EventParams, last_event_id: Option<&str>) -> Result<Option<Resume>, Reply> {
    let bad = |why: String| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_resume_point",
            format!("{why}: resume with ?since=SEQ&epoch=E as hello and every event carry them"),
        )
    };
    let (since, epoch) = match (p.since, p.epoch.as_deref(), last_event_id) {
        (None, None, None) => return Ok(None),
        (Some(seq), epoch, _) => (seq, epoch),
        (None, Some(_), _) => return Err(bad("epoch without since".into())),
        (None, None, Some(id)) => match id.split_once(':') {
            Some((epoch, seq)) => (
                seq.parse()
                    .map_err(|_| bad(format!("Last-Event-ID {id:?} is not EPOCH:SEQ")))?,
                Some(epoch),
            ),
            None => return Err(bad(format!("Last-Event-ID {id:?} is not EPOCH:SEQ"))),
        },
    };
    let Some(epoch) = epoch else {
        return Err(bad(format!("since={since} without its epoch")));
    };
    let epoch = epoch.parse::<Epoch>().map_err(bad)?;
    Ok(Some(Resume { epoch, seq: since }))
}

/// Subscribes, and bridges the subscription's std channel into the
/// runtime on a blocking thread. Events are published on shard threads,
/// which must never touch the runtime's wakers (they signal through file
/// descriptors the shards' fd tables do not share); the bridge thread
/// lives in the process's own fd table.
fn subscribe(
    state: &AppState,
    since: Option<Resume>,
) -> Result<(u64, mpsc::Receiver<Event>), Reply> {
    let (seq, events) = state.api.subscribe_events(since).map_err(|e| match e {
        ReplayError::Gone { .. } | ReplayError::Ahead { .. } | ReplayError::OtherEpoch { .. } => fail(
            StatusCode::GONE,
            "gone",
            format!("{e}: GET /services, then /events?since=<lastEventSeq>&epoch=<eventEpoch> of /summary"),
        ),
        ReplayError::TooManySubscribers(_) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            e.to_string(),
        ),
    })?;
    let (tx, rx) = mpsc::channel(BRIDGE);
    state.pump.add(events, tx);
    Ok((seq, rx))
}

/// The cluster node whose events a stream carries (None: not clustered).
type Node = Option<std::sync::Arc<str>>;

/// Names the node on a hello or an event: with the epoch and seq, an event
/// is told apart from every other node's.
fn with_node(mut v: serde_json::Value, node: &Node) -> serde_json::Value {
    if let Some(n) = node {
        v["node"] = json!(&**n);
    }
    v
}

fn hello_json(epoch: Epoch, seq: u64, node: &Node) -> String {
    with_node(json!({"type": "hello", "epoch": epoch, "seq": seq}), node).to_string()
}

fn event_json(epoch: Epoch, node: &Node, e: &Event) -> serde_json::Value {
    let mut v = serde_json::to_value(e).expect("events serialize");
    v["type"] = json!("event");
    v["epoch"] = json!(epoch);
    v["at"] = json!(crate::controller::rpc::Rfc3339(e.at_ms).to_string());
    with_node(v, node)
}

pub(crate) async fn events(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<super::AdminPeer>,
    Query(p): Query<EventParams>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    match p.scope.as_deref().filter(|s| !s.is_empty()) {
        None | Some("node") => {}
        Some("cluster") => {
            let caller = Arc::new(super::Caller::from_headers(&headers, peer.addr));
            let resumed = p.since.is_some() || p.epoch.is_some() || last_event_id.is_some();
            return respond_or(cluster_events(&state, caller, resumed, ws.ok()));
        }
        Some(other) => {
            return respond(fail(
                StatusCode::BAD_REQUEST,
                "bad_scope",
                format!("scope is node (the default) or cluster; not {other:?}"),
            ));
        }
    }
    let since = match resume_point(&p, last_event_id) {
        Ok(since) => since,
        Err(reply) => return respond(reply),
    };
    // Held by the stream until its task ends, however it ends.
    let permit = match stream_permit(&state) {
        Ok(p) => p,
        Err(reply) => return respond(reply),
    };
    let (seq, rx) = match subscribe(&state, since) {
        Ok(s) => s,
        Err(reply) => return respond(reply),
    };
    let stop = state.stopping.subscribe();
    let send_timeout = state.config.stream_send_timeout;
    let epoch = state.api.events_epoch();
    let node: Node = state
        .config
        .cluster
        .get()
        .map(|c| std::sync::Arc::from(c.node_id()));
    match ws {
        Ok(upgrade) => upgrade
            .on_upgrade(move |socket| async move {
                stream_ws(socket, (epoch, node), seq, rx, stop, send_timeout).await;
                drop(permit);
            })
            .into_response(),
        Err(_) => stream_sse((epoch, node), seq, rx, stop, permit).into_response(),
    }
}

/// One of the event streams' bounded places, or the 503 that says so.
fn stream_permit(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, Reply> {
    state.streams.clone().try_acquire_owned().map_err(|_| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            format!(
                "{} event streams are open, the limit",
                state.config.max_event_streams
            ),
        )
    })
}

fn respond_or(r: Result<Response, Reply>) -> Response {
    r.unwrap_or_else(respond)
}

/// Merged texts queued for one cluster stream's client at most.
const MERGED_QUEUE: usize = 4096;

/// `GET /events?scope=cluster` (SSE, or a WebSocket of text messages):
/// this node's hello and events, and each other node's, read from its own
/// `/events` as the caller (nodes that join later are picked up within a
/// second; one that goes says `node_left`). Every hello and event names
/// its node: (node, epoch, seq) is unique across the cluster. It starts
/// live: resume is per node (`/events?since=…&epoch=…` on that node). If
/// this node's own part is cut (a slow reader), the WebSocket closes with
/// 1008 and SSE says `cut`: the client reloads and starts again.
fn cluster_events(
    state: &AppState,
    caller: Arc<super::Caller>,
    resumed: bool,
    websocket: Option<WebSocketUpgrade>,
) -> Result<Response, Reply> {
    let Some(cluster) = state.config.cluster.get().cloned() else {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "no_cluster",
            "scope=cluster: this controller runs alone (no --cluster)",
        ));
    };
    if resumed {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_scope",
            "scope=cluster is a stream that starts live (take GET /services?scope=cluster \
             first); resume each node's own stream with since and epoch",
        ));
    }
    let permit = stream_permit(state)?;
    let (seq, mut local) = subscribe(state, None)?;
    let node: Node = Some(Arc::from(cluster.node_id()));
    let epoch = state.api.events_epoch();
    let (tx, rx) = mpsc::channel::<String>(MERGED_QUEUE);
    let _ = tx.try_send(hello_json(epoch, seq, &node));
    let local_tx = tx.clone();
    // Set before this node's `cut` is queued: a WebSocket closes after it.
    let local_cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_flag = local_cut.clone();
    let (stop, send_timeout) = (state.stopping.subscribe(), state.config.stream_send_timeout);
    tokio::spawn(async move {
        loop {
            // The client gone, this task ends at once (a quiet node sends
            // nothing that would fail): dropping `local` frees its place in
            // the event log.
            let e = tokio::select! {
                e = local.recv() => e,
                () = local_tx.closed() => return,
            };
            let Some(e) = e else { break };
            if local_tx
                .send(event_json(epoch, &node, &e).to_string())
                .await
                .is_err()
            {
                return;
            }
        }
        let why = with_node(
            json!({"type": "cut", "resumeSince": seq, "epoch": epoch}),
            &node,
        );
        cut_flag.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = local_tx.send(why.to_string()).await;
    });
    let state = state.clone();
    tokio::spawn(async move {
        let followed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        while !tx.is_closed() {
            for (peer, admin) in cluster.peers() {
                if !followed.lock().unwrap().insert(peer.clone()) {
                    continue;
                }
                let (state, caller, tx, followed) =
                    (state.clone(), caller.clone(), tx.clone(), followed.clone());
                tokio::spawn(async move {
                    follow_peer(&state, &caller, &peer, &admin, &tx).await;
                    followed.lock().unwrap().remove(&peer);
                    let _ = tx
                        .send(json!({"type": "node_left", "node": peer}).to_string())
                        .await;
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    if let Some(upgrade) = websocket {
        return Ok(upgrade
            .on_upgrade(move |socket| async move {
                merged_ws(socket, rx, local_cut, stop, send_timeout).await;
                drop(permit);
            })
            .into_response());
    }
    let stream = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        let text = rx.recv().await?;
        Some((
            Ok::<_, Infallible>(SseEvent::default().data(text)),
            (rx, permit),
        ))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Copies one peer's `/events` data lines into `tx` until either ends.
async fn follow_peer(
    state: &AppState,
    caller: &super::Caller,
    peer: &str,
    admin: &str,
    tx: &mpsc::Sender<String>,
) {
    use http_body_util::BodyExt;
    let response = match super::forward::send(
        state,
        caller,
        (peer, admin),
        axum::http::Method::GET,
        "/events",
        None,
    )
    .await
    {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            let why = format!("node {peer} answered {}", r.status());
            let _ = tx
                .send(json!({"type": "node_error", "node": peer, "message": why}).to_string())
                .await;
            return;
        }
        Err((_, why)) => {
            let _ = tx
                .send(
                    json!({"type": "node_error", "node": peer, "message": why["message"]})
                        .to_string(),
                )
                .await;
            return;
        }
    };
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // The client gone, the peer's stream (its permit and subscriber
        // there) is let go at once, not at its next keep-alive.
        let frame = tokio::select! {
            f = body.frame() => f,
            () = tx.closed() => return,
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        // One event's lines at most: a peer never sends more per event.
        if pending.len() > 1 << 20 {
            return;
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(text) = line.strip_prefix("data:") else {
                continue;
            };
            let text = text.trim();
            // The peer's own end (`cut`, `stopping`) names no node: say
            // whose, so a reader knows that node's events have a gap.
            let text = if text.contains(r#""type":"event""#) {
                text.to_string()
            } else {
                match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) if v["type"] == "cut" || v["type"] == "stopping" => {
                        json!({"type": "node_cut", "node": peer, "why": v["type"]}).to_string()
                    }
                    _ => text.to_string(),
                }
            };
            if tx.send(text).await.is_err() {
                return;
            }
        }
    }
}

/// The merged texts as WebSocket messages, until the client goes, the
/// controller stops, or this node's part is cut (`cut`: 1008).
async fn merged_ws(
    socket: WebSocket,
    mut rx: mpsc::Receiver<String>,
    local_cut: Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
    send_timeout: Duration,
) {
    let (mut tx, mut inbound) = socket.split();
    loop {
        tokio::select! {
            text = rx.recv() => {
                let Some(text) = text else { return };
                let sent = tokio::time::timeout(send_timeout, tx.send(Message::Text(text.into()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
                // This node's part is incomplete from here: the client
                // reloads and streams again (what is queued is moot).
                if local_cut.load(std::sync::atomic::Ordering::Relaxed) {
                    let reason = "too slow; reload GET /services?scope=cluster and stream again";
                    let _ = tx.send(Message::Close(Some(CloseFrame { code: 1008, reason: reason.into() }))).await;
                    return;
                }
            }
            _ = stop.changed() => {
                let reason = "controller stopping; reload and stream again";
                let _ = tx.send(Message::Close(Some(CloseFrame { code: 1001, reason: reason.into() }))).await;
                return;
            }
            incoming = inbound.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn stream_ws(
    socket: WebSocket,
    (epoch, node): (Epoch, Node),
    seq: u64,
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
    send_timeout: Duration,
) {
    let (mut tx, mut inbound) = socket.split();
    let hello = hello_json(epoch, seq, &node);
    if tx.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    let mut last = seq;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(e) => {
                    last = e.seq;
                    let text = event_json(epoch, &node, &e).to_string();
                    match tokio::time::timeout(send_timeout, tx.send(Message::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        _ => return,
                    }
                }
                None => {
                    // Cut for falling behind: say where to resume.
                    let reason = format!("too slow; resubscribe with since={last}&epoch={epoch}");
                    let frame = CloseFrame { code: 1008, reason: reason.into() };
                    let _ = tx.send(Message::Close(Some(frame))).await;
                    return;
                }
            },
            _ = stop.changed() => {
                let reason = format!("controller stopping; resubscribe with since={last}&epoch={epoch}");
                let _ = tx.send(Message::Close(Some(CloseFrame { code: 1001, reason: reason.into() }))).await;
                return;
            }
            incoming = inbound.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

fn stream_sse(
    (epoch, node): (Epoch, Node),
    seq: u64,
    rx: mpsc::Receiver<Event>,
    stop: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    // No `id:` on hello: a reconnecting EventSource sends the last id it
    // saw as Last-Event-ID, and the events replayed after hello must not be
    // skipped.
    let hello = SseEvent::default()
        .event("hello")
        .data(hello_json(epoch, seq, &node));
    // The permit lives in the stream's state: it is released when hyper
    // drops the body (the client left, or the kernel gave up on it).
    let live = futures_util::stream::unfold(
        (rx, stop, seq, false, permit),
        move |(mut rx, mut stop, last, done, permit)| {
            let node = node.clone();
            async move {
                if done {
                    return None;
                }
                let next = tokio::select! {
                    e = rx.recv() => e.ok_or("cut"),
                    _ = stop.changed() => Err("stopping"),
                };
                Some(match next {
                    Ok(e) => {
                        let sse = SseEvent::default()
                            .event(e.kind.label())
                            .id(format!("{epoch}:{}", e.seq))
                            .data(event_json(epoch, &node, &e).to_string());
                        (Ok(sse), (rx, stop, e.seq, false, permit))
                    }
                    Err(why) => {
                        let data =
                            json!({"type": why, "resumeSince": last, "epoch": epoch}).to_string();
                        (
                            Ok(SseEvent::default().event(why).data(data)),
                            (rx, stop, last, true, permit),
                        )
                    }
                })
            }
        },
    );
    Sse::new(futures_util::stream::once(async move { Ok(hello) }).chain(live))
        .keep_alive(KeepAlive::default())
}
