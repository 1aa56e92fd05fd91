//! Reads what the real control-plane translation (Envoy flavour) produces today, so the
//! sidecar and the translation cannot drift apart unnoticed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use weft_balance::{Algorithm, EndpointHealth, EndpointSpec};
use weft_registry::{Hub, Registry, SourceEvent, parse_document};
use weft_sidecar_config::*;
use weft_translate::{Flavor, Options, Resources, translate};

fn registry(yaml: &str) -> Registry {
    let doc = parse_document("test.yaml", yaml).expect("test registry must be valid");
    let hub = Hub::new();
    let src = hub.add_source("file");
    let mut events = vec![SourceEvent::Init];
    events.extend(doc.into_objects().into_iter().map(SourceEvent::InitApply));
    events.push(SourceEvent::InitDone);
    src.apply(events);
    (*hub.current().registry).clone()
}

fn resources(yaml: &str) -> Resources {
    translate(&registry(yaml), &Options::default(), Flavor::Envoy)
}

fn mesh(yaml: &str) -> MeshConfig {
    let res = resources(yaml);
    let rc = res.routes.iter().find(|r| r.name == ROUTE_CONFIG_NAME);
    MeshConfig::from_xds(&res.clusters, &res.endpoints, rc).unwrap()
}

const LB: &str = r#"
services:
  - { name: rr }
  - { name: wrr }
  - { name: rand }
  - { name: lr }
  - { name: ewma }
  - { name: ring }
  - { name: mag }
  - { name: none }
policies:
  - { name: p-rr, service: rr, lb: round_robin }
  - { name: p-wrr, service: wrr, lb: weighted_round_robin }
  - { name: p-rand, service: rand, lb: random }
  - { name: p-lr, service: lr, lb: least_request }
  - { name: p-ewma, service: ewma, lb: peak_ewma }
  - { name: p-ring, service: ring, lb: ring_hash }
  - { name: p-mag, service: mag, lb: maglev }
"#;

/// Checks the algorithm each registry `lb` arrives as. Before the translation sends
/// `weft.lb_algorithm`, round robin flavours arrive as ROUND_ROBIN (our default, peak-EWMA) and
/// peak-EWMA as LEAST_REQUEST; once it does, each arrives exactly.
#[test]
fn every_lb_algorithm_reads() {
    let m = mesh(LB);
    let alg = |n: &str| m.clusters[n].algorithm;
    let exact = resources(LB).clusters.iter().any(|c| {
        c.metadata
            .as_ref()
            .is_some_and(|md| md.filter_metadata.contains_key(WEFT_METADATA))
    });
    assert_eq!(alg("rand"), Algorithm::Random);
    assert_eq!(alg("lr"), Algorithm::LeastRequest);
    assert_eq!(alg("none"), Algorithm::PeakEwma);
    assert_eq!(
        alg("ring"),
        Algorithm::RingHash {
            min_ring_size: 1024
        }
    );
    assert_eq!(alg("mag"), Algorithm::Maglev { table_size: 65537 });
    if exact {
        assert_eq!(alg("rr"), Algorithm::RoundRobin);
        assert_eq!(alg("wrr"), Algorithm::WeightedRoundRobin);
        assert_eq!(alg("ewma"), Algorithm::PeakEwma);
    } else {
        assert_eq!(alg("rr"), Algorithm::PeakEwma);
        assert_eq!(alg("wrr"), Algorithm::PeakEwma);
        assert_eq!(alg("ewma"), Algorithm::LeastRequest);
    }
}

const POLICIES: &str = r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.1, port: 8080 }
  - name: greeter
    protocol: grpc
  - name: cache
  - name: plain
policies:
  - name: web-policy
    service: web
    lb: maglev
    connect_timeout: 250ms
    circuit_breakers:
      max_connections: 100
      max_pending_requests: 50
      max_requests: 200
      max_retries: 3
    outlier_detection:
      consecutive_5xx: 7
      consecutive_gateway_failure: 3
      interval: 10s
      base_ejection_time: 20s
      max_ejection_percent: 50
    health_check:
      path: /healthz
      interval: 5s
      timeout: 500ms
      unhealthy_threshold: 4
      healthy_threshold: 1
  - name: greeter-policy
    service: greeter
    circuit_breakers: { max_connections: 10 }
    outlier_detection: { base_ejection_time: 1s }
    health_check: {}
  - name: cache-policy
    service: cache
    health_check: { interval: 2s }
"#;

#[test]
fn policies_read() {
    let m = mesh(POLICIES);
    let web = &m.clusters["web"];
    assert_eq!(web.connect_timeout, Duration::from_millis(250));
    assert!(!web.http2);
    assert_eq!(
        web.circuit_breakers,
        CircuitBreakerConfig {
            max_connections: Some(100),
            max_pending_requests: Some(50),
            max_requests: Some(200),
            max_retries: Some(3),
            retry_budget: None,
        }
    );
    let od = web.outlier.clone().unwrap();
    assert_eq!(od.consecutive_5xx, Some(7));
    assert_eq!(od.consecutive_gateway_failure, Some(3));
    assert_eq!(od.base_ejection_time, Duration::from_secs(20));
    assert_eq!(od.max_ejection_time, Duration::from_secs(300));
    assert_eq!(od.max_ejection_percent, 50);
    assert_eq!(
        web.health_check,
        Some(HealthCheckConfig {
            kind: HealthCheckKind::Http {
                path: "/healthz".into()
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: 4,
            healthy_threshold: 1,
        })
    );
    // Zone settings are not translated yet: the defaults.
    assert_eq!(web.zone, weft_balance::ZoneConfig::default());

    let greeter = &m.clusters["greeter"];
    assert!(greeter.http2, "gRPC services get an HTTP/2 upstream");
    assert_eq!(greeter.connect_timeout, Duration::from_secs(1));
    assert_eq!(greeter.circuit_breakers.max_connections, Some(10));
    assert_eq!(greeter.circuit_breakers.max_requests, None);
    let god = greeter.outlier.clone().unwrap();
    assert_eq!(god.consecutive_5xx, Some(5), "Envoy's default");
    assert_eq!(god.consecutive_gateway_failure, None);
    assert_eq!(god.base_ejection_time, Duration::from_secs(1));
    assert_eq!(god.max_ejection_percent, 10);
    let ghc = greeter.health_check.clone().unwrap();
    assert_eq!(ghc.kind, HealthCheckKind::Grpc);
    assert_eq!(ghc.interval, Duration::from_secs(10));
    assert_eq!(ghc.timeout, Duration::from_secs(1));
    assert_eq!((ghc.unhealthy_threshold, ghc.healthy_threshold), (3, 2));

    let cache = &m.clusters["cache"];
    let chc = cache.health_check.clone().unwrap();
    assert_eq!(chc.kind, HealthCheckKind::Tcp);
    assert_eq!(chc.interval, Duration::from_secs(2));
    assert!(cache.outlier.is_none());

    let plain = &m.clusters["plain"];
    assert!(plain.health_check.is_none() && plain.outlier.is_none());
    assert_eq!(plain.circuit_breakers, CircuitBreakerConfig::default());
}

#[test]
fn endpoints_keep_zone_weight_and_health() {
    let m = mesh(
        r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.3, port: 8080, zone: zone-b }
      - { address: 10.0.0.1, port: 8080, zone: zone-a, weight: 3 }
      - { address: 10.0.0.2, port: 8080, zone: zone-a, health: draining }
      - { address: "fd00::4", port: 9090, health: unhealthy }
  - name: empty
"#,
    );
    let mut got = m.endpoints["web"].clone();
    got.sort_by_key(|e| e.addr);
    let ep = |a: &str, w: u32, z: Option<&str>, h: EndpointHealth| EndpointSpec {
        addr: a.parse::<SocketAddr>().unwrap(),
        weight: w,
        zone: z.map(str::to_string),
        health: h,
    };
    let mut want = vec![
        ep("10.0.0.1:8080", 3, Some("zone-a"), EndpointHealth::Healthy),
        ep("10.0.0.2:8080", 1, Some("zone-a"), EndpointHealth::Draining),
        ep("10.0.0.3:8080", 1, Some("zone-b"), EndpointHealth::Healthy),
        ep("[fd00::4]:9090", 1, None, EndpointHealth::Unhealthy),
    ];
    want.sort_by_key(|e| e.addr);
    assert_eq!(got, want);
    assert!(m.endpoints["empty"].is_empty());
}

const ROUTES: &str = r#"
services:
  - name: web
  - name: web-canary
  - name: greeter
    protocol: grpc
  - name: greeter-v2
    protocol: grpc
routes:
  - name: web-split
    service: web
    hosts: [web.example.com, "*.web.test"]
    rules:
      - match:
          path_prefix: /api
          method: GET
          headers:
            - { name: x-canary, exact: "1" }
        backends:
          - { service: web, weight: 90 }
          - { service: web-canary, weight: 10 }
        timeout: 2s
        retries: { attempts: 3, per_try_timeout: 500ms }
        hash_policy:
          - { header: X-User }
          - { cookie: { name: session, ttl: 1h } }
          - { source_ip: true, terminal: true }
      - match:
          path_regex: "/v[0-9]+/.*"
          headers:
            - { name: x-debug, present: true, invert: true }
        backends:
          - { service: web-canary }
      - match: { path_exact: /healthz }
        retries: { attempts: 2, on: [5xx, reset] }
      - match:
          path_prefix: /tier
          headers:
            - { name: x-tier, prefix: gold }
            - { name: x-region, regex: "eu-.*" }
        backends: [{ service: greeter }]
  - name: greeter-route
    service: greeter
    rules:
      - match: { path_prefix: /helloworld.Greeter/, method: POST }
        backends:
          - { service: greeter, weight: 80 }
          - { service: greeter-v2, weight: 15 }
          - { service: greeter, weight: 5 }
        retries: { attempts: 2, on: [unavailable, deadline-exceeded, unavailable] }
"#;

struct Req {
    authority: String,
    method: http::Method,
    path: String,
    headers: http::HeaderMap,
}

impl Req {
    fn new(authority: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Req {
            authority: authority.into(),
            method: method.parse().unwrap(),
            path: path.into(),
            headers: h,
        }
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            authority: &self.authority,
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
        }
    }
}

fn route(t: &RouteTable, r: &Req, pick: u64) -> Result<RouteDecision, NoRoute> {
    t.route(&r.info(), pick)
}

#[test]
fn prefix_method_header_weighted_retry_hash() {
    let t = mesh(ROUTES).routes;
    let api = Req::new("web", "GET", "/api/users", &[("x-canary", "1")]);
    let d = route(&t, &api, 0).unwrap();
    assert_eq!(d.virtual_host, "web");
    assert_eq!(d.cluster, "web");
    assert_eq!(d.timeout, Some(Duration::from_secs(2)));
    let retry = d.retry.clone().unwrap();
    assert_eq!(retry.num_retries, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
    // HTTP service default conditions: connect-failure, refused-stream, unavailable, 5xx.
    assert!(retry.retry_on.connect_failure && retry.retry_on.refused_stream);
    assert!(retry.retry_on.server_error_5xx && !retry.retry_on.reset);
    assert_eq!(
        retry.retry_on.grpc_statuses,
        vec!["unavailable".to_string()]
    );
    assert_eq!(
        d.hash_policies,
        vec![
            HashPolicy {
                on: HashOn::Header {
                    name: "x-user".into()
                },
                terminal: false
            },
            HashPolicy {
                on: HashOn::Cookie {
                    name: "session".into()
                },
                terminal: false
            },
            HashPolicy {
                on: HashOn::SourceIp,
                terminal: true
            },
        ]
    );
    assert_eq!(d.rate_limit, None);
    assert_eq!(d.rate_limit_key, None);

    // 90/10 split, walked in order: 0..90 -> web, 90..100 -> web-canary, modulo 100.
    assert_eq!(route(&t, &api, 89).unwrap().cluster, "web");
    assert_eq!(route(&t, &api, 90).unwrap().cluster, "web-canary");
    assert_eq!(route(&t, &api, 99).unwrap().cluster, "web-canary");
    assert_eq!(route(&t, &api, 100).unwrap().cluster, "web");
    let canary = (0..1000)
        .filter(|p| route(&t, &api, *p).unwrap().cluster == "web-canary")
        .count();
    assert_eq!(canary, 100);

    // Wrong method or header value: falls through to the catch-all, which has no deadline.
    for r in [
        Req::new("web", "POST", "/api/users", &[("x-canary", "1")]),
        Req::new("web", "GET", "/api/users", &[("x-canary", "2")]),
        Req::new("web", "GET", "/api/users", &[]),
        Req::new("web", "GET", "/API/users", &[("x-canary", "1")]),
    ] {
        let d = route(&t, &r, 0).unwrap();
        assert_eq!(d.cluster, "web", "{}", r.path);
        assert_eq!(d.timeout, None);
        assert!(d.retry.is_none() && d.hash_policies.is_empty());
    }
}

#[test]
fn regex_exact_and_header_matchers() {
    let t = mesh(ROUTES).routes;
    let to = |r: Req| route(&t, &r, 0).unwrap().cluster;
    // The regex matches the whole path only.
    assert_eq!(to(Req::new("web", "GET", "/v2/x", &[])), "web-canary");
    assert_eq!(to(Req::new("web", "GET", "/v2/", &[])), "web-canary");
    assert_eq!(to(Req::new("web", "GET", "/x/v2/x", &[])), "web");
    assert_eq!(to(Req::new("web", "GET", "/v2", &[])), "web");
    // Inverted presence: x-debug must be absent.
    assert_eq!(
        to(Req::new("web", "GET", "/v2/x", &[("x-debug", "")])),
        "web"
    );

    let hz = route(&t, &Req::new("web", "GET", "/healthz", &[]), 0).unwrap();
    let retry = hz.retry.unwrap();
    assert_eq!(retry.num_retries, 2);
    assert!(retry.retry_on.server_error_5xx && retry.retry_on.reset);
    assert!(!retry.retry_on.connect_failure && retry.retry_on.grpc_statuses.is_empty());
    assert!(
        route(&t, &Req::new("web", "GET", "/healthz/", &[]), 0)
            .unwrap()
            .retry
            .is_none()
    );

    let gold = |tier: &str, region: &str| {
        to(Req::new(
            "web",
            "GET",
            "/tier",
            &[("x-tier", tier), ("x-region", region)],
        ))
    };
    assert_eq!(gold("gold-plus", "eu-west"), "greeter");
    assert_eq!(gold("silver", "eu-west"), "web");
    // Regex header match is a full match too.
    assert_eq!(gold("gold", "us-eu-1"), "web");
}

#[test]
fn grpc_weighted_backends_merge_and_retry_statuses() {
    let t = mesh(ROUTES).routes;
    let r = Req::new("greeter:50051", "POST", "/helloworld.Greeter/SayHello", &[]);
    // Merged by the translation: greeter 85, greeter-v2 15.
    assert_eq!(route(&t, &r, 84).unwrap().cluster, "greeter");
    assert_eq!(route(&t, &r, 85).unwrap().cluster, "greeter-v2");
    assert_eq!(route(&t, &r, 99).unwrap().cluster, "greeter-v2");
    let retry = route(&t, &r, 0).unwrap().retry.unwrap();
    assert_eq!(
        retry.retry_on.grpc_statuses,
        vec!["unavailable".to_string(), "deadline-exceeded".to_string()]
    );
    assert!(!retry.retry_on.server_error_5xx);
}

#[test]
fn host_matching() {
    let t = mesh(ROUTES).routes;
    let vh = |authority: &str| route(&t, &Req::new(authority, "GET", "/", &[]), 0);
    assert_eq!(vh("web").unwrap().virtual_host, "web");
    assert_eq!(vh("WEB").unwrap().virtual_host, "web");
    assert_eq!(vh("web:8080").unwrap().virtual_host, "web");
    assert_eq!(vh("greeter:50051").unwrap().virtual_host, "greeter");
    assert_eq!(vh("web.example.com").unwrap().virtual_host, "web");
    assert_eq!(vh("a.web.test").unwrap().virtual_host, "web");
    assert_eq!(vh("web-canary").unwrap().virtual_host, "web-canary");
    assert_eq!(
        vh("web.test").unwrap_err(),
        NoRoute::UnknownAuthority("web.test".into()),
        "`*.web.test` needs at least one character for the `*`"
    );
    assert_eq!(
        vh("nope:80").unwrap_err(),
        NoRoute::UnknownAuthority("nope:80".into())
    );
    assert_eq!(
        vh("web.example.com:80").unwrap_err(),
        NoRoute::UnknownAuthority("web.example.com:80".into())
    );
    let mut names = t.virtual_hosts();
    names.sort();
    assert_eq!(names, vec!["greeter", "greeter-v2", "web", "web-canary"]);
}

#[test]
fn no_matching_rule_is_no_match() {
    let res = resources(ROUTES);
    let mut rc = res.routes[0].clone();
    // Drop the catch-all routes so a request can miss every rule.
    for vh in &mut rc.virtual_hosts {
        vh.routes.retain(|r| r.name != "default");
    }
    let t = RouteTable::from_xds(&rc).unwrap();
    let r = Req::new("web", "GET", "/nothing", &[]);
    assert_eq!(
        route(&t, &r, 0).unwrap_err(),
        NoRoute::NoMatch("web".into())
    );
    assert_eq!(
        route(&t, &Req::new("web", "GET", "/healthz", &[]), 0)
            .unwrap()
            .cluster,
        "web"
    );
}
