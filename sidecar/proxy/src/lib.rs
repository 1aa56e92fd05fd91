//! The sidecar's data path: the outbound proxy that balances the app's calls over the mesh and
//! the inbound proxy in front of the app.
//!
//! What it does:
//! - [`Mesh`]: the runtime built from each accepted [`weft_sidecar_config::MeshConfig`]: a
//!   [`weft_balance::Balancer`] per cluster (state kept across updates), active health
//!   checkers per endpoint when a cluster asks for them (weft-health-check), circuit-breaker
//!   counters, retry budgets, rate-limit token buckets and pooled upstream connections
//!   (HTTP/1.1 keep-alive, or h2c for HTTP/2 clusters).
//! - Outbound ([`serve_outbound`]): HTTP/1.1 and h2c (gRPC) from the app; the target service is
//!   the Host/`:authority`; route -> cluster -> endpoint; timeouts, retries within the budget,
//!   circuit breaking (503 + `x-weft-overloaded`), local rate limiting (429 + `Retry-After`),
//!   outcomes fed to outlier detection and peak-EWMA.
//! - Inbound ([`serve_inbound`]): forwards to the app on loopback, keeping the protocol;
//!   stops accepting on drain and lets in-flight requests finish.
//! - Both directions: W3C trace context (a new span per hop, child of the caller's), spans
//!   handed to a [`SpanSink`], one JSON access-log line per request with trace and span ids
//!   (tracing target `weft::access`), Prometheus metrics.
//!
//! What it does not do: talk xDS, register, or export spans itself.
//!
//! Errors the proxy itself answers, always with a body saying why (`weft: ...`) and header
//! `x-weft-error`: 400 malformed request, 404 unknown service / no route, 429 rate limited,
//! 431 headers too large, 502 upstream connect/protocol failure, 503 no healthy endpoint or
//! circuit open, 504 timeout.
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_sidecar_config::MeshConfig;
use weft_trace_context::SpanContext;

/// A finished span, handed to the exporter.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: SpanContext,
    /// `outbound <service>` / `inbound <service>`.
    pub name: String,
    /// Client span for outbound, server span for inbound.
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    /// `http.request.method`, `url.path`, `http.response.status_code`, `server.address`
    /// (upstream endpoint), `weft.service`, `weft.retries`, `error.type`.
    pub attributes: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Client,
    Server,
}

/// Where finished sampled spans go (the binary's OTLP exporter). Must not block.
pub trait SpanSink: Send + Sync + 'static {
    fn record(&self, span: SpanRecord);
}

/// Discards spans (no `--otlp-endpoint`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSpans;

impl SpanSink for NoSpans {
    fn record(&self, _span: SpanRecord) {}
}

/// Settings that are not xDS.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// This sidecar's service (labels inbound metrics and spans).
    pub service: String,
    /// This sidecar's zone (zone-aware balancing).
    pub zone: Option<String>,
    /// Largest request/response header block accepted (default 64 KiB).
    pub max_header_bytes: usize,
    /// Largest request body buffered so the request can be retried (default 64 KiB); larger
    /// bodies are streamed and not retried.
    pub max_retry_body_bytes: usize,
    /// Idle pooled upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Sample traces this sidecar starts (incoming traces keep their sampled flag).
    pub sample_new_traces: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            service: String::new(),
            zone: None,
            max_header_bytes: 64 * 1024,
            max_retry_body_bytes: 64 * 1024,
            pool_idle_timeout: Duration::from_secs(90),
            sample_new_traces: true,
        }
    }
}

/// The shared runtime: config + per-cluster state. `Arc<Mesh>` is handed to both proxies.
pub struct Mesh {
    // implementation-defined
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

impl Mesh {
    /// Registers the proxy's metrics (`weft_sidecar_*`) into `registry`.
    pub fn new(
        opts: ProxyOptions,
        spans: Arc<dyn SpanSink>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Arc<Mesh> {
        let _ = (opts, spans, registry);
        unimplemented!()
    }

    /// Applies a new config: balancers updated in place (state kept for endpoints that stay),
    /// removed clusters dropped, health checkers started/stopped as policies say.
    pub fn apply(&self, config: MeshConfig) {
        let _ = config;
        unimplemented!()
    }

    /// `/debug/endpoints`: per cluster, its algorithm and every endpoint's
    /// [`weft_balance::EndpointStatus`].
    pub fn debug_endpoints(&self) -> serde_json::Value {
        unimplemented!()
    }

    /// `/debug/config`: clusters' settings and route table virtual hosts as applied.
    pub fn debug_config(&self) -> serde_json::Value {
        unimplemented!()
    }
}

/// Serves the outbound listener until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve_outbound(listener: TcpListener, mesh: Arc<Mesh>, shutdown: CancellationToken) {
    let _ = (listener, mesh, shutdown);
    unimplemented!()
}

/// Inbound settings.
#[derive(Debug, Clone)]
pub struct InboundOptions {
    /// The app's address (loopback and `--app-port`).
    pub app: SocketAddr,
    /// The app speaks HTTP/2 (h2c) only, e.g. a gRPC server; otherwise the request's own
    /// protocol is kept.
    pub app_http2: bool,
}

/// Serves the inbound listener. When `drain` is cancelled it stops accepting new connections,
/// closes idle keep-alive connections (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY) and
/// returns once in-flight requests are done.
pub async fn serve_inbound(
    listener: TcpListener,
    opts: InboundOptions,
    mesh: Arc<Mesh>,
    drain: CancellationToken,
) {
    let _ = (listener, opts, mesh, drain);
    unimplemented!()
}
