//! Health probes (HTTP, TCP, gRPC health v1) with rise/fall thresholds.
//!
//! What it does: probes one address on an interval and turns single results into a verdict
//! that changes only after `rise` consecutive successes or `fall` consecutive failures, like
//! Envoy's and Consul's checks. The sidecar uses it for its own app (the verdict drives
//! registration) and for upstream endpoints when a policy asks for active health checks.
//!
//! What it does not do: decide what a verdict means; callers watch it.
//!
//! ## Interface contract (shared with weft-proxy and the sidecar binary; keep it stable)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// GET `path` over HTTP/1.1; 2xx (and 3xx) pass, anything else fails.
    Http { path: String },
    /// A TCP connect succeeds.
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` ("" = the whole server) answers SERVING.
    Grpc { service: String },
    /// No probing: the verdict is Healthy at once.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--app-health `{value}`: {reason} (expected `http:/path`, `tcp`, `grpc`, `grpc:SERVICE` or `none`)"
)]
pub struct ParseProbeError {
    pub value: String,
    pub reason: &'static str,
}

impl std::str::FromStr for Probe {
    type Err = ParseProbeError;
    /// `http:/healthz`, `tcp`, `grpc`, `grpc:my.Service`, `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        unimplemented!()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Schedule {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes to become Healthy.
    pub rise: u32,
    /// Consecutive failures to become Unhealthy.
    pub fall: u32,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{addr}: connect failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr}: HTTP {path} answered {status}")]
    HttpStatus {
        addr: SocketAddr,
        path: String,
        status: u16,
    },
    #[error("{addr}: gRPC health says {status}")]
    GrpcStatus { addr: SocketAddr, status: String },
    #[error("{addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
}

/// One probe, bounded by `timeout`.
pub async fn probe_once(
    probe: &Probe,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let _ = (probe, addr, timeout);
    unimplemented!()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No verdict yet (fewer than `rise` results).
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// Verdict plus the last result, for debug pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub verdict: Verdict,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub probes: u64,
}

/// A running checker; dropping it stops probing.
#[derive(Debug)]
pub struct Checker {
    // implementation-defined (task handle + watch receiver)
}

impl Checker {
    /// Starts probing `addr` now and then every `schedule.interval`.
    pub fn spawn(probe: Probe, addr: SocketAddr, schedule: Schedule) -> Checker {
        let _ = (probe, addr, schedule);
        unimplemented!()
    }

    pub fn watch(&self) -> watch::Receiver<Status> {
        unimplemented!()
    }
}
