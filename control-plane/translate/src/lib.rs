//! Pure translation from the merged registry model to Envoy v3 xDS resources.
//!
//! What it does: turns a [`weft_registry::Registry`] into Clusters, ClusterLoadAssignments,
//! Listeners and RouteConfigurations (prost messages from `envoy-types`) for one client
//! [`Flavor`]: Envoy proxies, or proxyless gRPC clients, which accept a narrower subset of xDS
//! (api_listener listeners, ROUND_ROBIN/RING_HASH only, no active health checks, ...). Every
//! feature a client lacks is downgraded to the nearest one it accepts, never sent as something it
//! would NACK; `docs/translation.md` lists each mapping.
//!
//! Output is deterministic (everything sorted by name; hash maps either have one entry or are
//! built to iterate in key order, see `util::ordered_map`), so the same registry always encodes
//! to the same bytes and content-hash versions only change when the configuration does. Clusters, listeners and routes never read instances, so
//! the caller may recompute only [`endpoints`] when only instances changed.
//!
//! What it does not do: any I/O, caching, versioning or serving; those live in `weft-xds-cache`
//! and `weft-xds-server`. Input validation belongs to `weft-registry`; this crate assumes a
//! validated registry and never fails.

mod cluster;
mod endpoint;
mod flavor;
mod listener;
mod origins;
mod rate_limit;
mod route;
mod util;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use weft_registry::Registry;

pub use cluster::{META_LB_ALGORITHM, META_ZONE_MIN_HEALTHY_PERCENT, WEFT_METADATA, clusters};
pub use endpoint::{endpoint_assignment, endpoints};
pub use flavor::Flavor;
pub use listener::listeners;
pub use origins::origins;
pub use rate_limit::{LOCAL_RATE_LIMIT_FILTER, LOCAL_RATE_LIMIT_STAT_PREFIX, RETRY_AFTER};
pub use route::routes;

/// Type URL of CDS resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of EDS resources.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of LDS resources.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of RDS resources.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Envoy flavour's single HTTP listener and route configuration name.
pub const HTTP_LISTENER_NAME: &str = "weft_http";

/// Settings that are not part of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Address Envoy's HTTP listener binds to.
    pub http_listener_address: String,
    /// Port Envoy's HTTP listener binds to.
    pub http_listener_port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            http_listener_address: "0.0.0.0".to_string(),
            http_listener_port: 15001,
        }
    }
}

/// Every resource one flavour of client gets, each list sorted by resource name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
}

/// All four resource types for `flavor`.
pub fn translate(reg: &Registry, opts: &Options, flavor: Flavor) -> Resources {
    Resources {
        clusters: clusters(reg, flavor),
        endpoints: endpoints(reg, flavor),
        listeners: listeners(reg, opts, flavor),
        routes: routes(reg, opts, flavor),
    }
}
