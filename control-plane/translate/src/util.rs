//! Small constructors shared by the resource builders.

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
};
use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::{Message, Name};

/// How many fresh hashers [`ordered_map`] tries. Each try puts the keys in a random order, so
/// for the 2-3 keys it is used with, failing 1024 times in a row does not happen in practice.
const ORDERED_MAP_ATTEMPTS: usize = 1024;

/// Packs `msg` into an `Any` under its `type.googleapis.com/<full name>` URL.
pub(crate) fn pack<T: Message + Name>(msg: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// A protobuf Duration. Saturates instead of wrapping: registry durations are small, and a
/// wrapped (negative) duration would be rejected by every client.
pub(crate) fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // subsec_nanos() < 1e9, which always fits an i32.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn millis(ms: u64) -> Duration {
    duration(std::time::Duration::from_millis(ms))
}

pub(crate) fn u32v(value: u32) -> UInt32Value {
    UInt32Value { value }
}

pub(crate) fn percent(value: u32) -> Percent {
    Percent {
        value: f64::from(value),
    }
}

/// A `HashMap` whose iteration order is its keys' sorted order, for map fields of the generated
/// protos (`google.protobuf.Struct.fields`, ...).
///
/// prost encodes a HashMap in iteration order, and std's HashMap iterates in an order that
/// depends on its randomly seeded hasher, so a map of two or more entries would encode to
/// different bytes in every process and for every fresh value: the content-hash versions would
/// change on every translation and every restart. The generated types fix the map type (std
/// HashMap with RandomState), so instead of choosing the hasher this tries fresh ones (each
/// `HashMap::new` gets a new seed) until the resulting layout iterates in sorted order. A map
/// keeps its layout while unmodified and `Clone` copies it, so the encoding is then the same
/// as a BTreeMap's. Meant for a few keys: with `n` keys a try succeeds with probability `1/n!`.
/// Should every try fail (not seen in practice), the map is still correct, only its encoding
/// is not canonical.
pub(crate) fn ordered_map<V: Clone>(entries: &BTreeMap<String, V>) -> HashMap<String, V> {
    let build = || -> HashMap<String, V> {
        entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    if entries.len() < 2 {
        return build();
    }
    let mut map = build();
    for _ in 1..ORDERED_MAP_ATTEMPTS {
        if map.keys().eq(entries.keys()) {
            break;
        }
        map = build();
    }
    map
}

/// "Fetch this over the same ADS stream, v3": the only config source gRPC accepts besides
/// `self`, and what lets Envoy (bootstrapped with ADS) follow CDS -> EDS and LDS -> RDS.
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_splits_seconds_and_nanos() {
        let d = duration(std::time::Duration::from_millis(1_250));
        assert_eq!((d.seconds, d.nanos), (1, 250_000_000));
        assert_eq!(millis(25).nanos, 25_000_000);
    }

    #[test]
    fn ordered_map_iterates_and_encodes_in_key_order() {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let entries: BTreeMap<String, Value> = ["zeta", "alpha", "mid"]
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::NumberValue(i as f64)),
                    },
                )
            })
            .collect();
        let first = Struct {
            fields: ordered_map(&entries),
        }
        .encode_to_vec();
        // Fresh maps get fresh hasher seeds; without the reordering roughly 5 in 6 of these
        // would encode differently.
        for _ in 0..200 {
            let m = ordered_map(&entries);
            assert!(m.keys().eq(entries.keys()));
            assert!(m.clone().keys().eq(entries.keys()), "clone keeps the order");
            assert_eq!(Struct { fields: m }.encode_to_vec(), first);
        }
        // The canonical encoding: one map entry after another in key order, i.e. the
        // single-entry Structs' encodings concatenated.
        let canonical: Vec<u8> = entries
            .iter()
            .flat_map(|(k, v)| {
                Struct {
                    fields: HashMap::from([(k.clone(), v.clone())]),
                }
                .encode_to_vec()
            })
            .collect();
        assert_eq!(canonical, first);
    }

    #[test]
    fn pack_uses_full_type_url() {
        let any = pack(&u32v(7));
        assert_eq!(
            any.type_url,
            "type.googleapis.com/google.protobuf.UInt32Value"
        );
        assert_eq!(any.value, u32v(7).encode_to_vec());
    }
}
