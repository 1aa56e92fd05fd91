//! Checks shared by the fuzz targets: what every registry value a source accepts must satisfy.

use weft_registry::Object;
use weft_registry::schema::{parse_endpoint, parse_policy, parse_route};

/// An accepted object is accepted again by the registry's own single-value validators (so no
/// source can let through what the schema refuses), and its key names it.
pub fn assert_object_valid(obj: &Object) {
    match obj {
        Object::Service { name, .. } => {
            assert!(
                weft_registry::schema::is_valid_name(name),
                "service {name:?}"
            );
        }
        Object::Instance {
            service,
            id,
            endpoint,
        } => {
            assert!(weft_registry::schema::is_valid_name(service), "{service:?}");
            assert!(!id.is_empty(), "an instance without an id");
            let json = serde_json::to_string(endpoint).expect("an endpoint serialises");
            match parse_endpoint("fuzz", &json) {
                Ok(again) => assert_eq!(&again, endpoint, "endpoint round trip"),
                Err(e) => panic!("accepted endpoint {json} is invalid: {e}"),
            }
        }
        Object::Route(r) => {
            let json = serde_json::to_string(r).expect("a route serialises");
            match parse_route("fuzz", &json) {
                Ok(again) => assert_eq!(&again, r, "route round trip"),
                Err(e) => panic!("accepted route {json} is invalid: {e}"),
            }
        }
        Object::Policy(p) => {
            let json = serde_json::to_string(p).expect("a policy serialises");
            match parse_policy("fuzz", &json) {
                Ok(again) => assert_eq!(&again, p, "policy round trip"),
                Err(e) => panic!("accepted policy {json} is invalid: {e}"),
            }
        }
    }
}

/// Objects of one source never share a key (the hub would silently keep one).
pub fn assert_keys_unique(objects: &[Object]) {
    let mut keys: Vec<_> = objects.iter().map(Object::key).collect();
    keys.sort();
    for pair in keys.windows(2) {
        assert_ne!(pair[0], pair[1], "two objects under one key");
    }
}

pub mod xds;
