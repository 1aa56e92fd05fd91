//! Circuit-breaker counters of one cluster, kept across config updates.
//!
//! - `max_requests`: requests in flight to the cluster (counted until the response ends).
//! - `max_connections` (HTTP/1.1 clusters): a HTTP/1.1 connection carries one request at a
//!   time, so it is enforced as a semaphore of that many concurrent upstream attempts, and the
//!   pool keeps at most that many idle connections per endpoint. HTTP/2 clusters multiplex
//!   over one connection per endpoint, so the limit does not apply to them.
//! - `max_pending_requests`: attempts waiting for one of those connection slots.
//! - `max_retries` / `retry_budget`: retries in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use weft_sidecar_config::CircuitBreakerConfig;

/// Envoy's default `max_retries` when a cluster sets neither it nor a budget.
const DEFAULT_MAX_RETRIES: u64 = 3;

#[derive(Debug, Default)]
pub(crate) struct Breaker {
    requests: AtomicU64,
    retries: AtomicU64,
    pending: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Requests,
    Retries,
    Pending,
}

/// Releases one slot when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    breaker: Arc<Breaker>,
    counter: Counter,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker
            .counter(self.counter)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    fn counter(&self, c: Counter) -> &AtomicU64 {
        match c {
            Counter::Requests => &self.requests,
            Counter::Retries => &self.retries,
            Counter::Pending => &self.pending,
        }
    }

    fn try_take(self: &Arc<Self>, c: Counter, max: Option<u64>) -> Option<Slot> {
        let prev = self.counter(c).fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            breaker: Arc::clone(self),
            counter: c,
        };
        match max {
            Some(m) if prev >= m => None, // dropping `slot` gives the count back
            _ => Some(slot),
        }
    }

    pub(crate) fn try_request(self: &Arc<Self>, cb: &CircuitBreakerConfig) -> Option<Slot> {
        self.try_take(Counter::Requests, cb.max_requests.map(u64::from))
    }

    pub(crate) fn try_pending(self: &Arc<Self>, cb: &CircuitBreakerConfig) -> Option<Slot> {
        self.try_take(Counter::Pending, cb.max_pending_requests.map(u64::from))
    }

    /// A retry slot when the retry budget (or else `max_retries`) allows one more.
    pub(crate) fn try_retry(self: &Arc<Self>, cb: &CircuitBreakerConfig) -> Option<Slot> {
        let max = match &cb.retry_budget {
            // As in Envoy, a budget replaces max_retries.
            Some(b) => {
                let active = self.requests.load(Ordering::Acquire);
                let share = active.saturating_mul(u64::from(b.budget_percent)) / 100;
                share.max(u64::from(b.min_retry_concurrency))
            }
            None => cb.max_retries.map(u64::from).unwrap_or(DEFAULT_MAX_RETRIES),
        };
        self.try_take(Counter::Retries, Some(max))
    }

    pub(crate) fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "active_requests": self.requests.load(Ordering::Relaxed),
            "active_retries": self.retries.load(Ordering::Relaxed),
            "pending_requests": self.pending.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use weft_sidecar_config::RetryBudget;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let b = Arc::new(Breaker::default());
        let cb = CircuitBreakerConfig {
            max_requests: Some(2),
            ..Default::default()
        };
        let s1 = b.try_request(&cb);
        let s2 = b.try_request(&cb);
        assert!(s1.is_some() && s2.is_some());
        assert!(b.try_request(&cb).is_none());
        drop(s1);
        assert!(b.try_request(&cb).is_some());
    }

    #[test]
    fn retry_budget_scales_with_active_requests() {
        let b = Arc::new(Breaker::default());
        let cb = CircuitBreakerConfig {
            retry_budget: Some(RetryBudget {
                budget_percent: 50,
                min_retry_concurrency: 1,
            }),
            ..Default::default()
        };
        let reqs: Vec<_> = (0..4).map(|_| b.try_request(&cb)).collect();
        let r1 = b.try_retry(&cb);
        let r2 = b.try_retry(&cb);
        assert!(r1.is_some() && r2.is_some());
        assert!(b.try_retry(&cb).is_none());
        drop(reqs);
        drop((r1, r2));
        // Minimum concurrency with nothing in flight.
        assert!(b.try_retry(&cb).is_some());
    }

    #[test]
    fn default_max_retries_is_three() {
        let b = Arc::new(Breaker::default());
        let cb = CircuitBreakerConfig::default();
        let held: Vec<_> = (0..3).map(|_| b.try_retry(&cb)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(b.try_retry(&cb).is_none());
    }
}
