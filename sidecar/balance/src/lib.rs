//! Client-side load balancing for one upstream cluster: which endpoint gets the next request.
//!
//! What it does: holds a cluster's endpoints with their per-endpoint state (in-flight requests,
//! peak-EWMA latency, active-health verdict, outlier ejections) and picks one per request with
//! the cluster's [`Algorithm`]: round robin, smooth weighted round robin, random, least request
//! (power of two choices), P2C over peak-EWMA latency, ring hash and Maglev. It prefers the
//! local zone and spills over to other zones when too few endpoints are available there, and
//! like Envoy ignores health entirely below a panic threshold rather than overloading the few
//! healthy endpoints left.
//!
//! What it does not do: any I/O. It never opens a connection or sleeps; time is passed in
//! (`Instant`) so tests drive it deterministically. Requests report their outcome through the
//! [`Pick`] guard; the proxy decides what a failure is. It does not retry, time out or
//! health-check by itself: active health verdicts come in through
//! [`Balancer::set_active_health`], membership through [`Balancer::update`].
//!
//! Notes on the algorithms:
//! - Peak EWMA follows linkerd/tower (10 s time constant); between observations the estimate
//!   decays towards zero, so an endpoint that was slow once, or idle, is eventually tried again.
//!   An endpoint never observed costs the cluster's current median estimate (30 ms when nothing
//!   is observed yet): neither free (flooded) nor dearer than every tried peer (never tried).
//!   A gateway failure counts as at least 1 s of latency.
//! - Ring hash and Maglev tables are built over the non-draining members on membership change
//!   only; a lookup landing on an unusable (unhealthy, ejected, excluded, other-zone) member
//!   walks on to the next usable entry, so other members' keys never move. The ring gives each
//!   member a fixed 512 entries per unit of weight (Envoy scales by the lightest member
//!   instead), so one member leaving moves only its own keys.
//! - Outlier ejection counts decay by one per `base_ejection_time` spent un-ejected.
//!
//! ## Interface contract (shared with weft-sidecar-config and weft-proxy; keep it stable)

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod endpoint;
mod hashing;
#[cfg(test)]
mod tests;

use endpoint::{DEFAULT_RTT, Endpoint, EpState, FAILURE_PENALTY};
use hashing::{HashMember, HashTable};

/// Health of an endpoint as the registry (EDS) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointHealth {
    #[default]
    Healthy,
    Unhealthy,
    /// Finishing in-flight work: never picked for new requests, even in panic mode.
    Draining,
}

/// One endpoint as discovery describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    /// Relative weight, >= 1.
    pub weight: u32,
    pub zone: Option<String>,
    pub health: EndpointHealth,
}

/// The picking algorithm of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    /// Smooth weighted round robin (nginx's): interleaves, never bursts one endpoint.
    WeightedRoundRobin,
    Random,
    /// Power of two choices over in-flight requests (weights respected by the draw).
    LeastRequest,
    /// Power of two choices over peak-EWMA latency x (in-flight + 1). The default.
    PeakEwma,
    /// Ketama-style ring; `min_ring_size` entries at least (Envoy default 1024).
    RingHash {
        min_ring_size: u64,
    },
    /// Maglev lookup table of `table_size` entries (a prime; Envoy default 65537).
    Maglev {
        table_size: u64,
    },
}

impl Algorithm {
    /// Whether the algorithm picks by the request's hash.
    pub fn is_consistent_hash(&self) -> bool {
        matches!(self, Algorithm::RingHash { .. } | Algorithm::Maglev { .. })
    }
}

/// Zone preference and panic behaviour.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ZoneConfig {
    /// This client's zone; `None` disables zone preference.
    pub local_zone: Option<String>,
    /// Zone preference on/off (policy `zone_aware.enabled`, default true).
    pub enabled: bool,
    /// Stay in the local zone while at least this percent of its endpoints are available
    /// (healthy, not ejected, not draining); below it, pick over every zone. Default 70.
    pub min_healthy_percent: u32,
    /// When fewer than this percent of the candidate endpoints are available, ignore health
    /// and ejections (but never pick draining endpoints), as Envoy's healthy_panic_threshold.
    /// 0 disables panic mode. Default 50.
    pub panic_threshold: u32,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            local_zone: None,
            enabled: true,
            min_healthy_percent: 70,
            panic_threshold: 50,
        }
    }
}

/// Passive outlier detection, Envoy's consecutive-failure flavour.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutlierConfig {
    /// Eject after this many consecutive 5xx (including gateway failures). `None`: off.
    pub consecutive_5xx: Option<u32>,
    /// Eject after this many consecutive gateway failures (connect failure, reset, 502/503/504).
    pub consecutive_gateway_failure: Option<u32>,
    /// Ejection time = base_ejection_time x number of times ejected so far (capped at
    /// `max_ejection_time`); an endpoint that stays healthy has its count decay back.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// At most this percent of the cluster's endpoints ejected at once (at least one may be
    /// ejected whatever the percent, as in Envoy).
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// How a request to a picked endpoint ended, as the proxy judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any non-5xx response.
    Success { latency: Duration },
    /// 500, 501, 505..: counts towards consecutive_5xx only.
    ServerError { latency: Duration },
    /// Connect failure, reset, timeout, 502/503/504: counts towards both thresholds.
    GatewayFailure { latency: Duration },
    /// The request was abandoned (client went away, local timeout before any byte):
    /// releases the in-flight slot, says nothing about the endpoint.
    Cancelled,
}

/// What `/debug/endpoints` shows for one endpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointStatus {
    pub addr: SocketAddr,
    pub zone: Option<String>,
    pub weight: u32,
    pub health: EndpointHealth,
    /// Verdict of active health checking; `None` when the cluster has no active checks.
    pub active_healthy: Option<bool>,
    pub in_flight: u64,
    /// Current peak-EWMA latency estimate in milliseconds.
    pub ewma_ms: f64,
    pub ejected: bool,
    /// Times ejected (drives the growing ejection time).
    pub ejections: u32,
    /// Milliseconds until the ejection ends, when ejected.
    pub ejected_for_ms: Option<u64>,
}

/// Locks ignoring poisoning: every critical section leaves the state consistent between
/// statements, so a panic elsewhere must not take the whole cluster down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Result of [`Balancer::pick`]. Report the outcome with [`Pick::finish`]; dropping it
/// unfinished counts as [`Outcome::Cancelled`].
pub struct Pick {
    addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    cluster: Arc<Mutex<Inner>>,
    settled: bool,
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("addr", &self.addr)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records the request's outcome (latency into the EWMA, failures into outlier detection)
    /// and releases the in-flight slot.
    pub fn finish(mut self, outcome: Outcome, now: Instant) {
        self.settled = true;
        let mut inner = lock(&self.cluster);
        inner.settle(&self.endpoint, outcome, now);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.settled {
            let mut st = lock(&self.endpoint.state);
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

/// One cluster's balancer. Cheap to share (`Arc<Balancer>`); every method takes `&self` and is
/// safe to call from many tasks at once.
///
/// ```
/// use std::time::{Duration, Instant};
/// use weft_balance::{Algorithm, Balancer, EndpointHealth, EndpointSpec, Outcome, ZoneConfig};
///
/// let lb = Balancer::new(Algorithm::PeakEwma, ZoneConfig::default(), None);
/// lb.update(vec![
///     EndpointSpec {
///         addr: "10.0.0.1:8080".parse().unwrap(),
///         weight: 1,
///         zone: None,
///         health: EndpointHealth::Healthy,
///     },
///     EndpointSpec {
///         addr: "10.0.0.2:8080".parse().unwrap(),
///         weight: 1,
///         zone: None,
///         health: EndpointHealth::Draining,
///     },
/// ]);
/// let now = Instant::now();
/// let pick = lb.pick(None, &[], now).expect("one endpoint can take traffic");
/// assert_eq!(pick.addr(), "10.0.0.1:8080".parse().unwrap());
/// pick.finish(Outcome::Success { latency: Duration::from_millis(3) }, now);
/// assert_eq!(lb.available(now), 1);
/// ```
pub struct Balancer {
    shared: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.shared);
        f.debug_struct("Balancer")
            .field("algorithm", &inner.algorithm)
            .field("endpoints", &inner.members.len())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    pub fn new(algorithm: Algorithm, zone: ZoneConfig, outlier: Option<OutlierConfig>) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Inner {
                algorithm,
                zone,
                outlier,
                members: Vec::new(),
                table: None,
                rr_next: 0,
                rng: SmallRng::from_rng(&mut rand::rng()),
            })),
        }
    }

    /// Reseeds the random source (random draws, P2C candidates, hashless consistent-hash
    /// picks) so tests can reproduce a run exactly.
    pub fn seed_rng(&self, seed: u64) {
        lock(&self.shared).rng = SmallRng::seed_from_u64(seed);
    }

    /// Replaces the settings, keeping per-endpoint state.
    ///
    /// Turning outlier detection off lifts current ejections (and forgets failure counts), as
    /// nothing would otherwise account for them.
    pub fn set_config(
        &self,
        algorithm: Algorithm,
        zone: ZoneConfig,
        outlier: Option<OutlierConfig>,
    ) {
        let mut inner = lock(&self.shared);
        let rebuild = inner.algorithm != algorithm;
        if outlier.is_none() {
            for m in &inner.members {
                let mut st = lock(&m.endpoint.state);
                st.ejected_until = None;
                st.decay_anchor = None;
                st.ejections = 0;
                st.reset_counters();
            }
        }
        inner.algorithm = algorithm;
        inner.zone = zone;
        inner.outlier = outlier;
        if rebuild {
            inner.rebuild_table();
        }
    }

    /// Replaces the membership. Endpoints that stay (same address) keep their state (EWMA,
    /// in-flight, ejection); new ones are unobserved, costing the cluster's median estimate
    /// until their first response (see the crate notes on peak EWMA).
    ///
    /// A repeated address keeps its first spec; weight 0 counts as 1.
    pub fn update(&self, endpoints: Vec<EndpointSpec>) {
        let mut inner = lock(&self.shared);
        let mut old: std::collections::HashMap<SocketAddr, Arc<Endpoint>> = inner
            .members
            .drain(..)
            .map(|m| (m.spec.addr, m.endpoint))
            .collect();
        let mut members: Vec<Member> = Vec::with_capacity(endpoints.len());
        let mut seen = std::collections::HashSet::new();
        for mut spec in endpoints {
            if !seen.insert(spec.addr) {
                continue;
            }
            spec.weight = spec.weight.max(1);
            let endpoint = old
                .remove(&spec.addr)
                .unwrap_or_else(|| Arc::new(Endpoint::new()));
            members.push(Member { spec, endpoint });
        }
        members.sort_by_key(|m| m.spec.addr);
        inner.members = members;
        inner.rebuild_table();
    }

    /// Verdict of an active health check for `addr` (unknown addresses are ignored).
    pub fn set_active_health(&self, addr: SocketAddr, healthy: bool) {
        let inner = lock(&self.shared);
        if let Some(m) = inner.member(addr) {
            lock(&m.endpoint.state).active_healthy = Some(healthy);
        }
    }

    /// Picks an endpoint. `hash` is the request's hash for ring hash / Maglev (ignored by other
    /// algorithms; when absent a consistent-hash cluster picks at random). `exclude` lists
    /// endpoints already tried by this request's earlier attempts (avoided when possible).
    /// `None` when no endpoint can take traffic.
    ///
    /// When every candidate of the chosen zone set is excluded, available endpoints of other
    /// zones are preferred over repeating an excluded one.
    pub fn pick(&self, hash: Option<u64>, exclude: &[SocketAddr], now: Instant) -> Option<Pick> {
        let mut inner = lock(&self.shared);
        let index = inner.choose(hash, exclude, now)?;
        let member = &inner.members[index];
        {
            let mut st = lock(&member.endpoint.state);
            st.in_flight += 1;
            st.ewma.touch(now);
        }
        Some(Pick {
            addr: member.spec.addr,
            endpoint: Arc::clone(&member.endpoint),
            cluster: Arc::clone(&self.shared),
            settled: false,
        })
    }

    /// Per-endpoint state for `/debug/endpoints`, sorted by address.
    pub fn status(&self, now: Instant) -> Vec<EndpointStatus> {
        let inner = lock(&self.shared);
        let prior = inner.median_ewma_ns(now);
        inner
            .members
            .iter()
            .map(|m| {
                let mut st = lock(&m.endpoint.state);
                st.refresh(now, inner.outlier.as_ref());
                EndpointStatus {
                    addr: m.spec.addr,
                    zone: m.spec.zone.clone(),
                    weight: m.spec.weight,
                    health: m.spec.health,
                    active_healthy: st.active_healthy,
                    in_flight: st.in_flight,
                    ewma_ms: st.ewma.get(now, prior) / 1e6,
                    ejected: st.is_ejected(),
                    ejections: st.ejections,
                    ejected_for_ms: st.ejected_until.map(|end| {
                        let left = end.saturating_duration_since(now);
                        u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
                    }),
                }
            })
            .collect()
    }

    /// Number of endpoints that can take traffic now (healthy, not ejected, not draining).
    pub fn available(&self, now: Instant) -> usize {
        let inner = lock(&self.shared);
        inner.refresh_all(now).iter().filter(|&&a| a).count()
    }
}

/// The 64-bit hash consistent-hash algorithms use for request keys (xxHash64 like Envoy, seed 0).
pub fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(key, 0)
}

#[derive(Debug)]
struct Member {
    spec: EndpointSpec,
    endpoint: Arc<Endpoint>,
}

/// The cluster state behind the balancer's lock. Lock order: this, then an endpoint's state.
#[derive(Debug)]
struct Inner {
    algorithm: Algorithm,
    zone: ZoneConfig,
    outlier: Option<OutlierConfig>,
    /// Sorted by address, so tables and round robin do not depend on discovery's order.
    members: Vec<Member>,
    table: Option<HashTable>,
    rr_next: usize,
    rng: SmallRng,
}

impl Inner {
    fn member(&self, addr: SocketAddr) -> Option<&Member> {
        self.members
            .binary_search_by_key(&addr, |m| m.spec.addr)
            .ok()
            .map(|i| &self.members[i])
    }

    /// What an endpoint never observed costs: the median of the observed estimates at `now`.
    fn median_ewma_ns(&self, now: Instant) -> f64 {
        let mut observed: Vec<f64> = self
            .members
            .iter()
            .filter_map(|m| {
                let st = lock(&m.endpoint.state);
                st.ewma.has_observations().then(|| st.ewma.get(now, 0.0))
            })
            .collect();
        if observed.is_empty() {
            return DEFAULT_RTT.as_secs_f64() * 1e9;
        }
        observed.sort_by(f64::total_cmp);
        observed[observed.len() / 2]
    }

    fn rebuild_table(&mut self) {
        let hashing: Vec<HashMember> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.spec.health != EndpointHealth::Draining)
            .map(|(index, m)| HashMember {
                index,
                key: m.spec.addr.to_string(),
                weight: m.spec.weight,
            })
            .collect();
        self.table = match self.algorithm {
            Algorithm::RingHash { min_ring_size } => {
                Some(hashing::build_ring(&hashing, min_ring_size))
            }
            Algorithm::Maglev { table_size } => Some(hashing::build_maglev(&hashing, table_size)),
            _ => None,
        };
    }

    /// Ends expired ejections and returns, per member, whether it can take traffic.
    fn refresh_all(&self, now: Instant) -> Vec<bool> {
        self.members
            .iter()
            .map(|m| {
                let mut st = lock(&m.endpoint.state);
                st.refresh(now, self.outlier.as_ref());
                m.spec.health == EndpointHealth::Healthy
                    && st.active_healthy != Some(false)
                    && !st.is_ejected()
            })
            .collect()
    }

    /// The candidate pool (zone preference, then panic), narrowed by `exclude`.
    fn pool(&self, available: &[bool], exclude: &[SocketAddr]) -> Vec<usize> {
        let live: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].spec.health != EndpointHealth::Draining)
            .collect();
        let mut candidates = live.clone();
        if self.zone.enabled
            && let Some(local) = self.zone.local_zone.as_deref()
        {
            let in_local = |i: &usize| self.members[*i].spec.zone.as_deref() == Some(local);
            // Draining endpoints count in the denominator: a zone mid-rollout is short of
            // capacity even though the leavers are not candidates.
            let local_total = self
                .members
                .iter()
                .filter(|m| m.spec.zone.as_deref() == Some(local))
                .count() as u64;
            let local_live: Vec<usize> = live.iter().copied().filter(in_local).collect();
            let local_available = local_live.iter().filter(|&&i| available[i]).count() as u64;
            let needed = (local_total * u64::from(self.zone.min_healthy_percent))
                .div_ceil(100)
                .max(1);
            if local_total > 0 && local_available >= needed {
                candidates = local_live;
            }
        }
        let usable: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| available[i])
            .collect();
        let panic = self.zone.panic_threshold > 0
            && (usable.len() as u64) * 100
                < u64::from(self.zone.panic_threshold) * candidates.len() as u64;
        let pool = if panic { candidates } else { usable };

        if exclude.is_empty() {
            return pool;
        }
        let excluded = |i: &usize| exclude.contains(&self.members[*i].spec.addr);
        let fresh: Vec<usize> = pool.iter().copied().filter(|i| !excluded(i)).collect();
        if !fresh.is_empty() {
            return fresh;
        }
        let elsewhere: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| available[i] && !excluded(&i))
            .collect();
        if elsewhere.is_empty() {
            pool
        } else {
            elsewhere
        }
    }

    fn choose(&mut self, hash: Option<u64>, exclude: &[SocketAddr], now: Instant) -> Option<usize> {
        let available = self.refresh_all(now);
        let pool = self.pool(&available, exclude);
        if pool.is_empty() {
            return None;
        }
        if pool.len() == 1 {
            return Some(pool[0]);
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let i = pool[self.rr_next % pool.len()];
                self.rr_next = self.rr_next.wrapping_add(1);
                Some(i)
            }
            Algorithm::WeightedRoundRobin => Some(self.smooth_wrr(&pool)),
            Algorithm::Random => self.weighted_draw(&pool, None),
            Algorithm::LeastRequest => self.p2c(&pool, |st| st.in_flight as f64),
            Algorithm::PeakEwma => {
                let prior = self.median_ewma_ns(now);
                self.p2c(&pool, |st| {
                    st.ewma.get(now, prior) * (st.in_flight as f64 + 1.0)
                })
            }
            Algorithm::RingHash { .. } | Algorithm::Maglev { .. } => {
                let Some(hash) = hash else {
                    return self.weighted_draw(&pool, None);
                };
                let mut in_pool = vec![false; self.members.len()];
                for &i in &pool {
                    in_pool[i] = true;
                }
                self.table
                    .as_ref()
                    .and_then(|t| t.lookup(hash, |i| in_pool[i]))
                    .or_else(|| self.weighted_draw(&pool, None))
            }
        }
    }

    /// nginx's smooth weighted round robin over `pool`.
    fn smooth_wrr(&self, pool: &[usize]) -> usize {
        let total: i64 = pool
            .iter()
            .map(|&i| i64::from(self.members[i].spec.weight))
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for &i in pool {
            let mut st = lock(&self.members[i].endpoint.state);
            st.wrr_current += i64::from(self.members[i].spec.weight);
            if best.is_none_or(|(_, cur)| st.wrr_current > cur) {
                best = Some((i, st.wrr_current));
            }
        }
        let chosen = best.map_or(pool[0], |(i, _)| i);
        lock(&self.members[chosen].endpoint.state).wrr_current -= total;
        chosen
    }

    /// Weighted random member of `pool`, other than `skip`.
    fn weighted_draw(&mut self, pool: &[usize], skip: Option<usize>) -> Option<usize> {
        let weight = |i: usize| u64::from(self.members[i].spec.weight);
        let total: u64 = pool
            .iter()
            .copied()
            .filter(|&i| Some(i) != skip)
            .map(weight)
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = self.rng.random_range(0..total);
        for &i in pool.iter().filter(|&&i| Some(i) != skip) {
            let w = weight(i);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Power of two choices: two distinct weighted draws, the lower cost wins (the first on a
    /// tie, which keeps weights meaningful when costs are equal).
    fn p2c(&mut self, pool: &[usize], cost: impl Fn(&EpState) -> f64) -> Option<usize> {
        let a = self.weighted_draw(pool, None)?;
        let Some(b) = self.weighted_draw(pool, Some(a)) else {
            return Some(a);
        };
        let cost_a = cost(&lock(&self.members[a].endpoint.state));
        let cost_b = cost(&lock(&self.members[b].endpoint.state));
        Some(if cost_b < cost_a { b } else { a })
    }

    /// Settles a finished request on `endpoint` (which may have left the membership).
    fn settle(&mut self, endpoint: &Arc<Endpoint>, outcome: Outcome, now: Instant) {
        let is_member = self
            .members
            .iter()
            .any(|m| Arc::ptr_eq(&m.endpoint, endpoint));
        let outlier = if is_member {
            self.outlier.clone()
        } else {
            None
        };
        let wants_ejection = {
            let mut st = lock(&endpoint.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.refresh(now, outlier.as_ref());
            match outcome {
                Outcome::Success { latency } => {
                    st.ewma.observe(latency, now);
                    st.reset_counters();
                }
                Outcome::ServerError { latency } => {
                    st.ewma.observe(latency, now);
                    st.consecutive_5xx = st.consecutive_5xx.saturating_add(1);
                    st.consecutive_gateway = 0;
                }
                Outcome::GatewayFailure { latency } => {
                    st.ewma.observe(latency.max(FAILURE_PENALTY), now);
                    st.consecutive_5xx = st.consecutive_5xx.saturating_add(1);
                    st.consecutive_gateway = st.consecutive_gateway.saturating_add(1);
                }
                Outcome::Cancelled => {}
            }
            if st.is_ejected() {
                // Late results of requests sent before the ejection say nothing new.
                st.reset_counters();
                false
            } else {
                outlier.as_ref().is_some_and(|cfg| st.should_eject(cfg))
            }
        };
        let Some(cfg) = outlier.filter(|_| wants_ejection) else {
            return;
        };
        // Envoy's rule: eject if that keeps the ejected share within max_ejection_percent, or
        // if nothing is ejected yet.
        let others_ejected = self
            .members
            .iter()
            .filter(|m| !Arc::ptr_eq(&m.endpoint, endpoint))
            .filter(|m| {
                let mut st = lock(&m.endpoint.state);
                st.refresh(now, Some(&cfg));
                st.is_ejected()
            })
            .count() as u64;
        let total = self.members.len() as u64;
        let allowed = others_ejected == 0
            || (others_ejected + 1) * 100 <= u64::from(cfg.max_ejection_percent) * total;
        // Over the cap the counters are kept, so the next failure tries again and ejects as
        // soon as another endpoint has returned.
        if allowed {
            lock(&endpoint.state).eject(now, &cfg);
        }
    }
}
