//! The etcd source: one key and value as a relist or watch event decodes them.
//!
//! Input: the first line is the key, the rest the value (prefix `/weft`).
//! Invariants: no panic; a refusal names the key and a reason, and the object the key would
//! name exactly when the key's shape is valid; an accepted object validates again and is the
//! one its key names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::assert_object_valid;
use weft_registry::kv::{Instances, decode_key};
use weft_source_etcd::decode_pair;

const PREFIX: &str = "/weft";

fuzz_target!(|data: &[u8]| {
    let (key, value) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let shape = std::str::from_utf8(key)
        .ok()
        .and_then(|k| decode_key(PREFIX, k, Instances::Held).ok());
    match decode_pair(PREFIX, key, value) {
        Ok(obj) => {
            assert_object_valid(&obj);
            let shape = shape.expect("an accepted key has a valid shape");
            assert_eq!(obj.key(), shape.object_key(), "object differs from its key");
        }
        Err((named, reason, object)) => {
            assert_eq!(
                named,
                String::from_utf8_lossy(key),
                "error names another key"
            );
            assert!(!reason.is_empty(), "a refusal without a reason");
            assert_eq!(object, shape.map(|s| s.object_key()));
        }
    }
});
