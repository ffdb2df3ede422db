//! `POST /services/{id}/commands` and `POST /commands` (fan-out): a tool
//! call forwarded to services, awaited, audited.
//!
//! HTTP status by outcome: ok and unsupported 200 (unsupported is the
//! service's answer, not a controller failure; the body says which), the
//! service's JSON-RPC error 502, timeout 504, no such instance 404, the
//! instance went away before replying 503, a bound exceeded 429, a
//! mutating tool without `portal.w` 403.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::audit::AuditEntry;
use super::services::parse_status;
use super::{AppState, Caller, Reply, WRITE_SCOPE, error, fail, now_rfc3339, respond};
use crate::controller::{CommandOutcome, tool_call_params};
use crate::registry::{self, Status};

/// Tools that change a service (PROTOCOL.md): they need the write scope.
pub fn is_mutating(tool: &str) -> bool {
    tool.starts_with("set_")
        || matches!(
            tool,
            "reload_modules" | "clear_cache" | "configure_chaos_monkey" | "shutdown"
        )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CommandBody {
    pub name: String,
    #[serde(default)]
    arguments: Option<Value>,
    timeout_ms: Option<u64>,
}

fn status_of(outcome: &CommandOutcome) -> StatusCode {
    match outcome {
        CommandOutcome::Ok(_) | CommandOutcome::Unsupported(_) => StatusCode::OK,
        CommandOutcome::Failed { .. } => StatusCode::BAD_GATEWAY,
        CommandOutcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
        CommandOutcome::NotFound => StatusCode::NOT_FOUND,
        CommandOutcome::Gone => StatusCode::SERVICE_UNAVAILABLE,
        CommandOutcome::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
    }
}

/// The JSON of one instance's outcome.
pub(crate) fn outcome_json(id: Uuid, outcome: &CommandOutcome) -> Value {
    let raw = |r: &serde_json::value::RawValue| {
        serde_json::from_str::<Value>(r.get()).unwrap_or(Value::Null)
    };
    let mut v = json!({"runtimeInstanceId": id, "outcome": outcome.label()});
    match outcome {
        CommandOutcome::Ok(result) => v["result"] = raw(result),
        CommandOutcome::Unsupported(detail) => v["detail"] = raw(detail),
        CommandOutcome::Failed { code, message } => {
            v["error"] = json!({"code": code, "message": message})
        }
        CommandOutcome::Timeout => v["message"] = json!("the service did not reply in time"),
        CommandOutcome::NotFound => v["message"] = json!("no registered, up instance with this id"),
        CommandOutcome::Gone => v["message"] = json!("the instance disconnected before replying"),
        CommandOutcome::Busy(why) => v["message"] = json!(why),
    }
    v
}

/// Sends one tool call and waits for its outcome.
pub(crate) async fn call(
    state: &AppState,
    id: Uuid,
    name: &str,
    arguments: &Value,
    timeout: Option<Duration>,
) -> CommandOutcome {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let params = tool_call_params(name, arguments);
    state.api.call(
        id,
        "tools/call",
        Some(params),
        timeout,
        Box::new(move |o| drop(tx.send(o))),
    );
    // The controller always replies (every command ends by reply,
    // timeout or disconnect); a dropped sender would mean it stopped.
    rx.await.unwrap_or(CommandOutcome::Gone)
}

fn audit(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: String,
    tool: &str,
    outcome: &str,
    started: Instant,
) {
    state.audit.record(&AuditEntry {
        time: now_rfc3339(),
        who: &caller.who,
        scopes: &caller.scopes,
        action,
        target,
        tool,
        outcome: outcome.to_string(),
        duration_ms: started.elapsed().as_millis() as u64,
    });
}

fn forbidden(tool: &str) -> Reply {
    fail(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{tool} changes the service: it needs the {WRITE_SCOPE} scope"),
    )
}

/// One tool call to one instance.
pub(crate) async fn command_reply(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: CommandBody,
) -> Reply {
    let Ok(id) = Uuid::parse_str(id) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("{id:?} is not a runtimeInstanceId"),
        );
    };
    if is_mutating(&body.name) && !caller.can_write() {
        audit(
            state,
            caller,
            "command",
            id.to_string(),
            &body.name,
            "forbidden",
            Instant::now(),
        );
        return forbidden(&body.name);
    }
    let started = Instant::now();
    let arguments = body.arguments.unwrap_or_else(|| json!({}));
    let outcome = call(
        state,
        id,
        &body.name,
        &arguments,
        body.timeout_ms.map(Duration::from_millis),
    )
    .await;
    audit(
        state,
        caller,
        "command",
        id.to_string(),
        &body.name,
        outcome.label(),
        started,
    );
    let mut v = outcome_json(id, &outcome);
    v["name"] = json!(body.name);
    (status_of(&outcome), v)
}

pub(crate) async fn one(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CommandBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Caller::from_headers(&headers, peer);
    match body {
        Ok(Json(body)) => respond(command_reply(&state, &caller, &id, body).await),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected {{\"name\", \"arguments\"}}: {e}"),
        ),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FanoutBody {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
    timeout_ms: Option<u64>,
    concurrency: Option<usize>,
    service_id: Option<String>,
    env_tag: Option<String>,
    /// Default `up`: commands only reach connected instances.
    status: Option<String>,
    q: Option<String>,
}

/// One tool call to every instance matching a filter.
pub(crate) async fn fanout_reply(state: &AppState, caller: Arc<Caller>, body: FanoutBody) -> Reply {
    if is_mutating(&body.name) && !caller.can_write() {
        let target = format!(
            "serviceId={:?} envTag={:?} q={:?}",
            body.service_id, body.env_tag, body.q
        );
        audit(
            state,
            &caller,
            "fanout",
            target,
            &body.name,
            "forbidden",
            Instant::now(),
        );
        return forbidden(&body.name);
    }
    let status = match parse_status(body.status.as_deref().or(Some("up"))) {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    let max = state.config.max_fanout;
    let query = registry::Query {
        service_id: body.service_id,
        env_tag: body.env_tag,
        status,
        q: body.q,
    };
    let targets: Vec<Uuid> = {
        let page = state.api.page(query, 0, max);
        if page.total > max {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_targets",
                format!(
                    "the filter matches {} instances; the limit is {max}: narrow the filter",
                    page.total
                ),
            );
        }
        page.items
            .iter()
            .filter(|n| n.status == Status::Up)
            .map(|n| n.runtime_instance_id)
            .collect()
    };
    let concurrency = body
        .concurrency
        .unwrap_or(state.config.fanout_concurrency)
        .clamp(1, state.config.max_fanout_concurrency);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let arguments = Arc::new(body.arguments.unwrap_or_else(|| json!({})));
    let name: Arc<str> = Arc::from(body.name.as_str());
    let timeout = body.timeout_ms.map(Duration::from_millis);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, id) in targets.iter().copied().enumerate() {
        let (state, semaphore, arguments, name, caller) = (
            state.clone(),
            semaphore.clone(),
            arguments.clone(),
            name.clone(),
            caller.clone(),
        );
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("never closed");
            let started = Instant::now();
            let outcome = call(&state, id, &name, &arguments, timeout).await;
            audit(
                &state,
                &caller,
                "fanout",
                id.to_string(),
                &name,
                outcome.label(),
                started,
            );
            (index, outcome_json(id, &outcome), outcome.label())
        });
    }
    let mut results = vec![Value::Null; targets.len()];
    let mut counts = serde_json::Map::new();
    while let Some(done) = tasks.join_next().await {
        let Ok((index, v, label)) = done else {
            continue;
        };
        results[index] = v;
        let n = counts.entry(label).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    (
        StatusCode::OK,
        json!({"name": &*name, "total": targets.len(), "outcomes": counts, "results": results}),
    )
}

pub(crate) async fn fanout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<FanoutBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Arc::new(Caller::from_headers(&headers, peer));
    match body {
        Ok(Json(body)) => respond(fanout_reply(&state, caller, body).await),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected {{\"name\", \"arguments\", filter…}}: {e}"),
        ),
    }
}
