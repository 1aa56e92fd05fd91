//! What the sidecar's data path needs, read out of the xDS resources the control plane sends.
//!
//! What it does: turns Envoy v3 Clusters, ClusterLoadAssignments and the `weft_http`
//! RouteConfiguration into plain settings ([`ClusterConfig`], endpoint lists, [`RouteTable`]),
//! rejecting with a named reason anything the sidecar cannot honour (so the xDS client NACKs it
//! instead of half-applying it), and matches a request to a route.
//!
//! What it does not do: any I/O, or keep runtime state (balancers, rate-limit buckets, circuit
//! breaker counters); that is weft-proxy's. It does not decode xDS responses either, beyond the
//! `Any` helper [`decode_any`]: the xDS client hands it typed messages.
//!
//! The control plane's translation (control-plane/translate) is the other side of this contract:
//! - `Cluster.lb_policy` + `ring_hash_lb_config`/`maglev_lb_config`, and
//!   `Cluster.metadata.filter_metadata["weft"]` with `lb_algorithm` (registry `LbAlgorithm` in
//!   snake_case: exact algorithm, since Envoy lacks peak-EWMA and smooth WRR) and
//!   `zone_min_healthy_percent` (number). Without `lb_algorithm` the sidecar uses peak-EWMA
//!   unless `lb_policy` is RING_HASH, MAGLEV, RANDOM or LEAST_REQUEST.
//! - `Cluster.common_lb_config.healthy_panic_threshold` (percent) and
//!   `zone_aware_lb_config.routing_enabled` (percent; 0 = zone preference off).
//! - `Cluster.circuit_breakers.thresholds[DEFAULT]`: max_connections, max_pending_requests,
//!   max_requests, max_retries, retry_budget {budget_percent, min_retry_concurrency}.
//! - `Cluster.outlier_detection`, `Cluster.health_checks[0]` (HTTP path, gRPC, TCP),
//!   `Cluster.connect_timeout`, HTTP/2 upstream via `typed_extension_protocol_options`.
//! - Local rate limit: `typed_per_filter_config["envoy.filters.http.local_ratelimit"]` holding
//!   `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit` with a `token_bucket`,
//!   on a VirtualHost (per service) or a Route (per rule; the route's wins).
//!
//! ## Interface contract (shared with weft-proxy and the sidecar binary; keep it stable)

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use weft_balance::{Algorithm, EndpointSpec, OutlierConfig, ZoneConfig};

mod cluster;
mod endpoints;
mod routes;
mod util;

/// Name of the RouteConfiguration the sidecar subscribes to.
pub const ROUTE_CONFIG_NAME: &str = "weft_http";
/// `typed_per_filter_config` key of the local rate limit.
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
/// `filter_metadata` key of Weft's own cluster settings.
pub const WEFT_METADATA: &str = "weft";

/// A resource the sidecar cannot honour. The message names the resource and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct ConfigError {
    /// `cluster <name>`, `endpoints <name>`, `route_config <name> virtual_host <vh> route <i>`.
    pub resource: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryBudget {
    /// Active retries may be at most this percent of active requests.
    pub budget_percent: u32,
    /// ... but this many concurrent retries are always allowed.
    pub min_retry_concurrency: u32,
}

/// Envoy-style circuit breakers (DEFAULT priority). `None` = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CircuitBreakerConfig {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    Http { path: String },
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// A token bucket: `max_tokens` burst, `tokens_per_fill` added every `fill_interval`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenBucketConfig {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// Everything about one upstream service except its endpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClusterConfig {
    pub name: String,
    pub algorithm: Algorithm,
    /// `local_zone` is left `None` here; the sidecar fills in its own `--zone`.
    pub zone: ZoneConfig,
    pub outlier: Option<OutlierConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub circuit_breakers: CircuitBreakerConfig,
    pub connect_timeout: Duration,
    /// Upstream speaks HTTP/2 (h2c; gRPC services).
    pub http2: bool,
}

/// Reads a Cluster. Rejects: non-EDS discovery, unknown lb_policy, a `weft.lb_algorithm` it
/// does not know, percentages above 100, zero thresholds.
pub fn cluster_from_xds(c: &Cluster) -> Result<ClusterConfig, ConfigError> {
    cluster::read(c)
}

/// Reads a ClusterLoadAssignment: locality zone -> `zone`, `load_balancing_weight` (default 1),
/// health_status (HEALTHY/UNKNOWN -> Healthy, DRAINING -> Draining, everything else ->
/// Unhealthy). Rejects endpoints that are not IP socket addresses.
pub fn endpoints_from_xds(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointSpec>, ConfigError> {
    endpoints::read(cla)
}

/// What to hash for ring hash / Maglev (Envoy's hash_policy subset Weft emits).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    Header { name: String },
    Cookie { name: String },
    SourceIp,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HashPolicy {
    pub on: HashOn,
    pub terminal: bool,
}

/// Retry conditions (Envoy `retry_on` names the sidecar honours).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryOn {
    pub server_error_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// gRPC status names from the `retry_on` list (`cancelled`, `deadline-exceeded`,
    /// `internal`, `resource-exhausted`, `unavailable`), matched against `grpc-status`.
    pub grpc_statuses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

/// Matching inputs of one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Host header / `:authority`, possibly with a port.
    pub authority: &'a str,
    pub method: &'a http::Method,
    /// Path without the query string.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Where a matched request goes and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecision {
    /// Virtual host name (the service the authority named).
    pub virtual_host: String,
    /// The chosen cluster (a weighted choice already made).
    pub cluster: String,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryConfig>,
    pub hash_policies: Vec<HashPolicy>,
    /// The route's rate limit, else its virtual host's.
    pub rate_limit: Option<TokenBucketConfig>,
    /// Stable key for the rate-limit bucket (`vh/<name>` or `route/<vh>/<index>`), so a
    /// per-route limit is not shared with the rest of its service.
    pub rate_limit_key: Option<String>,
}

/// Why a request matched nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    #[error("no service named by authority `{0}`")]
    UnknownAuthority(String),
    #[error("service `{0}` has no route matching this request")]
    NoMatch(String),
}

/// The `weft_http` RouteConfiguration, ready to match requests.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    table: routes::Table,
}

impl RouteTable {
    /// Reads a RouteConfiguration. Rejects regexes that do not compile, route actions other
    /// than cluster / weighted_clusters, and domains Envoy would also reject.
    pub fn from_xds(rc: &RouteConfiguration) -> Result<RouteTable, ConfigError> {
        Ok(RouteTable {
            table: routes::Table::build(rc)?,
        })
    }

    /// Matches a request: virtual host by authority (exact, then `svc:*`-style port wildcard,
    /// then suffix/prefix wildcards as Envoy does, case-insensitive), then the first matching
    /// route. `weighted_pick` is a uniform random number in `0..total_weight` supplied by the
    /// caller so tests are deterministic.
    pub fn route(
        &self,
        req: &RequestInfo<'_>,
        weighted_pick: u64,
    ) -> Result<RouteDecision, NoRoute> {
        self.table.route(req, weighted_pick)
    }

    /// Names of the virtual hosts, for `/debug/config`.
    pub fn virtual_hosts(&self) -> Vec<String> {
        self.table.virtual_hosts()
    }
}

/// The sidecar's whole view of the mesh, rebuilt from each accepted xDS update.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    pub clusters: BTreeMap<String, ClusterConfig>,
    pub endpoints: BTreeMap<String, Vec<EndpointSpec>>,
    pub routes: RouteTable,
}

impl MeshConfig {
    /// Reads a whole set of resources, all or nothing: the first resource the sidecar cannot
    /// honour fails the lot, so a partly applied update never exists. `routes` is the
    /// [`ROUTE_CONFIG_NAME`] RouteConfiguration (`None`: no routes yet).
    pub fn from_xds(
        clusters: &[Cluster],
        assignments: &[ClusterLoadAssignment],
        routes: Option<&RouteConfiguration>,
    ) -> Result<MeshConfig, ConfigError> {
        let clusters = clusters
            .iter()
            .map(|c| cluster_from_xds(c).map(|cc| (cc.name.clone(), cc)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let endpoints = assignments
            .iter()
            .map(|a| endpoints_from_xds(a).map(|e| (a.cluster_name.clone(), e)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let routes = match routes {
            Some(rc) => RouteTable::from_xds(rc)?,
            None => RouteTable::default(),
        };
        Ok(MeshConfig {
            clusters,
            endpoints,
            routes,
        })
    }
}

/// Decodes a resource from an xDS `Any`, checking its type URL, with a [`ConfigError`] naming
/// `resource` on failure.
pub fn decode_any<M: prost::Message + prost::Name + Default>(
    any: &Any,
    resource: &str,
) -> Result<M, ConfigError> {
    util::unpack(any, resource, "resource")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
