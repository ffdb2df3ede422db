//! RFC 6455 on byte slices: the HTTP/1.1 upgrade (both sides) and the frame
//! codec. Owns no buffers and no sockets; every function takes the bytes it
//! reads or the `Vec` it appends to, so it is tested without I/O.
//!
//! Never does: select a subprotocol (clients treat an unrequested one as a
//! failure), negotiate extensions (so any RSV bit is a protocol error), or
//! accept a frame the RFC forbids. Message-level rules (fragment order,
//! UTF-8, size) live in `conn.rs`, which sees whole messages.

use std::fmt::Write as _;

/// Control frames carry at most this many payload bytes (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest frame header: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;
/// Headers we look at; a request with more is refused (431).
const MAX_HEADERS: usize = 32;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which end of the connection is decoding: a server must see masked
/// frames, a client must see unmasked ones (RFC 6455 §5.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    pub header_len: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set, but no extension was negotiated")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("control frame is fragmented")]
    FragmentedControl,
    #[error("control frame carries {0} bytes; the limit is 125")]
    ControlTooLong(u64),
    #[error("client frame is not masked")]
    Unmasked,
    #[error("server frame is masked")]
    Masked,
    #[error("64-bit payload length has its most significant bit set")]
    BadLength,
    #[error("payload length is not in its minimal encoding")]
    NonMinimalLength,
}

/// Parses one frame header from the front of `buf`. `Ok(None)` means more
/// bytes are needed. Validates everything knowable from the header alone.
pub fn decode_header(buf: &[u8], role: Role) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(FrameError::Unmasked),
        (Role::Client, true) => return Err(FrameError::Masked),
        _ => {}
    }
    let (payload_len, mut header_len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if len < 126 {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            if len <= u16::MAX as u64 {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 10)
        }
        short => (short as u64, 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if payload_len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::ControlTooLong(payload_len));
        }
    }
    let mask = if masked {
        if buf.len() < header_len + 4 {
            return Ok(None);
        }
        let key = buf[header_len..header_len + 4].try_into().expect("4 bytes");
        header_len += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// XORs `payload` with the masking key (RFC 6455 §5.3), eight bytes at a time.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends a whole frame. With `mask`, the payload is masked as a client must.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    encode_fragment(out, opcode, true, payload, mask);
}

/// Appends one frame of a message: `fin` says whether it is the last
/// (a relay passes fragments on as they came).
pub fn encode_fragment(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let len = payload.len();
    out.reserve(MAX_HEADER_LEN + len);
    out.push(if fin { 0x80 } else { 0 } | opcode as u8);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
    }
}

/// Appends a close frame with `code` and a reason cut to fit a control frame.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let reason = truncate_utf8(reason, MAX_CONTROL_PAYLOAD - 2);
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    encode_frame(out, OpCode::Close, &payload[..2 + reason.len()], mask);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A close code a peer may send (RFC 6455 §7.4): 1004-1006 and 1015 are
/// reserved for local use, 1016-2999 for future standards.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    #[error("close payload of one byte")]
    OneByte,
    #[error("close code {0} may not be sent by a peer")]
    Code(u16),
    #[error("close reason is not UTF-8")]
    Reason,
}

/// Parses a close frame's payload: `None` when it carries no code.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, CloseError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(CloseError::OneByte),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(CloseError::Code(code));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| CloseError::Reason)?;
            Ok(Some((code, reason)))
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 upgrade
// ---------------------------------------------------------------------------

/// What the server needs from a client's upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct UpgradeRequest<'a> {
    /// Path without the query string.
    pub path: &'a str,
    pub key: &'a str,
    pub authorization: Option<&'a str>,
    pub origin: Option<&'a str>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("upgrade request exceeds {0} bytes")]
    TooLarge(usize),
    #[error("malformed HTTP request")]
    Malformed,
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("method is not GET")]
    NotGet,
    #[error("not an HTTP/1.1 request")]
    NotHttp11,
    #[error("missing `Upgrade: websocket` or `Connection: Upgrade`")]
    NotUpgrade,
    #[error("missing or unsupported Sec-WebSocket-Version (13 is supported)")]
    BadVersion,
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    #[error("server answered with status {0}, not 101")]
    Status(u16),
    #[error("server's Sec-WebSocket-Accept does not match the key")]
    BadAccept,
}

impl HandshakeError {
    /// The HTTP status a server answers this error with.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::TooLarge(_) | HandshakeError::TooManyHeaders => 431,
            HandshakeError::NotGet => 405,
            HandshakeError::BadVersion => 426,
            _ => 400,
        }
    }
}

fn header_value<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// A Sec-WebSocket-Key is the base64 of exactly 16 bytes: 22 symbols and
/// `==`, the last symbol carrying only 4 bits.
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
        && &b[22..] == b"=="
}

/// Finds the end of the HTTP head (after `\r\n\r\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a client's upgrade request from the front of `buf`. `Ok(None)`
/// means the head is incomplete and within `max_len`. On success returns
/// the request and how many bytes the head used (frames may follow).
pub fn parse_upgrade(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(UpgradeRequest<'_>, usize)>, HandshakeError> {
    let Some(end) = head_end(buf) else {
        return if buf.len() >= max_len {
            Err(HandshakeError::TooLarge(max_len))
        } else {
            Ok(None)
        };
    };
    if end > max_len {
        return Err(HandshakeError::TooLarge(max_len));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HandshakeError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(_) => return Err(HandshakeError::Malformed),
    }
    if req.method != Some("GET") {
        return Err(HandshakeError::NotGet);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::NotHttp11);
    }
    let headers = req.headers;
    if !has_token(header_value(headers, "upgrade"), "websocket")
        || !has_token(header_value(headers, "connection"), "upgrade")
    {
        return Err(HandshakeError::NotUpgrade);
    }
    if header_value(headers, "sec-websocket-version") != Some("13") {
        return Err(HandshakeError::BadVersion);
    }
    let key = header_value(headers, "sec-websocket-key").filter(|k| is_valid_key(k));
    let Some(key) = key else {
        return Err(HandshakeError::BadKey);
    };
    let full_path = req.path.unwrap_or("/");
    let path = full_path.split('?').next().unwrap_or(full_path);
    Ok(Some((
        UpgradeRequest {
            path,
            key,
            authorization: header_value(headers, "authorization"),
            origin: header_value(headers, "origin"),
        },
        end,
    )))
}

/// The `Sec-WebSocket-Accept` value for a key.
pub fn accept_key(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Appends the 101 response. Never names a subprotocol.
pub fn write_upgrade_response(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a complete HTTP error response whose body says what went wrong.
pub fn write_http_error(out: &mut Vec<u8>, status: u16, message: &str) {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        message.len() + 1
    );
    if status == 426 {
        head.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(message.as_bytes());
    out.push(b'\n');
}

/// A fresh random Sec-WebSocket-Key for a client.
pub fn new_client_key() -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut key = String::with_capacity(24);
    for _ in 0..21 {
        key.push(B64[fastrand::usize(..64)] as char);
    }
    key.push(['A', 'Q', 'g', 'w'][fastrand::usize(..4)]);
    key.push_str("==");
    key
}

/// Appends a client's upgrade request for `path` on `host`.
pub fn write_upgrade_request(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key: &str,
    authorization: Option<&str>,
) {
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(auth) = authorization {
        let _ = write!(head, "Authorization: {auth}\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
}

/// Parses the server's answer to our upgrade. `Ok(Some(n))`: upgraded, the
/// head used `n` bytes.
pub fn parse_upgrade_response(
    buf: &[u8],
    key: &str,
    max_len: usize,
) -> Result<Option<usize>, HandshakeError> {
    let Some(end) = head_end(buf) else {
        return if buf.len() >= max_len {
            Err(HandshakeError::TooLarge(max_len))
        } else {
            Ok(None)
        };
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        _ => return Err(HandshakeError::Malformed),
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(HandshakeError::Status(code));
    }
    if header_value(resp.headers, "sec-websocket-accept") != Some(accept_key(key).as_str()) {
        return Err(HandshakeError::BadAccept);
    }
    Ok(Some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /ws/microservice?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn rfc_sample_accept_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_a_valid_upgrade_and_reports_its_length() {
        let raw = request("Authorization: Bearer abc\r\n");
        let mut bytes = raw.clone().into_bytes();
        bytes.extend_from_slice(b"\x81\x80");
        let (req, used) = parse_upgrade(&bytes, 8192).unwrap().unwrap();
        assert_eq!(used, raw.len());
        assert_eq!(req.path, "/ws/microservice");
        assert_eq!(req.key, KEY);
        assert_eq!(req.authorization, Some("Bearer abc"));
    }

    #[test]
    fn incomplete_head_waits_then_overflows() {
        let raw = request("");
        assert_eq!(
            parse_upgrade(&raw.as_bytes()[..raw.len() - 2], 8192),
            Ok(None)
        );
        let long = vec![b'a'; 100];
        assert_eq!(
            parse_upgrade(&long, 100),
            Err(HandshakeError::TooLarge(100))
        );
    }

    #[test]
    fn rejects_bad_upgrades_with_the_right_status() {
        let cases: &[(&str, HandshakeError, u16)] = &[
            (
                "POST / HTTP/1.1\r\nHost: h\r\n\r\n",
                HandshakeError::NotGet,
                405,
            ),
            (
                "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
                HandshakeError::NotHttp11,
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
                HandshakeError::NotUpgrade,
                400,
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n",
                HandshakeError::BadVersion,
                426,
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
                HandshakeError::BadKey,
                400,
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
                HandshakeError::BadKey,
                400,
            ),
            ("\x00\x01garbage\r\n\r\n", HandshakeError::Malformed, 400),
        ];
        for (raw, err, status) in cases {
            assert_eq!(
                parse_upgrade(raw.as_bytes(), 8192).unwrap_err(),
                *err,
                "{raw:?}"
            );
            assert_eq!(err.status(), *status);
        }
    }

    #[test]
    fn key_must_encode_sixteen_bytes() {
        assert!(is_valid_key(KEY));
        assert!(!is_valid_key("dGhlIHNhbXBsZSBub25jZR=="));
        assert!(!is_valid_key("dGhlIHNhbXBsZSBub25jZQ="));
        for _ in 0..100 {
            assert!(is_valid_key(&new_client_key()));
        }
    }

    #[test]
    fn response_never_names_a_subprotocol_and_client_accepts_it() {
        let mut out = Vec::new();
        write_upgrade_response(&mut out, KEY);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.to_ascii_lowercase().contains("sec-websocket-protocol"));
        assert_eq!(parse_upgrade_response(&out, KEY, 4096), Ok(Some(out.len())));
        assert_eq!(
            parse_upgrade_response(&out, "AAAAAAAAAAAAAAAAAAAAAA==", 4096),
            Err(HandshakeError::BadAccept)
        );
        let mut err = Vec::new();
        write_http_error(&mut err, 404, "no such path");
        assert_eq!(
            parse_upgrade_response(&err, KEY, 4096),
            Err(HandshakeError::Status(404))
        );
    }

    #[test]
    fn client_request_round_trips() {
        let mut out = Vec::new();
        write_upgrade_request(
            &mut out,
            "127.0.0.1:8438",
            "/ws/discovery",
            KEY,
            Some("Bearer t"),
        );
        let (req, used) = parse_upgrade(&out, 8192).unwrap().unwrap();
        assert_eq!(
            (req.path, req.authorization, used),
            ("/ws/discovery", Some("Bearer t"), out.len())
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_encoding() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OpCode::Text, &payload, Some([1, 2, 3, 4]));
            let h = decode_header(&out, Role::Server).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.payload_len),
                (true, OpCode::Text, len as u64)
            );
            let body = &mut out[h.header_len..];
            apply_mask(body, h.mask.unwrap());
            assert_eq!(body, &payload[..]);
            // Every strict prefix of the header asks for more bytes.
            for cut in 0..h.header_len {
                assert_eq!(decode_header(&out[..cut], Role::Server), Ok(None));
            }
        }
    }

    #[test]
    fn header_violations() {
        let cases: &[(&[u8], Role, FrameError)] = &[
            (
                &[0xC1, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::ReservedBits,
            ),
            (
                &[0x83, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::ReservedOpcode(3),
            ),
            (
                &[0x8B, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::ReservedOpcode(0xB),
            ),
            (
                &[0x09, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::FragmentedControl,
            ),
            (
                &[0x89, 0xFE, 0, 126, 0, 0, 0, 0],
                Role::Server,
                FrameError::ControlTooLong(126),
            ),
            (&[0x81, 0x05], Role::Server, FrameError::Unmasked),
            (&[0x81, 0x85], Role::Client, FrameError::Masked),
            (
                &[0x82, 0xFE, 0, 5],
                Role::Server,
                FrameError::NonMinimalLength,
            ),
            (
                &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
                Role::Server,
                FrameError::BadLength,
            ),
        ];
        for (bytes, role, err) in cases {
            assert_eq!(decode_header(bytes, *role), Err(*err), "{bytes:x?}");
        }
    }

    #[test]
    fn mask_is_an_involution_on_odd_lengths() {
        let mut data: Vec<u8> = (0..37).collect();
        apply_mask(&mut data, [9, 8, 7, 6]);
        assert_ne!(data, (0..37).collect::<Vec<u8>>());
        apply_mask(&mut data, [9, 8, 7, 6]);
        assert_eq!(data, (0..37).collect::<Vec<u8>>());
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(CloseError::OneByte));
        assert_eq!(
            parse_close(&[0x03, 0xE8, b'o', b'k']),
            Ok(Some((1000, "ok")))
        );
        assert_eq!(
            parse_close(&1005u16.to_be_bytes()),
            Err(CloseError::Code(1005))
        );
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]), Err(CloseError::Reason));
        let mut out = Vec::new();
        encode_close(&mut out, 4000, &"é".repeat(100), None);
        let h = decode_header(&out, Role::Client).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        let (code, reason) = parse_close(&out[h.header_len..]).unwrap().unwrap();
        assert_eq!(code, 4000);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
