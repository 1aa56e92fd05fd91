//! The proxy's Prometheus metrics (`weft_sidecar_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub direction: &'static str,
    pub service: String,
    /// The exact status code: the set of codes seen is small, and `503` vs `504` matters.
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DurationLabels {
    pub direction: &'static str,
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub service: String,
    /// `connect`, `reset`, `refused_stream`, `timeout`.
    pub kind: &'static str,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Clone)]
pub(crate) struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ServiceLabels, Counter>,
    pub rate_limited: Family<ServiceLabels, Counter>,
    pub overloaded: Family<ServiceLabels, Counter>,
    pub no_route: Counter,
    pub upstream_errors: Family<ErrorLabels, Counter>,
}

impl Metrics {
    pub(crate) fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            retries: Family::default(),
            rate_limited: Family::default(),
            overloaded: Family::default(),
            no_route: Counter::default(),
            upstream_errors: Family::default(),
        };
        registry.register(
            "weft_sidecar_requests",
            "Requests proxied, by direction, service and response status code",
            m.requests.clone(),
        );
        registry.register(
            "weft_sidecar_request_duration_seconds",
            "Time from request received to response finished",
            m.duration.clone(),
        );
        registry.register(
            "weft_sidecar_retries",
            "Retries sent to a service",
            m.retries.clone(),
        );
        registry.register(
            "weft_sidecar_rate_limited",
            "Requests refused by the local rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "weft_sidecar_overloaded",
            "Requests refused by a circuit breaker",
            m.overloaded.clone(),
        );
        registry.register(
            "weft_sidecar_no_route",
            "Requests whose authority or path matched no route",
            m.no_route.clone(),
        );
        registry.register(
            "weft_sidecar_upstream_errors",
            "Failed upstream attempts, by kind",
            m.upstream_errors.clone(),
        );
        m
    }

    pub(crate) fn service(service: &str) -> ServiceLabels {
        ServiceLabels {
            service: service.to_string(),
        }
    }
}
