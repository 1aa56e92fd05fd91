//! What an attempt's result means: the outcome reported to the balancer (outlier detection,
//! peak-EWMA) and whether the route's retry policy asks for another try.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use rand::Rng;
use weft_balance::Outcome;
use weft_sidecar_config::RetryOn;

use crate::errors::UpstreamError;

/// First backoff; Envoy's default base interval.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Backoff cap: Envoy's default of 10 x the base.
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// gRPC status code from the response headers (a trailers-only response).
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn grpc_name_code(name: &str) -> Option<u32> {
    Some(match name {
        "cancelled" => 1,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

const GRPC_UNAVAILABLE: u32 = 14;

fn is_gateway_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 502..=504)
}

/// Judges response headers.
pub(crate) fn judge_response(
    status: StatusCode,
    headers: &HeaderMap,
    latency: Duration,
    retry_on: Option<&RetryOn>,
) -> (Outcome, bool) {
    let grpc = grpc_status(headers);
    let outcome = if is_gateway_status(status) || grpc == Some(GRPC_UNAVAILABLE) {
        Outcome::GatewayFailure { latency }
    } else if status.is_server_error() {
        Outcome::ServerError { latency }
    } else {
        Outcome::Success { latency }
    };
    let retry = retry_on.is_some_and(|ro| {
        (ro.server_error_5xx && status.is_server_error())
            || (ro.gateway_error && is_gateway_status(status))
            || (ro.retriable_4xx && status == StatusCode::CONFLICT)
            || grpc.is_some_and(|code| {
                ro.grpc_statuses
                    .iter()
                    .any(|n| grpc_name_code(n) == Some(code))
            })
    });
    (outcome, retry)
}

/// Judges a failed attempt. Envoy's `5xx` and `gateway-error` include connect failures,
/// resets and per-try timeouts; `reset` includes refused streams.
pub(crate) fn judge_error(
    e: &UpstreamError,
    latency: Duration,
    retry_on: Option<&RetryOn>,
) -> (Outcome, bool) {
    let outcome = match e {
        UpstreamError::Request { .. } => Outcome::Cancelled,
        _ => Outcome::GatewayFailure { latency },
    };
    let retry = retry_on.is_some_and(|ro| {
        let broad = ro.server_error_5xx || ro.gateway_error;
        match e {
            UpstreamError::Connect { .. } => broad || ro.connect_failure,
            UpstreamError::RefusedStream { .. } => broad || ro.reset || ro.refused_stream,
            UpstreamError::Reset { .. } => broad || ro.reset,
            UpstreamError::Timeout { .. } => broad,
            UpstreamError::Request { .. } => false,
        }
    });
    (outcome, retry)
}

/// Fully jittered exponential backoff before retry number `retry` (1-based).
pub(crate) fn backoff(retry: u32) -> Duration {
    let exp = retry.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(250);
    // At least the base so two retries never fire back to back.
    let lo = ms.min(BACKOFF_BASE.as_millis() as u64);
    Duration::from_millis(rand::rng().random_range(lo..=ms))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ro() -> RetryOn {
        RetryOn {
            server_error_5xx: false,
            gateway_error: true,
            reset: false,
            connect_failure: true,
            retriable_4xx: true,
            refused_stream: false,
            grpc_statuses: vec!["unavailable".into()],
        }
    }

    #[test]
    fn statuses_map_to_outcomes_and_retries() {
        let h = HeaderMap::new();
        let l = Duration::from_millis(3);
        let (o, r) = judge_response(StatusCode::SERVICE_UNAVAILABLE, &h, l, Some(&ro()));
        assert_eq!(o, Outcome::GatewayFailure { latency: l });
        assert!(r);
        let (o, r) = judge_response(StatusCode::INTERNAL_SERVER_ERROR, &h, l, Some(&ro()));
        assert_eq!(o, Outcome::ServerError { latency: l });
        assert!(!r, "500 is not a gateway error");
        let (o, r) = judge_response(StatusCode::CONFLICT, &h, l, Some(&ro()));
        assert_eq!(o, Outcome::Success { latency: l });
        assert!(r);
        let (_, r) = judge_response(StatusCode::SERVICE_UNAVAILABLE, &h, l, None);
        assert!(!r, "no policy, no retry");
    }

    #[test]
    fn grpc_unavailable_is_a_gateway_failure_and_retriable() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        let l = Duration::from_millis(1);
        let (o, r) = judge_response(StatusCode::OK, &h, l, Some(&ro()));
        assert_eq!(o, Outcome::GatewayFailure { latency: l });
        assert!(r);
        h.insert("grpc-status", HeaderValue::from_static("13"));
        let (o, r) = judge_response(StatusCode::OK, &h, l, Some(&ro()));
        assert_eq!(o, Outcome::Success { latency: l });
        assert!(!r);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let b1 = backoff(1);
            assert_eq!(b1, BACKOFF_BASE);
            let b5 = backoff(5);
            assert!(b5 >= BACKOFF_BASE && b5 <= BACKOFF_MAX, "{b5:?}");
            assert!(backoff(40) <= BACKOFF_MAX);
        }
    }
}
