//! What the benchmarks and the `hash_stability` example share: the endpoint sets they measure
//! and one short Criterion configuration (`make bench` runs them all).

// Each bench and example compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use criterion::Criterion;
use weft_balance::{EndpointHealth, EndpointSpec};

pub const SIZES: [usize; 3] = [10, 100, 1_000];

/// `n` healthy endpoints of weight 1 with distinct addresses (10.0.x.y:8080).
pub fn endpoints(n: usize) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| EndpointSpec {
            addr: SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
            weight: 1,
            zone: None,
            health: EndpointHealth::Healthy,
        })
        .collect()
}

/// Short runs: the whole suite stays around a minute and a half on two cores.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10)
}
