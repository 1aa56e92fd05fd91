//! Keys moved when one endpoint leaves, for ring hash and Maglev at N = 10, 100 and 1,000:
//! 100,000 request keys are mapped before and after the endpoint in the middle of the
//! (address-sorted) membership leaves. The ideal is 1/N (only the leaver's keys move); keys
//! that moved between two survivors are pure disruption.
//!
//! Prints a Markdown section (`make bench` saves it as `target/bench/hashing.md`):
//!
//! ```sh
//! cargo run --release -p weft-balance --example hash_stability
//! ```

use std::net::SocketAddr;
use std::time::Instant;

#[path = "../benches/common/mod.rs"]
mod common;
use common::endpoints;

use weft_balance::{Algorithm, Balancer, ZoneConfig, hash_key};

const KEYS: usize = 100_000;

fn mapping(lb: &Balancer, keys: &[u64], now: Instant) -> Vec<Option<SocketAddr>> {
    keys.iter()
        .map(|&k| lb.pick(Some(k), &[], now).map(|p| p.addr()))
        .collect()
}

fn main() {
    let keys: Vec<u64> = (0..KEYS)
        .map(|i| hash_key(format!("user-{i}").as_bytes()))
        .collect();
    let now = Instant::now();
    println!("## Consistent hashing: keys moved when one of N endpoints leaves\n");
    println!(
        "{KEYS} request keys (`user-<i>`, xxHash64), equal weights; the endpoint in the middle \
         of the membership leaves. Ring hash: `min_ring_size` 1024 (512 entries per endpoint); \
         Maglev: table 65,537 (Envoy's default) unless said.\n"
    );
    println!(
        "| algorithm | N | keys moved | ideal (1/N) | moved / ideal | moved between survivors | build (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, algorithm) in [
        (
            "ring_hash",
            Algorithm::RingHash {
                min_ring_size: 1024,
            },
        ),
        ("maglev", Algorithm::Maglev { table_size: 65_537 }),
        // Not a default anywhere: shows that Maglev's extra churn shrinks as the table grows
        // relative to N.
        (
            "maglev (table 1,000,003)",
            Algorithm::Maglev {
                table_size: 1_000_003,
            },
        ),
    ] {
        for n in [10usize, 100, 1_000] {
            let lb = Balancer::new(algorithm, ZoneConfig::default(), None);
            let all = endpoints(n);
            let t = Instant::now();
            lb.update(all.clone());
            let build_ms = t.elapsed().as_secs_f64() * 1e3;
            let before = mapping(&lb, &keys, now);
            let leaver = all[n / 2].addr;
            lb.update(all.into_iter().filter(|s| s.addr != leaver).collect());
            let after = mapping(&lb, &keys, now);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let between_survivors = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && **b != Some(leaver))
                .count();
            let share = moved as f64 / KEYS as f64;
            let ideal = 1.0 / n as f64;
            println!(
                "| {name} | {n} | {:.3}% | {:.3}% | {:.2} | {:.3}% | {build_ms:.1} |",
                share * 100.0,
                ideal * 100.0,
                share / ideal,
                between_survivors as f64 / KEYS as f64 * 100.0,
            );
        }
    }
}
