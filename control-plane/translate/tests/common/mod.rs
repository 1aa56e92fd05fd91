//! Registries the tests translate, built the way the server builds them: parsed and validated by
//! `weft_registry::parse_document`, merged by a `Hub`.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use weft_registry::{Hub, Registry, SourceEvent, parse_document};

pub fn registry(yaml: &str) -> Registry {
    let doc = parse_document("test.yaml", yaml).expect("test registry must be valid");
    let hub = Hub::new();
    let src = hub.add_source("file");
    let mut events = vec![SourceEvent::Init];
    events.extend(doc.into_objects().into_iter().map(SourceEvent::InitApply));
    events.push(SourceEvent::InitDone);
    src.apply(events);
    (*hub.current().registry).clone()
}

/// The demo: one HTTP service with 3 endpoints in 2 zones, one gRPC service.
pub const DEMO: &str = r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.3, port: 8080, zone: zone-b }
      - { address: 10.0.0.1, port: 8080, zone: zone-a, weight: 3 }
      - { address: 10.0.0.2, port: 8080, zone: zone-a, health: draining }
  - name: greeter
    protocol: grpc
    endpoints:
      - { address: 10.0.1.1, port: 50051 }
      - { address: 10.0.1.2, port: 50051, health: unhealthy }
"#;

/// Routes exercising every rule feature, for an HTTP and a gRPC service.
pub const ROUTES: &str = r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.1, port: 8080 }
  - name: web-canary
    endpoints:
      - { address: 10.0.0.9, port: 8080 }
  - name: greeter
    protocol: grpc
    endpoints:
      - { address: 10.0.1.1, port: 50051 }
  - name: greeter-v2
    protocol: grpc
routes:
  - name: web-split
    service: web
    hosts: [web.example.com, "*.web.test", greeter]
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
          - { header: x-user }
          - { cookie: { name: session, ttl: 1h } }
          - { source_ip: true, terminal: true }
      - match:
          path_regex: "^/v[0-9]+/.*"
          headers:
            - { name: x-debug, present: true, invert: true }
        backends:
          - { service: web-canary }
      - match: { path_exact: /healthz }
        retries: { attempts: 2, on: [5xx, reset] }
  - name: web-z-extra-hosts
    service: web
    hosts: [WEB.example.com, web-alt.example.com]
    rules:
      - match: { path_prefix: /alt }
  - name: greeter-route
    service: greeter
    rules:
      - match:
          path_prefix: /helloworld.Greeter/
          headers:
            - { name: x-tier, prefix: gold }
            - { name: x-region, regex: "eu-.*" }
        backends:
          - { service: greeter, weight: 80 }
          - { service: greeter-v2, weight: 15 }
          - { service: greeter, weight: 5 }
        timeout: 1s
        retries: { attempts: 2, on: [5xx, unavailable, deadline-exceeded, unavailable] }
        hash_policy:
          - { cookie: { name: affinity } }
          - { header: x-user-id, terminal: true }
          - { source_ip: true }
      - match: { method: PUT }
        backends: [{ service: web }]
      - match: { path_exact: /helloworld.Greeter/SayHello, method: POST }
        retries: { attempts: 1 }
"#;

/// A policy with every field, plus the defaults paths, over HTTP and gRPC services.
pub const POLICIES: &str = r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.1, port: 8080 }
  - name: greeter
    protocol: grpc
  - name: cache
  - name: stats
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
      consecutive_5xx: 5
      consecutive_gateway_failure: 3
      interval: 10s
      base_ejection_time: 30s
      max_ejection_percent: 50
    health_check:
      path: /healthz
      interval: 5s
      timeout: 500ms
      unhealthy_threshold: 4
      healthy_threshold: 1
  - name: greeter-policy
    service: greeter
    lb: least_request
    circuit_breakers: { max_connections: 10 }
    health_check: {}
  - name: cache-policy
    service: cache
    lb: ring_hash
    health_check: { interval: 2s }
  - name: stats-policy
    service: stats
    lb: peak_ewma
    circuit_breakers: { max_requests: 7 }
"#;

/// Every field added for the sidecar (zone-aware routing, panic threshold, rate limits, retry
/// budget, max ejection time), over HTTP and gRPC services; the gRPC flavour must get none.
pub const SIDECAR_POLICIES: &str = r#"
services:
  - name: web
    endpoints:
      - { address: 10.0.0.1, port: 8080, zone: zone-a }
      - { address: 10.0.0.2, port: 8080, zone: zone-b }
  - name: greeter
    protocol: grpc
    endpoints:
      - { address: 10.0.1.1, port: 50051 }
  - name: api
routes:
  - name: web-limits
    service: web
    rules:
      - match: { path_prefix: /limited }
        rate_limit: { requests: 2, per: 1500ms, burst: 4 }
      - match: { path_prefix: /open }
  - name: greeter-limits
    service: greeter
    rules:
      - match: { path_prefix: /helloworld.Greeter/ }
        rate_limit: { requests: 50 }
policies:
  - name: web-policy
    service: web
    lb: peak_ewma
    zone_aware: { min_healthy_percent: 80 }
    panic_threshold: 30
    rate_limit: { requests: 5, per: 10s }
    circuit_breakers:
      max_requests: 100
      retry_budget: { percent: 25, min_concurrency: 5 }
    outlier_detection:
      consecutive_5xx: 3
      base_ejection_time: 10s
      max_ejection_time: 2m
  - name: greeter-policy
    service: greeter
    lb: weighted_round_robin
    zone_aware: { enabled: false }
    panic_threshold: 0
    rate_limit: { requests: 100 }
    circuit_breakers: { retry_budget: {} }
    outlier_detection: { max_ejection_time: 5m }
  - name: api-policy
    service: api
    lb: ring_hash
"#;

pub const EMPTY: &str = "";
