//! `GET /cluster` and `GET /cluster/services`: how this node's view of the
//! other controller nodes stands, and their instances (`--cluster`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cluster::view::RemoteInstance;

use super::{AppState, Reply, fail, respond};

/// Another node's instance as the admin API shows it: what discovery has
/// of it, and the node that holds it.
pub(crate) fn remote_item(r: &RemoteInstance) -> Value {
    // As discovery shows it (connectedAt from its UUID v7), without the
    // socket's last-seen time: the holder has that, this node does not.
    let mut v =
        crate::controller::rpc::node_json(&crate::cluster::view::registry_node(&r.id, &r.value, 0));
    if let Some(fields) = v.as_object_mut() {
        fields.remove("lastSeenAt");
        fields.remove("connected");
    }
    v["node"] = json!(r.node.as_ref());
    v["status"] = json!("up");
    v
}

fn no_cluster() -> Reply {
    fail(
        StatusCode::NOT_FOUND,
        "no_cluster",
        "this controller runs alone (start it with --cluster etcd://… --node-id N)",
    )
}

pub(crate) async fn status(State(state): State<AppState>) -> Response {
    let Some(cluster) = state.config.cluster.get().cloned() else {
        return respond(no_cluster());
    };
    let api = state.api.clone();
    let up = tokio::task::spawn_blocking(move || api.counts().up)
        .await
        .unwrap_or(0);
    respond((StatusCode::OK, cluster.status_json(up)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RemoteParams {
    service_id: Option<String>,
    limit: Option<usize>,
}

/// The other nodes' up instances (this node's own are `GET /services`),
/// each with the node that holds it.
pub(crate) async fn services(
    State(state): State<AppState>,
    Query(p): Query<RemoteParams>,
) -> Response {
    let Some(cluster) = state.config.cluster.get().cloned() else {
        return respond(no_cluster());
    };
    let limit = p.limit.unwrap_or(100).clamp(1, state.config.max_page);
    let service = p.service_id.filter(|s| !s.is_empty());
    // Off the async workers: the view's lock, and an O(N) count under it.
    let listed = tokio::task::spawn_blocking(move || {
        cluster.with_view(|v| {
            let (total, items) = v.list(service.as_deref(), limit);
            (total, items, v.stale)
        })
    })
    .await;
    let Ok((total, items, stale)) = listed else {
        return respond((
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "internal", "message": "listing the cluster view failed"}),
        ));
    };
    let items: Vec<_> = items.iter().map(remote_item).collect();
    respond((
        StatusCode::OK,
        json!({"total": total, "items": items, "stale": stale}),
    ))
}
