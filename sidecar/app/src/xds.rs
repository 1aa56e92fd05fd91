//! Between the xDS client and the proxy: the validator that makes the client NACK what the
//! sidecar cannot honour, and the task that turns each accepted state into a `MeshConfig`.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use weft_proxy::Mesh;
use weft_sidecar_config::{
    MeshConfig, ROUTE_CONFIG_NAME, RouteTable, cluster_from_xds, endpoints_from_xds,
};
use weft_xds_client::{Resource, State, Validator};

/// Runs the same conversion [`mesh_config`] will, so a resource is rejected (NACKed, the last
/// good one kept) rather than accepted and then skipped.
pub fn validator() -> Validator {
    Arc::new(|resource: Resource<'_>| {
        let checked = match resource {
            Resource::Cluster(c) => cluster_from_xds(c).map(drop),
            Resource::Endpoints(cla) => endpoints_from_xds(cla).map(drop),
            Resource::Route(rc) => RouteTable::from_xds(rc).map(drop),
        };
        checked.map_err(|e| e.to_string())
    })
}

/// Everything the accepted state says, converted. Anything that fails conversion was already
/// validated, so a failure here means the two disagree: it is logged and left out instead of
/// taking the rest of the mesh down with it.
pub fn mesh_config(state: &State, zone: Option<&str>) -> MeshConfig {
    let mut config = MeshConfig::default();
    for (name, c) in &state.clusters {
        match cluster_from_xds(c) {
            Ok(mut cluster) => {
                // Clusters carry no zone of ours; zone preference needs to know where we are.
                if cluster.zone.local_zone.is_none() {
                    cluster.zone.local_zone = zone.map(str::to_string);
                }
                config.clusters.insert(name.clone(), cluster);
            }
            Err(e) => tracing::error!(cluster = %name, error = %e, "skipping cluster"),
        }
    }
    for (name, cla) in &state.endpoints {
        match endpoints_from_xds(cla) {
            Ok(endpoints) => {
                config.endpoints.insert(name.clone(), endpoints);
            }
            Err(e) => tracing::error!(cluster = %name, error = %e, "skipping endpoints"),
        }
    }
    if let Some(rc) = state.routes.get(ROUTE_CONFIG_NAME) {
        match RouteTable::from_xds(rc) {
            Ok(table) => config.routes = table,
            Err(e) => tracing::error!(route_config = %rc.name, error = %e, "skipping routes"),
        }
    }
    config
}

/// Applies every accepted change to the mesh until the xDS client goes away. States that only
/// change the stream's status (connected, errors) are not re-applied.
pub async fn sync_mesh(
    mut rx: watch::Receiver<Arc<State>>,
    mesh: Arc<Mesh>,
    zone: Option<String>,
    connected: Gauge,
) {
    let mut applied: Option<Arc<State>> = None;
    loop {
        let state = Arc::clone(&rx.borrow_and_update());
        connected.set(i64::from(state.connected));
        let changed = applied
            .as_ref()
            .is_none_or(|prev| !same_resources(prev, &state));
        if changed {
            let config = mesh_config(&state, zone.as_deref());
            tracing::info!(
                clusters = config.clusters.len(),
                endpoints = config.endpoints.values().map(Vec::len).sum::<usize>(),
                virtual_hosts = config.routes.virtual_hosts().len(),
                synced = state.synced,
                "applying mesh config"
            );
            mesh.apply(config);
            applied = Some(state);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn same_resources(a: &State, b: &State) -> bool {
    a.clusters == b.clusters && a.endpoints == b.endpoints && a.routes == b.routes
}

/// `/debug/config`'s xDS half: the stream's status and what it holds.
pub fn debug_state(state: &State) -> serde_json::Value {
    let mut versions: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for ((type_url, name), version) in &state.versions {
        versions
            .entry(type_url.as_str())
            .or_default()
            .insert(name.as_str(), version.as_str());
    }
    serde_json::json!({
        "connected": state.connected,
        "synced": state.synced,
        "reconnects": state.reconnects,
        "last_error": state.last_error,
        "last_nack": state.last_nack.as_ref().map(|(type_url, message)| {
            serde_json::json!({ "type_url": type_url, "message": message })
        }),
        "last_update": state.last_update.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        "versions": versions,
        "resources": {
            "clusters": state.clusters.keys().collect::<Vec<_>>(),
            "endpoints": state.endpoints.iter().map(|(name, cla)| {
                let n: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                (name.clone(), n)
            }).collect::<BTreeMap<_, _>>(),
            "routes": state.routes.keys().collect::<Vec<_>>(),
        },
    })
}
