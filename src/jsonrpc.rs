//! JSON-RPC 2.0, as every side of tether speaks it: the controller to its
//! services, the agent to the controller, the admin plane's MCP endpoint to
//! its clients. One envelope (`parse`, `write_*`), one set of error codes
//! (`Code`, whose numbers are the wire contract of ../shared/PROTOCOL.md)
//! and one error type (`RpcError`). Pure functions on strings and byte
//! buffers; what a method's params mean is each side's own business.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::metrics::BadInput;

/// The error codes tether sends and understands. The numbers are a
/// compatibility contract: never renumber.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Code {
    /// -32700: the text is not JSON.
    Parse,
    /// -32600: JSON, but not a JSON-RPC 2.0 request.
    InvalidRequest,
    /// -32601
    MethodNotFound,
    /// -32602
    InvalidParams,
    /// -32603
    Internal,
    /// -32001: a request before `service/register`.
    NotRegistered,
    /// -32002: a token that does not verify (the connection then closes).
    Unauthorized,
    /// -32003: a bound was reached; try later.
    RateLimited,
}

impl Code {
    pub const fn value(self) -> i64 {
        match self {
            Code::Parse => -32700,
            Code::InvalidRequest => -32600,
            Code::MethodNotFound => -32601,
            Code::InvalidParams => -32602,
            Code::Internal => -32603,
            Code::NotRegistered => -32001,
            Code::Unauthorized => -32002,
            Code::RateLimited => -32003,
        }
    }

    /// The bad-input counter a peer's error of this kind is reported under,
    /// if it is the peer's fault (a rate limit or an internal error is not).
    const fn bad_input(self) -> Option<BadInput> {
        Some(match self {
            Code::Parse => BadInput::InvalidJson,
            Code::InvalidRequest => BadInput::InvalidRequest,
            Code::MethodNotFound => BadInput::MethodNotFound,
            Code::InvalidParams => BadInput::InvalidParams,
            Code::NotRegistered => BadInput::NotRegistered,
            Code::Unauthorized => BadInput::Unauthorized,
            Code::Internal | Code::RateLimited => return None,
        })
    }
}

/// An error answer: its code, the message a person reads (what happened
/// and what to do), and the bad-input counter it is counted under (`None`:
/// not counted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", code.value())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
    pub kind: Option<BadInput>,
}

impl RpcError {
    /// Counted under the code's own bad-input kind.
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            kind: code.bad_input(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(Code::InvalidParams, message)
    }

    pub fn method_not_found(message: impl Into<String>) -> RpcError {
        RpcError::new(Code::MethodNotFound, message)
    }

    pub fn not_registered(message: impl Into<String>) -> RpcError {
        RpcError::new(Code::NotRegistered, message)
    }

    /// Not counted as bad input (the peer did nothing wrong).
    pub fn uncounted(mut self) -> RpcError {
        self.kind = None;
        self
    }

    /// Writes it as the error response to `id`.
    pub fn write(&self, out: &mut Vec<u8>, id: Option<&RawValue>) {
        write_error(out, id, self.code, &self.message);
    }

    /// As a JSON value: `{"code":…,"message":…}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.value(), "message": self.message})
    }
}

// -- the envelope ---------------------------------------------------------------

/// One inbound message, borrowing from the frame's text.
#[derive(Debug)]
pub enum Message<'a> {
    Request {
        id: &'a RawValue,
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    Notification {
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    Response {
        id: &'a RawValue,
        outcome: Result<&'a RawValue, &'a RawValue>,
    },
}

#[derive(Debug)]
pub enum ParseError<'a> {
    /// Not JSON at all: -32700 with id null.
    Json,
    /// JSON, but not a JSON-RPC 2.0 message: -32600.
    Invalid {
        id: Option<&'a RawValue>,
        why: &'static str,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

fn is_valid_id(id: &RawValue) -> bool {
    matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// Reads one JSON-RPC message. `"method": null` in a response is accepted
/// (some clients send it).
pub fn parse(text: &str) -> Result<Message<'_>, ParseError<'_>> {
    let envelope: Envelope<'_> = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(_) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            return Err(ParseError::Invalid {
                id: None,
                why: "a JSON-RPC message must be one JSON object",
            });
        }
        Err(_) => return Err(ParseError::Json),
    };
    let id = envelope.id;
    let invalid = |why| {
        Err(ParseError::Invalid {
            id: id.filter(|i| is_valid_id(i)),
            why,
        })
    };
    if envelope.jsonrpc.as_deref() != Some("2.0") {
        return invalid("\"jsonrpc\" must be \"2.0\"");
    }
    if id.is_some_and(|i| !is_valid_id(i)) {
        return invalid("\"id\" must be a string or a number");
    }
    let method = match envelope.method.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => match serde_json::from_str::<Cow<'_, str>>(raw) {
            Ok(m) => Some(m),
            Err(_) => return invalid("\"method\" must be a string"),
        },
    };
    match (method, id) {
        (Some(method), Some(id)) => Ok(Message::Request {
            id,
            method,
            params: envelope.params,
        }),
        (Some(method), None) => Ok(Message::Notification {
            method,
            params: envelope.params,
        }),
        (None, Some(id)) => match (envelope.result, envelope.error) {
            (Some(result), None) => Ok(Message::Response {
                id,
                outcome: Ok(result),
            }),
            (None, Some(error)) => Ok(Message::Response {
                id,
                outcome: Err(error),
            }),
            _ => invalid("a response carries exactly one of \"result\" and \"error\""),
        },
        (None, None) => invalid("a message needs a \"method\" (request) or an \"id\" (response)"),
    }
}

// -- writing -------------------------------------------------------------------

pub fn write_result<T: Serialize + ?Sized>(out: &mut Vec<u8>, id: &RawValue, result: &T) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.get().as_bytes());
    out.extend_from_slice(b",\"result\":");
    serde_json::to_writer(&mut *out, result).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

pub fn write_error(out: &mut Vec<u8>, id: Option<&RawValue>, code: Code, message: &str) {
    #[derive(Serialize)]
    struct Error<'a> {
        code: i64,
        message: &'a str,
    }
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.map_or("null", RawValue::get).as_bytes());
    out.extend_from_slice(b",\"error\":");
    let error = Error {
        code: code.value(),
        message,
    };
    serde_json::to_writer(&mut *out, &error).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

pub fn write_notification<T: Serialize + ?Sized>(out: &mut Vec<u8>, method: &str, params: &T) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":");
    serde_json::to_writer(&mut *out, method).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(b",\"params\":");
    serde_json::to_writer(&mut *out, params).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

/// A controller → service request with our own numeric id.
pub fn write_request(out: &mut Vec<u8>, id: u64, method: &str, params: Option<&RawValue>) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b",\"method\":");
    serde_json::to_writer(&mut *out, method).expect("serializing to a Vec cannot fail");
    if let Some(params) = params {
        out.extend_from_slice(b",\"params\":");
        out.extend_from_slice(params.get().as_bytes());
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn classifies_messages() {
        let m =
            parse(r#"{"jsonrpc":"2.0","id":"register-1","method":"service/register","params":{}}"#)
                .unwrap();
        assert!(
            matches!(m, Message::Request { id, ref method, .. } if id.get() == "\"register-1\"" && method == "service/register")
        );
        let m = parse(
            r#"{"jsonrpc":"2.0","method":"service/update_metadata","params":{"version":"2"}}"#,
        )
        .unwrap();
        assert!(matches!(m, Message::Notification { .. }));
        let m = parse(r#"{"jsonrpc":"2.0","id":17,"method":null,"result":{"ok":true}}"#).unwrap();
        assert!(matches!(m, Message::Response { id, outcome: Ok(_) } if id.get() == "17"));
        let m = parse(r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"x"}}"#).unwrap();
        assert!(matches!(
            m,
            Message::Response {
                outcome: Err(_),
                ..
            }
        ));
    }

    #[test]
    fn rejects_what_is_not_json_rpc() {
        assert!(matches!(parse("{not json"), Err(ParseError::Json)));
        assert!(matches!(
            parse("[1,2]"),
            Err(ParseError::Invalid { id: None, .. })
        ));
        assert!(matches!(
            parse(r#"{"id":1,"method":"x"}"#),
            Err(ParseError::Invalid { id: Some(_), .. })
        ));
        assert!(matches!(
            parse(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#),
            Err(ParseError::Invalid { .. })
        ));
        assert!(matches!(
            parse(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            Err(ParseError::Invalid { id: None, .. })
        ));
        assert!(matches!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":7}"#),
            Err(ParseError::Invalid { .. })
        ));
        assert!(matches!(
            parse(r#"{"jsonrpc":"2.0","id":1}"#),
            Err(ParseError::Invalid { .. })
        ));
    }

    #[test]
    fn writes_envelopes_without_a_method_in_responses() {
        let mut out = Vec::new();
        write_result(
            &mut out,
            raw("\"1\""),
            &serde_json::json!({"status": "registered"}),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"jsonrpc":"2.0","id":"1","result":{"status":"registered"}})
        );
        out.clear();
        write_error(&mut out, None, Code::Parse, "parse error");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], -32700);
        assert!(v.get("method").is_none());
    }

    #[test]
    fn codes_keep_their_wire_numbers() {
        let all = [
            (Code::Parse, -32700),
            (Code::InvalidRequest, -32600),
            (Code::MethodNotFound, -32601),
            (Code::InvalidParams, -32602),
            (Code::Internal, -32603),
            (Code::NotRegistered, -32001),
            (Code::Unauthorized, -32002),
            (Code::RateLimited, -32003),
        ];
        for (code, value) in all {
            assert_eq!(code.value(), value);
        }
        let e = RpcError::new(Code::RateLimited, "too many subscriptions");
        assert_eq!(e.kind, None);
        assert_eq!(
            RpcError::invalid_params("x").kind,
            Some(BadInput::InvalidParams)
        );
        let mut out = Vec::new();
        e.write(&mut out, Some(raw("7")));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"], e.to_json());
        assert_eq!(v["id"], 7);
    }
}
