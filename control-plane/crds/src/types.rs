//! The three custom resources. Their specs reuse the registry's own types
//! ([`weft_registry::model`]), so a CRD field means exactly what the same field means in a
//! registry file, down to the spelling (snake_case, as in `docs/registry-schema.md`).

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use weft_registry::model::{
    CircuitBreakers, DURATION_PATTERN, Endpoint, HealthCheck, LbAlgorithm, OutlierDetection,
    Policy, Protocol, RateLimit, Route, RouteRule, ServiceSpec, ZoneAware,
};

use crate::status::ObjectStatus;

/// API group of every Weft CRD.
pub const GROUP: &str = "mesh.weft.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Status of a [`TrafficRoute`].
pub type TrafficRouteStatus = ObjectStatus;
/// Status of a [`TrafficPolicy`].
pub type TrafficPolicyStatus = ObjectStatus;
/// Status of an [`ExternalService`].
pub type ExternalServiceStatus = ObjectStatus;

/// How traffic addressed to one service is routed: the registry's `Route` without its `name`
/// (the object's namespace and name give it one, `<namespace>.<name>`).
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.weft.dev",
    version = "v1alpha1",
    kind = "TrafficRoute",
    plural = "trafficroutes",
    namespaced,
    status = "TrafficRouteStatus",
    shortname = "wtr",
    category = "weft",
    derive = "PartialEq",
    doc = "How traffic addressed to one service is routed: matches on path, headers and method; weighted backends; timeouts, retries and hash policy. Fields as in the registry schema's Route (docs/registry-schema.md).",
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".spec.service"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Programmed", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name": "ResolvedRefs", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"ResolvedRefs\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct TrafficRouteSpec {
    /// The service whose traffic this route governs (its Host/authority and `xds:///` name).
    pub service: String,
    /// Further Host/authority values that select this route (Envoy only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Rules, tried in order; at least one.
    pub rules: Vec<RouteRule>,
}

/// How a service's endpoints are picked and protected: the registry's `Policy` without its
/// `name`.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    namespaced,
    status = "TrafficPolicyStatus",
    shortname = "wtp",
    category = "weft",
    derive = "PartialEq",
    doc = "How a service's endpoints are picked and protected: load-balancing algorithm, circuit breakers, outlier detection, active health checks, zone-aware routing, rate limit. Fields as in the registry schema's Policy (docs/registry-schema.md).",
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".spec.service"}"#,
    printcolumn = r#"{"name": "LB", "type": "string", "jsonPath": ".spec.lb"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Programmed", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The service this policy applies to.
    pub service: String,
    /// Load-balancing algorithm. Absent: round robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbAlgorithm>,
    /// Timeout for a new upstream connection, e.g. `500ms`. Absent: 1s.
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
    /// 0..=100: below this percent of healthy endpoints the client balances over all of them.
    /// Absent: 50. Envoy and the sidecar only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// Local rate limit for all requests to the service (Envoy and the sidecar only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A service whose endpoints live outside the cluster: the registry's `ServiceSpec` without
/// its `name`.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.weft.dev",
    version = "v1alpha1",
    kind = "ExternalService",
    plural = "externalservices",
    namespaced,
    status = "ExternalServiceStatus",
    shortname = "wes",
    category = "weft",
    derive = "PartialEq",
    doc = "A service whose endpoints live outside the cluster (IP literals). Fields as in the registry schema's Service (docs/registry-schema.md).",
    printcolumn = r#"{"name": "Protocol", "type": "string", "jsonPath": ".spec.protocol"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Programmed", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct ExternalServiceSpec {
    /// `http` or `grpc`; `grpc` gives Envoy an HTTP/2 upstream.
    #[serde(default)]
    pub protocol: Protocol,
    /// The service's instances, one per `address:port`.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

impl TrafficRouteSpec {
    /// The registry route this spec describes, under the registry name `name`. Does not
    /// validate; see [`crate::validate_route`].
    pub fn to_route(&self, name: impl Into<String>) -> Route {
        Route {
            name: name.into(),
            service: self.service.clone(),
            hosts: self.hosts.clone(),
            rules: self.rules.clone(),
        }
    }
}

impl From<Route> for TrafficRouteSpec {
    fn from(r: Route) -> Self {
        Self {
            service: r.service,
            hosts: r.hosts,
            rules: r.rules,
        }
    }
}

impl TrafficPolicySpec {
    /// The registry policy this spec describes, under the registry name `name`. Does not
    /// validate; see [`crate::validate_policy`].
    pub fn to_policy(&self, name: impl Into<String>) -> Policy {
        Policy {
            name: name.into(),
            service: self.service.clone(),
            lb: self.lb,
            connect_timeout: self.connect_timeout,
            circuit_breakers: self.circuit_breakers.clone(),
            outlier_detection: self.outlier_detection.clone(),
            health_check: self.health_check.clone(),
            zone_aware: self.zone_aware.clone(),
            panic_threshold: self.panic_threshold,
            rate_limit: self.rate_limit.clone(),
        }
    }
}

impl From<Policy> for TrafficPolicySpec {
    fn from(p: Policy) -> Self {
        Self {
            service: p.service,
            lb: p.lb,
            connect_timeout: p.connect_timeout,
            circuit_breakers: p.circuit_breakers,
            outlier_detection: p.outlier_detection,
            health_check: p.health_check,
            zone_aware: p.zone_aware,
            panic_threshold: p.panic_threshold,
            rate_limit: p.rate_limit,
        }
    }
}

impl ExternalServiceSpec {
    /// The registry service this spec describes, under the registry name `name`. Does not
    /// validate; see [`crate::validate_external_service`].
    pub fn to_service(&self, name: impl Into<String>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            protocol: self.protocol,
            endpoints: self.endpoints.clone(),
        }
    }
}

impl From<ServiceSpec> for ExternalServiceSpec {
    fn from(s: ServiceSpec) -> Self {
        Self {
            protocol: s.protocol,
            endpoints: s.endpoints,
        }
    }
}
