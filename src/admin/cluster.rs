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
    let v = &r.value;
    json!({
        "node": r.node.as_ref(),
        "runtimeInstanceId": r.id,
        "serviceId": v.service_id.as_ref(),
        "envTag": v.env_tag.as_ref(),
        "version": v.version.as_ref(),
        "protocol": v.protocol.as_ref(),
        "address": v.address.as_ref(),
        "port": v.port,
        "tags": serde_json::from_str::<Value>(&v.tags_json).unwrap_or(json!({})),
        "status": "up",
    })
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
