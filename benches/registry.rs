//! The registry: register (interning, identity index, discovery list),
//! deregister, and a discovery lookup serialized as the protocol sends it.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use tether::controller::rpc::SnapshotJson;
use tether::registry::{Filter, Owner, Registration, Registry, RegistryConfig};

fn address(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn populated(n: u32, services: u32) -> (Registry, Vec<String>) {
    let mut r = Registry::new(RegistryConfig::default(), 4);
    let addresses: Vec<String> = (0..n).map(address).collect();
    let names: Vec<String> = (0..services).map(|s| format!("service-{s}")).collect();
    for i in 0..n {
        let reg = Registration {
            service_id: &names[(i % services) as usize],
            version: "1.0.0",
            protocol: "https",
            address: &addresses[i as usize],
            port: 8443,
            env_tag: Some("prod"),
            tags_json: r#"{"zone":"a"}"#,
            address_derived: false,
        };
        r.register(
            &reg,
            Owner {
                shard: (i % 4) as u16,
                key: i,
                generation: 1,
            },
            1_795_413_540_000,
            &mut || None,
        )
        .unwrap();
    }
    (r, names)
}

fn registry(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry");
    group.sample_size(20);
    // One registration into a registry already holding 100,000.
    group.bench_function("register_into_100k", |b| {
        let (mut r, _) = populated(100_000, 100);
        let mut i = 100_000u32;
        b.iter(|| {
            i += 1;
            let addr = address(i);
            let reg = Registration {
                service_id: "service-7",
                version: "1.0.0",
                protocol: "https",
                address: &addr,
                port: 8443,
                env_tag: Some("prod"),
                tags_json: r#"{"zone":"a"}"#,
                address_derived: false,
            };
            let done = r
                .register(
                    &reg,
                    Owner {
                        shard: 0,
                        key: i,
                        generation: 1,
                    },
                    1_795_413_540_000,
                    &mut || None,
                )
                .unwrap();
            r.deregister(
                &done.id,
                Owner {
                    shard: 0,
                    key: i,
                    generation: 1,
                },
                "bench",
                1_795_413_540_001,
            );
            black_box(done.id)
        })
    });
    for per_service in [10u32, 1_000, 10_000] {
        let services = 100;
        let (r, names) = populated(per_service * services, services);
        let filter = Filter {
            service_id: names[3].clone(),
            env_tag: Some("prod".into()),
            protocol: None,
        };
        group.bench_with_input(
            BenchmarkId::new("lookup_and_serialize", per_service),
            &filter,
            |b, filter| {
                let mut out = Vec::with_capacity(4 << 20);
                b.iter(|| {
                    let snapshot = r.lookup(filter);
                    out.clear();
                    serde_json::to_writer(&mut out, &SnapshotJson(&snapshot)).unwrap();
                    black_box(out.len())
                })
            },
        );
    }
    group.bench_function("populate_100k", |b| {
        b.iter_batched(
            || (),
            |()| black_box(populated(100_000, 100).0.len_up()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
