//! The runtime state built from each [`MeshConfig`]: per-cluster balancers, breakers, clients
//! and active health checkers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use weft_balance::{Balancer, EndpointSpec};
use weft_health_check::{Checker, Probe, Schedule, Verdict};
use weft_sidecar_config::{
    ClusterConfig, HealthCheckConfig, HealthCheckKind, MeshConfig, RouteTable,
};

use crate::breaker::Breaker;
use crate::client::{ClientCache, ClientKey, UpstreamClient};

/// One immutable view of the mesh; requests take an `Arc` of it and never see a half-applied
/// update.
#[derive(Default)]
pub(crate) struct State {
    pub routes: RouteTable,
    pub clusters: HashMap<String, Arc<ClusterRuntime>>,
}

pub(crate) struct ClusterRuntime {
    /// As applied, `zone.local_zone` filled in.
    pub config: ClusterConfig,
    pub balancer: Arc<Balancer>,
    pub breaker: Arc<Breaker>,
    /// `max_connections` of an HTTP/1.1 cluster (see `breaker`).
    pub conn_limit: Option<Arc<Semaphore>>,
    pub client: UpstreamClient,
}

/// A running checker for one endpoint and the task feeding its verdicts to the balancer.
struct HealthTask {
    _checker: Checker,
    feeder: JoinHandle<()>,
}

impl Drop for HealthTask {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

struct ClusterHealth {
    config: HealthCheckConfig,
    tasks: HashMap<SocketAddr, HealthTask>,
}

/// Active health checking of every cluster that asks for it.
#[derive(Default)]
pub(crate) struct HealthCheckers {
    clusters: HashMap<String, ClusterHealth>,
}

fn probe(kind: &HealthCheckKind) -> Probe {
    match kind {
        HealthCheckKind::Http { path } => Probe::Http { path: path.clone() },
        HealthCheckKind::Tcp => Probe::Tcp,
        HealthCheckKind::Grpc => Probe::Grpc {
            service: String::new(),
        },
    }
}

fn spawn_check(hc: &HealthCheckConfig, addr: SocketAddr, balancer: &Arc<Balancer>) -> HealthTask {
    let checker = Checker::spawn(
        probe(&hc.kind),
        addr,
        Schedule {
            interval: hc.interval,
            timeout: hc.timeout,
            rise: hc.healthy_threshold,
            fall: hc.unhealthy_threshold,
        },
    );
    let mut rx = checker.watch();
    let balancer = Arc::clone(balancer);
    let feeder = tokio::spawn(async move {
        loop {
            let verdict = rx.borrow_and_update().verdict;
            match verdict {
                Verdict::Healthy => balancer.set_active_health(addr, true),
                Verdict::Unhealthy => balancer.set_active_health(addr, false),
                Verdict::Unknown => {}
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    HealthTask {
        _checker: checker,
        feeder,
    }
}

impl HealthCheckers {
    fn sync(
        &mut self,
        cluster: &str,
        check: Option<&HealthCheckConfig>,
        endpoints: &[EndpointSpec],
        balancer: &Arc<Balancer>,
    ) {
        let Some(hc) = check else {
            if let Some(old) = self.clusters.remove(cluster) {
                // Without checks the last verdict must not keep an endpoint out.
                for addr in old.tasks.keys() {
                    balancer.set_active_health(*addr, true);
                }
            }
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!(
                cluster,
                "no Tokio runtime: active health checks not started"
            );
            return;
        }
        let entry = self
            .clusters
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterHealth {
                config: hc.clone(),
                tasks: HashMap::new(),
            });
        if entry.config != *hc {
            entry.config = hc.clone();
            entry.tasks.clear();
        }
        let wanted: HashSet<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        entry.tasks.retain(|addr, _| wanted.contains(addr));
        for addr in wanted {
            entry
                .tasks
                .entry(addr)
                .or_insert_with(|| spawn_check(hc, addr, balancer));
        }
    }

    fn retain_clusters(&mut self, keep: &HashMap<String, Arc<ClusterRuntime>>) {
        self.clusters.retain(|name, _| keep.contains_key(name));
    }
}

/// Builds the next [`State`] from `config`, reusing what stays: balancers (endpoint state),
/// breaker counters, connection semaphores whose limit is unchanged.
pub(crate) fn build_state(
    config: MeshConfig,
    previous: &State,
    local_zone: Option<&String>,
    clients: &ClientCache,
    health: &mut HealthCheckers,
) -> State {
    let MeshConfig {
        clusters: configs,
        endpoints,
        routes,
    } = config;
    let mut clusters = HashMap::new();
    let mut keys = HashSet::new();
    for (name, mut cc) in configs {
        cc.zone.local_zone = local_zone.cloned();
        let eps = endpoints.get(&name).cloned().unwrap_or_default();
        let prev = previous.clusters.get(&name);
        let balancer = match prev {
            Some(p) => {
                p.balancer
                    .set_config(cc.algorithm, cc.zone.clone(), cc.outlier.clone());
                Arc::clone(&p.balancer)
            }
            None => Arc::new(Balancer::new(
                cc.algorithm,
                cc.zone.clone(),
                cc.outlier.clone(),
            )),
        };
        balancer.update(eps.clone());
        let breaker = prev.map(|p| Arc::clone(&p.breaker)).unwrap_or_default();
        let max_conns = if cc.http2 {
            None
        } else {
            cc.circuit_breakers.max_connections
        };
        let conn_limit = max_conns.map(|n| match prev {
            Some(p)
                if !p.config.http2
                    && p.config.circuit_breakers.max_connections == Some(n)
                    && p.conn_limit.is_some() =>
            {
                p.conn_limit
                    .clone()
                    .unwrap_or_else(|| Arc::new(Semaphore::new(n as usize)))
            }
            _ => Arc::new(Semaphore::new(n as usize)),
        });
        let key = ClientKey {
            http2: cc.http2,
            connect_timeout: cc.connect_timeout,
            max_idle_per_host: max_conns,
        };
        keys.insert(key);
        health.sync(&name, cc.health_check.as_ref(), &eps, &balancer);
        clusters.insert(
            name,
            Arc::new(ClusterRuntime {
                config: cc,
                balancer,
                breaker,
                conn_limit,
                client: clients.get(key),
            }),
        );
    }
    health.retain_clusters(&clusters);
    clients.retain(&keys);
    State { routes, clusters }
}

pub(crate) fn debug_endpoints(state: &State) -> serde_json::Value {
    let now = Instant::now();
    let sorted: BTreeMap<&String, &Arc<ClusterRuntime>> = state.clusters.iter().collect();
    let clusters: serde_json::Map<String, serde_json::Value> = sorted
        .into_iter()
        .map(|(name, c)| {
            (
                name.clone(),
                serde_json::json!({
                    "algorithm": c.config.algorithm,
                    "available": c.balancer.available(now),
                    "endpoints": c.balancer.status(now),
                    "circuit_breakers": c.breaker.snapshot(),
                }),
            )
        })
        .collect();
    serde_json::Value::Object(clusters)
}

pub(crate) fn debug_config(state: &State) -> serde_json::Value {
    let sorted: BTreeMap<&String, &ClusterConfig> =
        state.clusters.iter().map(|(k, v)| (k, &v.config)).collect();
    serde_json::json!({
        "clusters": sorted,
        "virtual_hosts": state.routes.virtual_hosts(),
    })
}
