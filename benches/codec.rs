//! The frame codec: parse + unmask a client text frame, and encode a
//! server frame, at the sizes the protocol sees (a pong, a register, a
//! discovery snapshot). Also the whole connection state machine on a
//! register message.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tether::engine::conn::{Conn, Event, Flow, Limits, Timing};
use tether::engine::ws::{self, OpCode, Role};

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for size in [8usize, 300, 4 << 10, 64 << 10] {
        let payload = vec![b'a'; size];
        let mut frame = Vec::new();
        ws::encode_frame(&mut frame, OpCode::Text, &payload, Some([1, 2, 3, 4]));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("decode_unmask", size),
            &frame,
            |b, frame| {
                let mut buf = frame.clone();
                b.iter(|| {
                    let h = ws::decode_header(black_box(&buf), Role::Server)
                        .unwrap()
                        .unwrap();
                    let body = &mut buf[h.header_len..];
                    ws::apply_mask(body, h.mask.unwrap());
                    black_box(&body[0]);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("encode_server", size),
            &payload,
            |b, payload| {
                let mut out = Vec::with_capacity(size + 14);
                b.iter(|| {
                    out.clear();
                    ws::encode_frame(&mut out, OpCode::Text, black_box(payload), None);
                    black_box(out.len());
                })
            },
        );
    }
    group.finish();
}

fn conn_machine(c: &mut Criterion) {
    let timing = Timing {
        handshake: 50,
        admit: 100,
        ping_interval: 300,
        ping_grace: 15,
        pong_timeout: 100,
        linger: 20,
        message: 100,
    };
    let register = br#"{"jsonrpc":"2.0","id":"register-1","method":"service/register","params":{"serviceId":"user-service","version":"1.0.0","protocol":"https","address":"10.0.3.7","port":8443,"tags":{"zone":"a"},"envTag":"prod"}}"#;
    let mut frame = Vec::new();
    ws::encode_frame(&mut frame, OpCode::Text, register, Some([9, 8, 7, 6]));
    let mut upgrade = Vec::new();
    ws::write_upgrade_request(
        &mut upgrade,
        "h",
        "/ws/microservice",
        "dGhlIHNhbXBsZSBub25jZQ==",
        None,
    );
    let limits = Limits::default();
    c.bench_function("conn/feed_register_message", |b| {
        let mut conn = Conn::accepted(3, 1, 0, &timing);
        let mut out = Vec::new();
        conn.feed(
            0,
            &mut upgrade.clone(),
            &limits,
            &timing,
            &mut out,
            |_, _| Flow::Continue,
        );
        let mut buf = frame.clone();
        b.iter(|| {
            buf.copy_from_slice(&frame);
            out.clear();
            let mut seen = 0;
            conn.feed(0, &mut buf, &limits, &timing, &mut out, |ev, _| {
                if let Event::Text(t) = ev {
                    seen += t.len();
                }
                Flow::Continue
            });
            black_box(seen);
        })
    });
}

criterion_group!(benches, frames, conn_machine);
criterion_main!(benches);
