//! `/ctrl/mcp`: the admin operations as MCP tools, JSON-RPC 2.0 over a
//! WebSocket (initialize, notifications/initialized, ping, tools/list,
//! tools/call), for admin UIs that speak MCP. The caller's identity and
//! scopes are the headers of the upgrade request.

use std::sync::Arc;

use crate::jsonrpc::{self, Code, Message as Rpc, ParseError, RpcError};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use super::commands::{command_reply, fanout_reply, tools_reply};
use super::services::{list_reply, one_reply, summary_reply};
use super::{AppState, Caller, Reply};

/// MCP protocol revisions this server speaks; the newest is offered when
/// the client asks for one it does not know.
const PROTOCOL_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];
/// Largest request accepted on this socket.
const MAX_MESSAGE: usize = 1 << 20;

pub(crate) async fn mcp(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<super::AdminPeer>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let caller = Arc::new(Caller::from_headers(&headers, peer.addr));
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, state, caller))
}

async fn session(mut socket: WebSocket, state: AppState, caller: Arc<Caller>) {
    while let Some(Ok(message)) = socket.recv().await {
        let text = match message {
            Message::Text(t) => t,
            Message::Close(_) => return,
            _ => continue,
        };
        let reply = match jsonrpc::parse(&text) {
            Ok(Rpc::Request { id, method, params }) => {
                let id: Value = serde_json::from_str(id.get()).unwrap_or(Value::Null);
                let params = params
                    .and_then(|p| serde_json::from_str(p.get()).ok())
                    .unwrap_or(json!({}));
                Some(handle(&state, &caller, id, &method, params).await)
            }
            // Notifications (notifications/initialized, …) and responses
            // get no answer.
            Ok(Rpc::Notification { .. } | Rpc::Response { .. }) => None,
            Err(ParseError::Json) => Some(rpc_error(
                Value::Null,
                RpcError::new(Code::Parse, "parse error"),
            )),
            Err(ParseError::Invalid { id, why }) => {
                let id = id.and_then(|i| serde_json::from_str(i.get()).ok());
                let e = RpcError::new(Code::InvalidRequest, format!("invalid request: {why}"));
                Some(rpc_error(id.unwrap_or(Value::Null), e))
            }
        };
        if let Some(reply) = reply
            && socket
                .send(Message::Text(reply.to_string().into()))
                .await
                .is_err()
        {
            return;
        }
    }
}

fn rpc_error(id: Value, error: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": error.to_json()})
}

/// One request (read by the shared envelope, `jsonrpc::parse`).
async fn handle(
    state: &AppState,
    caller: &Arc<Caller>,
    id: Value,
    method: &str,
    params: Value,
) -> Value {
    let result = match method {
        "initialize" => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = asked
                .filter(|v| PROTOCOL_VERSIONS.contains(v))
                .unwrap_or(PROTOCOL_VERSIONS[0]);
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "tether", "version": env!("CARGO_PKG_VERSION")},
            })
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            match call_tool(state, caller, name, arguments).await {
                Some((status, body)) => json!({
                    "content": [{"type": "text", "text": body.to_string()}],
                    "structuredContent": body,
                    "isError": !status.is_success(),
                }),
                None => {
                    let e = RpcError::invalid_params(format!("unknown tool: {name}"));
                    return rpc_error(id, e);
                }
            }
        }
        _ => {
            let e = RpcError::method_not_found(format!("method not found: {method}"));
            return rpc_error(id, e);
        }
    };
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn parse<T: serde::de::DeserializeOwned>(arguments: Value) -> Result<T, Reply> {
    serde_json::from_value(arguments).map_err(|e| {
        super::fail(
            axum::http::StatusCode::BAD_REQUEST,
            "bad_arguments",
            e.to_string(),
        )
    })
}

async fn call_tool(
    state: &AppState,
    caller: &Arc<Caller>,
    name: &str,
    arguments: Value,
) -> Option<Reply> {
    let id = arguments
        .get("runtimeInstanceId")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some(match name {
        "list_services" => match parse(arguments) {
            Ok(p) => list_reply(state, p).await,
            Err(e) => e,
        },
        "get_service" => one_reply(state, &id),
        "get_summary" => summary_reply(
            state,
            arguments
                .get("top")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        ),
        "list_service_tools" => {
            let timeout_ms = arguments.get("timeoutMs").and_then(Value::as_u64);
            tools_reply(state, caller.clone(), &id, timeout_ms).await
        }
        "send_command" => match parse(arguments) {
            Ok(body) => command_reply(state, caller.clone(), &id, body).await,
            Err(e) => e,
        },
        "fanout_command" => match parse(arguments) {
            Ok(body) => fanout_reply(state, caller.clone(), body).await,
            Err(e) => e,
        },
        _ => return None,
    })
}

fn tools() -> Value {
    let filter = json!({
        "serviceId": {"type": "string"}, "envTag": {"type": "string"},
        "status": {"type": "string", "enum": ["up", "down"]}, "q": {"type": "string"},
    });
    let mut list_props = filter.clone();
    list_props["limit"] = json!({"type": "integer", "minimum": 1});
    list_props["cursor"] = json!({"type": "string"});
    let mut fanout_props = filter;
    fanout_props["name"] = json!({"type": "string"});
    fanout_props["arguments"] = json!({"type": "object"});
    fanout_props["concurrency"] = json!({"type": "integer", "minimum": 1});
    fanout_props["timeoutMs"] = json!({"type": "integer", "minimum": 1});
    json!([
        {"name": "list_services", "description": "Registered instances, filtered and paged (nextCursor).",
         "inputSchema": {"type": "object", "properties": list_props}},
        {"name": "get_service", "description": "One instance by runtimeInstanceId.",
         "inputSchema": {"type": "object", "properties": {"runtimeInstanceId": {"type": "string"}}, "required": ["runtimeInstanceId"]}},
        {"name": "get_summary", "description": "Counts by status and serviceId, shard loads.",
         "inputSchema": {"type": "object", "properties": {"top": {"type": "integer"}}}},
        {"name": "list_service_tools", "description": "Ask one instance which tools it supports (tools/list), as it answers.",
         "inputSchema": {"type": "object", "properties": {
             "runtimeInstanceId": {"type": "string"}, "timeoutMs": {"type": "integer"}},
             "required": ["runtimeInstanceId"]}},
        {"name": "send_command", "description": "Call a tool on one instance (mutating tools need portal.w).",
         "inputSchema": {"type": "object", "properties": {
             "runtimeInstanceId": {"type": "string"}, "name": {"type": "string"},
             "arguments": {"type": "object"}, "timeoutMs": {"type": "integer"}},
             "required": ["runtimeInstanceId", "name"]}},
        {"name": "fanout_command", "description": "Call a tool on every instance matching a filter.",
         "inputSchema": {"type": "object", "properties": fanout_props, "required": ["name"]}},
    ])
}
