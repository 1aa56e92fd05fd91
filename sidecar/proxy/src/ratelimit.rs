//! Local rate limiting: one token bucket per route or virtual host (`rate_limit_key`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weft_sidecar_config::TokenBucketConfig;

struct Bucket {
    config: TokenBucketConfig,
    tokens: u64,
    /// When the last whole fill happened; refills are counted from here.
    last_fill: Instant,
}

#[derive(Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

fn interval(config: &TokenBucketConfig) -> Duration {
    // Validated upstream (>= 50 ms); a zero here must not divide by zero.
    config.fill_interval.max(Duration::from_millis(1))
}

impl RateLimiter {
    /// Takes a token from `key`'s bucket. `Err(wait)`: empty, the next token is due in `wait`.
    pub(crate) fn try_acquire(
        &self,
        key: &str,
        config: &TokenBucketConfig,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = match buckets.get_mut(key) {
            // A changed limit starts a full bucket, as Envoy does on a config update.
            Some(b) if b.config == *config => b,
            _ => {
                buckets.insert(
                    key.to_string(),
                    Bucket {
                        config: config.clone(),
                        tokens: u64::from(config.max_tokens),
                        last_fill: now,
                    },
                );
                match buckets.get_mut(key) {
                    Some(b) => b,
                    None => return Ok(()),
                }
            }
        };
        let every = interval(config);
        let elapsed = now.saturating_duration_since(bucket.last_fill);
        let fills = elapsed.as_nanos() / every.as_nanos();
        if fills > 0 {
            let added = u64::try_from(fills)
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(config.tokens_per_fill));
            bucket.tokens = bucket
                .tokens
                .saturating_add(added)
                .min(u64::from(config.max_tokens));
            let advance = every.saturating_mul(u32::try_from(fills).unwrap_or(u32::MAX));
            bucket.last_fill = bucket.last_fill.checked_add(advance).unwrap_or(now);
        }
        if bucket.tokens > 0 {
            bucket.tokens -= 1;
            return Ok(());
        }
        let next = bucket.last_fill + every;
        Err(next.saturating_duration_since(now))
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cfg(max: u32, per_fill: u32, every_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(every_ms),
        }
    }

    #[test]
    fn burst_then_refill_by_elapsed_time() {
        let rl = RateLimiter::default();
        let c = cfg(2, 1, 1000);
        let t0 = Instant::now();
        assert!(rl.try_acquire("k", &c, t0).is_ok());
        assert!(rl.try_acquire("k", &c, t0).is_ok());
        let wait = rl.try_acquire("k", &c, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(retry_after_secs(wait), 1);
        let t1 = t0 + Duration::from_millis(999);
        assert!(rl.try_acquire("k", &c, t1).is_err());
        let t2 = t0 + Duration::from_millis(1500);
        assert!(rl.try_acquire("k", &c, t2).is_ok());
        assert!(rl.try_acquire("k", &c, t2).is_err());
        // Long idle refills to the burst only.
        let t3 = t0 + Duration::from_secs(100);
        assert!(rl.try_acquire("k", &c, t3).is_ok());
        assert!(rl.try_acquire("k", &c, t3).is_ok());
        assert!(rl.try_acquire("k", &c, t3).is_err());
        // Other keys have their own bucket.
        assert!(rl.try_acquire("other", &c, t3).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
