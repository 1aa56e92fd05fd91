#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Validation of specs into registry values, with errors naming object and field; condition
//! helpers.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use weft_crds::*;
use weft_registry::model::*;

fn route_spec(yaml: &str) -> TrafficRouteSpec {
    serde_yaml_ng::from_str(yaml).unwrap()
}

#[test]
fn valid_route_becomes_the_registry_route() {
    let spec = route_spec(
        r#"
service: web
hosts: [web.example.com]
rules:
  - match: {path_prefix: /api, method: GET, headers: [{name: x-canary, present: true}]}
    backends: [{service: web, weight: 90}, {service: web-v2, weight: 10}]
    timeout: 2s
    retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx]}
    hash_policy: [{cookie: {name: sid, ttl: 1h}}]
"#,
    );
    let route = validate_route("web", "default", &spec).unwrap();
    assert_eq!(
        route,
        Route {
            name: "default.web".into(),
            service: "web".into(),
            hosts: vec!["web.example.com".into()],
            rules: vec![RouteRule {
                matches: RouteMatch {
                    path_prefix: Some("/api".into()),
                    method: Some("GET".into()),
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        present: Some(true),
                        ..HeaderMatch::default()
                    }],
                    ..RouteMatch::default()
                },
                backends: vec![
                    Backend {
                        service: "web".into(),
                        weight: 90
                    },
                    Backend {
                        service: "web-v2".into(),
                        weight: 10
                    },
                ],
                timeout: Some(Duration::from_secs(2)),
                retries: Some(RetryPolicy {
                    attempts: 3,
                    per_try_timeout: Some(Duration::from_millis(500)),
                    on: vec!["5xx".into()],
                }),
                hash_policy: vec![HashPolicy {
                    cookie: Some(CookieHash {
                        name: "sid".into(),
                        ttl: Some(Duration::from_secs(3600)),
                    }),
                    ..HashPolicy::default()
                }],
                rate_limit: None,
            }],
        }
    );
    assert_eq!(TrafficRouteSpec::from(route), spec);
}

#[test]
fn bad_weight_names_object_and_field() {
    let spec = route_spec(
        "service: web\nrules: [{backends: [{service: a, weight: 1}, {service: b, weight: 0}]}]",
    );
    let e = validate_route("web", "default", &spec).unwrap_err();
    assert_eq!(
        e.to_string(),
        "TrafficRoute default/web: spec.rules[0].backends[1].weight: weight 0 is out of range 1..=100000"
    );
    assert_eq!(e.kind, "TrafficRoute");
    assert_eq!(e.problems[0].field, "spec.rules[0].backends[1].weight");
    assert_eq!(
        e.message(),
        "spec.rules[0].backends[1].weight: weight 0 is out of range 1..=100000"
    );
}

#[test]
fn bad_regex_and_every_other_problem_are_reported() {
    let spec = route_spec(
        r#"
service: "-web"
hosts: ["a b"]
rules:
  - match: {path_regex: "(", method: get, headers: [{name: X-A, regex: "a(?=b)"}]}
    retries: {attempts: 11, on: [sometimes]}
    timeout: 0s
"#,
    );
    let e = validate_route("web", "ns1", &spec).unwrap_err().to_string();
    for want in [
        "TrafficRoute ns1/web: spec.service: invalid name `-web`",
        "TrafficRoute ns1/web: spec.hosts[0]: invalid host `a b`",
        "TrafficRoute ns1/web: spec.rules[0].match.path_regex: invalid regex `(`",
        "TrafficRoute ns1/web: spec.rules[0].match.method: `get` is not an HTTP method",
        "TrafficRoute ns1/web: spec.rules[0].match.headers[0].name: header name `X-A`",
        "TrafficRoute ns1/web: spec.rules[0].match.headers[0].regex: invalid regex `a(?=b)`",
        "TrafficRoute ns1/web: spec.rules[0].retries.attempts: attempts 11",
        "TrafficRoute ns1/web: spec.rules[0].retries.on[0]: unknown retry condition `sometimes`",
        "TrafficRoute ns1/web: spec.rules[0].timeout: timeout must be greater than 0",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }
    assert_eq!(e.lines().count(), 9, "{e}");
}

#[test]
fn empty_rules_point_at_spec_rules() {
    let e = validate_route("r", "default", &route_spec("service: web\nrules: []"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "TrafficRoute default/r: spec.rules: a route needs at least one rule"
    );
}

#[test]
fn unknown_lb_names_object_and_field() {
    let obj = json!({
        "apiVersion": "mesh.weft.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"service": "web", "lb": "fastest"}
    });
    let e = decode::<TrafficPolicy>(obj).unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("TrafficPolicy default/web: spec.lb: unknown variant `fastest`"),
        "{s}"
    );
    assert!(s.contains("round_robin"), "{s}");

    let obj = json!({
        "apiVersion": "mesh.weft.dev/v1alpha1",
        "kind": "TrafficRoute",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"service": "web", "rules": [{"timeout": "soon"}]}
    });
    let s = decode::<TrafficRoute>(obj).unwrap_err().to_string();
    assert!(
        s.starts_with("TrafficRoute default/r: spec.rules[0].timeout:"),
        "{s}"
    );
}

#[test]
fn policy_validation() {
    let spec: TrafficPolicySpec = serde_yaml_ng::from_str(
        "service: web\nlb: ring_hash\nconnect_timeout: 1s\nzone_aware: {min_healthy_percent: 101}\npanic_threshold: 150\noutlier_detection: {max_ejection_time: 10s}",
    )
    .unwrap();
    let e = validate_policy("p", "prod", &spec).unwrap_err().to_string();
    for want in [
        "TrafficPolicy prod/p: spec.zone_aware.min_healthy_percent: 101 is out of range 0..=100",
        "TrafficPolicy prod/p: spec.panic_threshold: 150 is out of range 0..=100",
        "TrafficPolicy prod/p: spec.outlier_detection.max_ejection_time: 10s is less than base_ejection_time (30s)",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }

    let spec: TrafficPolicySpec =
        serde_yaml_ng::from_str("service: web\nlb: maglev\nconnect_timeout: 750ms").unwrap();
    let p = validate_policy("p", "prod", &spec).unwrap();
    assert_eq!(p.name, "prod.p");
    assert_eq!(p.lb, Some(LbAlgorithm::Maglev));
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(750)));
    assert_eq!(TrafficPolicySpec::from(p), spec);
}

#[test]
fn external_service_validation() {
    let spec: ExternalServiceSpec = serde_yaml_ng::from_str(
        "endpoints: [{address: db.internal, port: 0}, {address: 10.0.0.1, port: 5432}, {address: 10.0.0.1, port: 5432, weight: 0}]",
    )
    .unwrap();
    let e = validate_external_service("db", "data", &spec)
        .unwrap_err()
        .to_string();
    for want in [
        "ExternalService data/db: spec.endpoints[0].address: `db.internal` is not an IP address",
        "ExternalService data/db: spec.endpoints[0].port: port 0 is not a valid port",
        "ExternalService data/db: spec.endpoints[2].weight: weight 0 is out of range",
        "ExternalService data/db: spec.endpoints[2]: duplicate endpoint 10.0.0.1:5432",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }
    assert_eq!(e.lines().count(), 4, "{e}");

    let spec: ExternalServiceSpec =
        serde_yaml_ng::from_str("protocol: grpc\nendpoints: [{address: '::1', port: 50051}]")
            .unwrap();
    let s = validate_external_service("db", "data", &spec).unwrap();
    assert_eq!(s.name, "db.data");
    assert_eq!(s.protocol, Protocol::Grpc);
    assert_eq!(s.endpoints[0].weight, 1);
    assert_eq!(ExternalServiceSpec::from(s), spec);
}

#[test]
fn names_too_long_for_the_registry_are_refused() {
    let long = "a".repeat(250);
    let spec = route_spec("service: web\nrules: [{}]");
    let e = validate_route(&long, "default", &spec).unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].field, "metadata.name");
    assert!(e.to_string().starts_with(&format!(
        "TrafficRoute default/{long}: metadata.name: registry name"
    )));
    assert_eq!(registry_name("ns", "r"), "ns.r");
    assert_eq!(service_name("ns", "svc"), "svc.ns");
}

#[test]
fn object_validate_uses_its_namespace_and_name() {
    let mut r = TrafficRoute::new("web", route_spec("service: web\nrules: [{}]"));
    r.metadata.namespace = Some("team-a".into());
    assert_eq!(r.validate().unwrap().name, "team-a.web");
}

#[test]
fn condition_helpers() {
    let c = accepted(Some(4), true, REASON_ACCEPTED, "accepted");
    assert_eq!(c.type_, "Accepted");
    assert_eq!(c.status, "True");
    assert_eq!(c.reason, "Accepted");
    assert_eq!(c.message, "accepted");
    assert_eq!(c.observed_generation, Some(4));

    let c = resolved_refs(None, false, REASON_BACKEND_NOT_FOUND, "no service `web-v2`");
    assert_eq!(c.type_, "ResolvedRefs");
    assert_eq!(c.status, "False");
    assert_eq!(c.reason, "BackendNotFound");
    assert_eq!(c.observed_generation, None);

    let v = serde_json::to_value(&c).unwrap();
    for key in ["type", "status", "reason", "message", "lastTransitionTime"] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }

    let long = "é".repeat(MAX_MESSAGE_LEN);
    let c = accepted(Some(1), false, REASON_INVALID, long);
    assert!(c.message.len() <= MAX_MESSAGE_LEN);
}

#[test]
fn set_condition_keeps_transition_time_unless_status_flips() {
    let old_time = Time(Timestamp::from_second(1_000_000).unwrap());
    let mut first = accepted(Some(1), true, REASON_ACCEPTED, "ok");
    first.last_transition_time = old_time.clone();
    let mut conds = vec![first.clone()];

    // Same status, same everything but a fresh timestamp: nothing changes.
    assert!(!set_condition(
        &mut conds,
        accepted(Some(1), true, REASON_ACCEPTED, "ok")
    ));
    assert_eq!(conds, vec![first]);

    // Same status, new generation: updated, transition time kept.
    assert!(set_condition(
        &mut conds,
        accepted(Some(2), true, REASON_ACCEPTED, "ok")
    ));
    assert_eq!(conds[0].observed_generation, Some(2));
    assert_eq!(conds[0].last_transition_time, old_time);

    // Flip: new transition time.
    assert!(set_condition(
        &mut conds,
        accepted(Some(3), false, REASON_INVALID, "bad")
    ));
    assert_eq!(conds[0].status, "False");
    assert_ne!(conds[0].last_transition_time, old_time);

    // Another type is added alongside.
    assert!(set_condition(
        &mut conds,
        resolved_refs(Some(3), true, REASON_RESOLVED_REFS, "")
    ));
    assert_eq!(conds.len(), 2);
    let status = ObjectStatus::new(Some(3), conds);
    assert_eq!(status.condition(RESOLVED_REFS).unwrap().status, "True");
    assert_eq!(status.condition(ACCEPTED).unwrap().status, "False");
    let v = serde_json::to_value(&status).unwrap();
    assert_eq!(v["observedGeneration"], 3);
    assert_eq!(v["conditions"].as_array().unwrap().len(), 2);
}
