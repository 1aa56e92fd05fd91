//! Per-request cost of the non-hashing algorithms: one `pick` and its `finish` (the proxy does
//! both for every request), at N = 10, 100 and 1,000 endpoints, for P2C over peak EWMA (the
//! default), P2C least request and round robin.
//!
//! Every endpoint has answered before measuring starts, as in steady state; a second group
//! measures P2C/peak-EWMA while half the endpoints have never answered (after a scale-up),
//! where the cost of an unobserved endpoint comes into play (those picks are released as
//! cancelled, which keeps the unobserved ones unobserved).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;
use common::{SIZES, config, endpoints};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weft_balance::{Algorithm, Balancer, Outcome, ZoneConfig};

/// A balancer over `n` endpoints where the first `observed` have answered once.
fn warmed(algorithm: Algorithm, n: usize, observed: usize, now: Instant) -> Balancer {
    let lb = Balancer::new(algorithm, ZoneConfig::default(), None);
    lb.seed_rng(7);
    let specs = endpoints(n);
    lb.update(specs.clone());
    for (i, s) in specs.iter().enumerate().take(observed) {
        let others: Vec<SocketAddr> = specs
            .iter()
            .filter(|o| o.addr != s.addr)
            .map(|o| o.addr)
            .collect();
        if let Some(p) = lb.pick(None, &others, now) {
            let latency = Duration::from_micros(500 + (i as u64 % 17) * 50);
            p.finish(Outcome::Success { latency }, now);
        }
    }
    lb
}

fn bench_pick(c: &mut Criterion, group_name: &str, observed_share: f64) {
    let mut group = c.benchmark_group(group_name);
    let algorithms = [
        ("peak_ewma", Algorithm::PeakEwma),
        ("least_request", Algorithm::LeastRequest),
        ("round_robin", Algorithm::RoundRobin),
    ];
    for (name, algorithm) in algorithms {
        if observed_share < 1.0 && algorithm != Algorithm::PeakEwma {
            continue;
        }
        for n in SIZES {
            let start = Instant::now();
            let observed = (n as f64 * observed_share) as usize;
            let lb = warmed(algorithm, n, observed, start);
            let mut tick = 0u64;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    tick += 1;
                    let now = start + Duration::from_micros(tick);
                    if let Some(p) = lb.pick(None, &[], now) {
                        black_box(p.addr());
                        let outcome = if observed < n {
                            Outcome::Cancelled
                        } else {
                            Outcome::Success {
                                latency: Duration::from_micros(500),
                            }
                        };
                        p.finish(outcome, now);
                    }
                });
            });
        }
    }
    group.finish();
}

fn steady(c: &mut Criterion) {
    bench_pick(c, "pick_finish", 1.0);
}

fn half_unobserved(c: &mut Criterion) {
    bench_pick(c, "pick_finish_half_unobserved", 0.5);
}

criterion_group! {
    name = benches;
    config = config();
    targets = steady, half_unobserved
}
criterion_main!(benches);
