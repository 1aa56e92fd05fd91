#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The example manifests in control-plane/crds/examples (also shown in docs/crds.md): they
//! decode, survive a serde round trip, fit the CRD schema's kind, and validate into the
//! registry values a registry file would give.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use weft_crds::{ExternalService, TrafficPolicy, TrafficRoute, decode};
use weft_registry::parse_document;

fn example(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    std::fs::read_to_string(path).unwrap()
}

/// YAML -> typed -> JSON -> typed again, and the JSON carries what the YAML said.
fn round_trip<K>(file: &str) -> K
where
    K: kube::Resource<DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + PartialEq
        + std::fmt::Debug,
{
    let text = example(file);
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let obj: K = decode(yaml.clone()).unwrap();
    let json = serde_json::to_value(&obj).unwrap();
    let again: K = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(again, obj, "{file}");
    assert_eq!(json["apiVersion"], "mesh.weft.dev/v1alpha1", "{file}");
    assert_eq!(json["kind"], K::kind(&()).as_ref(), "{file}");
    assert_eq!(json["metadata"], yaml["metadata"], "{file}");
    let back: K = serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&obj).unwrap()).unwrap();
    assert_eq!(back, obj, "{file}: YAML round trip");
    obj
}

#[test]
fn traffic_route_example() {
    let r: TrafficRoute = round_trip("trafficroute.yaml");
    let route = r.validate().unwrap();
    let want = parse_document(
        "want",
        r#"
routes:
  - name: shop.web-api
    service: web.shop
    hosts: [www.example.com]
    rules:
      - match:
          path_prefix: /api
          headers: [{name: x-canary, exact: "1"}]
        backends: [{service: web-canary.shop}]
      - match: {path_prefix: /api, method: GET}
        backends:
          - {service: web.shop, weight: 90}
          - {service: web-canary.shop, weight: 10}
        timeout: 5s
        retries: {attempts: 2, per_try_timeout: 1s, on: [connect-failure, 5xx]}
      - match: {path_regex: "/cart/[0-9]+"}
        hash_policy: [{header: x-user, terminal: true}]
        rate_limit: {requests: 50, per: 1s, burst: 100}
"#,
    )
    .unwrap();
    assert_eq!(route, want.routes[0]);
}

#[test]
fn traffic_policy_example() {
    let p: TrafficPolicy = round_trip("trafficpolicy.yaml");
    let policy = p.validate().unwrap();
    assert_eq!(policy.name, "shop.web-resilience");
    let mut spec_yaml: serde_json::Value =
        serde_yaml_ng::from_str(&example("trafficpolicy.yaml")).unwrap();
    let mut spec = spec_yaml["spec"].take();
    spec["name"] = "shop.web-resilience".into();
    let want = parse_document(
        "want",
        &serde_json::to_string(&serde_json::json!({ "policies": [spec] })).unwrap(),
    )
    .unwrap();
    assert_eq!(policy, want.policies[0]);
}

#[test]
fn external_service_example() {
    let e: ExternalService = round_trip("externalservice.yaml");
    let svc = e.validate().unwrap();
    assert_eq!(svc.name, "payments.shop");
    assert_eq!(svc.protocol, weft_registry::Protocol::Grpc);
    assert_eq!(svc.endpoints.len(), 3);
    assert_eq!(svc.endpoints[0].weight, 1);
    assert_eq!(svc.endpoints[1].weight, 2);
    assert_eq!(svc.endpoints[2].health, weft_registry::Health::Draining);
    assert_eq!(svc.endpoints[2].metadata["dc"], "backup");
}
