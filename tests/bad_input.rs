//! Every kind of bad input gets the answer PROTOCOL.md names, is counted,
//! and leaves every other connection untouched.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::json;
use tether::controller::Controller;
use tether::engine::ws::{self, OpCode};
use tether::metrics::BadInput;

fn short_deadlines() -> Controller {
    let mut config = config(2);
    config.engine.handshake_timeout = Duration::from_millis(400);
    config.engine.admit_timeout = Duration::from_millis(400);
    config.engine.close_linger = Duration::from_millis(300);
    start(config)
}

/// A bystander that must stay registered and answering through it all.
fn assert_bystander_untouched(ctl: &Controller, bystander: &mut Client, id: uuid::Uuid) {
    let reply = bystander.call("discovery/lookup", json!({"serviceId": "bystander"}));
    assert_eq!(
        reply["result"]["nodes"][0]["runtimeInstanceId"],
        id.to_string()
    );
    assert_eq!(ctl.counts().up, 1);
}

/// Raw bytes before any upgrade, and the HTTP status they get.
#[test]
fn bad_upgrades_get_http_errors_and_are_counted() {
    let ctl = short_deadlines();
    let addr = ctl.local_addr();
    let (mut bystander, id) = registered(addr, "bystander", "10.9.9.9", 1);
    let key = ws::new_client_key();
    let head = |extra: &str| {
        format!(
            "GET /ws/microservice HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        )
    };
    let cases: Vec<(String, u16, BadInput)> = vec![
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            400,
            BadInput::NotAnUpgrade,
        ),
        (
            "POST /ws/microservice HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            405,
            BadInput::NotAnUpgrade,
        ),
        (
            head(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            ))
            .replace("/ws/microservice", "/ws/nope"),
            404,
            BadInput::WrongPath,
        ),
        (
            head("Sec-WebSocket-Version: 13\r\n"),
            400,
            BadInput::BadWebsocketKey,
        ),
        (
            head("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: not-base64\r\n"),
            400,
            BadInput::BadWebsocketKey,
        ),
        (
            head(&format!(
                "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {key}\r\n"
            )),
            426,
            BadInput::BadWebsocketVersion,
        ),
        (
            head(&format!("X-Padding: {}\r\n", "a".repeat(9000))),
            431,
            BadInput::UpgradeTooLarge,
        ),
        (
            "\x16\x03\x01\x00 garbage\r\n\r\n".into(),
            400,
            BadInput::MalformedHttp,
        ),
    ];
    for (request, status, kind) in cases {
        let before = bad_count(ctl.stats(), kind);
        let mut c = Client::tcp(addr);
        c.send_raw(request.as_bytes());
        assert_eq!(
            c.read_http_status(),
            status,
            "{:?}",
            &request[..request.len().min(60)]
        );
        assert!(
            c.sees_eof(WAIT),
            "the controller hangs up after an HTTP error"
        );
        eventually(&format!("{kind:?} counted"), || {
            bad_count(ctl.stats(), kind) == before + 1
        });
    }
    assert_bystander_untouched(&ctl, &mut bystander, id);
}

#[test]
fn slowloris_upgrade_is_dropped_at_the_deadline() {
    let ctl = short_deadlines();
    let mut c = Client::tcp(ctl.local_addr());
    c.send_raw(b"GET /ws/microservice HTTP/1.1\r\n");
    // Trickle a header byte at a time, never finishing the head.
    for b in b"Host: localhost\r\nX-Slow: " {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        c.sees_eof(WAIT),
        "dropped when the handshake deadline passes"
    );
    assert_eq!(bad_count(ctl.stats(), BadInput::HandshakeTimeout), 1);
}

/// Frames after a valid upgrade, and the close code they get.
#[test]
fn bad_frames_get_their_close_codes_and_are_counted() {
    let ctl = short_deadlines();
    let addr = ctl.local_addr();
    let (mut bystander, id) = registered(addr, "bystander", "10.9.9.9", 1);
    let masked = |opcode: OpCode, payload: &[u8]| {
        let mut v = Vec::new();
        ws::encode_frame(&mut v, opcode, payload, Some([1, 2, 3, 4]));
        v
    };
    let unfinished_ping = {
        let mut v = masked(OpCode::Ping, b"p");
        v[0] &= 0x7F;
        v
    };
    let cases: Vec<(&str, Vec<u8>, u16, BadInput)> = vec![
        (
            "unmasked frame",
            vec![0x81, 0x02, b'{', b'}'],
            1002,
            BadInput::UnmaskedFrame,
        ),
        (
            "reserved bit",
            {
                let mut v = masked(OpCode::Text, b"{}");
                v[0] |= 0x40;
                v
            },
            1002,
            BadInput::ReservedBitsOrOpcode,
        ),
        (
            "reserved opcode",
            {
                let mut v = masked(OpCode::Text, b"{}");
                v[0] = 0x83;
                v
            },
            1002,
            BadInput::ReservedBitsOrOpcode,
        ),
        (
            "control frame > 125 bytes",
            masked(OpCode::Ping, &[0u8; 126]),
            1002,
            BadInput::BadControlFrame,
        ),
        (
            "fragmented control frame",
            unfinished_ping,
            1002,
            BadInput::BadControlFrame,
        ),
        (
            "binary frame",
            masked(OpCode::Binary, b"\x00\x01"),
            1003,
            BadInput::BinaryFrame,
        ),
        (
            "invalid UTF-8",
            masked(OpCode::Text, &[b'"', 0xC3, 0x28, b'"']),
            1007,
            BadInput::InvalidUtf8,
        ),
        (
            "message > 1 MiB",
            masked(OpCode::Text, &vec![b' '; (1 << 20) + 1]),
            1009,
            BadInput::MessageTooBig,
        ),
        (
            "continuation without a start",
            masked(OpCode::Continuation, b"x"),
            1002,
            BadInput::BadFragmentation,
        ),
        (
            "close code 1005 from a peer",
            masked(OpCode::Close, &1005u16.to_be_bytes()),
            1002,
            BadInput::BadCloseFrame,
        ),
    ];
    for (what, bytes, code, kind) in cases {
        let before = bad_count(ctl.stats(), kind);
        let mut c = Client::connect(addr, "/ws/microservice");
        c.register("victim", "10.0.0.1", 1);
        c.stream.write_all(&bytes).unwrap();
        assert_eq!(c.expect_close(), Some(code), "{what}");
        assert_eq!(bad_count(ctl.stats(), kind), before + 1, "{what} counted");
        drop(c);
        eventually(&format!("{what}: the victim's instance is gone"), || {
            ctl.counts().up == 1
        });
    }
    assert_bystander_untouched(&ctl, &mut bystander, id);
}

/// JSON-RPC mistakes get error responses; the connection stays open.
#[test]
fn bad_messages_get_json_rpc_errors_and_the_connection_stays() {
    let ctl = short_deadlines();
    let addr = ctl.local_addr();
    let (mut bystander, bystander_id) = registered(addr, "bystander", "10.9.9.9", 1);
    let mut c = Client::connect(addr, "/ws/microservice");

    // Before register, anything but service/register is refused.
    let reply = c.call("discovery/lookup", json!({"serviceId": "bystander"}));
    assert_eq!(reply["error"]["code"], -32001);
    let reply = c.call(
        "service/deregister",
        json!({"runtimeInstanceId": bystander_id}),
    );
    assert_eq!(reply["error"]["code"], -32001);
    assert_eq!(bad_count(ctl.stats(), BadInput::NotRegistered), 2);

    // Not JSON: -32700 with id null.
    c.send_text("{this is not json");
    let reply = c.recv_json();
    assert_eq!(
        (reply["error"]["code"].clone(), reply["id"].clone()),
        (json!(-32700), json!(null))
    );
    // No jsonrpc member: -32600, the id echoed.
    c.send_json(&json!({"id": 41, "method": "service/register", "params": {}}));
    let reply = c.recv_json();
    assert_eq!(
        (reply["error"]["code"].clone(), reply["id"].clone()),
        (json!(-32600), json!(41))
    );
    // Unknown method: -32601.
    assert_eq!(
        c.call("service/teleport", json!({}))["error"]["code"],
        -32601
    );
    // Invalid registrations: -32602 with a message that says what is wrong.
    for (params, says) in [
        // (A missing or unspecified address is not invalid: the peer's is
        // taken, tests/compat.rs.)
        (
            json!({"serviceId": "x", "address": "bad host!", "port": 8443}),
            "neither an IP address nor a host name",
        ),
        (
            json!({"serviceId": "x", "address": "[::1", "port": 8443}),
            "neither",
        ),
        (
            json!({"serviceId": "x", "address": "10.0.0.1", "port": 0}),
            "port",
        ),
        (json!({"address": "10.0.0.1", "port": 1}), "serviceId"),
        (
            json!({"serviceId": "x", "address": "10.0.0.1", "port": 70000}),
            "port",
        ),
        (json!({"serviceId": "x", "address": "10.0.0.1"}), "port"),
    ] {
        let reply = c.call("service/register", params.clone());
        assert_eq!(reply["error"]["code"], -32602, "{params}");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(says),
            "{reply}"
        );
    }
    assert_eq!(bad_count(ctl.stats(), BadInput::InvalidJson), 1);
    assert_eq!(bad_count(ctl.stats(), BadInput::InvalidRequest), 1);
    assert_eq!(bad_count(ctl.stats(), BadInput::MethodNotFound), 1);
    assert_eq!(bad_count(ctl.stats(), BadInput::InvalidParams), 6);

    // Still open: it can register now.
    let own = c.register("victim", "10.0.0.1", 1);
    // Deregistering someone else's instance: -32602, and it stays.
    let reply = c.call(
        "service/deregister",
        json!({"runtimeInstanceId": bystander_id, "reason": "programmatic"}),
    );
    assert_eq!(reply["error"]["code"], -32602);
    // A reply to a command id we never sent: counted and ignored.
    c.send_json(&json!({"jsonrpc": "2.0", "id": 999_999, "result": {}}));
    eventually("unknown reply counted", || {
        bad_count(ctl.stats(), BadInput::UnknownReplyId) == 1
    });
    let reply = c.call(
        "service/deregister",
        json!({"runtimeInstanceId": own, "reason": "programmatic"}),
    );
    assert_eq!(reply["result"]["status"], "deregistered");
    assert_bystander_untouched(&ctl, &mut bystander, bystander_id);
}

#[test]
fn registration_must_arrive_in_time() {
    let ctl = short_deadlines();
    let mut c = Client::connect(ctl.local_addr(), "/ws/microservice");
    assert_eq!(c.expect_close(), Some(1008));
    assert_eq!(bad_count(ctl.stats(), BadInput::RegisterTimeout), 1);
}

#[test]
fn abrupt_reset_mid_frame_is_counted_and_removes_the_instance() {
    let ctl = short_deadlines();
    let addr = ctl.local_addr();
    let (mut bystander, id) = registered(addr, "bystander", "10.9.9.9", 1);
    let (c, _) = registered(addr, "victim", "10.0.0.1", 1);
    let mut frame = Vec::new();
    ws::encode_frame(&mut frame, OpCode::Text, &[b' '; 1000], Some([1, 2, 3, 4]));
    let mut stream = c.stream;
    stream.write_all(&frame[..500]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // SO_LINGER 0: close sends RST.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    eventually("reset counted", || {
        bad_count(ctl.stats(), BadInput::ResetMidFrame) == 1
    });
    eventually("victim removed", || ctl.counts().up == 1);
    assert_bystander_untouched(&ctl, &mut bystander, id);
}

/// The last message and the FIN often arrive in one epoll edge; the EOF
/// must still be seen (a regression test: it once was not).
#[test]
fn data_then_fin_in_one_edge_is_seen_as_a_close() {
    let ctl = controller(2);
    let addr = ctl.local_addr();
    for i in 0..50u16 {
        let (mut c, _) = registered(addr, "svc", "10.0.0.1", i + 1);
        let mut frame = Vec::new();
        ws::encode_frame(
            &mut frame,
            OpCode::Text,
            br#"{"jsonrpc":"2.0","method":"notifications/log","params":{}}"#,
            Some([9, 9, 9, 9]),
        );
        c.stream.write_all(&frame).unwrap();
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    eventually("every instance removed", || ctl.counts().up == 0);
}

#[test]
fn upgrades_past_the_shard_cap_get_1013() {
    let mut config = config(1);
    config.engine.max_conns_per_shard = 2;
    let ctl = start(config);
    let addr = ctl.local_addr();
    let (_a, _) = registered(addr, "a", "10.0.0.1", 1);
    let (_b, _) = registered(addr, "b", "10.0.0.2", 1);
    let mut c = Client::connect(addr, "/ws/microservice");
    assert_eq!(c.expect_close(), Some(1013));
    let over_cap = tether::metrics::total(ctl.stats(), |s| &s.rejected_over_cap);
    assert_eq!(over_cap, 1);
}
