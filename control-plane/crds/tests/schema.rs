#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The generated CRDs: names, scope, subresources, printer columns, and a schema Kubernetes
//! accepts as structural and that describes every field the types (de)serialise.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use weft_crds::{
    ExternalService, ExternalServiceSpec, ObjectStatus, TrafficPolicy, TrafficPolicySpec,
    TrafficRoute, TrafficRouteSpec, accepted, resolved_refs,
};
use weft_registry::model::*;

fn schema(crd: &CustomResourceDefinition) -> Value {
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn names_scope_and_version() {
    for (crd, kind, plural, short) in [
        (TrafficRoute::crd(), "TrafficRoute", "trafficroutes", "wtr"),
        (
            TrafficPolicy::crd(),
            "TrafficPolicy",
            "trafficpolicies",
            "wtp",
        ),
        (
            ExternalService::crd(),
            "ExternalService",
            "externalservices",
            "wes",
        ),
    ] {
        let v = serde_json::to_value(&crd).unwrap();
        assert_eq!(v["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(v["kind"], "CustomResourceDefinition");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.mesh.weft.dev").as_str())
        );
        assert_eq!(crd.spec.group, "mesh.weft.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.singular.as_deref(),
            Some(kind.to_lowercase().as_str())
        );
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["weft".to_string()]));
        assert_eq!(crd.spec.versions.len(), 1);
        let ver = &crd.spec.versions[0];
        assert_eq!(ver.name, "v1alpha1");
        assert!(ver.served && ver.storage);
        assert!(
            ver.subresources.as_ref().unwrap().status.is_some(),
            "{kind}: status subresource"
        );
        let s = schema(&crd);
        assert_eq!(s["required"], json!(["spec"]), "{kind}");
        assert_eq!(s["properties"]["spec"]["type"], "object", "{kind}");
        assert_eq!(s["properties"]["status"]["type"], "object", "{kind}");
    }
}

#[test]
fn printer_columns() {
    let cols = |crd: CustomResourceDefinition| -> Vec<(String, String, String)> {
        crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.type_, c.json_path))
            .collect()
    };
    let accepted = (
        "Accepted".to_string(),
        "string".to_string(),
        r#".status.conditions[?(@.type=="Accepted")].status"#.to_string(),
    );
    let programmed = (
        "Programmed".to_string(),
        "string".to_string(),
        r#".status.conditions[?(@.type=="Programmed")].status"#.to_string(),
    );
    let age = (
        "Age".to_string(),
        "date".to_string(),
        ".metadata.creationTimestamp".to_string(),
    );
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        cols(TrafficRoute::crd()),
        vec![
            s("Service", "string", ".spec.service"),
            accepted.clone(),
            programmed.clone(),
            s(
                "ResolvedRefs",
                "string",
                r#".status.conditions[?(@.type=="ResolvedRefs")].status"#
            ),
            age.clone(),
        ]
    );
    assert_eq!(
        cols(TrafficPolicy::crd()),
        vec![
            s("Service", "string", ".spec.service"),
            s("LB", "string", ".spec.lb"),
            accepted.clone(),
            programmed.clone(),
            age.clone(),
        ]
    );
    assert_eq!(
        cols(ExternalService::crd()),
        vec![
            s("Protocol", "string", ".spec.protocol"),
            accepted,
            programmed,
            age
        ]
    );
}

/// Kubernetes' structural-schema rules, as far as a walk can check them: every node has a
/// `type` (no node is typed only through `$ref`, `anyOf`, `oneOf`, `allOf` or `not`, none of
/// which appear), `enum`s are typed strings, no `additionalProperties` next to `properties`,
/// and unknown fields are preserved nowhere (nothing needs it).
fn assert_structural(path: &str, node: &Value) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not a schema object"));
    for banned in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
        "$schema",
        "const",
        "uniqueItems",
        "x-kubernetes-preserve-unknown-fields",
    ] {
        assert!(!obj.contains_key(banned), "{path}: has `{banned}`");
    }
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{path}: no `type` (or not a single string): {node}"));
    assert!(
        ["object", "array", "string", "integer", "number", "boolean"].contains(&ty),
        "{path}: type {ty}"
    );
    if let Some(values) = obj.get("enum") {
        assert_eq!(ty, "string", "{path}: enum must be typed string");
        for v in values.as_array().unwrap() {
            assert!(
                v.is_string() || (v.is_null() && obj.get("nullable") == Some(&json!(true))),
                "{path}: enum value {v}"
            );
        }
    }
    if let Some(default) = obj.get("default") {
        assert!(!default.is_null(), "{path}: null default");
    }
    match ty {
        "object" => {
            let props = obj.get("properties").and_then(Value::as_object);
            let additional = obj.get("additionalProperties");
            assert!(
                !(props.is_some() && additional.is_some()),
                "{path}: properties and additionalProperties together"
            );
            for (k, v) in props.into_iter().flatten() {
                assert_structural(&format!("{path}.{k}"), v);
            }
            if let Some(required) = obj.get("required") {
                for r in required.as_array().unwrap() {
                    let r = r.as_str().unwrap();
                    assert!(
                        props.is_some_and(|p| p.contains_key(r)),
                        "{path}: required `{r}` is not a property"
                    );
                }
            }
            if let Some(a) = additional {
                assert_structural(&format!("{path}.*"), a);
            }
            assert!(
                props.is_some() || additional.is_some(),
                "{path}: object without properties (would drop every field)"
            );
        }
        "array" => assert_structural(&format!("{path}[]"), &obj["items"]),
        _ => {}
    }
}

#[test]
fn schemas_are_structural() {
    for crd in [
        TrafficRoute::crd(),
        TrafficPolicy::crd(),
        ExternalService::crd(),
    ] {
        assert_structural(&crd.spec.names.kind, &schema(&crd));
    }
}

/// Walks a value (as the types serialise it) against the schema: every field the types write
/// must be a property with the matching type, or the API server would prune or refuse it.
fn assert_fits(path: &str, value: &Value, schema: &Value) {
    let ty = schema["type"].as_str().unwrap();
    match value {
        Value::Object(map) => {
            assert_eq!(ty, "object", "{path}");
            for (k, v) in map {
                let sub = schema["properties"]
                    .get(k)
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or_else(|| panic!("{path}.{k}: not in the schema"));
                assert_fits(&format!("{path}.{k}"), v, sub);
            }
        }
        Value::Array(items) => {
            assert_eq!(ty, "array", "{path}");
            for (i, v) in items.iter().enumerate() {
                assert_fits(&format!("{path}[{i}]"), v, &schema["items"]);
            }
        }
        Value::String(s) => {
            assert_eq!(ty, "string", "{path}");
            if let Some(values) = schema["enum"].as_array() {
                assert!(values.contains(value), "{path}: `{s}` not in enum");
            }
            if let Some(p) = schema["pattern"].as_str() {
                assert!(
                    regex::Regex::new(p).unwrap().is_match(s),
                    "{path}: `{s}` does not match {p}"
                );
            }
        }
        Value::Number(n) => {
            assert!(
                ty == "integer" || ty == "number",
                "{path}: number against {ty}"
            );
            if let (Some(min), Some(v)) = (schema["minimum"].as_f64(), n.as_f64()) {
                assert!(v >= min, "{path}: {v} < {min}");
            }
        }
        Value::Bool(_) => assert_eq!(ty, "boolean", "{path}"),
        Value::Null => assert_eq!(schema["nullable"], json!(true), "{path}: null"),
    }
}

fn full_rule() -> RouteRule {
    RouteRule {
        matches: RouteMatch {
            path_prefix: Some("/api".into()),
            path_exact: Some("/x".into()),
            path_regex: Some("/v[0-9]+".into()),
            headers: vec![HeaderMatch {
                name: "x-canary".into(),
                exact: Some("1".into()),
                prefix: Some("a".into()),
                regex: Some("b.*".into()),
                present: Some(true),
                invert: true,
            }],
            method: Some("GET".into()),
        },
        backends: vec![Backend {
            service: "web".into(),
            weight: 3,
        }],
        timeout: Some(Duration::from_millis(2500)),
        retries: Some(RetryPolicy {
            attempts: 2,
            per_try_timeout: Some(Duration::from_millis(500)),
            on: vec!["5xx".into()],
        }),
        hash_policy: vec![HashPolicy {
            header: Some("x-user".into()),
            cookie: Some(CookieHash {
                name: "sid".into(),
                ttl: Some(Duration::from_secs(3600)),
            }),
            source_ip: Some(true),
            terminal: true,
        }],
        rate_limit: Some(RateLimit {
            requests: 10,
            per: Duration::from_secs(60),
            burst: Some(20),
        }),
    }
}

fn full_policy() -> TrafficPolicySpec {
    TrafficPolicySpec {
        service: "web".into(),
        lb: Some(LbAlgorithm::PeakEwma),
        connect_timeout: Some(Duration::from_millis(250)),
        circuit_breakers: Some(CircuitBreakers {
            max_connections: Some(1),
            max_pending_requests: Some(2),
            max_requests: Some(3),
            max_retries: Some(4),
            retry_budget: Some(RetryBudget::default()),
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: Some(6),
            interval: Some(Duration::from_secs(10)),
            base_ejection_time: Some(Duration::from_secs(30)),
            max_ejection_percent: Some(50),
            max_ejection_time: Some(Duration::from_secs(300)),
        }),
        health_check: Some(HealthCheck {
            path: Some("/healthz".into()),
            interval: Some(Duration::from_secs(5)),
            timeout: Some(Duration::from_secs(1)),
            unhealthy_threshold: Some(3),
            healthy_threshold: Some(2),
        }),
        zone_aware: Some(ZoneAware::default()),
        panic_threshold: Some(40),
        rate_limit: Some(RateLimit {
            requests: 100,
            per: Duration::from_secs(1),
            burst: None,
        }),
    }
}

fn full_external() -> ExternalServiceSpec {
    ExternalServiceSpec {
        protocol: Protocol::Grpc,
        endpoints: vec![Endpoint {
            address: "10.0.0.1".into(),
            port: 443,
            weight: 2,
            zone: Some("z1".into()),
            health: Health::Draining,
            metadata: [("dc".to_string(), "a".to_string())].into(),
        }],
    }
}

fn with_status<K: serde::Serialize>(obj: &K) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["status"] = serde_json::to_value(ObjectStatus::new(
        Some(2),
        vec![
            accepted(Some(2), true, "Accepted", "ok"),
            resolved_refs(Some(2), false, "BackendNotFound", "no `web`"),
        ],
    ))
    .unwrap();
    v
}

#[test]
fn every_field_is_in_the_schema_with_its_type() {
    let route = TrafficRoute::new(
        "r",
        TrafficRouteSpec {
            service: "web".into(),
            hosts: vec!["www.example.com".into()],
            rules: vec![full_rule()],
        },
    );
    let policy = TrafficPolicy::new("p", full_policy());
    let ext = ExternalService::new("e", full_external());
    for (name, value, crd) in [
        ("TrafficRoute", with_status(&route), TrafficRoute::crd()),
        ("TrafficPolicy", with_status(&policy), TrafficPolicy::crd()),
        ("ExternalService", with_status(&ext), ExternalService::crd()),
    ] {
        let s = schema(&crd);
        for key in ["spec", "status"] {
            assert_fits(&format!("{name}.{key}"), &value[key], &s["properties"][key]);
        }
    }
}

#[test]
fn spec_fields_and_types() {
    let props = |crd: CustomResourceDefinition| -> Vec<(String, String)> {
        let s = schema(&crd);
        s["properties"]["spec"]["properties"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v["type"].as_str().unwrap().to_string()))
            .collect()
    };
    let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        props(TrafficRoute::crd()),
        p(&[
            ("hosts", "array"),
            ("rules", "array"),
            ("service", "string")
        ])
    );
    assert_eq!(
        props(TrafficPolicy::crd()),
        p(&[
            ("circuit_breakers", "object"),
            ("connect_timeout", "string"),
            ("health_check", "object"),
            ("lb", "string"),
            ("outlier_detection", "object"),
            ("panic_threshold", "integer"),
            ("rate_limit", "object"),
            ("service", "string"),
            ("zone_aware", "object"),
        ])
    );
    assert_eq!(
        props(ExternalService::crd()),
        p(&[("endpoints", "array"), ("protocol", "string")])
    );

    let route = schema(&TrafficRoute::crd());
    let spec = &route["properties"]["spec"];
    assert_eq!(spec["required"], json!(["rules", "service"]));
    let rule = &spec["properties"]["rules"]["items"]["properties"];
    for f in [
        "match",
        "backends",
        "timeout",
        "retries",
        "hash_policy",
        "rate_limit",
    ] {
        assert!(rule.get(f).is_some(), "rule.{f}");
    }
    assert_eq!(rule["timeout"]["type"], "string");
    assert_eq!(rule["timeout"]["nullable"], true);
    assert_eq!(rule["timeout"]["pattern"].as_str(), Some(DURATION_PATTERN));
    assert_eq!(
        rule["backends"]["items"]["properties"]["weight"]["type"],
        "integer"
    );

    let policy = schema(&TrafficPolicy::crd());
    let lb = &policy["properties"]["spec"]["properties"]["lb"];
    assert_eq!(lb["type"], "string");
    assert_eq!(lb["nullable"], true);
    let names: Vec<&str> = lb["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(names, LbAlgorithm::ALL.map(LbAlgorithm::as_str).to_vec());

    let ext = schema(&ExternalService::crd());
    let ep = &ext["properties"]["spec"]["properties"]["endpoints"]["items"];
    assert_eq!(ep["properties"]["port"]["maximum"].as_f64(), Some(65535.0));
    assert_eq!(
        ep["properties"]["health"]["enum"],
        json!(["healthy", "unhealthy", "draining"])
    );
    assert_eq!(
        ext["properties"]["spec"]["properties"]["protocol"]["enum"],
        json!(["http", "grpc"])
    );
}

#[test]
fn status_schema_is_conditions_and_generation() {
    let s = schema(&TrafficRoute::crd());
    let status = &s["properties"]["status"]["properties"];
    assert_eq!(status["observedGeneration"]["type"], "integer");
    let conds = &status["conditions"];
    assert_eq!(conds["type"], "array");
    assert_eq!(conds["x-kubernetes-list-type"], "map");
    assert_eq!(conds["x-kubernetes-list-map-keys"], json!(["type"]));
    assert_eq!(
        conds["items"]["required"],
        json!(["lastTransitionTime", "message", "reason", "status", "type"])
    );
}

#[test]
fn duration_pattern_accepts_what_humantime_parses() {
    let re = regex::Regex::new(DURATION_PATTERN).unwrap();
    for ok in [
        "1s",
        "250ms",
        "2m",
        "1h 30m",
        "1h30m",
        "1.5s",
        "10 seconds",
        "3days",
        "1w",
        "2M",
        "5 mins",
        "100us",
        "100µs",
        "7ns",
    ] {
        assert!(re.is_match(ok), "pattern refuses `{ok}`");
        assert!(
            humantime::parse_duration(ok).is_ok(),
            "humantime refuses `{ok}`"
        );
    }
    for bad in ["", "2", "fast", "2 parsecs", "s", "-1s", "1s,", "1 s 2"] {
        assert!(!re.is_match(bad), "pattern accepts `{bad}`");
        assert!(
            humantime::parse_duration(bad).is_err(),
            "humantime accepts `{bad}`"
        );
    }
}
