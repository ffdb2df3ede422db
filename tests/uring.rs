//! The io_uring driver's edge: more receives at once than buffers.

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
