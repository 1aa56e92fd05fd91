//! Cluster -> [`ClusterConfig`].

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
use envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Name;
use weft_balance::{Algorithm, OutlierConfig, ZoneConfig};

use crate::util::{duration, err, percent, percent_value, positive_duration, unpack};
use crate::{
    CircuitBreakerConfig, ClusterConfig, ConfigError, HealthCheckConfig, HealthCheckKind,
    RetryBudget, WEFT_METADATA,
};

/// Envoy's defaults and bounds for the hash tables.
const DEFAULT_MIN_RING_SIZE: u64 = 1024;
const MAX_RING_SIZE: u64 = 8_388_608;
const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65_537;
const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// Our translation always sets connect_timeout; this only covers hand-written clusters.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The translation's health-check defaults (control-plane/translate/src/cluster.rs).
const DEFAULT_HC_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// Envoy's outlier-detection defaults.
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Envoy's retry-budget defaults for unset fields.
const DEFAULT_BUDGET_PERCENT: u32 = 20;
const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;

const DEFAULT_ZONE_MIN_HEALTHY: u32 = 70;
const DEFAULT_PANIC_THRESHOLD: u32 = 50;

pub(crate) fn read(c: &Cluster) -> Result<ClusterConfig, ConfigError> {
    let res = format!("cluster {}", c.name);
    let res = res.as_str();
    if c.name.is_empty() {
        return Err(err(res, "name is empty"));
    }
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        Some(ClusterDiscoveryType::Type(t)) => {
            let name = DiscoveryType::try_from(*t)
                .map(|d| d.as_str_name().to_string())
                .unwrap_or_else(|_| t.to_string());
            return Err(err(
                res,
                format!("discovery type {name} is not EDS, the only one the sidecar reads"),
            ));
        }
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(err(
                res,
                format!("custom cluster type `{}` is not supported", ct.name),
            ));
        }
        // The proto default is STATIC.
        None => return Err(err(res, "discovery type STATIC is not EDS")),
    }
    let weft = WeftMetadata::read(c, res)?;
    Ok(ClusterConfig {
        name: c.name.clone(),
        algorithm: algorithm(c, weft.lb_algorithm.as_deref(), res)?,
        zone: zone(c, weft.zone_min_healthy_percent, res)?,
        outlier: outlier(c, res)?,
        health_check: health_check(c, res)?,
        circuit_breakers: circuit_breakers(c, res)?,
        connect_timeout: positive_duration(
            c.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            res,
            "connect_timeout",
        )?,
        http2: http2(c, res)?,
    })
}

#[derive(Default)]
struct WeftMetadata {
    lb_algorithm: Option<String>,
    zone_min_healthy_percent: Option<u32>,
}

impl WeftMetadata {
    fn read(c: &Cluster, res: &str) -> Result<Self, ConfigError> {
        let Some(st) = c
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(WEFT_METADATA))
        else {
            return Ok(Self::default());
        };
        let mut out = Self::default();
        // Unknown keys are ignored so the control plane can add settings ahead of sidecars.
        if let Some(v) = st.fields.get("lb_algorithm") {
            match &v.kind {
                Some(Kind::StringValue(s)) => out.lb_algorithm = Some(s.clone()),
                _ => return Err(err(res, "metadata weft.lb_algorithm is not a string")),
            }
        }
        if let Some(v) = st.fields.get("zone_min_healthy_percent") {
            match &v.kind {
                Some(Kind::NumberValue(n)) => {
                    out.zone_min_healthy_percent = Some(percent_value(
                        *n,
                        res,
                        "metadata weft.zone_min_healthy_percent",
                    )?)
                }
                _ => {
                    return Err(err(
                        res,
                        "metadata weft.zone_min_healthy_percent is not a number",
                    ));
                }
            }
        }
        Ok(out)
    }
}

fn algorithm(c: &Cluster, weft: Option<&str>, res: &str) -> Result<Algorithm, ConfigError> {
    if let Some(name) = weft {
        return Ok(match name {
            "round_robin" => Algorithm::RoundRobin,
            "weighted_round_robin" => Algorithm::WeightedRoundRobin,
            "random" => Algorithm::Random,
            "least_request" => Algorithm::LeastRequest,
            "peak_ewma" => Algorithm::PeakEwma,
            "ring_hash" => ring_hash(c, res)?,
            "maglev" => maglev(c, res)?,
            other => {
                return Err(err(
                    res,
                    format!("lb_algorithm {other:?} is not one Weft knows"),
                ));
            }
        });
    }
    let policy = LbPolicy::try_from(c.lb_policy).map_err(|_| {
        err(
            res,
            format!("lb_policy {} is not a known value", c.lb_policy),
        )
    })?;
    Ok(match policy {
        // Envoy has no peak-EWMA, so a plain ROUND_ROBIN without Weft metadata is the
        // translation's "no preference": the sidecar's best default.
        LbPolicy::RoundRobin => Algorithm::PeakEwma,
        LbPolicy::LeastRequest => Algorithm::LeastRequest,
        LbPolicy::Random => Algorithm::Random,
        LbPolicy::RingHash => ring_hash(c, res)?,
        LbPolicy::Maglev => maglev(c, res)?,
        other => {
            return Err(err(
                res,
                format!("lb_policy {} is not supported", other.as_str_name()),
            ));
        }
    })
}

fn ring_hash(c: &Cluster, res: &str) -> Result<Algorithm, ConfigError> {
    let min_ring_size = match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(rh)) => rh
            .minimum_ring_size
            .map_or(DEFAULT_MIN_RING_SIZE, |v| v.value),
        _ => DEFAULT_MIN_RING_SIZE,
    };
    if min_ring_size == 0 || min_ring_size > MAX_RING_SIZE {
        return Err(err(
            res,
            format!(
                "ring_hash_lb_config.minimum_ring_size {min_ring_size} is not in 1..={MAX_RING_SIZE}"
            ),
        ));
    }
    Ok(Algorithm::RingHash { min_ring_size })
}

fn maglev(c: &Cluster, res: &str) -> Result<Algorithm, ConfigError> {
    let table_size = match &c.lb_config {
        Some(LbConfig::MaglevLbConfig(m)) => {
            m.table_size.map_or(DEFAULT_MAGLEV_TABLE_SIZE, |v| v.value)
        }
        _ => DEFAULT_MAGLEV_TABLE_SIZE,
    };
    // Maglev's permutation needs a prime table size, and Envoy caps it.
    if table_size > MAX_MAGLEV_TABLE_SIZE || !is_prime(table_size) {
        return Err(err(
            res,
            format!(
                "maglev_lb_config.table_size {table_size} is not a prime <= {MAX_MAGLEV_TABLE_SIZE}"
            ),
        ));
    }
    Ok(Algorithm::Maglev { table_size })
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn zone(c: &Cluster, min_healthy: Option<u32>, res: &str) -> Result<ZoneConfig, ConfigError> {
    let common = c.common_lb_config.as_ref();
    let panic_threshold = percent(
        common.and_then(|cl| cl.healthy_panic_threshold.as_ref()),
        DEFAULT_PANIC_THRESHOLD,
        res,
        "common_lb_config.healthy_panic_threshold",
    )?;
    let routing_enabled = match common.and_then(|cl| cl.locality_config_specifier.as_ref()) {
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(z)) => percent(
            z.routing_enabled.as_ref(),
            100,
            res,
            "common_lb_config.zone_aware_lb_config.routing_enabled",
        )?,
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_)) => {
            return Err(err(
                res,
                "common_lb_config.locality_weighted_lb_config is not supported",
            ));
        }
        None => 100,
    };
    Ok(ZoneConfig {
        local_zone: None,
        // Envoy's routing_enabled is a probability; the sidecar's preference is on or off.
        enabled: routing_enabled > 0,
        min_healthy_percent: min_healthy.unwrap_or(DEFAULT_ZONE_MIN_HEALTHY),
        panic_threshold,
    })
}

fn outlier(c: &Cluster, res: &str) -> Result<Option<OutlierConfig>, ConfigError> {
    let Some(od) = &c.outlier_detection else {
        return Ok(None);
    };
    // An enforcement of 0% detects and never ejects, and a threshold of 0 never trips in Envoy
    // (the counter is compared after incrementing): both mean "off" for the sidecar.
    let enforced = |e: Option<u32>| e.is_none_or(|p| p > 0);
    for (field, v) in [
        ("enforcing_consecutive_5xx", od.enforcing_consecutive_5xx),
        (
            "enforcing_consecutive_gateway_failure",
            od.enforcing_consecutive_gateway_failure,
        ),
    ] {
        if let Some(v) = v {
            percent_value(
                f64::from(v.value),
                res,
                &format!("outlier_detection.{field}"),
            )?;
        }
    }
    let consecutive_5xx = od
        .consecutive_5xx
        .map_or(DEFAULT_CONSECUTIVE_5XX, |v| v.value);
    let consecutive_5xx = (consecutive_5xx > 0
        && enforced(od.enforcing_consecutive_5xx.map(|v| v.value)))
    .then_some(consecutive_5xx);
    let consecutive_gateway_failure = od.consecutive_gateway_failure.and_then(|v| {
        (v.value > 0 && enforced(od.enforcing_consecutive_gateway_failure.map(|e| e.value)))
            .then_some(v.value)
    });
    let base_ejection_time = positive_duration(
        od.base_ejection_time.as_ref(),
        DEFAULT_BASE_EJECTION,
        res,
        "outlier_detection.base_ejection_time",
    )?;
    let max_ejection_time = match &od.max_ejection_time {
        Some(d) => duration(d, res, "outlier_detection.max_ejection_time")?,
        None => DEFAULT_MAX_EJECTION,
    };
    // Envoy rejects a cap below the base: the first ejection would already exceed it.
    if max_ejection_time < base_ejection_time {
        return Err(err(
            res,
            format!(
                "outlier_detection.max_ejection_time {max_ejection_time:?} is below base_ejection_time {base_ejection_time:?}"
            ),
        ));
    }
    let max_ejection_percent = match od.max_ejection_percent {
        Some(v) => percent_value(
            f64::from(v.value),
            res,
            "outlier_detection.max_ejection_percent",
        )?,
        None => DEFAULT_MAX_EJECTION_PERCENT,
    };
    Ok(Some(OutlierConfig {
        consecutive_5xx,
        consecutive_gateway_failure,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent,
    }))
}

fn health_check(c: &Cluster, res: &str) -> Result<Option<HealthCheckConfig>, ConfigError> {
    let Some(hc) = c.health_checks.first() else {
        return Ok(None);
    };
    let kind = match &hc.health_checker {
        Some(HealthChecker::HttpHealthCheck(h)) => {
            if !h.path.starts_with('/') {
                return Err(err(
                    res,
                    format!(
                        "health_checks[0].http_health_check.path {:?} does not start with `/`",
                        h.path
                    ),
                ));
            }
            HealthCheckKind::Http {
                path: h.path.clone(),
            }
        }
        Some(HealthChecker::GrpcHealthCheck(_)) => HealthCheckKind::Grpc,
        Some(HealthChecker::TcpHealthCheck(_)) => HealthCheckKind::Tcp,
        Some(HealthChecker::CustomHealthCheck(h)) => {
            return Err(err(
                res,
                format!(
                    "health_checks[0] custom health checker `{}` is not supported",
                    h.name
                ),
            ));
        }
        None => return Err(err(res, "health_checks[0] has no health checker")),
    };
    let threshold = |v: Option<u32>, default: u32, field: &str| {
        let v = v.unwrap_or(default);
        if v == 0 {
            Err(err(
                res,
                format!("health_checks[0].{field} must be at least 1"),
            ))
        } else {
            Ok(v)
        }
    };
    Ok(Some(HealthCheckConfig {
        kind,
        interval: positive_duration(
            hc.interval.as_ref(),
            DEFAULT_HC_INTERVAL,
            res,
            "health_checks[0].interval",
        )?,
        timeout: positive_duration(
            hc.timeout.as_ref(),
            DEFAULT_HC_TIMEOUT,
            res,
            "health_checks[0].timeout",
        )?,
        unhealthy_threshold: threshold(
            hc.unhealthy_threshold.map(|v| v.value),
            DEFAULT_UNHEALTHY_THRESHOLD,
            "unhealthy_threshold",
        )?,
        healthy_threshold: threshold(
            hc.healthy_threshold.map(|v| v.value),
            DEFAULT_HEALTHY_THRESHOLD,
            "healthy_threshold",
        )?,
    }))
}

fn circuit_breakers(c: &Cluster, res: &str) -> Result<CircuitBreakerConfig, ConfigError> {
    // Weft routes everything at DEFAULT priority; HIGH-priority thresholds never apply.
    let Some(t) = c.circuit_breakers.as_ref().and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == RoutingPriority::Default as i32)
    }) else {
        return Ok(CircuitBreakerConfig::default());
    };
    let retry_budget = match &t.retry_budget {
        Some(b) => Some(RetryBudget {
            budget_percent: percent(
                b.budget_percent.as_ref(),
                DEFAULT_BUDGET_PERCENT,
                res,
                "circuit_breakers.thresholds.retry_budget.budget_percent",
            )?,
            min_retry_concurrency: b
                .min_retry_concurrency
                .map_or(DEFAULT_MIN_RETRY_CONCURRENCY, |v| v.value),
        }),
        None => None,
    };
    Ok(CircuitBreakerConfig {
        max_connections: t.max_connections.map(|v| v.value),
        max_pending_requests: t.max_pending_requests.map(|v| v.value),
        max_requests: t.max_requests.map(|v| v.value),
        max_retries: t.max_retries.map(|v| v.value),
        retry_budget,
    })
}

fn http2(c: &Cluster, res: &str) -> Result<bool, ConfigError> {
    let key = HttpProtocolOptions::full_name();
    let Some(any) = c.typed_extension_protocol_options.get(&key) else {
        return Ok(false);
    };
    let field = format!("typed_extension_protocol_options[{key}]");
    let opts: HttpProtocolOptions = unpack(any, res, &field)?;
    match opts.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(true),
            Some(ProtocolConfig::HttpProtocolOptions(_)) => Ok(false),
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => Err(err(
                res,
                format!("{field}: HTTP/3 upstreams are not supported"),
            )),
            None => Err(err(
                res,
                format!("{field}: explicit_http_config names no protocol"),
            )),
        },
        // Following the downstream protocol or ALPN needs per-request pools the sidecar
        // does not have.
        Some(_) => Err(err(
            res,
            format!("{field}: only explicit_http_config is supported"),
        )),
        None => Ok(false),
    }
}
