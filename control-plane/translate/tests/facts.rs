//! The important properties of the translation, asserted directly rather than through
//! snapshots: what each client must never receive, naming, locality weights, determinism.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::{ApiVersion, Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::{RouteAction, RouteConfiguration, route};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use prost::{Message, Name};
use weft_registry::Registry;
use weft_translate::*;

const ALL: [(&str, &str); 5] = [
    ("demo", common::DEMO),
    ("routes", common::ROUTES),
    ("policies", common::POLICIES),
    ("sidecar_policies", common::SIDECAR_POLICIES),
    ("empty", common::EMPTY),
];

fn all_translations() -> Vec<(String, Flavor, Resources)> {
    let mut out = Vec::new();
    for (name, yaml) in ALL {
        let reg = common::registry(yaml);
        for flavor in Flavor::ALL {
            out.push((
                name.to_string(),
                flavor,
                translate(&reg, &Options::default(), flavor),
            ));
        }
    }
    out
}

fn actions(rc: &RouteConfiguration) -> Vec<&RouteAction> {
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| &vh.routes)
        .filter_map(|r| match &r.action {
            Some(route::Action::Route(a)) => Some(a),
            _ => None,
        })
        .collect()
}

fn hcm_of(l: &Listener) -> HttpConnectionManager {
    let any = if let Some(api) = &l.api_listener {
        api.api_listener.clone().expect("api_listener Any")
    } else {
        match &l.filter_chains[0].filters[0].config_type {
            Some(ConfigType::TypedConfig(any)) => any.clone(),
            other => panic!("unexpected filter config {other:?}"),
        }
    };
    assert_eq!(any.type_url, HttpConnectionManager::type_url());
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

fn encoded(res: &Resources) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    out.extend(res.clusters.iter().map(Message::encode_to_vec));
    out.extend(res.endpoints.iter().map(Message::encode_to_vec));
    out.extend(res.listeners.iter().map(Message::encode_to_vec));
    out.extend(res.routes.iter().map(Message::encode_to_vec));
    out
}

#[test]
fn type_urls_are_the_messages_full_names() {
    assert_eq!(CLUSTER_TYPE, Cluster::type_url());
    assert_eq!(ENDPOINT_TYPE, ClusterLoadAssignment::type_url());
    assert_eq!(LISTENER_TYPE, Listener::type_url());
    assert_eq!(ROUTE_TYPE, RouteConfiguration::type_url());
    assert_eq!(HTTP_LISTENER_NAME, "weft_http");
    assert_eq!(Flavor::Envoy.as_str(), "envoy");
    assert_eq!(Flavor::Grpc.as_str(), "grpc");
}

#[test]
fn grpc_never_gets_what_grpcio_rejects_or_ignores() {
    for (name, flavor, res) in all_translations() {
        if flavor != Flavor::Grpc {
            continue;
        }
        for c in &res.clusters {
            let lb = LbPolicy::try_from(c.lb_policy).unwrap();
            assert!(
                matches!(lb, LbPolicy::RoundRobin | LbPolicy::RingHash),
                "{name}: cluster {} has {lb:?}",
                c.name
            );
            assert!(
                c.health_checks.is_empty(),
                "{name}: {} has health checks",
                c.name
            );
            assert!(c.typed_extension_protocol_options.is_empty());
            // Nothing added for the sidecar reaches gRPC clients.
            assert!(c.metadata.is_none(), "{name}: {} has metadata", c.name);
            assert!(c.common_lb_config.is_none(), "{name}: {}", c.name);
            if let Some(LbConfig::RingHashLbConfig(rh)) = &c.lb_config {
                for size in [rh.minimum_ring_size, rh.maximum_ring_size]
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        (1..=8_388_608).contains(&size.value),
                        "{name}: ring {size:?}"
                    );
                }
            }
            if let Some(od) = &c.outlier_detection {
                for pct in [od.max_ejection_percent, od.enforcing_success_rate]
                    .into_iter()
                    .flatten()
                {
                    assert!(pct.value <= 100);
                }
                assert!(od.max_ejection_time.is_none(), "{name}: {}", c.name);
            }
            if let Some(cb) = &c.circuit_breakers {
                for t in &cb.thresholds {
                    assert!(t.max_connections.is_none() && t.max_pending_requests.is_none());
                    assert!(t.max_retries.is_none() && t.max_requests.is_some());
                    assert!(t.retry_budget.is_none());
                }
            }
        }
        for l in &res.listeners {
            assert_ne!(l.name, HTTP_LISTENER_NAME, "{name}");
            assert!(
                l.api_listener.is_some(),
                "{name}: listener {} without api_listener",
                l.name
            );
            assert!(l.address.is_none() && l.filter_chains.is_empty());
        }
        for rc in &res.routes {
            for a in actions(rc) {
                assert!(
                    a.timeout.is_none(),
                    "{name}: gRPC ignores RouteAction.timeout"
                );
                for h in &a.hash_policy {
                    assert!(
                        matches!(h.policy_specifier, Some(PolicySpecifier::Header(_))),
                        "{name}: gRPC got hash policy {h:?}"
                    );
                }
                if let Some(rp) = &a.retry_policy {
                    assert!(rp.num_retries.is_some_and(|n| n.value >= 1));
                    let backoff = rp.retry_back_off.as_ref().expect("gRPC retry back-off");
                    assert!(backoff.base_interval.is_some());
                    for cond in rp.retry_on.split(',') {
                        assert!(
                            [
                                "cancelled",
                                "deadline-exceeded",
                                "internal",
                                "resource-exhausted",
                                "unavailable"
                            ]
                            .contains(&cond),
                            "{name}: gRPC got retry condition {cond}"
                        );
                    }
                }
            }
            for vh in &rc.virtual_hosts {
                assert!(vh.typed_per_filter_config.is_empty(), "{name}: {}", vh.name);
                for r in &vh.routes {
                    assert!(r.typed_per_filter_config.is_empty(), "{name}: {}", r.name);
                    let headers = &r.r#match.as_ref().unwrap().headers;
                    assert!(headers.iter().all(|h| !h.name.starts_with(':')));
                }
            }
        }
    }
}

#[test]
fn envoy_gets_one_bound_http_listener_and_never_an_api_listener() {
    let opts = Options {
        http_listener_address: "127.0.0.1".into(),
        http_listener_port: 18080,
    };
    for (name, yaml) in ALL {
        let reg = common::registry(yaml);
        let ls = listeners(&reg, &opts, Flavor::Envoy);
        assert_eq!(ls.len(), 1, "{name}");
        let l = &ls[0];
        assert_eq!(l.name, HTTP_LISTENER_NAME);
        assert!(l.api_listener.is_none());
        let Some(address::Address::SocketAddress(sa)) =
            l.address.as_ref().and_then(|a| a.address.clone())
        else {
            panic!("{name}: listener without socket address");
        };
        assert_eq!(sa.address, "127.0.0.1");
        assert_eq!(
            sa.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(18080))
        );
        let hcm = hcm_of(l);
        assert_eq!(hcm.stat_prefix, HTTP_LISTENER_NAME);
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("{name}: HCM without RDS");
        };
        assert_eq!(rds.route_config_name, HTTP_LISTENER_NAME);
        // The (inactive) local rate limit filter is always there, so that adding a rate limit
        // never changes the listener; the router is last.
        let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            filters,
            [
                "envoy.filters.http.local_ratelimit",
                "envoy.filters.http.router"
            ],
            "{name}"
        );
        let rcs = routes(&reg, &opts, Flavor::Envoy);
        assert_eq!(rcs.len(), 1);
        assert_eq!(rcs[0].name, HTTP_LISTENER_NAME);
    }
}

#[test]
fn naming_contract_per_service() {
    let reg = common::registry(common::ROUTES);
    let services: Vec<&String> = reg.services.keys().collect();
    for flavor in Flavor::ALL {
        let res = translate(&reg, &Options::default(), flavor);
        let cluster_names: Vec<&String> = res.clusters.iter().map(|c| &c.name).collect();
        assert_eq!(cluster_names, services);
        for c in &res.clusters {
            let eds = c.eds_cluster_config.as_ref().unwrap();
            assert_eq!(
                eds.service_name, "",
                "EDS resource name must be the cluster name"
            );
            let src = eds.eds_config.as_ref().unwrap();
            assert_eq!(src.resource_api_version, ApiVersion::V3 as i32);
            assert!(matches!(
                src.config_source_specifier,
                Some(ConfigSourceSpecifier::Ads(_))
            ));
        }
        let cla_names: Vec<&String> = res.endpoints.iter().map(|e| &e.cluster_name).collect();
        assert_eq!(cla_names, services);
        if flavor == Flavor::Grpc {
            let listener_names: Vec<&String> = res.listeners.iter().map(|l| &l.name).collect();
            assert_eq!(listener_names, services);
            for l in &res.listeners {
                let Some(RouteSpecifier::Rds(rds)) = hcm_of(l).route_specifier else {
                    panic!("no RDS");
                };
                assert_eq!(rds.route_config_name, l.name);
            }
            for rc in &res.routes {
                assert_eq!(rc.virtual_hosts.len(), 1);
                assert_eq!(
                    rc.virtual_hosts[0].domains,
                    vec![rc.name.clone(), format!("{}:*", rc.name)]
                );
            }
        }
    }
}

#[test]
fn every_virtual_host_ends_with_a_catch_all_to_its_service() {
    for (name, flavor, res) in all_translations() {
        for rc in &res.routes {
            for vh in &rc.virtual_hosts {
                let last = vh.routes.last().expect("at least the catch-all");
                let m = last.r#match.as_ref().unwrap();
                assert!(m.headers.is_empty(), "{name}/{flavor}");
                assert_eq!(
                    m.path_specifier,
                    Some(envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix("/".into()))
                );
                let Some(route::Action::Route(a)) = &last.action else {
                    panic!()
                };
                assert_eq!(
                    a.cluster_specifier,
                    Some(ClusterSpecifier::Cluster(vh.name.clone()))
                );
            }
        }
    }
}

#[test]
fn envoy_domains_are_unique_across_virtual_hosts() {
    let reg = common::registry(common::ROUTES);
    let rc = &routes(&reg, &Options::default(), Flavor::Envoy)[0];
    let mut seen = BTreeSet::new();
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            assert!(
                seen.insert(d.to_ascii_lowercase()),
                "domain {d} appears twice"
            );
        }
    }
    // A route's extra host naming another service does not steal that service's name.
    let greeter = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "greeter")
        .unwrap();
    assert!(greeter.domains.contains(&"greeter".to_string()));
    let web = rc.virtual_hosts.iter().find(|v| v.name == "web").unwrap();
    assert!(web.domains.contains(&"web.example.com".to_string()));
    assert!(web.domains.contains(&"web-alt.example.com".to_string()));
}

#[test]
fn default_retry_conditions_depend_on_protocol() {
    let reg = common::registry(
        r#"
services:
  - name: h
  - name: g
    protocol: grpc
routes:
  - { name: rh, service: h, rules: [{ retries: { attempts: 2 } }] }
  - { name: rg, service: g, rules: [{ retries: { attempts: 2 } }] }
"#,
    );
    let rc = &routes(&reg, &Options::default(), Flavor::Envoy)[0];
    let retry_on = |svc: &str| {
        let vh = rc.virtual_hosts.iter().find(|v| v.name == svc).unwrap();
        let Some(route::Action::Route(a)) = &vh.routes[0].action else {
            panic!()
        };
        a.retry_policy.as_ref().unwrap().retry_on.clone()
    };
    assert_eq!(
        retry_on("h"),
        "connect-failure,refused-stream,unavailable,5xx"
    );
    assert_eq!(retry_on("g"), "connect-failure,refused-stream,unavailable");
    for rc in routes(&reg, &Options::default(), Flavor::Grpc) {
        let a = actions(&rc)[0];
        assert_eq!(a.retry_policy.as_ref().unwrap().retry_on, "unavailable");
    }
}

#[test]
fn grpc_skips_rules_that_need_a_method_other_than_post() {
    let reg = common::registry(
        r#"
services: [{ name: g, protocol: grpc }]
routes:
  - name: r
    service: g
    rules:
      - { match: { method: GET }, timeout: 1s }
      - { match: { method: POST, path_prefix: /pkg.Svc/ }, timeout: 2s }
"#,
    );
    let rc = &routes(&reg, &Options::default(), Flavor::Grpc)[0];
    let names: Vec<&str> = rc.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, vec!["r/1", "default"]);
    let envoy = &routes(&reg, &Options::default(), Flavor::Envoy)[0];
    assert_eq!(envoy.virtual_hosts[0].routes.len(), 3);
}

#[test]
fn locality_weights_are_always_set() {
    for (name, flavor, res) in all_translations() {
        for cla in &res.endpoints {
            for loc in &cla.endpoints {
                assert!(loc.locality.is_some(), "{name}/{flavor}: locality missing");
                let w = loc.load_balancing_weight.expect("locality weight");
                assert!(w.value >= 1, "{name}/{flavor}: weight {}", w.value);
                for ep in &loc.lb_endpoints {
                    assert!(ep.load_balancing_weight.is_some_and(|w| w.value >= 1));
                }
            }
        }
    }
    // Zone grouping and weights: zone-a has a healthy weight-3 endpoint and a draining one.
    let reg = common::registry(common::DEMO);
    let cla = endpoint_assignment(&reg.services["web"], Flavor::Grpc);
    let zones: Vec<(&str, u32, usize)> = cla
        .endpoints
        .iter()
        .map(|l| {
            (
                l.locality.as_ref().unwrap().zone.as_str(),
                l.load_balancing_weight.unwrap().value,
                l.lb_endpoints.len(),
            )
        })
        .collect();
    assert_eq!(zones, vec![("zone-a", 3, 2), ("zone-b", 1, 1)]);
}

#[test]
fn service_without_instances_gets_an_empty_assignment() {
    let reg = common::registry("services: [{ name: lonely }]");
    for flavor in Flavor::ALL {
        let eps = endpoints(&reg, flavor);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].cluster_name, "lonely");
        assert!(eps[0].endpoints.is_empty());
    }
}

#[test]
fn translation_is_deterministic() {
    for (name, yaml) in ALL {
        for flavor in Flavor::ALL {
            let a = translate(&common::registry(yaml), &Options::default(), flavor);
            let b = translate(&common::registry(yaml), &Options::default(), flavor);
            assert_eq!(encoded(&a), encoded(&b), "{name}/{flavor}");
        }
    }
    // Declaration order in the source does not matter either.
    let forward = common::registry(
        "services: [{ name: a, protocol: grpc, endpoints: [{ address: 10.0.0.2, port: 1, zone: z2 }, { address: 10.0.0.1, port: 1, zone: z1 }] }, { name: b }]",
    );
    let backward = common::registry(
        "services: [{ name: b }, { name: a, protocol: grpc, endpoints: [{ address: 10.0.0.1, port: 1, zone: z1 }, { address: 10.0.0.2, port: 1, zone: z2 }] }]",
    );
    for flavor in Flavor::ALL {
        assert_eq!(
            encoded(&translate(&forward, &Options::default(), flavor)),
            encoded(&translate(&backward, &Options::default(), flavor)),
        );
    }
}

/// Cluster metadata holds a google.protobuf.Struct, a HashMap in prost that would encode in a
/// random order per fresh value and per process; every fresh translation must still encode to
/// the same bytes, with the Struct's keys in sorted order.
#[test]
fn struct_metadata_encodes_deterministically() {
    let reg = common::registry(common::SIDECAR_POLICIES);
    let first = enc(&clusters(&reg, Flavor::Envoy));
    for _ in 0..100 {
        let again = enc(&clusters(
            &common::registry(common::SIDECAR_POLICIES),
            Flavor::Envoy,
        ));
        assert_eq!(again, first);
    }
    let web = clusters(&reg, Flavor::Envoy)
        .into_iter()
        .find(|c| c.name == "web")
        .unwrap();
    let weft = &web.metadata.as_ref().unwrap().filter_metadata[WEFT_METADATA];
    let keys: Vec<&str> = weft.fields.keys().map(String::as_str).collect();
    assert_eq!(keys, [META_LB_ALGORITHM, META_ZONE_MIN_HEALTHY_PERCENT]);
}

#[test]
fn envoy_gets_the_sidecar_policies() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    use envoy_types::pb::google::protobuf::value::Kind;
    let reg = common::registry(common::SIDECAR_POLICIES);
    let res = translate(&reg, &Options::default(), Flavor::Envoy);
    let web = res.clusters.iter().find(|c| c.name == "web").unwrap();
    let weft = &web.metadata.as_ref().unwrap().filter_metadata[WEFT_METADATA];
    assert_eq!(
        weft.fields[META_LB_ALGORITHM].kind,
        Some(Kind::StringValue("peak_ewma".into()))
    );
    assert_eq!(
        weft.fields[META_ZONE_MIN_HEALTHY_PERCENT].kind,
        Some(Kind::NumberValue(80.0))
    );
    let lb = web.common_lb_config.as_ref().unwrap();
    assert_eq!(lb.healthy_panic_threshold.map(|p| p.value), Some(30.0));
    let Some(LocalityConfigSpecifier::ZoneAwareLbConfig(za)) = lb.locality_config_specifier else {
        panic!("no zone-aware config: {lb:?}");
    };
    assert_eq!(za.routing_enabled.map(|p| p.value), Some(100.0));
    let t = &web.circuit_breakers.as_ref().unwrap().thresholds[0];
    let rb = t.retry_budget.unwrap();
    assert_eq!(rb.budget_percent.map(|p| p.value), Some(25.0));
    assert_eq!(rb.min_retry_concurrency.map(|v| v.value), Some(5));
    let od = web.outlier_detection.as_ref().unwrap();
    assert_eq!(od.max_ejection_time.map(|d| d.seconds), Some(120));

    // Only a retry budget still makes circuit breakers; zone-aware `enabled: false` is 0%.
    let greeter = res.clusters.iter().find(|c| c.name == "greeter").unwrap();
    let t = &greeter.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert!(t.retry_budget.is_some() && t.max_requests.is_none());
    let lb = greeter.common_lb_config.as_ref().unwrap();
    assert!(matches!(
        lb.locality_config_specifier,
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(za))
            if za.routing_enabled.map(|p| p.value) == Some(0.0)
    ));

    // No zone_aware: no zone percent; no panic threshold or zone config: no common_lb_config.
    let api = res.clusters.iter().find(|c| c.name == "api").unwrap();
    let weft = &api.metadata.as_ref().unwrap().filter_metadata[WEFT_METADATA];
    assert_eq!(weft.fields.len(), 1);
    assert!(api.common_lb_config.is_none());

    let limit =
        |cfg: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>| {
            cfg.get(LOCAL_RATE_LIMIT_FILTER)
                .map(|any| LocalRateLimit::decode(any.value.as_slice()).unwrap())
        };
    let rc = &res.routes[0];
    let vh = rc.virtual_hosts.iter().find(|v| v.name == "web").unwrap();
    let svc = limit(&vh.typed_per_filter_config).expect("per-service limit");
    let tb = svc.token_bucket.unwrap();
    assert_eq!(
        (tb.max_tokens, tb.tokens_per_fill.map(|v| v.value)),
        (5, Some(5))
    );
    assert_eq!(
        svc.response_headers_to_add[0]
            .header
            .as_ref()
            .unwrap()
            .value,
        "10"
    );
    let by_name = |n: &str| vh.routes.iter().find(|r| r.name == n).unwrap();
    let rule = limit(&by_name("web-limits/0").typed_per_filter_config).expect("per-rule limit");
    assert_eq!(rule.token_bucket.unwrap().max_tokens, 4);
    assert!(limit(&by_name("web-limits/1").typed_per_filter_config).is_none());
    assert!(limit(&by_name("default").typed_per_filter_config).is_none());
    let api_vh = rc.virtual_hosts.iter().find(|v| v.name == "api").unwrap();
    assert!(api_vh.typed_per_filter_config.is_empty());
}

#[test]
fn only_endpoints_depend_on_instances() {
    let before = common::registry(common::ROUTES);
    let mut after: Registry = before.clone();
    let web = after.services.get_mut("web").unwrap();
    web.instances[0].endpoint.weight = 7;
    web.instances[0].endpoint.health = weft_registry::Health::Unhealthy;
    after.services.get_mut("greeter").unwrap().instances.clear();
    for flavor in Flavor::ALL {
        let opts = Options::default();
        assert_eq!(
            enc(&clusters(&before, flavor)),
            enc(&clusters(&after, flavor))
        );
        assert_eq!(
            enc(&listeners(&before, &opts, flavor)),
            enc(&listeners(&after, &opts, flavor))
        );
        assert_eq!(
            enc(&routes(&before, &opts, flavor)),
            enc(&routes(&after, &opts, flavor))
        );
        assert_ne!(
            enc(&endpoints(&before, flavor)),
            enc(&endpoints(&after, flavor))
        );
    }
}

fn enc<M: Message>(v: &[M]) -> Vec<Vec<u8>> {
    v.iter().map(Message::encode_to_vec).collect()
}

fn node(agent: &str, features: &[&str]) -> Node {
    Node {
        user_agent_name: agent.to_string(),
        client_features: features.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn classify_nodes() {
    let cases = [
        (node("envoy", &[]), Flavor::Envoy),
        (node("grpc-python", &[]), Flavor::Grpc),
        (node("grpc-node-js", &[]), Flavor::Grpc),
        // What grpcio and @grpc/grpc-js actually send.
        (node("gRPC C-core linux Python", &[]), Flavor::Grpc),
        (node("gRPC Node Pure JS", &[]), Flavor::Grpc),
        (
            node("", &["envoy.lb.does_not_support_overprovisioning"]),
            Flavor::Grpc,
        ),
        (
            node("some-client", &["xds.config.resource-in-sotw"]),
            Flavor::Envoy,
        ),
        (node("", &[]), Flavor::Envoy),
    ];
    for (n, want) in cases {
        assert_eq!(Flavor::classify(Some(&n)), want, "{n:?}");
    }
    assert_eq!(Flavor::classify(None), Flavor::Envoy);
}
