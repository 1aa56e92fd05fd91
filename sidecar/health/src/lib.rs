//! Health probes (HTTP, TCP, gRPC health v1) with rise/fall thresholds.
//!
//! What it does: probes one address on an interval and turns single results into a verdict
//! that changes only after `rise` consecutive successes or `fall` consecutive failures, like
//! Envoy's and Consul's checks. The sidecar uses it for its own app (the verdict drives
//! registration) and for upstream endpoints when a policy asks for active health checks.
//!
//! What it does not do: decide what a verdict means (callers watch it), retry within one probe,
//! or follow HTTP redirects (a 3xx answer already counts as a pass).
//!
//! ## Interface contract (shared with weft-proxy and the sidecar binary; keep it stable)

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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
        let err = |reason| ParseProbeError {
            value: s.to_string(),
            reason,
        };
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("http", Some(path)) => {
                if !path.starts_with('/') {
                    return Err(err("the HTTP path must start with `/`"));
                }
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(err("the HTTP path must not contain whitespace"));
                }
                Ok(Probe::Http {
                    path: path.to_string(),
                })
            }
            ("http", None) => Err(err("an HTTP probe needs a path, as in `http:/healthz`")),
            ("tcp", None) => Ok(Probe::Tcp),
            ("grpc", None) => Ok(Probe::Grpc {
                service: String::new(),
            }),
            ("grpc", Some(service)) => {
                if service.is_empty() {
                    return Err(err("`grpc:` needs a service name after the colon"));
                }
                Ok(Probe::Grpc {
                    service: service.to_string(),
                })
            }
            ("none", None) => Ok(Probe::None),
            ("tcp" | "none", Some(_)) => Err(err("this probe takes no argument")),
            _ => Err(err("unknown probe kind")),
        }
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
    let work = async {
        match probe {
            Probe::None => Ok(()),
            Probe::Tcp => connect(addr).await.map(drop),
            Probe::Http { path } => probe_http(addr, path).await,
            Probe::Grpc { service } => probe_grpc(addr, service, timeout).await,
        }
    };
    // Dropping `work` on timeout also drops its socket, so a server that never answers costs
    // nothing after the deadline.
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ProbeError::Timeout { addr, timeout }))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })
}

async fn probe_http(addr: SocketAddr, path: &str) -> Result<(), ProbeError> {
    let protocol = |message: String| ProbeError::Protocol { addr, message };
    let stream = connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(format!("HTTP handshake failed: {e}")))?;
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "weft-health-check")
        // One request per connection: keeping it open would hold a socket on the app between
        // probes for no gain.
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| protocol(format!("building request for {path}: {e}")))?;
    // The connection is driven here rather than in a spawned task so that a timeout (which drops
    // this future) closes it too.
    let send = sender.send_request(req);
    tokio::pin!(conn, send);
    let resp = tokio::select! {
        r = &mut send => r,
        r = &mut conn => match r {
            // With `Connection: close` the connection may finish in the same poll that hands
            // the response over, so the response is still there to take.
            Ok(()) => send.await,
            Err(e) => return Err(protocol(format!("HTTP GET {path}: {e}"))),
        },
    }
    .map_err(|e| protocol(format!("HTTP GET {path}: {e}")))?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus {
            addr,
            path: path.to_string(),
            status: status.as_u16(),
        })
    }
}

async fn probe_grpc(addr: SocketAddr, service: &str, timeout: Duration) -> Result<(), ProbeError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ProbeError::Protocol {
            addr,
            message: format!("invalid gRPC endpoint: {e}"),
        })?
        // No per-request timeout here: the caller's deadline covers connect and call, and a
        // second timer firing first would report the timeout as a gRPC status.
        .connect_timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| ProbeError::Connect {
        addr,
        source: std::io::Error::other(e),
    })?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| ProbeError::GrpcStatus {
            addr,
            status: format!("error {:?}: {}", s.code(), s.message()),
        })?
        .into_inner();
    match ServingStatus::try_from(resp.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(ProbeError::GrpcStatus {
            addr,
            status: other.as_str_name().to_string(),
        }),
        Err(_) => Err(ProbeError::GrpcStatus {
            addr,
            status: format!("unknown status {}", resp.status),
        }),
    }
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
    status: watch::Receiver<Status>,
    task: JoinHandle<()>,
}

impl Checker {
    /// Starts probing `addr` now and then every `schedule.interval`.
    ///
    /// Must be called inside a Tokio runtime. `rise` and `fall` of 0 count as 1; an `interval` of
    /// 0 as 1 ms.
    pub fn spawn(probe: Probe, addr: SocketAddr, schedule: Schedule) -> Checker {
        let (tx, status) = watch::channel(Status::default());
        let task = tokio::spawn(run(probe, addr, schedule, tx));
        Checker { status, task }
    }

    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(probe: Probe, addr: SocketAddr, schedule: Schedule, tx: watch::Sender<Status>) {
    if probe == Probe::None {
        tx.send_replace(Status {
            verdict: Verdict::Healthy,
            ..Status::default()
        });
        // Keeping the sender alive keeps watchers' `changed()` pending rather than failing.
        tx.closed().await;
        return;
    }
    let mut tick = tokio::time::interval(schedule.interval.max(Duration::from_millis(1)));
    // A probe slower than the interval delays the next one instead of causing a burst.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut status = Status::default();
    loop {
        tick.tick().await;
        let result = probe_once(&probe, addr, schedule.timeout).await;
        let before = status.verdict;
        record(&mut status, &schedule, result.as_ref().err());
        if status.verdict != before {
            tracing::info!(
                %addr,
                from = ?before,
                to = ?status.verdict,
                last_error = status.last_error.as_deref().unwrap_or(""),
                "health verdict changed"
            );
        } else if let Err(e) = &result {
            tracing::debug!(%addr, error = %e, "health probe failed");
        }
        tx.send_replace(status.clone());
    }
}

/// Folds one probe result into `status`: the verdict flips only after `rise` successes or
/// `fall` failures in a row, so one lost probe does not take an instance out.
fn record(status: &mut Status, schedule: &Schedule, error: Option<&ProbeError>) {
    status.probes += 1;
    match error {
        None => {
            status.consecutive_successes = status.consecutive_successes.saturating_add(1);
            status.consecutive_failures = 0;
            status.last_error = None;
            if status.consecutive_successes >= schedule.rise.max(1) {
                status.verdict = Verdict::Healthy;
            }
        }
        Some(e) => {
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.consecutive_successes = 0;
            status.last_error = Some(e.to_string());
            if status.consecutive_failures >= schedule.fall.max(1) {
                status.verdict = Verdict::Unhealthy;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let ok = [
            (
                "http:/healthz",
                Probe::Http {
                    path: "/healthz".into(),
                },
            ),
            (
                "http:/a/b?x=1",
                Probe::Http {
                    path: "/a/b?x=1".into(),
                },
            ),
            ("tcp", Probe::Tcp),
            (
                "grpc",
                Probe::Grpc {
                    service: String::new(),
                },
            ),
            (
                "grpc:my.Service",
                Probe::Grpc {
                    service: "my.Service".into(),
                },
            ),
            ("none", Probe::None),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Probe>(), Ok(want), "{s}");
        }
    }

    #[test]
    fn parse_errors_name_value_and_reason() {
        for (s, reason) in [
            ("http:healthz", "must start with `/`"),
            ("http", "needs a path"),
            ("http:", "must start with `/`"),
            ("grpc:", "needs a service name"),
            ("tcp:80", "takes no argument"),
            ("udp", "unknown probe kind"),
            ("", "unknown probe kind"),
        ] {
            let e = s.parse::<Probe>().unwrap_err();
            let text = e.to_string();
            assert!(text.contains(&format!("`{s}`")), "{text}");
            assert!(text.contains(reason), "{s}: {text}");
        }
    }

    fn schedule(rise: u32, fall: u32) -> Schedule {
        Schedule {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise,
            fall,
        }
    }

    fn fail() -> ProbeError {
        ProbeError::Timeout {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn thresholds_gate_every_transition() {
        let s = schedule(2, 3);
        let mut st = Status::default();
        let e = fail();
        let mut step = |ok: bool| {
            record(&mut st, &s, (!ok).then_some(&e));
            st.verdict
        };
        assert_eq!(step(true), Verdict::Unknown);
        assert_eq!(step(false), Verdict::Unknown);
        assert_eq!(step(true), Verdict::Unknown);
        assert_eq!(step(true), Verdict::Healthy);
        assert_eq!(step(false), Verdict::Healthy);
        assert_eq!(step(false), Verdict::Healthy);
        assert_eq!(step(true), Verdict::Healthy);
        assert_eq!(step(false), Verdict::Healthy);
        assert_eq!(step(false), Verdict::Healthy);
        assert_eq!(step(false), Verdict::Unhealthy);
        assert_eq!(step(true), Verdict::Unhealthy);
        assert_eq!(step(true), Verdict::Healthy);
    }

    #[test]
    fn unknown_turns_unhealthy_after_fall_failures() {
        let s = schedule(3, 2);
        let mut st = Status::default();
        let e = fail();
        record(&mut st, &s, Some(&e));
        assert_eq!(st.verdict, Verdict::Unknown);
        record(&mut st, &s, Some(&e));
        assert_eq!(st.verdict, Verdict::Unhealthy);
        assert_eq!(st.consecutive_failures, 2);
        assert_eq!(st.probes, 2);
        assert!(st.last_error.is_some());
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let s = schedule(0, 0);
        let mut st = Status::default();
        record(&mut st, &s, None);
        assert_eq!(st.verdict, Verdict::Healthy);
        record(&mut st, &s, Some(&fail()));
        assert_eq!(st.verdict, Verdict::Unhealthy);
    }
}
