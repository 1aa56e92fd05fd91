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
//! - Cost per pick does not grow with the cluster (except smooth weighted round robin, O(N) by
//!   nature): the candidate pool is cached until availability can change (membership, config,
//!   a health verdict, an ejection or its end), weighted draws are binary searches, and the
//!   median behind an unobserved endpoint's cost is only worked out when P2C drew one.
//!   Consistent-hash tables are built outside the lock, and not at all when an update leaves
//!   the membership as it was.
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

use endpoint::{DEFAULT_RTT, Endpoint, FAILURE_PENALTY, PeakEwma};
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
        inner.settle(self.addr, &self.endpoint, outcome, now);
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
                cached_pool: None,
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
        inner.cached_pool = None;
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
        let mut seen = std::collections::HashSet::new();
        let mut specs: Vec<EndpointSpec> = endpoints
            .into_iter()
            .filter(|s| seen.insert(s.addr))
            .map(|mut s| {
                s.weight = s.weight.max(1);
                s
            })
            .collect();
        specs.sort_by_key(|s| s.addr);

        // The proxy calls this for every cluster on every accepted xDS change; most leave the
        // membership as it is, and rebuilding a consistent-hash table is not free.
        let algorithm = {
            let inner = lock(&self.shared);
            if inner.members.len() == specs.len()
                && inner.members.iter().zip(&specs).all(|(m, s)| m.spec == *s)
            {
                return;
            }
            inner.algorithm
        };
        // Built without the lock, so picks are not held up meanwhile (a 1,000-endpoint ring
        // takes tens of milliseconds).
        let table = build_table(algorithm, &specs);

        let mut inner = lock(&self.shared);
        let mut old: std::collections::HashMap<SocketAddr, Arc<Endpoint>> = inner
            .members
            .drain(..)
            .map(|m| (m.spec.addr, m.endpoint))
            .collect();
        let table = if inner.algorithm == algorithm {
            table
        } else {
            // set_config changed the algorithm meanwhile.
            build_table(inner.algorithm, &specs)
        };
        inner.members = specs
            .into_iter()
            .map(|spec| {
                let endpoint = old
                    .remove(&spec.addr)
                    .unwrap_or_else(|| Arc::new(Endpoint::new()));
                Member { spec, endpoint }
            })
            .collect();
        inner.cached_pool = None;
        inner.table = table;
    }

    /// Verdict of an active health check for `addr` (unknown addresses are ignored).
    pub fn set_active_health(&self, addr: SocketAddr, healthy: bool) {
        let mut inner = lock(&self.shared);
        let changed = inner.member(addr).is_some_and(|m| {
            let mut st = lock(&m.endpoint.state);
            let changed = st.active_healthy != Some(healthy);
            st.active_healthy = Some(healthy);
            changed
        });
        if changed {
            inner.cached_pool = None;
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
        inner.refresh_all(now).0.iter().filter(|&&a| a).count()
    }
}

/// The 64-bit hash consistent-hash algorithms use for request keys (xxHash64 like Envoy, seed 0).
pub fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(key, 0)
}

/// The consistent-hash table of `algorithm` over `specs` (sorted by address, as the members
/// they index), if it has one.
fn build_table(algorithm: Algorithm, specs: &[EndpointSpec]) -> Option<HashTable> {
    let hashing = || -> Vec<HashMember> {
        specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.health != EndpointHealth::Draining)
            .map(|(index, s)| HashMember {
                index,
                key: s.addr.to_string(),
                weight: s.weight,
            })
            .collect()
    };
    match algorithm {
        Algorithm::RingHash { min_ring_size } => {
            Some(hashing::build_ring(&hashing(), min_ring_size))
        }
        Algorithm::Maglev { table_size } => Some(hashing::build_maglev(&hashing(), table_size)),
        _ => None,
    }
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
    /// The candidate pool of picks without exclusions, kept until something that decides
    /// availability changes: membership, config, an active-health verdict, an ejection, or the
    /// end of the earliest ejection. Recomputing it locks every endpoint, which made every
    /// pick O(N) (166 µs per peak-EWMA pick at 1,000 endpoints).
    cached_pool: Option<Pool>,
    rr_next: usize,
    rng: SmallRng,
}

/// The endpoints a pick chooses from, as indices into `Inner::members`, with what the
/// algorithms need to choose in O(1) or O(log N).
#[derive(Debug)]
struct Pool {
    members: Vec<usize>,
    /// `cumulative[k]`: total weight of `members[..=k]`, for weighted draws by binary search.
    cumulative: Vec<u64>,
    /// Per member index: in the pool (consistent-hash lookups walk past the others).
    in_pool: Vec<bool>,
    /// The pool changes by itself when the earliest ejection among the members ends.
    valid_until: Option<Instant>,
}

impl Pool {
    fn new(members: Vec<usize>, all: &[Member], valid_until: Option<Instant>) -> Self {
        let mut total = 0u64;
        let cumulative = members
            .iter()
            .map(|&i| {
                total += u64::from(all[i].spec.weight);
                total
            })
            .collect();
        let mut in_pool = vec![false; all.len()];
        for &i in &members {
            in_pool[i] = true;
        }
        Self {
            members,
            cumulative,
            in_pool,
            valid_until,
        }
    }

    fn valid_at(&self, now: Instant) -> bool {
        self.valid_until.is_none_or(|end| now < end)
    }

    /// A position in `members` drawn with probability proportional to weight, other than
    /// position `skip`. The same draw as a linear walk over the weights, in O(log N).
    fn draw(&self, rng: &mut SmallRng, skip: Option<usize>) -> Option<usize> {
        let total = self.cumulative.last().copied()?;
        let (skip_start, skip_weight) = match skip {
            Some(s) => {
                let end = *self.cumulative.get(s)?;
                let start = if s == 0 { 0 } else { self.cumulative[s - 1] };
                (start, end - start)
            }
            None => (total, 0),
        };
        let span = total - skip_weight;
        if span == 0 {
            return None;
        }
        let mut r = rng.random_range(0..span);
        if r >= skip_start {
            r += skip_weight;
        }
        Some(self.cumulative.partition_point(|&c| c <= r))
    }
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
        let mid = observed.len() / 2;
        *observed.select_nth_unstable_by(mid, f64::total_cmp).1
    }

    fn rebuild_table(&mut self) {
        let specs: Vec<EndpointSpec> = self.members.iter().map(|m| m.spec.clone()).collect();
        self.table = build_table(self.algorithm, &specs);
    }

    /// Ends expired ejections and returns, per member, whether it can take traffic, and when
    /// the earliest ejection still running ends.
    fn refresh_all(&self, now: Instant) -> (Vec<bool>, Option<Instant>) {
        let mut next_return: Option<Instant> = None;
        let available = self
            .members
            .iter()
            .map(|m| {
                let mut st = lock(&m.endpoint.state);
                st.refresh(now, self.outlier.as_ref());
                if let Some(end) = st.ejected_until {
                    next_return = Some(next_return.map_or(end, |t| t.min(end)));
                }
                m.spec.health == EndpointHealth::Healthy
                    && st.active_healthy != Some(false)
                    && !st.is_ejected()
            })
            .collect();
        (available, next_return)
    }

    /// The pool for a pick avoiding `exclude`: the cached one when nothing is excluded.
    fn take_pool(&mut self, exclude: &[SocketAddr], now: Instant) -> Pool {
        if exclude.is_empty()
            && let Some(pool) = self.cached_pool.take()
            && pool.valid_at(now)
        {
            return pool;
        }
        let (available, valid_until) = self.refresh_all(now);
        let members = self.pool(&available, exclude);
        Pool::new(members, &self.members, valid_until)
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
        let pool = self.take_pool(exclude, now);
        let chosen = self.choose_from(&pool, hash, now);
        if exclude.is_empty() {
            self.cached_pool = Some(pool);
        }
        chosen
    }

    fn choose_from(&mut self, pool: &Pool, hash: Option<u64>, now: Instant) -> Option<usize> {
        match pool.members.as_slice() {
            [] => return None,
            [only] => return Some(*only),
            _ => {}
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let i = pool.members[self.rr_next % pool.members.len()];
                self.rr_next = self.rr_next.wrapping_add(1);
                Some(i)
            }
            Algorithm::WeightedRoundRobin => Some(self.smooth_wrr(&pool.members)),
            Algorithm::Random => self.weighted_draw(pool, None),
            Algorithm::LeastRequest => self.p2c(pool, |in_flight, _, _| in_flight as f64),
            Algorithm::PeakEwma => {
                // The median is O(N): only worked out when a candidate has never answered.
                let mut prior: Option<f64> = None;
                self.p2c(pool, |in_flight, ewma, inner| {
                    let prior = if ewma.has_observations() {
                        0.0
                    } else {
                        *prior.get_or_insert_with(|| inner.median_ewma_ns(now))
                    };
                    ewma.get(now, prior) * (in_flight as f64 + 1.0)
                })
            }
            Algorithm::RingHash { .. } | Algorithm::Maglev { .. } => {
                let Some(hash) = hash else {
                    return self.weighted_draw(pool, None);
                };
                self.table
                    .as_ref()
                    .and_then(|t| t.lookup(hash, |i| pool.in_pool[i]))
                    .or_else(|| self.weighted_draw(pool, None))
            }
        }
    }

    /// nginx's smooth weighted round robin over `pool` (inherently O(N) per pick).
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

    /// Weighted random member of `pool`.
    fn weighted_draw(&mut self, pool: &Pool, skip: Option<usize>) -> Option<usize> {
        pool.draw(&mut self.rng, skip).map(|k| pool.members[k])
    }

    /// Power of two choices: two distinct weighted draws, the lower cost wins (the first on a
    /// tie, which keeps weights meaningful when costs are equal).
    fn p2c(
        &mut self,
        pool: &Pool,
        mut cost: impl FnMut(u64, &PeakEwma, &Self) -> f64,
    ) -> Option<usize> {
        let a = pool.draw(&mut self.rng, None)?;
        let Some(b) = pool.draw(&mut self.rng, Some(a)) else {
            return Some(pool.members[a]);
        };
        let (a, b) = (pool.members[a], pool.members[b]);
        // Costs are worked out on copies: the median behind an unobserved endpoint's cost
        // locks every endpoint, this one included.
        let cost_of = |i: usize, cost: &mut dyn FnMut(u64, &PeakEwma, &Self) -> f64| {
            let (in_flight, ewma) = {
                let st = lock(&self.members[i].endpoint.state);
                (st.in_flight, st.ewma.clone())
            };
            cost(in_flight, &ewma, self)
        };
        let cost_a = cost_of(a, &mut cost);
        let cost_b = cost_of(b, &mut cost);
        Some(if cost_b < cost_a { b } else { a })
    }

    /// Settles a finished request on `endpoint` at `addr` (which may have left the
    /// membership).
    fn settle(
        &mut self,
        addr: SocketAddr,
        endpoint: &Arc<Endpoint>,
        outcome: Outcome,
        now: Instant,
    ) {
        let is_member = self
            .member(addr)
            .is_some_and(|m| Arc::ptr_eq(&m.endpoint, endpoint));
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
            self.cached_pool = None;
        }
    }
}
