//! `GET /services`, `GET /services/{id}`, `GET /summary`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{AppState, Reply, fail, respond};
use crate::controller::rpc::node_json;
use crate::metrics;
use crate::registry::{self, Node, Status};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListParams {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<String>,
    pub q: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub sort: Option<String>,
    /// `node` (the default): this node's instances; `cluster`: then the
    /// other nodes' (up ones, each naming its node).
    pub scope: Option<String>,
}

/// An empty query parameter means no filter.
fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

pub(crate) fn parse_status(status: Option<&str>) -> Result<Option<Status>, Reply> {
    match status {
        None | Some("") => Ok(None),
        Some("up") => Ok(Some(Status::Up)),
        Some("down") => Ok(Some(Status::Down)),
        Some(other) => Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_status",
            format!("status is up or down, not {other:?}"),
        )),
    }
}

/// A node as the admin API shows it: the discovery shape plus its status
/// and shard.
pub(crate) fn item(node: &Node) -> Value {
    crate::controller::assert_registry_unlocked("writing an admin item");
    let mut v = node_json(node);
    v["status"] = json!(node.status);
    v["shard"] = json!(node.shard);
    // The last ping's round trip; null when none was measured (a service
    // that pings the controller itself is spared the controller's pings).
    v["rttMs"] = json!(node.rtt_us.map(|us| us as f64 / 1000.0));
    // Where the address came from: the registration, or (light-4j's
    // clients name none) the socket's peer.
    v["addressSource"] = json!(if node.address_derived {
        "peer"
    } else {
        "registered"
    });
    v
}

/// A listing's filter, cursor and page size from its query parameters, or
/// the 400 that says which is wrong.
pub(crate) fn list_query(
    p: ListParams,
    max_page: usize,
) -> Result<(registry::Query, u32, usize), Reply> {
    let status = parse_status(p.status.as_deref())?;
    let cursor = match p
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(str::parse::<u32>)
    {
        None => 0,
        Some(Ok(c)) => c,
        Some(Err(_)) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                "bad_cursor",
                "cursor is the nextCursor of a previous page",
            ));
        }
    };
    let limit = match given(p.limit).map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(l)) => l.clamp(1, max_page),
        Some(Err(_)) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                "bad_limit",
                "limit is a number of items",
            ));
        }
    };
    let sort = match given(p.sort) {
        None => None,
        Some(text) => match registry::Sort::parse(&text) {
            Some(sort) => Some(sort),
            None => {
                let names: Vec<&str> = registry::SortKey::NAMES.iter().map(|(n, _)| *n).collect();
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "bad_sort",
                    format!(
                        "sort is one of {}, with a leading - for descending; not {text:?}",
                        names.join(", ")
                    ),
                ));
            }
        },
    };
    let query = registry::Query {
        service_id: given(p.service_id),
        env_tag: given(p.env_tag),
        status,
        q: given(p.q),
        sort,
    };
    Ok((query, cursor, limit))
}

pub(crate) async fn list_reply(state: &AppState, mut p: ListParams) -> Reply {
    let cluster = match given(p.scope.take()).as_deref() {
        None | Some("node") => None,
        Some("cluster") => match state.config.cluster.get() {
            Some(c) => Some(c.clone()),
            None => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "no_cluster",
                    "scope=cluster: this controller runs alone (no --cluster)",
                );
            }
        },
        Some(other) => {
            return fail(
                StatusCode::BAD_REQUEST,
                "bad_scope",
                format!("scope is node (the default) or cluster; not {other:?}"),
            );
        }
    };
    // A cluster listing's cursor past this node's own: `r` and an offset
    // into the others'.
    let mut remote_from = None;
    if cluster.is_some()
        && let Some(offset) = p.cursor.as_deref().and_then(|c| c.strip_prefix('r'))
    {
        match offset.parse::<usize>() {
            Ok(n) => remote_from = Some(n),
            Err(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "bad_cursor",
                    "cursor is the nextCursor of a previous page",
                );
            }
        }
        p.cursor = None;
    }
    let (query, cursor, limit) = match list_query(p, state.config.max_page) {
        Ok(parsed) => parsed,
        Err(reply) => return reply,
    };
    if let Some(cluster) = cluster {
        if query.sort.is_some() {
            return fail(
                StatusCode::BAD_REQUEST,
                "sort_per_node",
                "sort orders one node's instances: drop scope=cluster, or the sort",
            );
        }
        return cluster_list(state, cluster, query, cursor, remote_from, limit).await;
    }
    // A sorted listing holds a key per match until it answers: only a
    // few at once (the others wait their turn).
    let _permit = match query.sort {
        Some(_) => Some(
            state
                .sorts
                .clone()
                .acquire_owned()
                .await
                .expect("the sort semaphore is never closed"),
        ),
        None => None,
    };
    // A listing may visit every record: not on the runtime's threads.
    let api = state.api.clone();
    let page = tokio::task::spawn_blocking(move || api.page(query, cursor, limit))
        .await
        .expect("listing does not panic");
    let body = json!({
        "total": page.total,
        "items": page.items.iter().map(item).collect::<Vec<_>>(),
        "nextCursor": page.next.map(|c| c.to_string()),
    });
    (StatusCode::OK, body)
}

/// This node's page, then the other nodes' instances (up ones, matching
/// serviceId, envTag and q), each item naming its node; `total` counts
/// both. Paged this node's first, then by an `r`-offset into the others'.
async fn cluster_list(
    state: &AppState,
    cluster: std::sync::Arc<crate::cluster::Cluster>,
    query: registry::Query,
    cursor: u32,
    remote_from: Option<usize>,
    limit: usize,
) -> Reply {
    let api = state.api.clone();
    let here = query.clone();
    // Past this node's own, its page only counts them.
    let local_limit = if remote_from.is_some() { 0 } else { limit };
    let page = tokio::task::spawn_blocking(move || api.page(here, cursor, local_limit))
        .await
        .expect("listing does not panic");
    let me = cluster.node_id().to_string();
    let mut items: Vec<Value> = if remote_from.is_some() {
        Vec::new()
    } else {
        page.items.iter().map(item).collect()
    };
    for i in &mut items {
        i["node"] = json!(me);
    }
    let local_done = remote_from.is_some() || page.next.is_none();
    let offset = remote_from.unwrap_or(0);
    let room = if local_done { limit - items.len() } else { 0 };
    let wants_up = query.status.is_none_or(|s| s == Status::Up);
    let (env, q) = (
        query.env_tag.clone(),
        query.q.clone().map(|q| q.to_ascii_lowercase()),
    );
    let service = query.service_id.clone();
    let (remote_total, remote) = tokio::task::spawn_blocking(move || {
        if !wants_up {
            return (0, Vec::new());
        }
        let keep = |id: &Uuid, v: &crate::cluster::codec::InstanceValue| {
            env.as_deref().is_none_or(|e| e == &*v.env_tag)
                && q.as_deref().is_none_or(|q| {
                    [
                        &*v.service_id,
                        &*v.env_tag,
                        &*v.version,
                        &*v.address,
                        &*v.tags_json,
                    ]
                    .iter()
                    .any(|s| s.to_ascii_lowercase().contains(q))
                        || id.to_string().contains(q)
                })
        };
        cluster.with_view(|v| v.list_page(service.as_deref(), keep, offset, room))
    })
    .await
    .expect("listing does not panic");
    let shown = remote.len();
    items.extend(remote.iter().map(super::cluster::remote_item));
    let next = if !local_done {
        page.next.map(|c| c.to_string())
    } else if offset + shown < remote_total {
        Some(format!("r{}", offset + shown))
    } else {
        None
    };
    let body = json!({
        "total": page.total + remote_total,
        "items": items,
        "nextCursor": next,
    });
    (StatusCode::OK, body)
}

/// A path's runtimeInstanceId, or the 400 that says it is not one.
pub(crate) fn instance_id(id: &str) -> Result<Uuid, Reply> {
    Uuid::parse_str(id).map_err(|_| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("{id:?} is not a runtimeInstanceId"),
        )
    })
}

pub(crate) fn one_reply(state: &AppState, id: &str) -> Reply {
    let id = match instance_id(id) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    let remote = || state.config.cluster.get()?.remote(&id);
    match state.api.node(&id) {
        Some(node) if node.status == Status::Up => (StatusCode::OK, item(&node)),
        // Up on another node of the cluster (it may be down here).
        local => match remote() {
            Some(r) => (StatusCode::OK, super::cluster::remote_item(&r)),
            None => match local {
                Some(node) => (StatusCode::OK, item(&node)),
                None => fail(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no instance {id}"),
                ),
            },
        },
    }
}

pub(crate) fn summary_reply(state: &AppState, top: Option<usize>) -> Reply {
    let api = &state.api;
    let summary = api.summary(top.unwrap_or(100).min(10_000));
    let counts = api.counts();
    let shards: Vec<Value> = api
        .stats()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "shard": i,
                "connections": metrics::read(&s.open_connections),
                "upgraded": metrics::read(&s.open_upgraded),
                "admitted": metrics::read(&s.open_admitted),
            })
        })
        .collect();
    let body = json!({
        "total": summary.up + summary.down,
        "byStatus": {"up": summary.up, "down": summary.down},
        "distinctServices": summary.distinct_services,
        "byService": summary.services.iter().map(|(s, n)| json!({"serviceId": s, "up": n})).collect::<Vec<_>>(),
        "shards": shards,
        "commandsInFlight": api.commands_in_flight(),
        "eventSubscribers": counts.event_subscribers,
        "lastEventSeq": counts.last_event_seq,
        "eventEpoch": api.events_epoch(),
        // This node's name in a cluster (the UI then asks GET /cluster);
        // null when it runs alone.
        "node": state.config.cluster.get().map(|c| c.node_id().to_string()),
    });
    (StatusCode::OK, body)
}

pub(crate) async fn list(State(state): State<AppState>, Query(p): Query<ListParams>) -> Response {
    respond(list_reply(&state, p).await)
}

pub(crate) async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    respond(one_reply(&state, &id))
}

#[derive(Deserialize)]
pub(crate) struct SummaryParams {
    top: Option<usize>,
}

pub(crate) async fn summary(
    State(state): State<AppState>,
    Query(p): Query<SummaryParams>,
) -> Response {
    respond(summary_reply(&state, p.top))
}
