//! Services and their policies become CDS Clusters.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy,
    RingHashLbConfig,
    common_lb_config::{LocalityConfigSpecifier, ZoneAwareLbConfig},
};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection,
    circuit_breakers::{Thresholds, thresholds::RetryBudget},
};
use envoy_types::pb::envoy::config::core::v3::health_check::{
    GrpcHealthCheck, HealthChecker, HttpHealthCheck, TcpHealthCheck,
};
use envoy_types::pb::envoy::config::core::v3::{
    HealthCheck, Http2ProtocolOptions, Metadata, RoutingPriority,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::google::protobuf::{Struct, UInt64Value, Value, value::Kind};
use prost::Name;
use weft_registry::{LbAlgorithm, Policy, Protocol, Registry, Service};

use crate::Flavor;
use crate::util::{ads, duration, ordered_map, pack, percent, u32v};

/// `filter_metadata` key of Weft's own cluster settings, read by the sidecar (Envoy ignores it).
pub const WEFT_METADATA: &str = "weft";
/// The policy's exact `lb` (snake_case), which `lb_policy` can only approximate.
pub const META_LB_ALGORITHM: &str = "lb_algorithm";
/// `zone_aware.min_healthy_percent`, which Envoy's zone-aware config has no field for.
pub const META_ZONE_MIN_HEALTHY_PERCENT: &str = "zone_min_healthy_percent";

const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const DEFAULT_HC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const DEFAULT_HC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Envoy's and gRPC's documented default. gRPC rejects anything above 8,388,608.
const MIN_RING_SIZE: u64 = 1024;
/// Ejection "enforcement" percentages are 0..=100; 100 means "always act on the detection".
const ALWAYS_ENFORCE: u32 = 100;

/// One Cluster per service, sorted by name. Reads services and policies, never instances.
pub fn clusters(reg: &Registry, flavor: Flavor) -> Vec<Cluster> {
    reg.services
        .values()
        .map(|svc| cluster(svc, reg.policy_for(&svc.name), flavor))
        .collect()
}

fn cluster(svc: &Service, policy: Option<&Policy>, flavor: Flavor) -> Cluster {
    let lb = policy.and_then(|p| p.lb);
    let lb_policy = lb_policy(lb, flavor);
    let lb_config = (lb_policy == LbPolicy::RingHash).then(|| {
        LbConfig::RingHashLbConfig(RingHashLbConfig {
            minimum_ring_size: Some(UInt64Value {
                value: MIN_RING_SIZE,
            }),
            ..Default::default()
        })
    });
    let mut c = Cluster {
        name: svc.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        // An empty service_name makes the EDS resource name the cluster name.
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(
            policy
                .and_then(|p| p.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        )),
        lb_policy: lb_policy as i32,
        lb_config,
        ..Default::default()
    };
    if let Some(p) = policy {
        c.circuit_breakers = circuit_breakers(p, flavor);
        c.outlier_detection = p
            .outlier_detection
            .as_ref()
            .map(|od| outlier_detection(od, flavor));
        // gRPC clients get none of these: they would ignore them at best (metadata, zone-aware
        // routing) or reject the cluster.
        if flavor == Flavor::Envoy {
            if let Some(hc) = &p.health_check {
                c.health_checks = vec![health_check(hc, svc.protocol)];
            }
            c.common_lb_config = common_lb_config(p);
            c.metadata = weft_metadata(p);
        }
    }
    if flavor == Flavor::Envoy && svc.protocol == Protocol::Grpc {
        c.typed_extension_protocol_options = http2_upstream();
    }
    c
}

/// The nearest algorithm each client supports. grpcio NACKs MAGLEV and LEAST_REQUEST in the
/// legacy `lb_policy` enum, so gRPC gets RING_HASH for both consistent hashes and ROUND_ROBIN
/// for everything else.
fn lb_policy(lb: Option<LbAlgorithm>, flavor: Flavor) -> LbPolicy {
    match (flavor, lb) {
        (_, None) => LbPolicy::RoundRobin,
        (Flavor::Envoy, Some(a)) => match a {
            LbAlgorithm::RoundRobin | LbAlgorithm::WeightedRoundRobin => LbPolicy::RoundRobin,
            LbAlgorithm::Random => LbPolicy::Random,
            // Envoy has no peak-EWMA; least-request is the nearest load-aware algorithm.
            LbAlgorithm::LeastRequest | LbAlgorithm::PeakEwma => LbPolicy::LeastRequest,
            LbAlgorithm::RingHash => LbPolicy::RingHash,
            LbAlgorithm::Maglev => LbPolicy::Maglev,
        },
        (Flavor::Grpc, Some(a)) => match a {
            LbAlgorithm::RingHash | LbAlgorithm::Maglev => LbPolicy::RingHash,
            _ => LbPolicy::RoundRobin,
        },
    }
}

/// Panic threshold and zone-aware routing; `None` when the policy sets neither, so clusters
/// without them stay byte-identical to before these fields existed.
fn common_lb_config(p: &Policy) -> Option<CommonLbConfig> {
    if p.panic_threshold.is_none() && p.zone_aware.is_none() {
        return None;
    }
    Some(CommonLbConfig {
        healthy_panic_threshold: p.panic_threshold.map(percent),
        locality_config_specifier: p.zone_aware.as_ref().map(|z| {
            LocalityConfigSpecifier::ZoneAwareLbConfig(ZoneAwareLbConfig {
                routing_enabled: Some(percent(if z.enabled { 100 } else { 0 })),
                ..Default::default()
            })
        }),
        ..Default::default()
    })
}

/// What Envoy has no field for, for the sidecar: the exact algorithm (Envoy has no peak-EWMA or
/// smooth weighted round robin) and the zone spill-over threshold. The Struct's keys are
/// ordered ([`ordered_map`]) so the cluster always encodes to the same bytes.
fn weft_metadata(p: &Policy) -> Option<Metadata> {
    let mut fields = BTreeMap::new();
    if let Some(lb) = p.lb {
        fields.insert(
            META_LB_ALGORITHM.to_string(),
            Value {
                kind: Some(Kind::StringValue(lb.as_str().to_string())),
            },
        );
    }
    if let Some(z) = &p.zone_aware {
        fields.insert(
            META_ZONE_MIN_HEALTHY_PERCENT.to_string(),
            Value {
                kind: Some(Kind::NumberValue(f64::from(z.min_healthy_percent))),
            },
        );
    }
    if fields.is_empty() {
        return None;
    }
    Some(Metadata {
        filter_metadata: HashMap::from([(
            WEFT_METADATA.to_string(),
            Struct {
                fields: ordered_map(&fields),
            },
        )]),
        ..Default::default()
    })
}

/// gRPC only reads `max_requests` of the DEFAULT priority, so it gets nothing else; with no
/// `max_requests` it gets no circuit breakers at all.
fn circuit_breakers(p: &Policy, flavor: Flavor) -> Option<CircuitBreakers> {
    let cb = p.circuit_breakers.as_ref()?;
    let t = match flavor {
        Flavor::Envoy => Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: cb.max_connections.map(u32v),
            max_pending_requests: cb.max_pending_requests.map(u32v),
            max_requests: cb.max_requests.map(u32v),
            max_retries: cb.max_retries.map(u32v),
            retry_budget: cb.retry_budget.as_ref().map(|rb| RetryBudget {
                budget_percent: Some(percent(rb.percent)),
                min_retry_concurrency: Some(u32v(rb.min_concurrency)),
                ..Default::default()
            }),
            ..Default::default()
        },
        Flavor::Grpc => Thresholds {
            priority: RoutingPriority::Default as i32,
            max_requests: Some(u32v(cb.max_requests?)),
            ..Default::default()
        },
    };
    Some(CircuitBreakers {
        thresholds: vec![t],
        per_host_thresholds: Vec::new(),
    })
}

/// Nearly the same message for both flavours. gRPC implements only success-rate and
/// failure-percentage ejection, which Weft never enables, so for gRPC clients the
/// consecutive-failure settings are inert; every value sent is one gRPC validates successfully
/// (percentages <= 100). `max_ejection_time` is Envoy's only, like every field added for the
/// sidecar.
fn outlier_detection(od: &weft_registry::OutlierDetection, flavor: Flavor) -> OutlierDetection {
    OutlierDetection {
        max_ejection_time: match flavor {
            Flavor::Envoy => od.max_ejection_time.map(duration),
            Flavor::Grpc => None,
        },
        consecutive_5xx: od.consecutive_5xx.map(u32v),
        consecutive_gateway_failure: od.consecutive_gateway_failure.map(u32v),
        // Envoy enforces gateway-failure ejection 0% of the time by default: setting the
        // threshold alone would detect and never eject.
        enforcing_consecutive_gateway_failure: od
            .consecutive_gateway_failure
            .map(|_| u32v(ALWAYS_ENFORCE)),
        interval: od.interval.map(duration),
        base_ejection_time: od.base_ejection_time.map(duration),
        max_ejection_percent: od.max_ejection_percent.map(|p| u32v(p.min(100))),
        ..Default::default()
    }
}

fn health_check(hc: &weft_registry::HealthCheck, protocol: Protocol) -> HealthCheck {
    let checker = match (&hc.path, protocol) {
        (Some(path), _) => HealthChecker::HttpHealthCheck(HttpHealthCheck {
            path: path.clone(),
            ..Default::default()
        }),
        (None, Protocol::Grpc) => HealthChecker::GrpcHealthCheck(GrpcHealthCheck::default()),
        (None, Protocol::Http) => HealthChecker::TcpHealthCheck(TcpHealthCheck::default()),
    };
    HealthCheck {
        timeout: Some(duration(hc.timeout.unwrap_or(DEFAULT_HC_TIMEOUT))),
        interval: Some(duration(hc.interval.unwrap_or(DEFAULT_HC_INTERVAL))),
        unhealthy_threshold: Some(u32v(
            hc.unhealthy_threshold
                .unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD),
        )),
        healthy_threshold: Some(u32v(
            hc.healthy_threshold.unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
        )),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// Upstream HTTP/2 (h2c) for gRPC backends. A single-entry map, so its encoding is
/// deterministic despite being a HashMap.
fn http2_upstream() -> HashMap<String, envoy_types::pb::google::protobuf::Any> {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    HashMap::from([(HttpProtocolOptions::full_name(), pack(&opts))])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_LB: [LbAlgorithm; 7] = [
        LbAlgorithm::RoundRobin,
        LbAlgorithm::WeightedRoundRobin,
        LbAlgorithm::Random,
        LbAlgorithm::LeastRequest,
        LbAlgorithm::PeakEwma,
        LbAlgorithm::RingHash,
        LbAlgorithm::Maglev,
    ];

    #[test]
    fn grpc_only_gets_round_robin_or_ring_hash() {
        for a in ALL_LB {
            let p = lb_policy(Some(a), Flavor::Grpc);
            assert!(
                matches!(p, LbPolicy::RoundRobin | LbPolicy::RingHash),
                "{a:?} -> {p:?}"
            );
        }
        assert_eq!(
            lb_policy(Some(LbAlgorithm::Maglev), Flavor::Grpc),
            LbPolicy::RingHash
        );
    }

    #[test]
    fn envoy_lb_mapping() {
        let got: Vec<_> = ALL_LB
            .iter()
            .map(|a| lb_policy(Some(*a), Flavor::Envoy))
            .collect();
        assert_eq!(
            got,
            vec![
                LbPolicy::RoundRobin,
                LbPolicy::RoundRobin,
                LbPolicy::Random,
                LbPolicy::LeastRequest,
                LbPolicy::LeastRequest,
                LbPolicy::RingHash,
                LbPolicy::Maglev,
            ]
        );
        assert_eq!(lb_policy(None, Flavor::Envoy), LbPolicy::RoundRobin);
    }

    #[test]
    fn http2_options_key_is_the_extension_name() {
        let m = http2_upstream();
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            vec!["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        );
        assert_eq!(
            m.values().next().map(|a| a.type_url.as_str()),
            Some("type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        );
    }
}
