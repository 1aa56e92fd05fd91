//! Ring hash and Maglev: the cost of building the table when membership changes (what
//! `Balancer::update` pays when one endpoint leaves or joins) and of one lookup (`pick` with a
//! request hash, then release), at N = 10, 100 and 1,000 endpoints.
//!
//! How many keys move when an endpoint leaves is a count, not a timing: see
//! `cargo run --release -p weft-balance --example hash_stability`.
//!
//! Kept short on purpose (1 s warm-up, 2 s measurement, 10 samples): `make bench` runs it on
//! shared machines. Pass criterion's own flags after `--` for longer runs.

use std::hint::black_box;
use std::time::Instant;

mod common;
use common::{SIZES, config, endpoints};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use weft_balance::{Algorithm, Balancer, ZoneConfig, hash_key};

fn algorithms() -> [(&'static str, Algorithm); 2] {
    [
        (
            "ring_hash",
            Algorithm::RingHash {
                min_ring_size: 1024,
            },
        ),
        ("maglev", Algorithm::Maglev { table_size: 65_537 }),
    ]
}

fn table_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_build");
    for (name, algorithm) in algorithms() {
        for n in SIZES {
            let lb = Balancer::new(algorithm, ZoneConfig::default(), None);
            // One endpoint leaves and comes back in turn: an unchanged membership is not
            // rebuilt at all.
            let all = endpoints(n);
            let one_less = all[..n - 1].to_vec();
            let mut flip = false;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter_batched(
                    || {
                        flip = !flip;
                        if flip { one_less.clone() } else { all.clone() }
                    },
                    |s| lb.update(s),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    group.finish();
}

fn hash_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("hash_pick");
    let keys: Vec<u64> = (0..4096)
        .map(|i| hash_key(format!("user-{i}").as_bytes()))
        .collect();
    for (name, algorithm) in algorithms() {
        for n in SIZES {
            let lb = Balancer::new(algorithm, ZoneConfig::default(), None);
            lb.update(endpoints(n));
            let now = Instant::now();
            let mut k = 0usize;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    k = (k + 1) % keys.len();
                    // Dropping the pick releases its in-flight slot, as a cancelled request.
                    black_box(lb.pick(Some(keys[k]), &[], now).map(|p| p.addr()))
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = table_build, hash_pick
}
criterion_main!(benches);
