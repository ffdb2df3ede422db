//! `POST /services/{id}/commands` and `POST /commands` (fan-out): a tool
//! call forwarded to services, awaited, audited.
//!
//! HTTP status by outcome: ok and unsupported 200 (unsupported is the
//! service's answer, not a controller failure; the body says which), the
//! service's JSON-RPC error 502, timeout 504, no such instance 404, the
//! instance went away before replying 503, a bound exceeded 429, a
//! mutating tool without `portal.w` 403, a fan-out matching too many 413.
//!
//! Every command's work runs in a task of its own, so it is audited even
//! when the HTTP client goes away before the reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::audit::{AuditEntry, Phase};
use super::services::{instance_id, parse_status};
use super::{AppState, Caller, Reply, WRITE_SCOPE, error, fail, now_rfc3339, respond};
use crate::controller::{CommandOutcome, tool_call_params};
use crate::registry::{self, Status};

/// Longest tool name accepted.
const MAX_TOOL_NAME: usize = 128;
/// Audit fields taken from the caller are cut to this.
const MAX_AUDIT_FIELD: usize = 256;

/// Tools that change a service (PROTOCOL.md): they need the write scope.
/// Compared without case, so `Shutdown` is as mutating as `shutdown`.
pub fn is_mutating(tool: &str) -> bool {
    let tool = tool.to_ascii_lowercase();
    tool.starts_with("set_")
        || matches!(
            tool.as_str(),
            "reload_modules" | "clear_cache" | "configure_chaos_monkey" | "shutdown"
        )
}

/// A tool name: 1..=128 of letters, digits and `_ . : / -`.
pub(crate) fn check_tool_name(name: &str) -> Result<(), Reply> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOOL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_tool_name",
            format!("a tool name is 1-{MAX_TOOL_NAME} letters, digits and _ . : / -"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CommandBody {
    name: String,
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

/// The JSON of one instance's outcome; a result larger than `max_result`
/// bytes is replaced by a note of its size.
pub(crate) fn outcome_json(id: Uuid, outcome: &CommandOutcome, max_result: usize) -> Value {
    outcome_json_within(id, outcome, max_result, None)
}

/// The same, taking the result's bytes from `left` (a fan-out's budget for
/// all its results): once it is spent, results are notes of their size.
pub(crate) fn outcome_json_within(
    id: Uuid,
    outcome: &CommandOutcome,
    max_result: usize,
    left: Option<&std::sync::atomic::AtomicUsize>,
) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let raw = |r: &serde_json::value::RawValue| {
        let len = r.get().len();
        if len > max_result {
            return json!({"truncated": true, "bytes": len});
        }
        let within = left.is_none_or(|left| {
            left.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(len))
                .is_ok()
        });
        if within {
            serde_json::from_str::<Value>(r.get()).unwrap_or(Value::Null)
        } else {
            json!({"truncated": true, "bytes": len, "why": "the fan-out's results passed max_fanout_bytes"})
        }
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
async fn call(
    state: &AppState,
    id: Uuid,
    name: &str,
    arguments: &Value,
    timeout: Duration,
) -> CommandOutcome {
    let params = tool_call_params(name, arguments);
    send(state, id, "tools/call", Some(params), timeout).await
}

/// Sends one request (`tools/call`, `tools/list`) and waits for its outcome.
async fn send(
    state: &AppState,
    id: Uuid,
    method: &str,
    params: Option<Box<serde_json::value::RawValue>>,
    timeout: Duration,
) -> CommandOutcome {
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.api.call(
        id,
        method,
        params,
        Some(timeout),
        Box::new(move |o| drop(tx.send(o))),
    );
    // The controller ends every command (reply, timeout, disconnect,
    // shutdown); the margin only guards against a bug there.
    match tokio::time::timeout(timeout + Duration::from_secs(5), rx).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => CommandOutcome::Gone,
        Err(_) => CommandOutcome::Timeout,
    }
}

fn clip(text: &str) -> &str {
    let mut end = text.len().min(MAX_AUDIT_FIELD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How long a mutating command waits for its `sent` line to be on disk.
const AUDIT_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// One command's pair of audit lines: `sent`, then `result`.
struct Audited<'a> {
    state: &'a AppState,
    caller: &'a Caller,
    id: Uuid,
    action: &'static str,
    target: String,
    tool: &'a str,
    started: Instant,
}

impl<'a> Audited<'a> {
    fn new(
        state: &'a AppState,
        caller: &'a Caller,
        action: &'static str,
        target: String,
        tool: &'a str,
    ) -> Audited<'a> {
        Audited {
            state,
            caller,
            id: Uuid::now_v7(),
            action,
            target,
            tool,
            started: Instant::now(),
        }
    }

    fn entry(&self, phase: Phase, outcome: Option<&'a str>) -> AuditEntry<'_> {
        AuditEntry {
            time: now_rfc3339(),
            id: self.id,
            phase,
            who: clip(&self.caller.who),
            scopes: clip(&self.caller.scopes),
            action: self.action,
            target: clip(&self.target),
            tool: clip(self.tool),
            outcome,
            duration_ms: (phase == Phase::Result)
                .then(|| self.started.elapsed().as_millis() as u64),
        }
    }

    /// The `sent` line: on disk before a mutating command leaves, queued
    /// for any other. `Err` (the reply) when it cannot be written: the
    /// command is not sent, and says so in its result line.
    async fn sent(&self) -> Result<(), Reply> {
        let entry = self.entry(Phase::Sent, None);
        if !is_mutating(self.tool) {
            self.state.audit.record(&entry);
            return Ok(());
        }
        match self
            .state
            .audit
            .record_durably(&entry, AUDIT_SYNC_TIMEOUT)
            .await
        {
            Ok(()) => Ok(()),
            Err(why) => {
                self.result(NOT_SENT);
                Err(fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    why.to_string(),
                ))
            }
        }
    }

    fn result(&self, outcome: &str) {
        self.state
            .audit
            .record(&self.entry(Phase::Result, Some(outcome)));
    }
}

/// The outcome of a command held back because it could not be audited.
const NOT_SENT: &str = "not_sent";

fn forbidden(tool: &str) -> Reply {
    fail(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{tool} changes the service: it needs the {WRITE_SCOPE} scope"),
    )
}

fn timeout_of(state: &AppState, timeout_ms: Option<u64>) -> Duration {
    let asked = timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(state.api.command_timeout());
    asked.clamp(Duration::from_millis(1), state.config.max_command_timeout)
}

/// One tool call to one instance.
pub(crate) async fn command_reply(
    state: &AppState,
    caller: Arc<Caller>,
    id: &str,
    body: CommandBody,
) -> Reply {
    let id = match instance_id(id) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    if let Err(reply) = check_tool_name(&body.name) {
        return reply;
    }
    if is_mutating(&body.name) && !caller.can_write() {
        Audited::new(state, &caller, "command", id.to_string(), &body.name).result("forbidden");
        return forbidden(&body.name);
    }
    if let Some(holder) = super::forward::holder(state, &caller, &id) {
        // Held by another node: it sends the command, checks and audits it.
        let audited = Audited::new(
            state,
            &caller,
            "command",
            format!("{id}@{}", holder.0),
            &body.name,
        );
        if let Err(refused) = audited.sent().await {
            return refused;
        }
        let path = format!("/services/{id}/commands");
        let v =
            json!({"name": body.name, "arguments": body.arguments, "timeoutMs": body.timeout_ms});
        let (status, answer) =
            super::forward::forward(state, &caller, holder, Method::POST, &path, Some(&v)).await;
        audited.result(answer["outcome"].as_str().unwrap_or("forwarded"));
        return (status, answer);
    }
    let timeout = timeout_of(state, body.timeout_ms);
    let state = state.clone();
    let work = tokio::spawn(async move {
        let audited = Audited::new(&state, &caller, "command", id.to_string(), &body.name);
        audited.sent().await?;
        let arguments = body.arguments.unwrap_or_else(|| json!({}));
        let outcome = call(&state, id, &body.name, &arguments, timeout).await;
        audited.result(outcome.label());
        let mut v = outcome_json(id, &outcome, usize::MAX);
        v["name"] = json!(body.name);
        Ok((status_of(&outcome), v))
    });
    work.await
        .unwrap_or_else(|e| {
            Err(fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            ))
        })
        .unwrap_or_else(|refused| refused)
}

/// `tools/list` to one instance: the tools (and, from light-runtime, the
/// `capabilityVersion` and `features`) it says it supports, as it said it.
pub(crate) async fn tools_reply(
    state: &AppState,
    caller: Arc<Caller>,
    id: &str,
    timeout_ms: Option<u64>,
) -> Reply {
    let id = match instance_id(id) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    if let Some(holder) = super::forward::holder(state, &caller, &id) {
        let path = match timeout_ms {
            Some(ms) => format!("/services/{id}/tools?timeoutMs={ms}"),
            None => format!("/services/{id}/tools"),
        };
        return super::forward::forward(state, &caller, holder, Method::GET, &path, None).await;
    }
    let timeout = timeout_of(state, timeout_ms);
    let state = state.clone();
    let work = tokio::spawn(async move {
        let audited = Audited::new(&state, &caller, "tools", id.to_string(), "tools/list");
        audited.sent().await.expect("tools/list is not mutating");
        let outcome = send(&state, id, "tools/list", None, timeout).await;
        audited.result(outcome.label());
        let mut v = outcome_json(id, &outcome, usize::MAX);
        v["name"] = json!("tools/list");
        (status_of(&outcome), v)
    });
    work.await
        .unwrap_or_else(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ToolsParams {
    timeout_ms: Option<u64>,
}

pub(crate) async fn tools(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<super::AdminPeer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(p): axum::extract::Query<ToolsParams>,
) -> Response {
    let caller = Arc::new(Caller::from_headers(&headers, peer.addr));
    respond(tools_reply(&state, caller, &id, p.timeout_ms).await)
}

pub(crate) async fn one(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<super::AdminPeer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CommandBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Arc::new(Caller::from_headers(&headers, peer.addr));
    match body {
        Ok(Json(body)) => respond(command_reply(&state, caller, &id, body).await),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected {{\"name\", \"arguments\"}}: {e}"),
        ),
    }
}

/// A command body's checks short of sending it: its tool name, and a
/// fan-out's status filter (the fuzz target's way in).
#[cfg(feature = "fuzzing")]
pub(crate) fn check_bodies(body: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<CommandBody>(body) {
        let _ = (
            check_tool_name(&b.name),
            is_mutating(&b.name),
            b.arguments,
            b.timeout_ms,
        );
    }
    if let Ok(b) = serde_json::from_slice::<FanoutBody>(body) {
        let _ = (check_tool_name(&b.name), parse_status(b.status.as_deref()));
    }
}

#[derive(Clone, Deserialize, serde::Serialize)]
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

/// One tool call to every instance matching a filter: this node's, and
/// in a cluster each other node's that holds matching instances, sent to
/// it as the caller (split by node, all at once). Each node bounds, checks
/// and audits its own part; the answer merges them, each result naming
/// its node, with each node's status under `nodes`.
pub(crate) async fn fanout_reply(state: &AppState, caller: Arc<Caller>, body: FanoutBody) -> Reply {
    let peers = fanout_peers(state, &caller, &body);
    if peers.is_empty() {
        return fanout_here(state, caller, body).await;
    }
    // What every node would refuse alike is refused once, before any is sent.
    if let Err(reply) = check_tool_name(&body.name) {
        return reply;
    }
    if is_mutating(&body.name) && !caller.can_write() {
        return fanout_here(state, caller, body).await;
    }
    let json = serde_json::to_value(&body).expect("a fan-out body serializes");
    let remote: Vec<_> = peers
        .into_iter()
        .map(|(node, admin, expected)| {
            let (state, caller, json) = (state.clone(), caller.clone(), json.clone());
            tokio::spawn(async move {
                let reply = super::forward::forward(
                    &state,
                    &caller,
                    (node.clone(), admin),
                    Method::POST,
                    "/commands",
                    Some(&json),
                )
                .await;
                (node, expected, reply)
            })
        })
        .collect();
    let (status, mut merged) = fanout_here(state, caller, body).await;
    if status != StatusCode::OK {
        return (status, merged);
    }
    let me = super::forward::this_node(state);
    let mut nodes = serde_json::Map::new();
    nodes.insert(me.clone(), json!({"status": 200, "total": merged["total"]}));
    for r in merged["results"].as_array_mut().into_iter().flatten() {
        r["node"] = json!(me);
    }
    for task in remote {
        let Ok((node, expected, (status, answer))) = task.await else {
            continue;
        };
        merge_fanout(&mut merged, &node, expected, status, answer, &mut nodes);
    }
    merged["nodes"] = Value::Object(nodes);
    (StatusCode::OK, merged)
}

/// The other nodes holding instances a fan-out may reach: none unless
/// clustered, asked directly (not forwarded) and aimed at up instances.
fn fanout_peers(
    state: &AppState,
    caller: &Caller,
    body: &FanoutBody,
) -> Vec<(String, String, usize)> {
    let Some(cluster) = state.config.cluster.get() else {
        return Vec::new();
    };
    let up_only = body.status.as_deref().is_none_or(|s| s == "up");
    if caller.forwarded_by.is_some() || !up_only {
        return Vec::new();
    }
    cluster.peers_holding(body.service_id.as_deref(), body.env_tag.as_deref())
}

/// Adds one node's fan-out answer to `merged`; a node that did not answer
/// 200 counts its `expected` instances as `node_failed`.
fn merge_fanout(
    merged: &mut Value,
    node: &str,
    expected: usize,
    status: StatusCode,
    answer: Value,
    nodes: &mut serde_json::Map<String, Value>,
) {
    let add = |merged: &mut Value, label: &str, n: u64| {
        let counts = &mut merged["outcomes"];
        counts[label] = json!(counts[label].as_u64().unwrap_or(0) + n);
    };
    if status != StatusCode::OK {
        merged["total"] = json!(merged["total"].as_u64().unwrap_or(0) + expected as u64);
        add(merged, "node_failed", expected as u64);
        nodes.insert(
            node.to_string(),
            json!({"status": status.as_u16(), "error": answer["error"], "message": answer["message"]}),
        );
        return;
    }
    merged["total"] =
        json!(merged["total"].as_u64().unwrap_or(0) + answer["total"].as_u64().unwrap_or(0));
    for (label, n) in answer["outcomes"].as_object().into_iter().flatten() {
        add(merged, label, n.as_u64().unwrap_or(0));
    }
    if let (Some(into), Some(from)) = (
        merged["results"].as_array_mut(),
        answer["results"].as_array(),
    ) {
        into.extend(from.iter().cloned().map(|mut r| {
            r["node"] = json!(node);
            r
        }));
    }
    nodes.insert(
        node.to_string(),
        json!({"status": 200, "total": answer["total"]}),
    );
}

/// This node's part of a fan-out.
async fn fanout_here(state: &AppState, caller: Arc<Caller>, body: FanoutBody) -> Reply {
    if let Err(reply) = check_tool_name(&body.name) {
        return reply;
    }
    if is_mutating(&body.name) && !caller.can_write() {
        let target = format!(
            "serviceId={:?} envTag={:?} q={:?}",
            body.service_id, body.env_tag, body.q
        );
        Audited::new(state, &caller, "fanout", target, &body.name).result("forbidden");
        return forbidden(&body.name);
    }
    if is_mutating(&body.name)
        && let Some(why) = state.audit.refusal()
    {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            why.to_string(),
        );
    }
    let Ok(running) = state.fanouts.clone().try_acquire_owned() else {
        return fail(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_fanouts",
            format!(
                "{} fan-outs are running, the limit; try again when one ends",
                state.config.max_concurrent_fanouts
            ),
        );
    };
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
        sort: None,
    };
    let api = state.api.clone();
    let page = tokio::task::spawn_blocking(move || api.page(query, 0, max))
        .await
        .expect("listing does not panic");
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
    let targets: Vec<Uuid> = page
        .items
        .iter()
        .filter(|n| n.status == Status::Up)
        .map(|n| n.runtime_instance_id)
        .collect();
    let concurrency = body
        .concurrency
        .unwrap_or(state.config.fanout_concurrency)
        .clamp(1, state.config.max_fanout_concurrency);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let arguments = Arc::new(body.arguments.unwrap_or_else(|| json!({})));
    let name: Arc<str> = Arc::from(body.name.as_str());
    let timeout = timeout_of(state, body.timeout_ms);
    let max_result = state.config.max_fanout_result;
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(
        state.config.max_fanout_bytes,
    ));
    // Spawned (not a JoinSet): each target is sent and audited even if the
    // HTTP client leaves.
    let tasks: Vec<_> = targets
        .iter()
        .map(|&id| {
            let (state, semaphore, arguments, name, caller, left) = (
                state.clone(),
                semaphore.clone(),
                arguments.clone(),
                name.clone(),
                caller.clone(),
                left.clone(),
            );
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.expect("never closed");
                let audited = Audited::new(&state, &caller, "fanout", id.to_string(), &name);
                if let Err((_, why)) = audited.sent().await {
                    let v = json!({"runtimeInstanceId": id, "outcome": NOT_SENT, "message": why["message"]});
                    return (v, NOT_SENT);
                }
                let outcome = call(&state, id, &name, &arguments, timeout).await;
                audited.result(outcome.label());
                let json = outcome_json_within(id, &outcome, max_result, Some(&left));
                (json, outcome.label())
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    let mut counts = serde_json::Map::new();
    for task in tasks {
        let Ok((v, label)) = task.await else { continue };
        results.push(v);
        let n = counts.entry(label).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    drop(running);
    (
        StatusCode::OK,
        json!({"name": &*name, "total": targets.len(), "outcomes": counts, "results": results}),
    )
}

pub(crate) async fn fanout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<super::AdminPeer>,
    headers: HeaderMap,
    body: Result<Json<FanoutBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = Arc::new(Caller::from_headers(&headers, peer.addr));
    match body {
        Ok(Json(body)) => respond(fanout_reply(&state, caller, body).await),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected {{\"name\", \"arguments\", filter…}}: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutating_tools_are_recognised_whatever_their_case() {
        for tool in [
            "shutdown",
            "Shutdown",
            "SET_LOGGERS",
            "set_loggers",
            "clear_cache",
            "reload_modules",
        ] {
            assert!(is_mutating(tool), "{tool}");
        }
        for tool in ["check", "get_service_info", "get_log_content", "settle"] {
            assert!(!is_mutating(tool), "{tool}");
        }
        assert!(check_tool_name("set_loggers").is_ok());
        assert!(check_tool_name("set_loggers ").is_err());
        assert!(check_tool_name(&"a".repeat(129)).is_err());
        assert!(check_tool_name("").is_err());
    }
}
