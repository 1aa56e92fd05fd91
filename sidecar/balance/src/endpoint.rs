//! Per-endpoint mutable state: in-flight count, peak-EWMA latency and outlier bookkeeping.
//!
//! Lives behind an `Arc` so a [`crate::Pick`] can settle its request even after the endpoint
//! left the membership.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::OutlierConfig;

/// Time constant of the EWMA decay (linkerd's default).
pub(crate) const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Seed for new endpoints when the cluster has no observations yet (linkerd's default RTT).
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Latency a gateway failure counts as at least: a connect failure is usually fast, and a
/// fast failure must not make the endpoint look attractive.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) state: Mutex<EpState>,
}

impl Endpoint {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(EpState::new()),
        }
    }
}

#[derive(Debug)]
pub(crate) struct EpState {
    pub(crate) in_flight: u64,
    pub(crate) ewma: PeakEwma,
    pub(crate) active_healthy: Option<bool>,
    /// Smooth weighted round robin's running weight.
    pub(crate) wrr_current: i64,
    pub(crate) consecutive_5xx: u32,
    pub(crate) consecutive_gateway: u32,
    /// Times ejected; drives the ejection time and decays while the endpoint stays in.
    pub(crate) ejections: u32,
    pub(crate) ejected_until: Option<Instant>,
    /// Start of the current un-ejected period not yet credited to the ejection-count decay.
    pub(crate) decay_anchor: Option<Instant>,
}

impl EpState {
    fn new() -> Self {
        Self {
            in_flight: 0,
            ewma: PeakEwma::new(),
            active_healthy: None,
            wrr_current: 0,
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ejections: 0,
            ejected_until: None,
            decay_anchor: None,
        }
    }

    /// Ends an expired ejection and credits the ejection-count decay: one ejection forgiven per
    /// full `base_ejection_time` spent un-ejected (Envoy's decay, made lazy since time is only
    /// known when we are called).
    pub(crate) fn refresh(&mut self, now: Instant, outlier: Option<&OutlierConfig>) {
        if let Some(end) = self.ejected_until
            && now >= end
        {
            self.ejected_until = None;
            self.decay_anchor = Some(end);
        }
        if self.ejected_until.is_some() || self.ejections == 0 {
            return;
        }
        let Some(cfg) = outlier else { return };
        let base = cfg.base_ejection_time;
        if base.is_zero() {
            self.ejections = 0;
            self.decay_anchor = None;
            return;
        }
        let anchor = *self.decay_anchor.get_or_insert(now);
        let periods = now.saturating_duration_since(anchor).as_nanos() / base.as_nanos();
        if periods == 0 {
            return;
        }
        let forgiven = u32::try_from(periods).unwrap_or(u32::MAX);
        self.ejections = self.ejections.saturating_sub(forgiven);
        self.decay_anchor = if self.ejections == 0 {
            None
        } else {
            // Only reached with forgiven < ejections, so the multiplication is small.
            base.checked_mul(forgiven)
                .and_then(|d| anchor.checked_add(d))
        };
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Whether the failure counters reached a threshold of `cfg`.
    pub(crate) fn should_eject(&self, cfg: &OutlierConfig) -> bool {
        let hit = |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| count >= t.max(1));
        hit(self.consecutive_5xx, cfg.consecutive_5xx)
            || hit(self.consecutive_gateway, cfg.consecutive_gateway_failure)
    }

    pub(crate) fn eject(&mut self, now: Instant, cfg: &OutlierConfig) {
        self.ejections = self.ejections.saturating_add(1);
        let cap = cfg.max_ejection_time.max(cfg.base_ejection_time);
        let time = cfg
            .base_ejection_time
            .checked_mul(self.ejections)
            .map_or(cap, |t| t.min(cap));
        self.ejected_until = Some(now.checked_add(time).unwrap_or(now));
        self.decay_anchor = None;
        self.reset_counters();
    }

    pub(crate) fn reset_counters(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
    }
}

/// Peak-EWMA latency estimate as linkerd/tower: a latency above the estimate replaces it at
/// once; below it, the estimate moves towards it with weight depending on the time since the
/// previous observation. Between observations the estimate relaxes back towards the seed, so an
/// endpoint that was slow once is retried eventually instead of being shunned forever.
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma {
    est_ns: f64,
    /// When `est_ns` was last set; it decays towards zero from there.
    at: Option<Instant>,
    observed: bool,
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
}

impl PeakEwma {
    pub(crate) fn new() -> Self {
        Self {
            est_ns: 0.0,
            at: None,
            observed: false,
        }
    }

    /// Kept for the pick path's symmetry; an unobserved endpoint has no clock to start.
    pub(crate) fn touch(&mut self, _now: Instant) {}

    pub(crate) fn has_observations(&self) -> bool {
        self.observed
    }

    /// Estimate at `now`, in nanoseconds. An endpoint never observed costs `prior` (the
    /// cluster's current median): a fixed seed would either make it look free and flood it, or,
    /// once its peers had answered faster than the seed, make it lose every comparison and never
    /// be tried at all. Observed estimates decay towards zero between observations (as tower's),
    /// so an endpoint that was slow once, or simply idle, is eventually probed again.
    pub(crate) fn get(&self, now: Instant, prior: f64) -> f64 {
        match (self.observed, self.at) {
            (true, Some(at)) => self.est_ns * decay_weight(now.saturating_duration_since(at)),
            _ => prior,
        }
    }

    pub(crate) fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_secs_f64() * 1e9;
        if !self.observed {
            // The first observation replaces the prior outright: it is the only real data.
            self.est_ns = rtt_ns;
        } else {
            let current = self.get(now, rtt_ns);
            if rtt_ns > current {
                self.est_ns = rtt_ns;
            } else {
                let elapsed = self
                    .at
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let w = decay_weight(elapsed);
                self.est_ns = current * w + rtt_ns * (1.0 - w);
            }
        }
        self.observed = true;
        // Concurrent finishers may report slightly older instants; never move the clock back.
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }
}
