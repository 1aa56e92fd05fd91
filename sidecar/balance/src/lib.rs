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
//! [`Pick`] guard; the proxy decides what a failure is.
//!
//! ## Interface contract (shared with weft-sidecar-config and weft-proxy; keep it stable)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

/// Result of [`Balancer::pick`]. Report the outcome with [`Pick::finish`]; dropping it
/// unfinished counts as [`Outcome::Cancelled`].
#[derive(Debug)]
pub struct Pick {
    addr: SocketAddr,
    // implementation-defined: a handle to the endpoint's shared state
}

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records the request's outcome (latency into the EWMA, failures into outlier detection)
    /// and releases the in-flight slot.
    pub fn finish(self, outcome: Outcome, now: Instant) {
        let _ = (outcome, now);
        unimplemented!("weft-balance: Pick::finish")
    }
}

/// One cluster's balancer. Cheap to share (`Arc<Balancer>`); every method takes `&self` and is
/// safe to call from many tasks at once.
#[derive(Debug)]
pub struct Balancer {
    // implementation-defined
}

impl Balancer {
    pub fn new(algorithm: Algorithm, zone: ZoneConfig, outlier: Option<OutlierConfig>) -> Self {
        let _ = (algorithm, zone, outlier);
        unimplemented!("weft-balance: Balancer::new")
    }

    /// Replaces the settings, keeping per-endpoint state.
    pub fn set_config(
        &self,
        algorithm: Algorithm,
        zone: ZoneConfig,
        outlier: Option<OutlierConfig>,
    ) {
        let _ = (algorithm, zone, outlier);
        unimplemented!()
    }

    /// Replaces the membership. Endpoints that stay (same address) keep their state (EWMA,
    /// in-flight, ejection); new ones start with a neutral EWMA seed, not zero, so a new
    /// endpoint does not look free and get flooded.
    pub fn update(&self, endpoints: Vec<EndpointSpec>) {
        let _ = endpoints;
        unimplemented!()
    }

    /// Verdict of an active health check for `addr` (unknown addresses are ignored).
    pub fn set_active_health(&self, addr: SocketAddr, healthy: bool) {
        let _ = (addr, healthy);
        unimplemented!()
    }

    /// Picks an endpoint. `hash` is the request's hash for ring hash / Maglev (ignored by other
    /// algorithms; when absent a consistent-hash cluster picks at random). `exclude` lists
    /// endpoints already tried by this request's earlier attempts (avoided when possible).
    /// `None` when no endpoint can take traffic.
    pub fn pick(&self, hash: Option<u64>, exclude: &[SocketAddr], now: Instant) -> Option<Pick> {
        let _ = (hash, exclude, now);
        unimplemented!()
    }

    /// Per-endpoint state for `/debug/endpoints`, sorted by address.
    pub fn status(&self, now: Instant) -> Vec<EndpointStatus> {
        let _ = now;
        unimplemented!()
    }

    /// Number of endpoints that can take traffic now (healthy, not ejected, not draining).
    pub fn available(&self, now: Instant) -> usize {
        let _ = now;
        unimplemented!()
    }
}

/// The 64-bit hash consistent-hash algorithms use for request keys (xxHash64 like Envoy, seed 0).
pub fn hash_key(key: &[u8]) -> u64 {
    let _ = key;
    unimplemented!()
}
