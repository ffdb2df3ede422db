//! The timer wheel at 300,000 entries (the connections of one node on
//! this machine): insert, cancel, and one 30 s ping interval of advances.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tether::engine::wheel::{Link, Tick, Wheel};

const N: u32 = 300_000;
/// 30 s at 100 ms ticks.
const INTERVAL: Tick = 300;

fn spread(key: u32) -> Tick {
    key.wrapping_mul(2_654_435_761) % INTERVAL + 1
}

fn full() -> (Wheel, Vec<Link>) {
    let mut links = vec![Link::default(); N as usize];
    let mut wheel = Wheel::new(0);
    for key in 0..N {
        wheel.insert(&mut links, key, spread(key));
    }
    (wheel, links)
}

fn wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel_300k");
    group.sample_size(20);
    group.bench_function("insert_300k", |b| {
        b.iter_batched(
            || (Wheel::new(0), vec![Link::default(); N as usize]),
            |(mut wheel, mut links)| {
                for key in 0..N {
                    wheel.insert(&mut links, key, spread(key));
                }
                black_box(wheel.len())
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("cancel_300k", |b| {
        b.iter_batched(
            full,
            |(mut wheel, mut links)| {
                for key in 0..N {
                    wheel.cancel(&mut links, key);
                }
                black_box(wheel.len())
            },
            BatchSize::LargeInput,
        )
    });
    // A whole ping interval: every entry fires once and is re-armed one
    // interval later, as pings are.
    group.bench_function("advance_one_interval_rearming_300k", |b| {
        b.iter_batched(
            full,
            |(mut wheel, mut links)| {
                let mut expired = Vec::with_capacity(4096);
                for tick in 1..=INTERVAL {
                    expired.clear();
                    wheel.advance(&mut links, tick, &mut expired);
                    for &key in &expired {
                        wheel.insert(&mut links, key, tick + INTERVAL);
                    }
                }
                black_box(wheel.len())
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, wheel);
criterion_main!(benches);
