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
//! Circuit breakers, as far as a pooled hyper client allows: `max_requests` counts requests in
//! flight per cluster until their response ends; `max_connections` (HTTP/1.1 clusters only, as
//! one HTTP/1.1 connection carries one request at a time) caps concurrent upstream attempts and
//! the idle connections kept per endpoint; `max_pending_requests` caps attempts waiting for one
//! of those slots; `max_retries` / `retry_budget` cap retries in flight (Envoy's default of 3
//! when neither is set). HTTP/2 upstreams multiplex over one connection per endpoint, and get
//! the endpoint as `:authority` with the original authority in `host`.
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

mod access_log;
mod body;
mod breaker;
mod client;
mod errors;
mod headers;
mod inbound;
mod mesh;
mod metrics;
mod outbound;
mod ratelimit;
mod replay;
mod retry;
mod server;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
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

    /// `false` when every span would be thrown away: the proxy then does not build them (a
    /// span is a handful of allocations and formatted strings per request).
    fn enabled(&self) -> bool {
        true
    }
}

/// Discards spans (no `--otlp-endpoint`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSpans;

impl SpanSink for NoSpans {
    fn record(&self, _span: SpanRecord) {}

    fn enabled(&self) -> bool {
        false
    }
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
    opts: ProxyOptions,
    telemetry: Arc<access_log::Telemetry>,
    /// Swapped whole by `apply`; requests clone the `Arc` and keep a consistent view.
    state: RwLock<Arc<mesh::State>>,
    /// Also serialises `apply` calls.
    health: Mutex<mesh::HealthCheckers>,
    clients: client::ClientCache,
    limiter: ratelimit::RateLimiter,
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
        let metrics = metrics::Metrics::new(registry);
        Arc::new(Mesh {
            clients: client::ClientCache::new(opts.pool_idle_timeout, opts.max_header_bytes),
            opts,
            telemetry: Arc::new(access_log::Telemetry { metrics, spans }),
            state: RwLock::new(Arc::new(mesh::State::default())),
            health: Mutex::new(mesh::HealthCheckers::default()),
            limiter: ratelimit::RateLimiter::default(),
        })
    }

    fn snapshot(&self) -> Arc<mesh::State> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies a new config: balancers updated in place (state kept for endpoints that stay),
    /// removed clusters dropped, health checkers started/stopped as policies say.
    pub fn apply(&self, config: MeshConfig) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.snapshot();
        let next = mesh::build_state(
            config,
            &previous,
            self.opts.zone.as_ref(),
            &self.clients,
            &mut health,
        );
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// `/debug/endpoints`: per cluster, its algorithm and every endpoint's
    /// [`weft_balance::EndpointStatus`].
    pub fn debug_endpoints(&self) -> serde_json::Value {
        mesh::debug_endpoints(&self.snapshot())
    }

    /// `/debug/config`: clusters' settings and route table virtual hosts as applied.
    pub fn debug_config(&self) -> serde_json::Value {
        mesh::debug_config(&self.snapshot())
    }
}

/// Serves the outbound listener until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve_outbound(listener: TcpListener, mesh: Arc<Mesh>, shutdown: CancellationToken) {
    let max_header_bytes = mesh.opts.max_header_bytes;
    server::serve(listener, max_header_bytes, shutdown, move |req, remote| {
        outbound::handle(Arc::clone(&mesh), req, remote)
    })
    .await;
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
    let max_header_bytes = mesh.opts.max_header_bytes;
    let key = |http2| client::ClientKey {
        http2,
        connect_timeout: APP_CONNECT_TIMEOUT,
        max_idle_per_host: None,
    };
    let build = |http2| {
        client::build(
            key(http2),
            mesh.opts.pool_idle_timeout,
            mesh.opts.max_header_bytes,
        )
    };
    let inbound = Arc::new(inbound::Inbound {
        h1: build(false),
        h2: build(true),
        mesh: Arc::clone(&mesh),
        opts,
    });
    server::serve(listener, max_header_bytes, drain, move |req, remote| {
        inbound::handle(Arc::clone(&inbound), req, remote)
    })
    .await;
}

/// The app is on loopback: a connect that takes longer than this is not going to work.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
