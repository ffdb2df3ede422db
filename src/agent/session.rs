//! One service's session with the controller, client side, sans IO: the
//! upgrade, `service/register`, answering the controller's requests through
//! a `Tools` handler, pings, and our own requests (discovery, deregister).
//! Bytes in, bytes and events out; the worker owns the socket.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ServiceSpec, Tools};
use crate::engine::ws::{self, OpCode, Role};
use crate::jsonrpc::{self, Message, RpcError};

/// Bounds on what the controller can make a session hold.
const MAX_MESSAGE: usize = 16 << 20;
const MAX_UPGRADE_RESPONSE: usize = 16 << 10;
const MAX_PENDING_REQUESTS: usize = 1024;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Upgrading,
    Registering,
    Registered,
    Deregistered,
    Closed,
}

/// What a session tells its owner.
#[derive(Debug)]
pub enum SessionEvent {
    Registered(Uuid),
    /// The controller refused the registration (its error message).
    Refused {
        code: i64,
        message: String,
    },
    /// The reply to one of our requests.
    Reply {
        id: u64,
        outcome: Result<Value, Value>,
    },
    /// A notification from the controller (e.g. `discovery/changed`).
    Notification {
        method: String,
        params: Value,
    },
    /// The session is over (close frame, protocol error); `code` if the
    /// controller sent one.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

pub struct Session {
    spec: Arc<ServiceSpec>,
    phase: Phase,
    key: String,
    partial: Vec<u8>,
    message: Vec<u8>,
    fragmented: bool,
    next_id: u64,
    register_id: u64,
    /// Our requests awaiting a reply, by id (their method, for the owner).
    pending: HashMap<u64, &'static str>,
    runtime_instance_id: Option<Uuid>,
}

fn mask() -> Option<[u8; 4]> {
    Some(fastrand::u32(..).to_ne_bytes())
}

impl Session {
    pub fn new(spec: Arc<ServiceSpec>) -> Session {
        Session {
            spec,
            phase: Phase::Closed,
            key: String::new(),
            partial: Vec::new(),
            message: Vec::new(),
            fragmented: false,
            next_id: 0,
            register_id: 0,
            pending: HashMap::new(),
            runtime_instance_id: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn spec(&self) -> &Arc<ServiceSpec> {
        &self.spec
    }

    pub fn runtime_instance_id(&self) -> Option<Uuid> {
        self.runtime_instance_id
    }

    /// A new connection is up: write the upgrade request.
    pub fn start(
        &mut self,
        host: &str,
        path: &str,
        authorization: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        self.phase = Phase::Upgrading;
        self.key = ws::new_client_key();
        self.partial = Vec::new();
        self.message = Vec::new();
        self.fragmented = false;
        self.pending.clear();
        self.runtime_instance_id = None;
        ws::write_upgrade_request(out, host, path, &self.key, authorization);
    }

    /// Frames one JSON-RPC message that `write` puts in a buffer.
    fn send(&mut self, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        let mut text = Vec::with_capacity(256);
        write(&mut text);
        ws::encode_frame(out, OpCode::Text, &text, mask());
    }

    /// Sends a request of ours; returns its id, or `None` when too many wait.
    pub fn request(
        &mut self,
        method: &'static str,
        params: Value,
        out: &mut Vec<u8>,
    ) -> Option<u64> {
        if self.pending.len() >= MAX_PENDING_REQUESTS {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(id, method);
        let params = serde_json::value::to_raw_value(&params).expect("values serialize");
        self.send(out, |text| {
            jsonrpc::write_request(text, id, method, Some(&params))
        });
        Some(id)
    }

    pub fn notify(&mut self, method: &str, params: Value, out: &mut Vec<u8>) {
        self.send(out, |text| {
            jsonrpc::write_notification(text, method, &params)
        });
    }

    pub fn ping(&mut self, out: &mut Vec<u8>) {
        ws::encode_frame(out, OpCode::Ping, b"", mask());
    }

    /// Deregisters (the reply arrives as a `Reply`), if registered.
    pub fn deregister(&mut self, reason: &str, out: &mut Vec<u8>) -> Option<u64> {
        let id = self
            .runtime_instance_id
            .filter(|_| self.phase == Phase::Registered)?;
        self.phase = Phase::Deregistered;
        self.request(
            "service/deregister",
            json!({"runtimeInstanceId": id, "reason": reason}),
            out,
        )
    }

    pub fn close(&mut self, code: u16, out: &mut Vec<u8>) {
        if self.phase != Phase::Closed {
            ws::encode_close(out, code, "", mask());
            self.phase = Phase::Closed;
        }
    }

    /// Processes received bytes.
    pub fn on_input(
        &mut self,
        data: &[u8],
        tools: &dyn Tools,
        out: &mut Vec<u8>,
        events: &mut Vec<SessionEvent>,
    ) {
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(data);
        let used = self.process(&buf, tools, out, events);
        buf.drain(..used);
        if self.phase != Phase::Closed {
            self.partial = buf;
            if self.partial.is_empty() {
                self.partial = Vec::new();
            }
        }
    }

    fn fail(&mut self, events: &mut Vec<SessionEvent>, code: Option<u16>, reason: String) -> usize {
        self.phase = Phase::Closed;
        events.push(SessionEvent::Closed { code, reason });
        0
    }

    fn process(
        &mut self,
        buf: &[u8],
        tools: &dyn Tools,
        out: &mut Vec<u8>,
        events: &mut Vec<SessionEvent>,
    ) -> usize {
        let mut pos = 0;
        if self.phase == Phase::Upgrading {
            match ws::parse_upgrade_response(buf, &self.key, MAX_UPGRADE_RESPONSE) {
                Ok(None) => return 0,
                Err(e) => return self.fail(events, None, format!("upgrade refused: {e}")),
                Ok(Some(used)) => {
                    pos = used;
                    self.phase = Phase::Registering;
                    self.register(out);
                }
            }
        }
        while self.phase != Phase::Closed {
            let rest = &buf[pos..];
            let header = match ws::decode_header(rest, Role::Client) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return self.fail(events, None, format!("protocol error: {e}")),
            };
            if header.payload_len > MAX_MESSAGE as u64 {
                return self.fail(events, None, "message too big".into());
            }
            let end = header.header_len + header.payload_len as usize;
            if rest.len() < end {
                break;
            }
            let payload = &rest[header.header_len..end];
            pos += end;
            match header.opcode {
                OpCode::Ping => ws::encode_frame(out, OpCode::Pong, payload, mask()),
                OpCode::Pong | OpCode::Binary => {}
                OpCode::Close => {
                    let (code, reason) = match ws::parse_close(payload) {
                        Ok(Some((code, reason))) => (Some(code), reason.to_string()),
                        _ => (None, String::new()),
                    };
                    if self.phase != Phase::Closed {
                        ws::encode_close(out, code.unwrap_or(1000), "", mask());
                    }
                    self.phase = Phase::Closed;
                    events.push(SessionEvent::Closed { code, reason });
                    return pos;
                }
                OpCode::Text | OpCode::Continuation => {
                    self.message.extend_from_slice(payload);
                    if self.message.len() > MAX_MESSAGE {
                        return self.fail(events, None, "message too big".into());
                    }
                    self.fragmented = !header.fin;
                    if header.fin {
                        let message = std::mem::take(&mut self.message);
                        self.on_message(&message, tools, out, events);
                    }
                }
            }
        }
        pos
    }

    fn register(&mut self, out: &mut Vec<u8>) {
        let s = &self.spec;
        let mut params = json!({
            "serviceId": s.service_id, "version": s.version, "protocol": s.protocol,
            "address": s.address, "port": s.port, "tags": s.tags,
        });
        if let Some(env) = &s.env_tag {
            params["envTag"] = env.as_str().into();
        }
        if let Some(jwt) = &s.jwt {
            params["jwt"] = jwt.as_str().into();
        }
        self.register_id = self
            .request("service/register", params, out)
            .expect("first request");
    }

    fn on_message(
        &mut self,
        text: &[u8],
        tools: &dyn Tools,
        out: &mut Vec<u8>,
        events: &mut Vec<SessionEvent>,
    ) {
        // What is not JSON-RPC 2.0 is not the controller's: ignored.
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        let message = match jsonrpc::parse(text) {
            Ok(message) => message,
            // A malformed answer to one of our requests (neither or both
            // of result and error) still ends that request, as a failure.
            Err(jsonrpc::ParseError::Invalid { id: Some(id), .. }) => {
                let Ok(id) = id.get().parse::<u64>() else {
                    return;
                };
                if let Some(method) = self.pending.remove(&id) {
                    let outcome = Err(Value::Null);
                    if id == self.register_id && method == "service/register" {
                        self.on_register(outcome, events);
                    } else {
                        events.push(SessionEvent::Reply { id, outcome });
                    }
                }
                return;
            }
            Err(_) => return,
        };
        let value = |raw: Option<&RawValue>| {
            raw.and_then(|r| serde_json::from_str(r.get()).ok())
                .unwrap_or(Value::Null)
        };
        match message {
            Message::Request { id, method, params } => {
                let answer = self.answer(&method, value(params), tools);
                self.send(out, |text| match answer {
                    Ok(result) => jsonrpc::write_result(text, id, &result),
                    Err(error) => error.write(text, Some(id)),
                });
            }
            Message::Notification { method, params } => events.push(SessionEvent::Notification {
                method: method.into_owned(),
                params: value(params),
            }),
            Message::Response { id, outcome } => {
                let Ok(id) = id.get().parse::<u64>() else {
                    return;
                };
                let Some(method) = self.pending.remove(&id) else {
                    return;
                };
                let outcome = match outcome {
                    Ok(result) => Ok(value(Some(result))),
                    Err(error) => Err(value(Some(error))),
                };
                if id == self.register_id && method == "service/register" {
                    self.on_register(outcome, events);
                } else {
                    events.push(SessionEvent::Reply { id, outcome });
                }
            }
        }
    }

    fn on_register(&mut self, outcome: Result<Value, Value>, events: &mut Vec<SessionEvent>) {
        match outcome {
            Ok(result) => {
                let id = result
                    .get("runtimeInstanceId")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok());
                match id {
                    Some(id) => {
                        self.phase = Phase::Registered;
                        self.runtime_instance_id = Some(id);
                        events.push(SessionEvent::Registered(id));
                    }
                    None => events.push(SessionEvent::Refused {
                        code: 0,
                        message: format!("register result without a runtimeInstanceId: {result}"),
                    }),
                }
            }
            Err(error) => events.push(SessionEvent::Refused {
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            }),
        }
    }

    fn answer(&self, method: &str, params: Value, tools: &dyn Tools) -> Result<Value, RpcError> {
        match method {
            "tools/list" => {
                let mut list = super::builtin_tools();
                list.extend(tools.list());
                Ok(json!({"tools": list}))
            }
            "tools/call" => {
                let name = params
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| RpcError::invalid_params("tools/call requires params.name"))?;
                let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
                match name {
                    "get_service_info" => Ok(self.service_info()),
                    "check" => Ok(json!({"result": "OK"})),
                    _ => tools.call(name, arguments).unwrap_or_else(|| {
                        Err(RpcError::method_not_found(format!(
                            "Tool not found: {name}"
                        )))
                    }),
                }
            }
            _ => Err(RpcError::method_not_found(format!(
                "Method not found: {method}"
            ))),
        }
    }

    fn service_info(&self) -> Value {
        let s = &self.spec;
        json!({
            "serviceId": s.service_id, "version": s.version, "protocol": s.protocol,
            "address": s.address, "port": s.port, "envTag": s.env_tag, "tags": s.tags,
            "runtimeInstanceId": self.runtime_instance_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::NoTools;

    fn spec() -> Arc<ServiceSpec> {
        Arc::new(ServiceSpec::new("user", "10.0.0.1", 8443))
    }

    /// Server-side bytes: the 101 for `key`, then frames.
    fn server_upgrade(request: &[u8]) -> Vec<u8> {
        let (req, _) = ws::parse_upgrade(request, 8192).unwrap().unwrap();
        let mut out = Vec::new();
        ws::write_upgrade_response(&mut out, req.key);
        out
    }

    fn server_text(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ws::encode_frame(&mut out, OpCode::Text, v.to_string().as_bytes(), None);
        out
    }

    /// Decodes the masked frames a session wrote.
    fn client_texts(mut bytes: &[u8]) -> Vec<Value> {
        let mut texts = Vec::new();
        while let Some(h) = ws::decode_header(bytes, Role::Server).unwrap() {
            let mut payload = bytes[h.header_len..h.header_len + h.payload_len as usize].to_vec();
            ws::apply_mask(&mut payload, h.mask.unwrap());
            if h.opcode == OpCode::Text {
                texts.push(serde_json::from_slice(&payload).unwrap());
            }
            bytes = &bytes[h.header_len + h.payload_len as usize..];
        }
        texts
    }

    #[test]
    fn registers_answers_tools_and_reports_replies() {
        let mut s = Session::new(spec());
        let (mut out, mut events) = (Vec::new(), Vec::new());
        s.start("127.0.0.1:8438", "/ws/microservice", None, &mut out);
        let upgrade = server_upgrade(&out);
        out.clear();
        s.on_input(&upgrade, &NoTools, &mut out, &mut events);
        let sent = client_texts(&out);
        assert_eq!(sent[0]["method"], "service/register");
        assert_eq!(sent[0]["params"]["serviceId"], "user");
        let id = Uuid::now_v7();
        out.clear();
        let reply = server_text(
            json!({"jsonrpc":"2.0","id":sent[0]["id"],"result":{"runtimeInstanceId":id,"status":"registered"}}),
        );
        // Delivered in two pieces.
        s.on_input(&reply[..5], &NoTools, &mut out, &mut events);
        s.on_input(&reply[5..], &NoTools, &mut out, &mut events);
        assert!(matches!(events.as_slice(), [SessionEvent::Registered(got)] if *got == id));
        let call = server_text(
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"check","arguments":{}}}),
        );
        let unknown = server_text(
            json!({"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"nope"}}),
        );
        s.on_input(&[call, unknown].concat(), &NoTools, &mut out, &mut events);
        let answers = client_texts(&out);
        assert_eq!(
            answers[0],
            json!({"jsonrpc":"2.0","id":7,"result":{"result":"OK"}})
        );
        assert_eq!(answers[1]["error"]["code"], -32601);

        // A malformed answer to our request still ends it, as a failure.
        out.clear();
        events.clear();
        let asked = s
            .request("discovery/lookup", json!({"serviceId": "x"}), &mut out)
            .unwrap();
        let both = server_text(json!({"jsonrpc":"2.0","id":asked,"result":{},"error":{}}));
        s.on_input(&both, &NoTools, &mut out, &mut events);
        assert!(
            matches!(events.as_slice(), [SessionEvent::Reply { id, outcome: Err(Value::Null) }] if *id == asked),
            "{events:?}"
        );
        assert!(s.pending.is_empty(), "no request left waiting");
    }

    #[test]
    fn a_refused_upgrade_closes_the_session() {
        let mut s = Session::new(spec());
        let (mut out, mut events) = (Vec::new(), Vec::new());
        s.start("h", "/nope", None, &mut out);
        let mut refusal = Vec::new();
        ws::write_http_error(&mut refusal, 404, "no");
        s.on_input(&refusal, &NoTools, &mut out, &mut events);
        assert_eq!(s.phase(), Phase::Closed);
        assert!(
            matches!(&events[0], SessionEvent::Closed { code: None, reason } if reason.contains("404"))
        );
    }
}
