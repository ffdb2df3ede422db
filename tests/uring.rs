//! The io_uring driver's edges: more receives at once than buffers; a
//! slot reused while our shutdown of its last connection is in flight.

mod common;

use common::*;
use serde_json::json;
use tether::engine::IoChoice;
use tether::metrics;

/// Two receive buffers for 64 clients pipelining requests: receives run
/// out of buffers (ENOBUFS), are re-armed, and every request is answered.
#[test]
fn running_out_of_receive_buffers_loses_no_data() {
    let mut config = config(1);
    config.engine.io = IoChoice::Uring;
    config.engine.uring_recv_buffers = 2;
    let ctl = start(config);
    let addr = ctl.local_addr();
    let mut clients: Vec<Client> = (0..64u16)
        .map(|i| registered(addr, "svc", "10.0.0.1", i + 1).0)
        .collect();
    for round in 0..3 {
        // Everyone sends 20 requests before anyone reads.
        for c in &mut clients {
            for _ in 0..20 {
                let id = c.next_id();
                c.send_json(&json!({"jsonrpc": "2.0", "id": id, "method": "discovery/lookup", "params": {"serviceId": "svc"}}));
            }
        }
        for c in &mut clients {
            for _ in 0..20 {
                let reply = c.recv_json();
                assert_eq!(
                    reply["result"]["nodes"].as_array().map(Vec::len),
                    Some(64),
                    "round {round}"
                );
            }
        }
    }
    let rearms = metrics::total(ctl.stats(), |s| &s.recv_rearms);
    assert!(
        rearms > 0,
        "the test must exhaust the buffers to mean anything"
    );
    eprintln!("receives re-armed after ENOBUFS: {rearms}");
}

/// The controller ends connections (a binary frame, refused with 1003)
/// and each peer leaves as soon as it has the close frame, before our
/// FIN. A slot freed that way is taken by the next accept: no shutdown
/// meant for the old connection may reach the new one, so every upgrade
/// is answered. Several clients at once keep the kernel's workers (where
/// a shutdown runs) busy.
#[test]
fn a_slot_given_to_a_new_connection_gets_no_shutdown_meant_for_the_old_one() {
    use std::time::{Duration, Instant};
    use tether::engine::ws::OpCode;
    let mut config = config(1);
    config.engine.io = IoChoice::Uring;
    let ctl = start(config);
    let addr = ctl.local_addr();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut rounds = 0;
                while rounds < 2000 && started.elapsed() < Duration::from_secs(3) {
                    let mut c = Client::tcp(addr);
                    let status = c.upgrade("/ws/microservice", None);
                    assert_eq!(status, 101, "round {rounds}: the upgrade was answered");
                    c.send_frame(OpCode::Binary, b"\x00\x01");
                    assert_eq!(c.expect_close(), Some(1003), "round {rounds}");
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let rounds: u32 = clients.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(rounds > 400, "{rounds} rounds");
    eprintln!("{rounds} connections ended by the controller, their slots reused");
}
