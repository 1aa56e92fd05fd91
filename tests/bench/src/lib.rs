//! `weft-bench`: the benchmarks behind `make bench` and `BENCHMARKS.md`.
//!
//! What it does: drives the real binaries (control plane, sidecar, Envoy, etcd) the way users
//! run them, under load this crate generates, and reads their cost from `/proc`.
//! - `weft-bench-xds`: an in-tree xDS load client (M SotW or Delta clients) against the
//!   control plane: convergence, pushes per second, CPU per update, RSS per client, bytes per
//!   change, encodes per change.
//! - `weft-bench-proxy`: one hop direct, through `weft-sidecar` and through Envoy.
//! - `weft-bench-lb`: tail latency per balancing algorithm with one slow backend.
//!
//! What it does not do: assert. Benchmarks report numbers; timed assertions belong nowhere
//! (these machines are shared and noisy). Tests live in `tests/`.

pub mod backend;
pub mod load;
pub mod procstat;
pub mod report;
pub mod xds;
