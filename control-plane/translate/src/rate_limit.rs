//! Local rate limits: Envoy's `envoy.filters.http.local_ratelimit` filter, configured per
//! virtual host (a service's `Policy.rate_limit`) or per route (a rule's `rate_limit`).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, RuntimeFractionalPercent,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, TokenBucket, fractional_percent::DenominatorType,
};
use envoy_types::pb::google::protobuf::Any;
use weft_registry::RateLimit;

use crate::util::{duration, pack, u32v};

/// The filter's name: the HTTP filter in the listener and the `typed_per_filter_config` key.
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
/// Envoy stats appear as `<stat_prefix>.http_local_rate_limit.rate_limited` and so on.
pub const LOCAL_RATE_LIMIT_STAT_PREFIX: &str = "weft_local_rate_limit";
const ENABLED_RUNTIME_KEY: &str = "weft_local_rate_limit_enabled";
const ENFORCED_RUNTIME_KEY: &str = "weft_local_rate_limit_enforced";
/// The header a limited response carries, telling the client when a token is due.
pub const RETRY_AFTER: &str = "retry-after";

/// The listener-level filter: no token bucket, and so (with `filter_enabled` unset, i.e. 0%)
/// inactive wherever no virtual host or route enables it. It is always present, so adding or
/// removing the first rate limit changes only routes, never the listener: a listener change
/// makes Envoy drain every connection on it. Envoy 1.40 accepts a LocalRateLimit without a
/// token bucket (checked with `envoy --mode validate`, and exercised by the tests in
/// tests/tests/envoy_policies.rs).
pub(crate) fn listener_filter() -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: LOCAL_RATE_LIMIT_STAT_PREFIX.to_string(),
        ..Default::default()
    }
}

/// `typed_per_filter_config` of a virtual host or route that `rl` limits. A single-entry map,
/// so its encoding is deterministic despite being a HashMap.
pub(crate) fn per_filter_config(rl: &RateLimit) -> HashMap<String, Any> {
    HashMap::from([(
        LOCAL_RATE_LIMIT_FILTER.to_string(),
        pack(&local_rate_limit(rl)),
    )])
}

pub(crate) fn local_rate_limit(rl: &RateLimit) -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: LOCAL_RATE_LIMIT_STAT_PREFIX.to_string(),
        token_bucket: Some(TokenBucket {
            max_tokens: rl.max_tokens(),
            tokens_per_fill: Some(u32v(rl.requests)),
            fill_interval: Some(duration(rl.per)),
        }),
        // Both must be set: a per-route config replaces the listener's, and an unset
        // percentage is 0%, i.e. "never check" / "check but never reject".
        filter_enabled: Some(always(ENABLED_RUNTIME_KEY)),
        filter_enforced: Some(always(ENFORCED_RUNTIME_KEY)),
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: RETRY_AFTER.to_string(),
                value: retry_after_secs(rl.per).to_string(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// 100%, overridable at runtime under `key` (an operator's kill switch without a redeploy).
fn always(key: &str) -> RuntimeFractionalPercent {
    RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        runtime_key: key.to_string(),
    }
}

/// Whole seconds until the bucket refills, rounded up and at least 1: `Retry-After` has
/// one-second resolution, and `0` would invite an immediate retry that is sure to fail.
fn retry_after_secs(per: std::time::Duration) -> u64 {
    let secs = per.as_secs() + u64::from(per.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(50)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(10)), 10);
    }

    #[test]
    fn bucket_is_burst_or_requests() {
        let mut rl = RateLimit {
            requests: 5,
            per: Duration::from_secs(10),
            burst: None,
        };
        let tb = local_rate_limit(&rl).token_bucket.unwrap();
        assert_eq!(tb.max_tokens, 5);
        assert_eq!(tb.tokens_per_fill, Some(u32v(5)));
        assert_eq!(tb.fill_interval, Some(duration(Duration::from_secs(10))));
        rl.burst = Some(12);
        assert_eq!(local_rate_limit(&rl).token_bucket.unwrap().max_tokens, 12);
    }

    #[test]
    fn listener_filter_has_no_bucket() {
        let f = listener_filter();
        assert!(f.token_bucket.is_none());
        assert!(f.filter_enabled.is_none());
        assert_eq!(f.stat_prefix, LOCAL_RATE_LIMIT_STAT_PREFIX);
    }
}
