//! Entry points for the cargo-fuzz targets in `fuzz/` (the `fuzzing`
//! feature; not an API). Each takes arbitrary bytes, drives one parser as
//! the controller does, and checks what must hold of its output: a panic
//! or a failed check is a finding.

pub use crate::controller::fuzz::Dispatch;
use crate::engine::conn::{Conn, Event, Fed, Flow, Limits, Phase};
use crate::engine::{EngineConfig, ws};

const UPGRADE: &[u8] = b"GET /ws/microservice HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

const LIMITS: Limits = Limits {
    max_message: 64 << 10,
    max_message_unadmitted: 4 << 10,
    max_upgrade: 8 << 10,
};

/// The frame codec: the decoder frame after frame, what we would write
/// back decoding to the same frame, and the connection machine (upgrade,
/// then the input in chunks of sizes the input picks).
pub fn frame_codec(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some(h)) = ws::decode_header(rest, ws::Role::Server) {
        assert!((2..=14).contains(&h.header_len), "{h:?}");
        assert!(h.mask.is_some(), "a server takes only masked frames");
        let Some(end) = usize::try_from(h.payload_len)
            .ok()
            .and_then(|n| n.checked_add(h.header_len))
        else {
            break;
        };
        if end > rest.len() {
            break;
        }
        let mut payload = rest[h.header_len..end].to_vec();
        if let Some(mask) = h.mask {
            ws::apply_mask(&mut payload, mask);
        }
        if h.opcode.is_control() {
            assert!(
                h.fin && payload.len() <= 125,
                "control frames are whole and short"
            );
        }
        if h.opcode == ws::OpCode::Close
            && let Ok(Some((code, _))) = ws::parse_close(&payload)
        {
            assert!(ws::is_valid_close_code(code), "{code}");
        }
        let mut echo = Vec::new();
        ws::encode_frame(&mut echo, h.opcode, &payload, None);
        let back = ws::decode_header(&echo, ws::Role::Client)
            .expect("our frame decodes")
            .expect("our frame is whole");
        assert_eq!(
            (back.opcode, back.payload_len),
            (h.opcode, payload.len() as u64)
        );
        assert_eq!(&echo[back.header_len..], &payload[..]);
        rest = &rest[end..];
    }
    let (step, body) = match data.split_first() {
        Some((&b, body)) => (b as usize % 97 + 1, body),
        None => (1, data),
    };
    let mut input = UPGRADE.to_vec();
    input.extend_from_slice(body);
    machine(&input, step);
}

/// The upgrade parser: a head it accepts is within bounds and names a
/// path without its query; and the same bytes start a connection.
pub fn upgrade(data: &[u8]) {
    match ws::parse_upgrade(data, LIMITS.max_upgrade) {
        Ok(Some((req, used))) => {
            assert!(used <= data.len() && used <= LIMITS.max_upgrade);
            assert!(!req.path.contains('?'), "{:?}", req.path);
            assert_eq!(ws::accept_key(req.key).len(), 28);
        }
        Ok(None) => assert!(data.len() < LIMITS.max_upgrade),
        Err(_) => {}
    }
    machine(data, data.len().max(1));
}

/// Feeds `input` to a new connection `step` bytes at a time, admitting it
/// after its first message, as a handler does on a register; the input it
/// holds stays within its bounds.
fn machine(input: &[u8], step: usize) {
    let config = EngineConfig::new("127.0.0.1:0".parse().expect("an address"), 1);
    let timing = config.timing();
    let mut conn = Conn::accepted(0, 1, 0, &timing);
    let mut out = Vec::new();
    for (now, chunk) in input.chunks(step).enumerate() {
        let now = now as u32;
        let mut bytes = chunk.to_vec();
        let mut texts = 0;
        out.clear();
        let fed = conn.feed(now, &mut bytes, &LIMITS, &timing, &mut out, |event, _| {
            match event {
                Event::Text(text) => {
                    assert!(text.len() <= LIMITS.max_message);
                    texts += 1;
                }
                Event::Upgrade(req) => assert!(!req.path.contains('?')),
                Event::Open | Event::Pong(_) => {}
            }
            Flow::Continue
        });
        let (held_in, _) = conn.buffered();
        // A message being reassembled and a frame begun, each in a
        // buffer that may have doubled its capacity.
        assert!(
            held_in <= 4 * LIMITS.max_message + LIMITS.max_upgrade,
            "{held_in} bytes held"
        );
        if fed != Fed::Open {
            return;
        }
        if texts > 0 && conn.phase() == Phase::Upgraded {
            conn.admit(now, 1);
        }
    }
}

/// JSON-RPC dispatch through the controller's handlers (`Dispatch::run`).
pub fn dispatch(data: &[u8]) {
    Dispatch::new().run(data);
}

/// The admin API's query strings and bodies: the first line is a query
/// string, the rest a body. A valid listing runs against a registry with
/// a few services, and its page holds what the filter asked.
pub fn admin_query(data: &[u8]) {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let query = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let Some((query, cursor, limit)) = crate::admin::fuzz::parse(&query, body, 500) else {
        return;
    };
    let mut d = Dispatch::new();
    d.run(SERVICES);
    let page = d.page(&query, cursor, limit);
    assert!(page.items.len() <= limit);
    assert!(page.items.len() <= page.total);
    for node in &page.items {
        if let Some(status) = query.status {
            assert_eq!(node.status, status);
        }
        if let Some(service) = &query.service_id {
            assert_eq!(&*node.service_id, service.as_str());
        }
    }
}

/// Three registrations for `admin_query`'s registry (selector bytes 0 and
/// 1: the two service sockets).
const SERVICES: &[u8] = b"\x00{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"service/register\",\"params\":{\"serviceId\":\"user\",\"version\":\"1\",\"protocol\":\"https\",\"address\":\"10.0.0.1\",\"port\":1,\"envTag\":\"prod\"}}\n\
\x01{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"service/register\",\"params\":{\"serviceId\":\"order\",\"version\":\"2\",\"protocol\":\"http\",\"address\":\"10.0.0.2\",\"port\":2}}\n";
