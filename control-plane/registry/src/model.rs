//! The shared registry schema: what a registry file says, and what every later source (etcd and
//! Consul values, CRD specs) is to say in the same words.
//!
//! Every source decodes into these types, so a route written in a file and one written as an etcd
//! key mean exactly the same thing. Unknown fields are rejected everywhere (`deny_unknown_fields`)
//! because a misspelt `timout:` silently ignored is worse than an error naming it.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One registry document: the top level of a registry file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryDoc {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// A service and (in files) its statically listed endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// The application protocol a service speaks. Decides HTTP/2 upstreams in Envoy.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
}

/// Health of one endpoint as the registry knows it.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
    /// Still serving in-flight requests but must receive no new ones.
    Draining,
}

/// One instance of a service.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// An IP address literal. Host names are rejected: EDS endpoints are addresses, and a name
    /// Envoy cannot resolve there would make it NACK the whole assignment.
    pub address: String,
    /// 1..=65535; 0 is rejected by validation.
    pub port: u16,
    /// Relative load-balancing weight, 1..=[`MAX_WEIGHT`].
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default)]
    pub health: Health,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What a duration field's JSON schema (the CRDs' OpenAPI schema) accepts: humantime syntax,
/// `250ms`, `2s`, `1h 30m`. The API server then refuses a malformed duration when the object is
/// written, rather than the control plane failing to decode it later.
pub const DURATION_PATTERN: &str = r"^\s*([0-9]+(\.[0-9]+)?\s*(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y)\s*)+$";

/// Upper bound on an endpoint or backend weight. Envoy sums weights into a uint32 per locality;
/// this bound keeps 40,000 endpoints of maximal weight below overflow.
pub const MAX_WEIGHT: u32 = 100_000;

fn default_weight() -> u32 {
    1
}

/// How traffic addressed to a service is routed. Rules are tried in order; traffic that matches
/// no rule of any route goes to the service itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// The service whose traffic this route governs (its Host/authority and `xds:///` name).
    pub service: String,
    /// Further Host/authority values that select this route (Envoy only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Weighted backends. Empty means the route's own service with weight 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Whole-request timeout, e.g. `2s`. Absent: Envoy's default (15s), no deadline for gRPC.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policy: Vec<HashPolicy>,
    /// Local rate limit for requests matching this rule; replaces the service's own
    /// (`Policy.rate_limit`) for them. Envoy and the sidecar only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Conditions a request must all meet. At most one of the path fields may be set; none means
/// every path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// HTTP method, e.g. `GET` (matched against `:method`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// Exactly one of `exact`, `prefix`, `regex`, `present` must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt, 1..=10.
    pub attempts: u32,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub per_try_timeout: Option<Duration>,
    /// Envoy `retry_on` conditions (`5xx`, `connect-failure`, `reset`, `retriable-4xx`,
    /// `gateway-error`, `refused-stream`, `unavailable`, `cancelled`, `deadline-exceeded`,
    /// `internal`, `resource-exhausted`). Default: `connect-failure, refused-stream, unavailable`
    /// plus `5xx` for HTTP services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
}

/// The retry conditions Weft accepts: Envoy's HTTP conditions and its gRPC status conditions.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// What a consistent-hash load balancer hashes on. Exactly one of the fields must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// Stop evaluating further hash policies when this one produced a hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CookieHash {
    pub name: String,
    /// When set, Envoy generates the cookie with this TTL if the request lacks it.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub ttl: Option<Duration>,
}

/// How a service's endpoints are picked and protected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// The service this policy applies to.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbAlgorithm>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub connect_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<CircuitBreakers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Prefer endpoints in the client's own zone (Envoy and the sidecar only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware: Option<ZoneAware>,
    /// Envoy's `healthy_panic_threshold`, 0..=100: below this percent of healthy endpoints the
    /// client balances over all of them, healthy or not. Absent: 50. Envoy and the sidecar only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// Local rate limit for all requests to the service (Envoy and the sidecar only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Zone-aware routing: keep traffic in the client's zone while that zone is healthy enough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZoneAware {
    /// `false` turns zone preference off explicitly (as if `zone_aware` were absent, but said).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// 0..=100: spill over to other zones when fewer than this percent of the local zone's
    /// endpoints are healthy.
    #[serde(default = "default_min_healthy_percent")]
    pub min_healthy_percent: u32,
}

impl Default for ZoneAware {
    fn default() -> Self {
        Self {
            enabled: true,
            min_healthy_percent: default_min_healthy_percent(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_min_healthy_percent() -> u32 {
    70
}

/// A token bucket: `requests` tokens every `per`, holding at most `burst` (default `requests`).
/// Requests beyond it get 429 with `retry-after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per `per`, at least 1.
    pub requests: u32,
    /// Refill interval, at least [`MIN_RATE_LIMIT_PER`]. Default 1s.
    #[serde(default = "default_rate_limit_per", with = "humantime_serde")]
    #[schemars(
        with = "String",
        pattern(DURATION_PATTERN),
        description = "Refill interval, at least 50ms. Default 1s."
    )]
    pub per: Duration,
    /// Bucket size, at least `requests`. Default `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Envoy rejects a token bucket `fill_interval` below 50ms.
pub const MIN_RATE_LIMIT_PER: Duration = Duration::from_millis(50);

fn default_rate_limit_per() -> Duration {
    Duration::from_secs(1)
}

impl RateLimit {
    /// The bucket size: `burst`, or `requests` when unset.
    pub fn max_tokens(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }
}

/// Load-balancing algorithms. Clients that lack one get the nearest they support (documented in
/// `docs/registry-schema.md`), never a config they would reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    LeastRequest,
    PeakEwma,
    RingHash,
    Maglev,
}

impl LbAlgorithm {
    pub const ALL: [LbAlgorithm; 7] = [
        LbAlgorithm::RoundRobin,
        LbAlgorithm::WeightedRoundRobin,
        LbAlgorithm::Random,
        LbAlgorithm::LeastRequest,
        LbAlgorithm::PeakEwma,
        LbAlgorithm::RingHash,
        LbAlgorithm::Maglev,
    ];

    /// The schema spelling (snake_case), which is also what clients read from cluster metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::RoundRobin => "round_robin",
            LbAlgorithm::WeightedRoundRobin => "weighted_round_robin",
            LbAlgorithm::Random => "random",
            LbAlgorithm::LeastRequest => "least_request",
            LbAlgorithm::PeakEwma => "peak_ewma",
            LbAlgorithm::RingHash => "ring_hash",
            LbAlgorithm::Maglev => "maglev",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

/// Retries limited to a share of active requests, rather than a fixed `max_retries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// 0..=100: active retries may be at most this percent of active requests. Default 20.
    #[serde(default = "default_retry_budget_percent")]
    pub percent: u32,
    /// Concurrent retries always allowed, whatever the percentage says. Default 3.
    #[serde(default = "default_min_retry_concurrency")]
    pub min_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: default_retry_budget_percent(),
            min_concurrency: default_min_retry_concurrency(),
        }
    }
}

fn default_retry_budget_percent() -> u32 {
    20
}

fn default_min_retry_concurrency() -> u32 {
    3
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_failure: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub interval: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub base_ejection_time: Option<Duration>,
    /// 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Upper bound on an ejection (ejections grow with each repeat). Envoy's default: 300s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub max_ejection_time: Option<Duration>,
}

/// Active health checking of a service's endpoints by the client (Envoy, sidecar).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP path to GET. Absent: gRPC health v1 for gRPC services, a TCP connect otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub interval: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

// === merged model ===

/// An endpoint as the merged registry holds it: where it came from and under which id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Unique within its source and service (file source: `address:port`).
    pub id: String,
    /// The source that reported it (`file`, `registration`, `etcd`, ...).
    pub source: String,
    #[serde(flatten)]
    pub endpoint: Endpoint,
}

/// A service in the merged registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    /// Sorted by (address, port); one instance per address:port.
    pub instances: Vec<Instance>,
}

/// The merged view over every source: the translator's only input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Registry {
    pub services: BTreeMap<String, Service>,
    pub routes: BTreeMap<String, Route>,
    pub policies: BTreeMap<String, Policy>,
}

impl Registry {
    /// The policy that applies to `service`, if any (the first by name when several do).
    pub fn policy_for(&self, service: &str) -> Option<&Policy> {
        self.policies.values().find(|p| p.service == service)
    }

    /// The routes that govern `service`, in name order.
    pub fn routes_for<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes.values().filter(move |r| r.service == service)
    }
}
