//! Small constructors shared by the resource builders.

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::{Message, Name};

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
    fn pack_uses_full_type_url() {
        let any = pack(&u32v(7));
        assert_eq!(
            any.type_url,
            "type.googleapis.com/google.protobuf.UInt32Value"
        );
        assert_eq!(any.value, u32v(7).encode_to_vec());
    }
}
