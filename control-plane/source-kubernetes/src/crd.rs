//! Weft's custom resources as registry objects, with the verdict their status reports.
//!
//! Objects are watched untyped (`DynamicObject`) and each spec is decoded here, one object at a
//! time: a spec that does not decode then rejects that one object, naming the field, instead
//! of failing the whole list and with it every other object of the kind.

use kube::api::DynamicObject;
use serde::de::DeserializeOwned;
use weft_crds::{ExternalServiceSpec, ObjectStatus, TrafficPolicySpec, TrafficRouteSpec};
use weft_registry::{Object, ObjectKey, RegistryDoc};

use crate::status::{CrdKind, StatusTarget, Verdict};

/// The error key an object is reported under in `/debug/sources`: `<Kind>/<namespace>/<name>`.
pub fn error_key(kind: CrdKind, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", kind.as_str())
}

/// What one custom resource gives the registry (or why it gives nothing: `(error key,
/// reason)`), and its status target.
pub fn evaluate(
    kind: CrdKind,
    obj: &DynamicObject,
) -> (Result<Vec<Object>, (String, String)>, StatusTarget) {
    let namespace = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let verdict = convert(kind, obj, &namespace, &name);
    let current = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value::<ObjectStatus>(s.clone()).ok());
    let target = StatusTarget {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
        generation: obj.metadata.generation,
        resource_version: obj.metadata.resource_version.clone().unwrap_or_default(),
        current,
        verdict: match &verdict {
            Ok((objs, refs)) => Verdict::Accepted {
                refs: refs.clone(),
                objects: objs
                    .iter()
                    .map(Object::key)
                    .filter(|k| !matches!(k, ObjectKey::Instance { .. }))
                    .collect(),
            },
            Err(reason) => Verdict::Invalid(reason.clone()),
        },
    };
    let result = verdict
        .map(|(objs, _)| objs)
        .map_err(|reason| (error_key(kind, &namespace, &name), reason));
    (result, target)
}

/// The objects and the registry services they refer to, or every problem found. Naming and
/// validation are `weft-crds`' (routes and policies `<namespace>.<name>`, external services
/// `<name>.<namespace>`), so a CRD means what the same value in a registry file means.
fn convert(
    kind: CrdKind,
    obj: &DynamicObject,
    namespace: &str,
    name: &str,
) -> Result<(Vec<Object>, Vec<String>), String> {
    match kind {
        CrdKind::TrafficRoute => {
            let spec: TrafficRouteSpec = decode_spec(obj)?;
            let route =
                weft_crds::validate_route(name, namespace, &spec).map_err(|e| e.message())?;
            let mut refs = vec![route.service.clone()];
            refs.extend(
                route
                    .rules
                    .iter()
                    .flat_map(|r| &r.backends)
                    .map(|b| b.service.clone()),
            );
            Ok((vec![Object::Route(route)], refs))
        }
        CrdKind::TrafficPolicy => {
            let spec: TrafficPolicySpec = decode_spec(obj)?;
            let policy =
                weft_crds::validate_policy(name, namespace, &spec).map_err(|e| e.message())?;
            let refs = vec![policy.service.clone()];
            Ok((vec![Object::Policy(policy)], refs))
        }
        CrdKind::ExternalService => {
            let spec: ExternalServiceSpec = decode_spec(obj)?;
            let service = weft_crds::validate_external_service(name, namespace, &spec)
                .map_err(|e| e.message())?;
            let doc = RegistryDoc {
                services: vec![service],
                ..Default::default()
            };
            Ok((doc.into_objects(), Vec::new()))
        }
    }
}

fn decode_spec<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    let spec = obj
        .data
        .get("spec")
        .ok_or_else(|| "spec: missing".to_string())?;
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        format!("{field}: {}", e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn obj(kind: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.weft.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": "shop", "generation": 3, "resourceVersion": "7"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn valid_route_applies_with_refs() {
        let o = obj(
            "TrafficRoute",
            "pay-canary",
            serde_json::json!({"service": "pay.shop", "rules": [{"backends": [
                {"service": "pay.shop", "weight": 90}, {"service": "pay-v2.shop", "weight": 10}]}]}),
        );
        let (res, t) = evaluate(CrdKind::TrafficRoute, &o);
        let objs = res.unwrap();
        assert!(matches!(&objs[0], Object::Route(r) if r.name == "shop.pay-canary"));
        assert_eq!(t.generation, Some(3));
        assert_eq!(
            t.verdict,
            Verdict::Accepted {
                refs: vec!["pay.shop".into(), "pay.shop".into(), "pay-v2.shop".into()],
                objects: vec![weft_registry::ObjectKey::Route("shop.pay-canary".into())],
            }
        );
    }

    #[test]
    fn invalid_route_names_the_field() {
        let o = obj(
            "TrafficRoute",
            "bad",
            serde_json::json!({"service": "pay.shop", "rules": []}),
        );
        let (res, t) = evaluate(CrdKind::TrafficRoute, &o);
        let (key, reason) = res.unwrap_err();
        assert_eq!(key, "TrafficRoute/shop/bad");
        assert!(reason.starts_with("spec.rules:"), "{reason}");
        assert!(matches!(t.verdict, Verdict::Invalid(m) if m == reason));
        // A spec that does not even decode names the field too.
        let o = obj(
            "TrafficRoute",
            "bad2",
            serde_json::json!({"service": "pay.shop", "rules": [{"backends": [{"service": "x", "weight": "heavy"}]}]}),
        );
        let (res, _) = evaluate(CrdKind::TrafficRoute, &o);
        let (_, reason) = res.unwrap_err();
        assert!(
            reason.starts_with("spec.rules[0].backends[0].weight:"),
            "{reason}"
        );
    }

    #[test]
    fn external_service_has_static_endpoints() {
        let o = obj(
            "ExternalService",
            "db",
            serde_json::json!({"protocol": "grpc", "endpoints": [{"address": "192.0.2.1", "port": 5432}]}),
        );
        let (res, _) = evaluate(CrdKind::ExternalService, &o);
        let objs = res.unwrap();
        assert_eq!(objs.len(), 2);
        let o = obj(
            "ExternalService",
            "db",
            serde_json::json!({"endpoints": [{"address": "db.example.com", "port": 5432}]}),
        );
        let (_, reason) = evaluate(CrdKind::ExternalService, &o).0.unwrap_err();
        assert!(reason.starts_with("spec.endpoints[0].address:"), "{reason}");
    }
}
