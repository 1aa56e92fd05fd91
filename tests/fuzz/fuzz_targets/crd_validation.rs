//! weft-crds: decoding and validating TrafficRoute / TrafficPolicy / ExternalService objects.
//!
//! Input: one object as YAML or JSON (JSON is YAML). Its `kind` picks the type; any other
//! kind is tried as all three.
//! Invariants: no panic; an error names the object's kind, namespace and name and at least
//! one field under `spec` or `metadata` (or `.`/a path for decoding); what validates is
//! named `<namespace>.<name>` (services `<name>.<namespace>`) and validates again as a
//! registry value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_crds::{
    ExternalService, TrafficPolicy, TrafficRoute, ValidationError, decode, registry_name,
    service_name,
};
use weft_fuzz::assert_object_valid;
use weft_registry::{Object, RegistryDoc};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_yaml_ng::from_str::<serde_json::Value>(text) else {
        return;
    };
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (ns, name) = (meta("namespace"), meta("name"));
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    let all = !matches!(kind, "TrafficRoute" | "TrafficPolicy" | "ExternalService");

    if all || kind == "TrafficRoute" {
        match decode::<TrafficRoute>(value.clone()) {
            Ok(obj) => match obj.validate() {
                Ok(route) => {
                    assert_eq!(route.name, registry_name(&ns, &name));
                    assert_object_valid(&Object::Route(route));
                }
                Err(e) => check_error(&e, "TrafficRoute", &ns, &name, true),
            },
            Err(e) => check_error(&e, "TrafficRoute", &ns, &name, false),
        }
    }
    if all || kind == "TrafficPolicy" {
        match decode::<TrafficPolicy>(value.clone()) {
            Ok(obj) => match obj.validate() {
                Ok(policy) => {
                    assert_eq!(policy.name, registry_name(&ns, &name));
                    assert_object_valid(&Object::Policy(policy));
                }
                Err(e) => check_error(&e, "TrafficPolicy", &ns, &name, true),
            },
            Err(e) => check_error(&e, "TrafficPolicy", &ns, &name, false),
        }
    }
    if all || kind == "ExternalService" {
        match decode::<ExternalService>(value.clone()) {
            Ok(obj) => match obj.validate() {
                Ok(service) => {
                    assert_eq!(service.name, service_name(&ns, &name));
                    let doc = RegistryDoc {
                        services: vec![service],
                        ..RegistryDoc::default()
                    };
                    let json = serde_json::to_string(&doc).expect("a document serialises");
                    if let Err(e) = weft_registry::parse_document("fuzz", &json) {
                        panic!("an accepted ExternalService is an invalid document: {e}");
                    }
                    doc.into_objects().iter().for_each(assert_object_valid);
                }
                Err(e) => check_error(&e, "ExternalService", &ns, &name, true),
            },
            Err(e) => check_error(&e, "ExternalService", &ns, &name, false),
        }
    }
});

fn check_error(e: &ValidationError, kind: &str, ns: &str, name: &str, validated: bool) {
    assert_eq!(e.kind, kind);
    assert_eq!(e.namespace, ns);
    assert_eq!(e.name, name);
    assert!(!e.problems.is_empty(), "an error without a problem");
    for p in &e.problems {
        assert!(!p.reason.is_empty(), "{p:?}");
        if validated {
            assert!(
                p.field == "spec" || p.field.starts_with("spec.") || p.field == "metadata.name",
                "validation problem outside the object: {p:?}"
            );
        } else {
            assert!(!p.field.is_empty(), "{p:?}");
        }
    }
    // Display has one line per problem, each naming the object (names and reasons may
    // themselves hold line breaks, so look for each, not at line counts).
    let text = e.to_string();
    for p in &e.problems {
        let line = format!("{kind} {ns}/{name}: {}: {}", p.field, p.reason);
        assert!(text.contains(&line), "{line:?} missing from {text:?}");
    }
}
