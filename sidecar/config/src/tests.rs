//! Hand-built resources: the fields the translation does not send yet, Envoy edge cases, and
//! everything that must be rejected.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget as PbRetryBudget;
use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::{
    LocalityConfigSpecifier, ZoneAwareLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, LbConfig, LbPolicy, MaglevLbConfig,
    RingHashLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality, Metadata, RoutingPriority, SocketAddress, address,
    socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, TokenBucket};
use envoy_types::pb::google::protobuf::{
    Duration as PbDuration, Struct, UInt32Value, UInt64Value, Value, value::Kind,
};
use prost::{Message, Name};
use weft_balance::EndpointHealth;

use super::*;

fn eds(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        connect_timeout: Some(secs(1)),
        ..Default::default()
    }
}

fn secs(s: i64) -> PbDuration {
    PbDuration {
        seconds: s,
        nanos: 0,
    }
}

fn pct(v: f64) -> Option<Percent> {
    Some(Percent { value: v })
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

fn weft_md(fields: &[(&str, Kind)]) -> Option<Metadata> {
    let st = Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect(),
    };
    Some(Metadata {
        filter_metadata: HashMap::from([(WEFT_METADATA.to_string(), st)]),
        ..Default::default()
    })
}

fn with_alg(name: &str) -> Cluster {
    Cluster {
        metadata: weft_md(&[("lb_algorithm", Kind::StringValue(name.into()))]),
        // The translation sends the nearest Envoy policy alongside; metadata must win.
        lb_policy: LbPolicy::LeastRequest as i32,
        ..eds("web")
    }
}

#[test]
fn metadata_lb_algorithm_wins() {
    let cases = [
        ("round_robin", Algorithm::RoundRobin),
        ("weighted_round_robin", Algorithm::WeightedRoundRobin),
        ("random", Algorithm::Random),
        ("least_request", Algorithm::LeastRequest),
        ("peak_ewma", Algorithm::PeakEwma),
        (
            "ring_hash",
            Algorithm::RingHash {
                min_ring_size: 1024,
            },
        ),
        ("maglev", Algorithm::Maglev { table_size: 65537 }),
    ];
    for (name, want) in cases {
        assert_eq!(
            cluster_from_xds(&with_alg(name)).unwrap().algorithm,
            want,
            "{name}"
        );
    }
    let mut c = with_alg("ring_hash");
    c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
        minimum_ring_size: Some(UInt64Value { value: 4096 }),
        ..Default::default()
    }));
    assert_eq!(
        cluster_from_xds(&c).unwrap().algorithm,
        Algorithm::RingHash {
            min_ring_size: 4096
        }
    );
    let mut c = with_alg("maglev");
    c.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
        table_size: Some(UInt64Value { value: 251 }),
    }));
    assert_eq!(
        cluster_from_xds(&c).unwrap().algorithm,
        Algorithm::Maglev { table_size: 251 }
    );
}

#[test]
fn lb_policy_without_metadata() {
    let alg = |p: LbPolicy| {
        cluster_from_xds(&Cluster {
            lb_policy: p as i32,
            ..eds("web")
        })
    };
    assert_eq!(
        alg(LbPolicy::RoundRobin).unwrap().algorithm,
        Algorithm::PeakEwma
    );
    assert_eq!(alg(LbPolicy::Random).unwrap().algorithm, Algorithm::Random);
    assert_eq!(
        alg(LbPolicy::LeastRequest).unwrap().algorithm,
        Algorithm::LeastRequest
    );
    let e = alg(LbPolicy::ClusterProvided).unwrap_err();
    assert_eq!(e.resource, "cluster web");
    assert!(e.reason.contains("lb_policy CLUSTER_PROVIDED"), "{e}");
}

#[test]
fn unknown_lb_algorithm_is_rejected_by_name() {
    let e = cluster_from_xds(&with_alg("foo")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"cluster web: lb_algorithm "foo" is not one Weft knows"#
    );
    let c = Cluster {
        metadata: weft_md(&[("lb_algorithm", Kind::NumberValue(1.0))]),
        ..eds("web")
    };
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("lb_algorithm")
    );
    let mut c = with_alg("maglev");
    c.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
        table_size: Some(UInt64Value { value: 1000 }),
    }));
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("table_size 1000")
    );
}

#[test]
fn non_eds_cluster_is_rejected() {
    let c = Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
        ..eds("dns")
    };
    let e = cluster_from_xds(&c).unwrap_err();
    assert_eq!(e.resource, "cluster dns");
    assert!(e.reason.contains("STRICT_DNS"), "{e}");
    let c = Cluster {
        cluster_discovery_type: None,
        ..eds("static")
    };
    assert!(cluster_from_xds(&c).is_err());
}

#[test]
fn zone_aware_and_panic_threshold() {
    let d = cluster_from_xds(&eds("web")).unwrap();
    assert_eq!(d.zone, ZoneConfig::default());
    assert!(d.outlier.is_none() && d.health_check.is_none() && !d.http2);
    assert_eq!(d.connect_timeout, Duration::from_secs(1));

    let zoned = |routing: Option<f64>, panic: Option<f64>, min: Option<f64>| {
        let mut c = eds("web");
        c.common_lb_config = Some(CommonLbConfig {
            healthy_panic_threshold: panic.and_then(pct),
            locality_config_specifier: routing.map(|r| {
                LocalityConfigSpecifier::ZoneAwareLbConfig(ZoneAwareLbConfig {
                    routing_enabled: pct(r),
                    ..Default::default()
                })
            }),
            ..Default::default()
        });
        if let Some(m) = min {
            c.metadata = weft_md(&[("zone_min_healthy_percent", Kind::NumberValue(m))]);
        }
        cluster_from_xds(&c)
    };
    let z = zoned(Some(0.0), Some(25.0), Some(80.0)).unwrap().zone;
    assert_eq!(
        z,
        ZoneConfig {
            local_zone: None,
            enabled: false,
            min_healthy_percent: 80,
            panic_threshold: 25
        }
    );
    let z = zoned(Some(100.0), Some(0.0), None).unwrap().zone;
    assert!(z.enabled);
    assert_eq!((z.min_healthy_percent, z.panic_threshold), (70, 0));
    let z = zoned(None, None, None).unwrap().zone;
    assert_eq!(z, ZoneConfig::default());

    for (routing, panic, min, field) in [
        (Some(101.0), None, None, "routing_enabled"),
        (None, Some(100.5), None, "healthy_panic_threshold"),
        (None, Some(-1.0), None, "healthy_panic_threshold"),
        (None, None, Some(150.0), "zone_min_healthy_percent"),
    ] {
        let e = zoned(routing, panic, min).unwrap_err();
        assert_eq!(e.resource, "cluster web");
        assert!(e.reason.contains(field), "{e}");
    }
}

#[test]
fn retry_budget_defaults_and_priority() {
    let cb = |budget: PbRetryBudget, priority: RoutingPriority| {
        let mut c = eds("web");
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                priority: priority as i32,
                max_requests: u32v(9),
                retry_budget: Some(budget),
                ..Default::default()
            }],
            per_host_thresholds: vec![],
        });
        cluster_from_xds(&c)
    };
    let got = cb(PbRetryBudget::default(), RoutingPriority::Default).unwrap();
    assert_eq!(got.circuit_breakers.max_requests, Some(9));
    assert_eq!(
        got.circuit_breakers.retry_budget,
        Some(RetryBudget {
            budget_percent: 20,
            min_retry_concurrency: 3
        })
    );
    let got = cb(
        PbRetryBudget {
            budget_percent: pct(35.0),
            min_retry_concurrency: u32v(1),
            budget_interval: None,
        },
        RoutingPriority::Default,
    )
    .unwrap();
    assert_eq!(
        got.circuit_breakers.retry_budget,
        Some(RetryBudget {
            budget_percent: 35,
            min_retry_concurrency: 1
        })
    );
    // HIGH priority thresholds never apply to the sidecar.
    let got = cb(PbRetryBudget::default(), RoutingPriority::High).unwrap();
    assert_eq!(got.circuit_breakers, CircuitBreakerConfig::default());
    let e = cb(
        PbRetryBudget {
            budget_percent: pct(120.0),
            ..Default::default()
        },
        RoutingPriority::Default,
    )
    .unwrap_err();
    assert!(e.reason.contains("budget_percent"), "{e}");
}

#[test]
fn outlier_max_ejection_time_and_defaults() {
    let mut c = eds("web");
    c.outlier_detection = Some(OutlierDetection {
        max_ejection_time: Some(secs(120)),
        ..Default::default()
    });
    let od = cluster_from_xds(&c).unwrap().outlier.unwrap();
    assert_eq!(
        od,
        OutlierConfig {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(120),
            max_ejection_percent: 10,
        }
    );
    // A disabled enforcement is "off", as in Envoy.
    c.outlier_detection = Some(OutlierDetection {
        enforcing_consecutive_5xx: u32v(0),
        consecutive_gateway_failure: u32v(2),
        ..Default::default()
    });
    let od = cluster_from_xds(&c).unwrap().outlier.unwrap();
    assert_eq!(od.consecutive_5xx, None);
    assert_eq!(od.consecutive_gateway_failure, Some(2));
    c.outlier_detection = Some(OutlierDetection {
        max_ejection_percent: u32v(101),
        ..Default::default()
    });
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("max_ejection_percent")
    );
    c.outlier_detection = Some(OutlierDetection {
        base_ejection_time: Some(secs(60)),
        max_ejection_time: Some(secs(10)),
        ..Default::default()
    });
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("max_ejection_time")
    );
}

#[test]
fn zero_thresholds_and_timeouts_are_rejected() {
    use envoy_types::pb::envoy::config::core::v3::HealthCheck;
    use envoy_types::pb::envoy::config::core::v3::health_check::{HealthChecker, TcpHealthCheck};
    let mut c = eds("web");
    c.health_checks = vec![HealthCheck {
        healthy_threshold: u32v(0),
        health_checker: Some(HealthChecker::TcpHealthCheck(TcpHealthCheck::default())),
        ..Default::default()
    }];
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("healthy_threshold")
    );
    let mut c = eds("web");
    c.connect_timeout = Some(secs(0));
    assert!(
        cluster_from_xds(&c)
            .unwrap_err()
            .reason
            .contains("connect_timeout")
    );
}

fn lb_endpoint(addr: &str, port: u32, status: HealthStatus, weight: Option<u32>) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: addr.into(),
                    port_specifier: Some(PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: status as i32,
        load_balancing_weight: weight.and_then(u32v),
        ..Default::default()
    }
}

fn cla(eps: Vec<LbEndpoint>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: "web".into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality {
                zone: "z1".into(),
                ..Default::default()
            }),
            lb_endpoints: eps,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn endpoint_health_statuses_and_default_weight() {
    let got = endpoints_from_xds(&cla(vec![
        lb_endpoint("10.0.0.1", 80, HealthStatus::Unknown, None),
        lb_endpoint("10.0.0.2", 80, HealthStatus::Degraded, Some(4)),
        lb_endpoint("10.0.0.3", 80, HealthStatus::Timeout, None),
        lb_endpoint("10.0.0.4", 80, HealthStatus::Draining, None),
    ]))
    .unwrap();
    let h: Vec<_> = got.iter().map(|e| (e.health, e.weight)).collect();
    assert_eq!(
        h,
        vec![
            (EndpointHealth::Healthy, 1),
            (EndpointHealth::Unhealthy, 4),
            (EndpointHealth::Unhealthy, 1),
            (EndpointHealth::Draining, 1),
        ]
    );
    assert!(got.iter().all(|e| e.zone.as_deref() == Some("z1")));
}

#[test]
fn non_ip_endpoints_are_rejected() {
    let e = endpoints_from_xds(&cla(vec![lb_endpoint(
        "web.internal",
        80,
        HealthStatus::Healthy,
        None,
    )]))
    .unwrap_err();
    assert_eq!(e.resource, "endpoints web");
    assert!(
        e.reason.contains("\"web.internal\" is not an IP address"),
        "{e}"
    );
    assert!(
        endpoints_from_xds(&cla(vec![lb_endpoint(
            "10.0.0.1",
            70000,
            HealthStatus::Healthy,
            None
        )]))
        .is_err()
    );
    assert!(
        endpoints_from_xds(&cla(vec![lb_endpoint(
            "10.0.0.1",
            80,
            HealthStatus::Healthy,
            Some(0)
        )]))
        .is_err()
    );
}

fn prefix_route(prefix: &str, cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

fn rc(vhs: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: ROUTE_CONFIG_NAME.into(),
        virtual_hosts: vhs,
        ..Default::default()
    }
}

fn lrl(max: u32, per_fill: Option<u32>, every_ms: u32) -> HashMap<String, Any> {
    let l = LocalRateLimit {
        stat_prefix: "x".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: max,
            tokens_per_fill: per_fill.and_then(u32v),
            fill_interval: Some(PbDuration {
                seconds: i64::from(every_ms / 1000),
                nanos: i32::try_from((every_ms % 1000) * 1_000_000).unwrap(),
            }),
        }),
        ..Default::default()
    };
    HashMap::from([(
        LOCAL_RATE_LIMIT_FILTER.to_string(),
        Any {
            type_url: LocalRateLimit::type_url(),
            value: l.encode_to_vec(),
        },
    )])
}

fn get(
    t: &RouteTable,
    authority: &str,
    method: &str,
    path: &str,
    h: &[(&str, &str)],
) -> Result<RouteDecision, NoRoute> {
    let m: http::Method = method.parse().unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in h {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    t.route(
        &RequestInfo {
            authority,
            method: &m,
            path,
            headers: &headers,
        },
        0,
    )
}

#[test]
fn local_rate_limits_route_wins_over_vhost() {
    let mut limited = prefix_route("/slow", "web");
    limited.typed_per_filter_config = lrl(5, None, 500);
    let mut vh = vhost("web", &["web"], vec![limited, prefix_route("/", "web")]);
    vh.typed_per_filter_config = lrl(100, Some(10), 1000);
    let t = RouteTable::from_xds(&rc(vec![
        vh,
        vhost("free", &["free"], vec![prefix_route("/", "free")]),
    ]))
    .unwrap();

    let d = get(&t, "web", "GET", "/slow", &[]).unwrap();
    assert_eq!(
        d.rate_limit,
        Some(TokenBucketConfig {
            max_tokens: 5,
            tokens_per_fill: 1,
            fill_interval: Duration::from_millis(500)
        })
    );
    assert_eq!(d.rate_limit_key.as_deref(), Some("route/web/0"));
    let d = get(&t, "web", "GET", "/other", &[]).unwrap();
    assert_eq!(
        d.rate_limit,
        Some(TokenBucketConfig {
            max_tokens: 100,
            tokens_per_fill: 10,
            fill_interval: Duration::from_secs(1)
        })
    );
    assert_eq!(d.rate_limit_key.as_deref(), Some("vh/web"));
    let d = get(&t, "free", "GET", "/", &[]).unwrap();
    assert_eq!((d.rate_limit, d.rate_limit_key), (None, None));

    // An explicit 0% enforcement turns the limit off.
    let mut off = vhost("web", &["web"], vec![prefix_route("/", "web")]);
    let mut l = LocalRateLimit::decode(lrl(5, None, 100)[LOCAL_RATE_LIMIT_FILTER].value.as_slice())
        .unwrap();
    l.filter_enforced = Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 0,
            denominator: 0,
        }),
        runtime_key: String::new(),
    });
    off.typed_per_filter_config = HashMap::from([(
        LOCAL_RATE_LIMIT_FILTER.to_string(),
        Any {
            type_url: LocalRateLimit::type_url(),
            value: l.encode_to_vec(),
        },
    )]);
    let t = RouteTable::from_xds(&rc(vec![off])).unwrap();
    assert_eq!(get(&t, "web", "GET", "/", &[]).unwrap().rate_limit, None);

    let mut bad = vhost("web", &["web"], vec![prefix_route("/", "web")]);
    bad.typed_per_filter_config = lrl(0, None, 100);
    let e = RouteTable::from_xds(&rc(vec![bad])).unwrap_err();
    assert_eq!(e.resource, "route_config weft_http virtual_host web");
    assert!(e.reason.contains("max_tokens"), "{e}");
}

#[test]
fn bad_regex_is_rejected_naming_the_route() {
    let mut r = prefix_route("/", "web");
    r.r#match = Some(RouteMatch {
        path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/v(".into(),
            engine_type: None,
        })),
        ..Default::default()
    });
    let e = RouteTable::from_xds(&rc(vec![vhost(
        "web",
        &["web"],
        vec![prefix_route("/a", "web"), r],
    )]))
    .unwrap_err();
    assert_eq!(
        e.resource,
        "route_config weft_http virtual_host web route 1"
    );
    assert!(e.reason.contains("does not compile"), "{e}");
}

#[test]
fn duplicate_domains_and_bad_actions_are_rejected() {
    let e = RouteTable::from_xds(&rc(vec![
        vhost("a", &["x.com"], vec![prefix_route("/", "a")]),
        vhost("b", &["X.com"], vec![prefix_route("/", "b")]),
    ]))
    .unwrap_err();
    assert!(e.reason.contains("\"X.com\""), "{e}");
    assert!(RouteTable::from_xds(&rc(vec![vhost("a", &[], vec![])])).is_err());
    let mut r = prefix_route("/", "a");
    if let Some(Action::Route(a)) = &mut r.action {
        a.cluster_specifier = Some(ClusterSpecifier::ClusterHeader("x-cluster".into()));
    }
    assert!(RouteTable::from_xds(&rc(vec![vhost("a", &["a"], vec![r])])).is_err());
    let mut r = prefix_route("/", "a");
    if let Some(Action::Route(a)) = &mut r.action {
        a.retry_policy = Some(envoy_types::pb::envoy::config::route::v3::RetryPolicy {
            retry_on: "5xx,bogus".into(),
            ..Default::default()
        });
    }
    let e = RouteTable::from_xds(&rc(vec![vhost("a", &["a"], vec![r])])).unwrap_err();
    assert!(e.reason.contains("\"bogus\""), "{e}");
}

#[test]
fn wildcard_precedence() {
    let t = RouteTable::from_xds(&rc(vec![
        vhost("any", &["*"], vec![prefix_route("/", "any")]),
        vhost(
            "suffix",
            &["*.example.com"],
            vec![prefix_route("/", "suffix")],
        ),
        vhost(
            "longer",
            &["*.api.example.com"],
            vec![prefix_route("/", "longer")],
        ),
        vhost("prefix", &["api.*"], vec![prefix_route("/", "prefix")]),
        vhost("svc", &["svc", "svc:*"], vec![prefix_route("/", "svc")]),
        vhost("svcs", &["svc*"], vec![prefix_route("/", "svcs")]),
    ]))
    .unwrap();
    let vh = |a: &str| get(&t, a, "GET", "/", &[]).unwrap().virtual_host;
    assert_eq!(vh("a.example.com"), "suffix");
    assert_eq!(vh("a.api.example.com"), "longer");
    // Suffix wildcards before prefix wildcards, as Envoy.
    assert_eq!(vh("api.example.com"), "suffix");
    assert_eq!(vh("api.other"), "prefix");
    assert_eq!(vh("svc"), "svc");
    assert_eq!(vh("svc:8080"), "svc");
    assert_eq!(vh("svc2"), "svcs");
    assert_eq!(vh("elsewhere"), "any");
    assert_eq!(vh("example.com"), "any");
}

fn header_route(h: HeaderMatcher) -> RouteTable {
    let mut r = prefix_route("/", "hit");
    if let Some(m) = &mut r.r#match {
        m.headers = vec![h];
    }
    RouteTable::from_xds(&rc(vec![vhost(
        "web",
        &["web"],
        vec![r, prefix_route("/", "miss")],
    )]))
    .unwrap()
}

fn exact(name: &str, v: &str, ignore_case: bool, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        invert_match: invert,
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            ignore_case,
            match_pattern: Some(MatchPattern::Exact(v.into())),
        })),
        ..Default::default()
    }
}

#[test]
fn header_matcher_semantics_follow_envoy() {
    let to = |t: &RouteTable, h: &[(&str, &str)]| get(t, "web", "GET", "/", h).unwrap().cluster;
    let t = header_route(exact("x-a", "v", false, false));
    assert_eq!(to(&t, &[("x-a", "v")]), "hit");
    assert_eq!(to(&t, &[("x-a", "V")]), "miss");
    // Several values are joined with `,` before matching.
    assert_eq!(to(&t, &[("x-a", "v"), ("x-a", "w")]), "miss");
    let t = header_route(exact("x-a", "v,w", false, false));
    assert_eq!(to(&t, &[("x-a", "v"), ("x-a", "w")]), "hit");
    let t = header_route(exact("x-a", "V", true, false));
    assert_eq!(to(&t, &[("x-a", "v")]), "hit");
    // Inverted: another value matches; a missing header does not (Envoy).
    let t = header_route(exact("x-a", "v", false, true));
    assert_eq!(to(&t, &[("x-a", "w")]), "hit");
    assert_eq!(to(&t, &[("x-a", "v")]), "miss");
    assert_eq!(to(&t, &[]), "miss");
    let t = header_route(HeaderMatcher {
        name: "x-a".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
        ..Default::default()
    });
    assert_eq!(to(&t, &[("x-a", "")]), "hit");
    assert_eq!(to(&t, &[]), "miss");
    // `:method` is matched against the request method.
    let t = header_route(exact(":method", "DELETE", false, false));
    assert_eq!(get(&t, "web", "DELETE", "/", &[]).unwrap().cluster, "hit");
    assert_eq!(get(&t, "web", "GET", "/", &[]).unwrap().cluster, "miss");
}

#[test]
fn path_matching_is_case_sensitive_by_default() {
    let mut insensitive = prefix_route("/Docs", "ci");
    if let Some(m) = &mut insensitive.r#match {
        m.case_sensitive = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
    }
    let t = RouteTable::from_xds(&rc(vec![vhost(
        "web",
        &["web"],
        vec![prefix_route("/API", "cs"), insensitive],
    )]))
    .unwrap();
    let to = |p: &str| get(&t, "web", "GET", p, &[]).map(|d| d.cluster);
    assert_eq!(to("/API/x").unwrap(), "cs");
    assert_eq!(to("/docs/x").unwrap(), "ci");
    assert_eq!(to("/api/x").unwrap_err(), NoRoute::NoMatch("web".into()));
}

#[test]
fn route_timeouts() {
    let mut none = prefix_route("/none", "web");
    let mut two = prefix_route("/two", "web");
    if let Some(Action::Route(a)) = &mut none.action {
        a.timeout = Some(secs(0));
    }
    if let Some(Action::Route(a)) = &mut two.action {
        a.timeout = Some(secs(2));
    }
    let t = RouteTable::from_xds(&rc(vec![vhost(
        "web",
        &["web"],
        vec![none, two, prefix_route("/", "web")],
    )]))
    .unwrap();
    let timeout = |p: &str| get(&t, "web", "GET", p, &[]).unwrap().timeout;
    assert_eq!(timeout("/none"), None);
    assert_eq!(timeout("/two"), Some(Duration::from_secs(2)));
    assert_eq!(timeout("/"), None);
}

#[test]
fn mesh_config_is_all_or_nothing() {
    let ok = MeshConfig::from_xds(&[eds("a")], &[], None).unwrap();
    assert_eq!(ok.clusters.keys().collect::<Vec<_>>(), vec!["a"]);
    assert!(ok.routes.virtual_hosts().is_empty());
    assert!(MeshConfig::from_xds(&[eds("a"), with_alg("nope")], &[], None).is_err());
}

#[test]
fn decode_any_checks_the_type() {
    let c = eds("a");
    let any = Any {
        type_url: Cluster::type_url(),
        value: c.encode_to_vec(),
    };
    assert_eq!(decode_any::<Cluster>(&any, "cds").unwrap(), c);
    assert!(decode_any::<RouteConfiguration>(&any, "rds").is_err());
}
