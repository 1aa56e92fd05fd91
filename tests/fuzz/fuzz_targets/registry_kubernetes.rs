//! The Kubernetes source's pure conversions: custom resources (`crd::evaluate`) and a Service
//! with its EndpointSlices (`discovery::service_objects`) into registry objects.
//!
//! Input: the first line is `crd` or `service [port-name]`; the rest YAML or JSON: for `crd`
//! one object, for `service` a list whose first item is the Service and the rest its slices.
//! Invariants: no panic; a refused custom resource is reported under
//! `<Kind>/<namespace>/<name>` with a reason and an `Invalid` status verdict; accepted objects
//! validate again as registry values, and instances belong to the service they came with.
#![no_main]

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use weft_fuzz::assert_object_valid;
use weft_registry::Object;
use weft_source_kubernetes::crd::{error_key, evaluate};
use weft_source_kubernetes::discovery::{registry_name, service_objects};
use weft_source_kubernetes::{CrdKind, Verdict};

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(head), Ok(body)) = (std::str::from_utf8(head), std::str::from_utf8(body)) else {
        return;
    };
    let Ok(value) = serde_yaml_ng::from_str::<serde_json::Value>(body) else {
        return;
    };
    match head.split_once(' ').unwrap_or((head, "")) {
        ("service", flag) => service(value, (!flag.is_empty()).then_some(flag)),
        _ => crd(value),
    }
});

fn crd(value: serde_json::Value) {
    let Ok(obj) = serde_json::from_value::<DynamicObject>(value) else {
        return;
    };
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    for kind in [
        CrdKind::TrafficRoute,
        CrdKind::TrafficPolicy,
        CrdKind::ExternalService,
    ] {
        let (result, target) = evaluate(kind, &obj);
        assert_eq!(target.kind, kind);
        assert_eq!(
            (target.namespace.as_str(), target.name.as_str()),
            (&*ns, &*name)
        );
        match (result, &target.verdict) {
            (
                Ok(objects),
                Verdict::Accepted {
                    refs,
                    objects: keys,
                },
            ) => {
                assert!(!objects.is_empty(), "an accepted {kind:?} gave nothing");
                objects.iter().for_each(assert_object_valid);
                // `Programmed` is judged on these keys: every object it became except
                // instances, no more and no fewer.
                let want: Vec<_> = objects
                    .iter()
                    .map(Object::key)
                    .filter(|k| !matches!(k, weft_registry::ObjectKey::Instance { .. }))
                    .collect();
                assert_eq!(keys, &want, "status keys and objects disagree");
                for r in refs {
                    assert!(weft_registry::schema::is_valid_name(r), "ref {r:?}");
                }
            }
            (Err((key, reason)), Verdict::Invalid(message)) => {
                assert_eq!(key, error_key(kind, &ns, &name));
                assert!(!reason.is_empty());
                assert_eq!(&reason, message, "status and error disagree");
            }
            (r, v) => panic!("result {r:?} with verdict {v:?}"),
        }
    }
}

fn service(value: serde_json::Value, flag: Option<&str>) {
    let serde_json::Value::Array(items) = value else {
        return;
    };
    let mut items = items.into_iter();
    let Some(Ok(svc)) = items.next().map(serde_json::from_value::<Service>) else {
        return;
    };
    let slices: Vec<EndpointSlice> = items
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    match service_objects(&svc, &refs, flag) {
        Ok(objects) => {
            let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else {
                panic!("a Service without name or namespace was accepted");
            };
            let expected = registry_name(name, ns);
            for obj in &objects {
                assert_object_valid(obj);
                match obj {
                    Object::Service { name, .. } => assert_eq!(name, &expected),
                    Object::Instance { service, .. } => assert_eq!(service, &expected),
                    other => panic!("a Service gave {other:?}"),
                }
            }
        }
        Err(e) => assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}"),
    }
}
