//! Commands to an instance another cluster node holds (`--cluster`): sent
//! to that node's admin API, as the caller, and answered as it answered.
//!
//! Owns: one pooled client per peer node (bounded by `MAX_PEERS`). Never
//! forwards twice: a request another node forwarded here is answered
//! here or not at all (`FORWARDED_BY_HEADER`), so two nodes whose views
//! disagree cannot bounce a command between them. The nodes of a cluster
//! share one admin key (`--admin-key-file`): the peer checks it, the
//! caller's scopes again, and audits the command under the caller's name.
//! The admin URL comes from the holder's record in etcd: it is used only
//! when its host is loopback or one of `--cluster-peer-host`, so a forged
//! record cannot collect the key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use uuid::Uuid;

use super::upstream::{Upstream, UpstreamConfig};
use super::{Caller, Reply, SCOPES_HEADER, State, USER_HEADER, fail};
use crate::registry::Status;

/// Marks a request one node forwarded to another; it names the sender.
pub const FORWARDED_BY_HEADER: &str = "x-tether-forwarded-by";
/// Peer clients kept (one per node's admin URL).
const MAX_PEERS: usize = 1024;
/// Largest answer read from a peer (a command's reply is bounded there).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Default)]
pub(crate) struct Peers {
    clients: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl Peers {
    fn client(&self, url: &str, state: &State) -> Result<Arc<Upstream>, String> {
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        if clients.len() >= MAX_PEERS {
            clients.clear();
        }
        let upstream = Arc::new(Upstream::new(&UpstreamConfig {
            url: url.to_string(),
            key: Some(state.config.key.clone()),
            ca: None,
            client_cert: None,
        })?);
        clients.insert(url.to_string(), upstream.clone());
        Ok(upstream)
    }
}

/// The node (its name and admin URL) that holds `id`, when this one does
/// not hold it up and the caller's request was not forwarded already.
pub(crate) fn holder(state: &State, caller: &Caller, id: &Uuid) -> Option<(String, String)> {
    if caller.forwarded_by.is_some() {
        return None;
    }
    let cluster = state.config.cluster.get()?;
    if state.api.node(id).is_some_and(|n| n.status == Status::Up) {
        return None;
    }
    cluster.holder_admin(id)
}

/// This node's id in the cluster ("" when not clustered).
pub(crate) fn this_node(state: &State) -> String {
    state
        .config
        .cluster
        .get()
        .map_or("", |c| c.node_id())
        .to_string()
}

/// Sends `method path` with `body` to the node at `admin` as `caller`, and
/// gives its answer, with `"node"` added.
pub(crate) async fn forward(
    state: &State,
    caller: &Caller,
    (node, admin): (String, String),
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Reply {
    let response = match send(state, caller, (&node, &admin), method, path, body).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let status = response.status();
    let unreachable = |why: String| {
        fail(
            StatusCode::BAD_GATEWAY,
            "peer_unreachable",
            format!("node {node} at {admin}: {why}"),
        )
    };
    let body = match Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return unreachable(e.to_string()),
    };
    let mut v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return unreachable(format!("its answer is not JSON: {e}")),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("node".into(), Value::String(node));
    }
    (status, v)
}

/// Sends `method path` with `body` to the node at `admin` as `caller` (to
/// a trusted peer host only); its response, its body still to read (a
/// stream, for `GET /events`), or why there is none.
pub(crate) async fn send(
    state: &State,
    caller: &Caller,
    (node, admin): (&str, &str),
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<hyper::Response<hyper::body::Incoming>, Reply> {
    let unreachable = |why: String| {
        fail(
            StatusCode::BAD_GATEWAY,
            "peer_unreachable",
            format!("node {node} at {admin}: {why}"),
        )
    };
    let trusted = state
        .config
        .cluster
        .get()
        .is_some_and(|c| c.trusts_peer_url(admin));
    if !trusted {
        return Err(fail(
            StatusCode::BAD_GATEWAY,
            "peer_not_trusted",
            format!(
                "node {node} names its admin API {admin:?}, whose host is not loopback nor in \
                 --cluster-peer-host: the command (and the admin key) is not sent there"
            ),
        ));
    }
    let upstream = state.peers.client(admin, state).map_err(unreachable)?;
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", upstream.authority())
        .header(USER_HEADER, &caller.who)
        .header(SCOPES_HEADER, &caller.scopes)
        .header(FORWARDED_BY_HEADER, this_node(state))
        .header("content-type", "application/json");
    if let Some(bearer) = upstream.bearer() {
        builder = builder.header("authorization", bearer);
    }
    let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = builder
        .body(Full::new(bytes))
        .expect("a well-formed request");
    let response = upstream.send(request).await.map_err(unreachable)?;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::MISDIRECTED_REQUEST {
        return Err(fail(
            StatusCode::BAD_GATEWAY,
            "peer_refused",
            format!(
                "node {node} refused this node ({status}): cluster nodes share one --admin-key-file, \
                 and each allows the host of its --cluster-admin-url"
            ),
        ));
    }
    Ok(response)
}
