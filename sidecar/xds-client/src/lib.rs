//! An ADS client for the sidecar: subscribes to the control plane's clusters, their endpoints
//! and the `weft_http` routes, and keeps the last good set when the control plane is away.
//!
//! What it does: one ADS stream, Delta (default) or SotW. Subscribes to every Cluster
//! (wildcard), to the ClusterLoadAssignment of each cluster it has, and to the named
//! RouteConfigurations it is given. Each response is validated through a caller-supplied
//! [`Validator`] before anything from it is used: a rejected response is NACKed with the
//! validator's message and the previous resources stay in force. On disconnect it reconnects
//! with exponential backoff and full jitter; a Delta stream resumes with
//! `initial_resource_versions` so an unchanged control plane sends nothing new, a SotW stream
//! re-requests with the last accepted versions.
//!
//! What it does not do: interpret resources (weft-sidecar-config does), serve traffic, or
//! subscribe to Listeners (the sidecar builds its own).
//!
//! `synced` needs an accepted answer for every current cluster's endpoints. Weft's server
//! always has an assignment per cluster; with SotW a cluster whose assignment does not exist
//! on the server is only known absent from a later EDS response (SotW cannot say "no such
//! resource"), so against another control plane it may hold `synced` back.
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use tokio::sync::watch;

mod client;

/// Type URL of CDS resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of EDS resources.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of RDS resources.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    #[default]
    Delta,
    Sotw,
}

/// A resource about to be accepted; the validator says whether the sidecar can honour it.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    Cluster(&'a Cluster),
    Endpoints(&'a ClusterLoadAssignment),
    Route(&'a RouteConfiguration),
}

/// Returns `Err(message)` to NACK the response carrying the resource.
pub type Validator = Arc<dyn Fn(Resource<'_>) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct Options {
    /// `http://host:port` of the control plane's xDS port.
    pub endpoint: String,
    pub node: Node,
    pub variant: Variant,
    /// RouteConfiguration names to subscribe to (the sidecar: `["weft_http"]`).
    pub route_names: Vec<String>,
    pub validator: Validator,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// mTLS to the control plane (`endpoint` is then `https://`). The files are read again on
    /// every reconnect, so a renewed client certificate is presented from the next stream on.
    pub tls: Option<weft_identity::ClientTlsFiles>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("endpoint", &self.endpoint)
            .field("node", &self.node.id)
            .field("variant", &self.variant)
            .field("route_names", &self.route_names)
            .finish_non_exhaustive()
    }
}

/// The accepted resources and the stream's status. Published whole on every accepted change.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub clusters: BTreeMap<String, Cluster>,
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    pub routes: BTreeMap<String, RouteConfiguration>,
    /// Accepted version per (type URL, resource name) (Delta) or per type URL under the empty
    /// name (SotW).
    pub versions: BTreeMap<(String, String), String>,
    /// Every subscribed type has had at least one response accepted since start (stays true
    /// across reconnects: the last good config keeps serving).
    pub synced: bool,
    pub connected: bool,
    /// Last NACK sent: (type URL, message).
    pub last_nack: Option<(String, String)>,
    pub last_error: Option<String>,
    pub reconnects: u64,
    pub last_update: Option<SystemTime>,
}

/// A running client. Dropping it stops the stream.
#[derive(Debug)]
pub struct XdsClient {
    state: watch::Receiver<Arc<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        // The task owns the stream: aborting it closes the connection.
        self.task.abort();
    }
}

impl XdsClient {
    /// Starts the client task. Never fails: connection errors are retried with backoff and
    /// reported in [`State::last_error`]. Must be called within a Tokio runtime.
    pub fn spawn(opts: Options) -> XdsClient {
        let (tx, state) = watch::channel(Arc::new(State::default()));
        let task = tokio::spawn(client::Core::new(opts, tx).run());
        XdsClient { state, task }
    }

    /// Watch of the accepted state.
    pub fn state(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }
}
