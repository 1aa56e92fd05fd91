//! The Consul source: health (catalog) bodies and KV bodies as the source decodes them.
//!
//! Input: the first line says what the rest is: `health <service>` (a
//! `/v1/health/service/<service>` body) or `kv` (a `/v1/kv/weft?recurse` body).
//! Invariants: no panic; a refused entry is named (`health/<service>/<node>/<id>` or its KV
//! key) with a reason; accepted objects validate again and are what their key names; the
//! stricter warning mapping never makes an instance healthier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::assert_object_valid;
use weft_registry::kv::{Instances, decode_key};
use weft_registry::{Health, Object};
use weft_source_consul::{WarningAs, decode_health_body, decode_kv_body};

const PREFIX: &str = "weft";

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    match head.split_once(' ') {
        Some(("health", service)) => health(service, body),
        _ => kv(body),
    }
});

fn health(service: &str, body: &[u8]) {
    // The source checks the watched service's name before decoding its entries.
    if !weft_registry::schema::is_valid_name(service) {
        return;
    }
    let Ok(lenient) = decode_health_body(service, body, WarningAs::Healthy) else {
        return;
    };
    let strict = decode_health_body(service, body, WarningAs::Unhealthy)
        .expect("the same body decodes whatever the warning mapping");
    assert_eq!(lenient.len(), strict.len());
    for (l, s) in lenient.iter().zip(&strict) {
        match (l, s) {
            (Ok(l), Ok(s)) => {
                for obj in [l, s] {
                    assert_object_valid(obj);
                    let Object::Instance { service: svc, .. } = obj else {
                        panic!("a health entry became {obj:?}");
                    };
                    assert_eq!(svc, service);
                }
                if let (
                    Object::Instance { endpoint: le, .. },
                    Object::Instance { endpoint: se, .. },
                ) = (l, s)
                    && le.health == Health::Unhealthy
                {
                    assert_eq!(se.health, Health::Unhealthy);
                }
            }
            (Err((lk, lr)), Err((sk, _))) => {
                assert_eq!(lk, sk);
                assert!(lk.starts_with(&format!("health/{service}/")), "{lk}");
                assert!(!lr.is_empty());
            }
            // Health never decides whether an entry is usable.
            _ => panic!("warning mapping changed validity: {l:?} vs {s:?}"),
        }
    }
}

fn kv(body: &[u8]) {
    let Ok(results) = decode_kv_body(PREFIX, body) else {
        return;
    };
    // serde_json skips fields the pairs ignore without checking them (a lone surrogate in
    // one), where a `Value` refuses them: compare only when both decode.
    let Ok(raw) = serde_json::from_slice::<Vec<serde_json::Value>>(body) else {
        return;
    };
    assert_eq!(raw.len(), results.len());
    for (pair, result) in raw.iter().zip(results) {
        let key = pair["Key"].as_str().expect("a decoded pair has a Key");
        match result {
            Ok(Some(obj)) => {
                assert_object_valid(&obj);
                assert!(
                    !matches!(obj, Object::Instance { .. }),
                    "KV never holds instances"
                );
                let shape = decode_key(PREFIX, key, Instances::Elsewhere)
                    .expect("an accepted key has a valid shape");
                assert_eq!(obj.key(), shape.object_key());
            }
            Ok(None) => assert!(key.ends_with('/'), "only folder keys are skipped: {key}"),
            Err((named, reason)) => {
                assert_eq!(named, key);
                assert!(!reason.is_empty());
            }
        }
    }
}
