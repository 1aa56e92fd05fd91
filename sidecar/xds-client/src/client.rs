//! The client task: connects, runs one ADS stream (SotW or Delta) at a time, applies what the
//! validator accepts, and reconnects with backoff when the stream is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{CLUSTER_TYPE, ENDPOINT_TYPE, Options, ROUTE_TYPE, Resource, State, Variant};

/// A stream that lived this long was healthy: the next failure starts backoff from scratch.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
/// Large configurations (many clusters) exceed tonic's 4 MiB default.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code Envoy puts in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Why a connection or stream ended. Only ever reported through [`State::last_error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("invalid control plane endpoint `{endpoint}`: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to the control plane at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("TLS files for the control plane: {0}")]
    Tls(#[from] weft_identity::TlsError),
    #[error("connecting to the control plane at {endpoint} timed out after {timeout:?}")]
    ConnectTimeout { endpoint: String, timeout: Duration },
    #[error("the control plane refused the ADS stream: {0}")]
    Open(#[source] tonic::Status),
    #[error("the ADS stream failed: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the control plane closed the ADS stream")]
    Closed,
}

/// The message of an error and of everything it wraps (tonic's transport errors alone say
/// only "transport error").
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Cluster,
    Endpoint,
    Route,
}

impl Kind {
    fn url(self) -> &'static str {
        match self {
            Kind::Cluster => CLUSTER_TYPE,
            Kind::Endpoint => ENDPOINT_TYPE,
            Kind::Route => ROUTE_TYPE,
        }
    }

    fn from_url(url: &str) -> Option<Kind> {
        [Kind::Cluster, Kind::Endpoint, Kind::Route]
            .into_iter()
            .find(|k| k.url() == url)
    }
}

enum Decoded {
    // Boxed: the message structs differ in size by kilobytes.
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    Route(Box<RouteConfiguration>),
}

impl Decoded {
    fn decode(kind: Kind, any: &Any) -> Result<Decoded, String> {
        if any.type_url != kind.url() {
            return Err(format!(
                "resource of type `{}` in a response of type `{}`",
                any.type_url,
                kind.url()
            ));
        }
        let bytes = any.value.as_slice();
        let r = match kind {
            Kind::Cluster => Cluster::decode(bytes).map(|c| Decoded::Cluster(Box::new(c))),
            Kind::Endpoint => {
                ClusterLoadAssignment::decode(bytes).map(|e| Decoded::Endpoints(Box::new(e)))
            }
            Kind::Route => RouteConfiguration::decode(bytes).map(|r| Decoded::Route(Box::new(r))),
        };
        r.map_err(|e| format!("cannot decode a resource of type `{}`: {e}", kind.url()))
    }

    fn name(&self) -> &str {
        match self {
            Decoded::Cluster(c) => &c.name,
            Decoded::Endpoints(e) => &e.cluster_name,
            Decoded::Route(r) => &r.name,
        }
    }

    fn resource(&self) -> Resource<'_> {
        match self {
            Decoded::Cluster(c) => Resource::Cluster(c),
            Decoded::Endpoints(e) => Resource::Endpoints(e),
            Decoded::Route(r) => Resource::Route(r),
        }
    }
}

/// Decodes and validates every resource of a response: all of them or an error message for
/// the NACK.
fn check<'a>(
    opts: &Options,
    kind: Kind,
    items: impl Iterator<Item = (Option<&'a str>, Option<&'a Any>)>,
) -> Result<Vec<(String, Decoded)>, String> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, any) in items {
        let Some(any) = any else {
            errors.push(format!(
                "resource `{}` has no body",
                name.unwrap_or_default()
            ));
            continue;
        };
        match Decoded::decode(kind, any) {
            Ok(d) => {
                if let Err(msg) = (opts.validator)(d.resource()) {
                    errors.push(msg);
                    continue;
                }
                // Delta names the resource; SotW only has the name inside it.
                let name = match name {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => d.name().to_string(),
                };
                out.push((name, d));
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("; "))
    }
}

/// Exponential backoff with full jitter.
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let initial = self.initial.max(Duration::from_millis(1));
        let cap = initial
            .saturating_mul(2u32.saturating_pow(self.attempt.min(31)))
            .min(self.max.max(initial));
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What the client holds and publishes, plus what decides `synced`.
pub(crate) struct Core {
    opts: Options,
    tx: watch::Sender<Arc<State>>,
    state: State,
    cds_done: bool,
    /// Cluster names whose endpoints an accepted response has answered (present or absent).
    eds_covered: BTreeSet<String>,
    /// Route names an accepted response has answered.
    rds_covered: BTreeSet<String>,
    /// A response was received on the current stream (resets backoff).
    received: bool,
}

impl Core {
    pub(crate) fn new(opts: Options, tx: watch::Sender<Arc<State>>) -> Core {
        Core {
            opts,
            tx,
            state: State::default(),
            cds_done: false,
            eds_covered: BTreeSet::new(),
            rds_covered: BTreeSet::new(),
            received: false,
        }
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.state.clone()));
    }

    fn cluster_names(&self) -> BTreeSet<String> {
        self.state.clusters.keys().cloned().collect()
    }

    /// `synced` is sticky: once every subscribed type has been answered, the config is good
    /// to serve, and a later reconnect does not make it less so.
    fn refresh_synced(&mut self) -> bool {
        if self.state.synced {
            return false;
        }
        let eds = self
            .state
            .clusters
            .keys()
            .all(|c| self.eds_covered.contains(c));
        let rds = self
            .opts
            .route_names
            .iter()
            .all(|r| self.rds_covered.contains(r));
        if self.cds_done && eds && rds {
            self.state.synced = true;
            tracing::info!(
                clusters = self.state.clusters.len(),
                routes = self.state.routes.len(),
                "xDS configuration synced"
            );
            return true;
        }
        false
    }

    fn nack(&mut self, kind: Kind, message: &str) {
        tracing::warn!(
            type_url = kind.url(),
            message,
            "rejected xDS response (NACK); keeping the previous configuration"
        );
        self.state.last_nack = Some((kind.url().to_string(), message.to_string()));
        self.publish();
    }

    /// Drops the endpoints of clusters we no longer have (a removed service's endpoints are
    /// not always announced on their own: SotW only says so through CDS).
    fn prune_endpoints(&mut self) {
        let clusters = &self.state.clusters;
        self.state.endpoints.retain(|n, _| clusters.contains_key(n));
        self.state
            .versions
            .retain(|(t, n), _| t != ENDPOINT_TYPE || n.is_empty() || clusters.contains_key(n));
        self.eds_covered.retain(|n| clusters.contains_key(n));
    }

    /// A SotW response is the whole set for its type.
    fn apply_sotw(&mut self, kind: Kind, resources: Vec<(String, Decoded)>, version: &str) -> bool {
        let mut clusters = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        let mut routes = BTreeMap::new();
        for (name, d) in resources {
            match d {
                Decoded::Cluster(c) => {
                    clusters.insert(name, *c);
                }
                Decoded::Endpoints(e) => {
                    endpoints.insert(name, *e);
                }
                Decoded::Route(r) => {
                    routes.insert(name, *r);
                }
            }
        }
        let mut changed = false;
        match kind {
            Kind::Cluster => {
                if clusters != self.state.clusters {
                    self.state.clusters = clusters;
                    self.prune_endpoints();
                    changed = true;
                }
            }
            Kind::Endpoint => {
                // A response to an older subscription may still name a dropped cluster.
                endpoints.retain(|n, _| self.state.clusters.contains_key(n));
                if endpoints != self.state.endpoints {
                    self.state.endpoints = endpoints;
                    changed = true;
                }
            }
            Kind::Route => {
                if routes != self.state.routes {
                    self.state.routes = routes;
                    changed = true;
                }
            }
        }
        let key = (kind.url().to_string(), String::new());
        if self.state.versions.get(&key).map(String::as_str) != Some(version) {
            self.state.versions.insert(key, version.to_string());
            changed = true;
        }
        changed
    }

    /// A Delta response upserts what it carries and removes what it lists.
    fn apply_delta(
        &mut self,
        kind: Kind,
        resources: Vec<(String, Decoded, String)>,
        removed: &[String],
    ) -> bool {
        let url = kind.url().to_string();
        let mut changed = false;
        for (name, d, version) in resources {
            // Endpoints of a cluster we do not have (a response to an older subscription) are
            // not kept: nothing would remove them later.
            if matches!(d, Decoded::Endpoints(_)) && !self.state.clusters.contains_key(&name) {
                continue;
            }
            let key = (url.clone(), name.clone());
            if self.state.versions.get(&key) != Some(&version) {
                self.state.versions.insert(key, version);
                changed = true;
            }
            changed |= match d {
                Decoded::Cluster(c) => upsert(&mut self.state.clusters, name, *c),
                Decoded::Endpoints(e) => upsert(&mut self.state.endpoints, name, *e),
                Decoded::Route(r) => upsert(&mut self.state.routes, name, *r),
            };
        }
        for name in removed {
            changed |= self
                .state
                .versions
                .remove(&(url.clone(), name.clone()))
                .is_some();
            changed |= match kind {
                Kind::Cluster => self.state.clusters.remove(name).is_some(),
                Kind::Endpoint => self.state.endpoints.remove(name).is_some(),
                Kind::Route => self.state.routes.remove(name).is_some(),
            };
        }
        if kind == Kind::Cluster && changed {
            self.prune_endpoints();
        }
        changed
    }

    /// After an accepted response: stamps, recomputes `synced` and publishes if anything moved.
    fn accepted(&mut self, changed: bool) {
        let synced = self.refresh_synced();
        if changed {
            self.state.last_update = Some(SystemTime::now());
        }
        if changed || synced {
            self.publish();
        }
    }

    fn version_of(&self, kind: Kind) -> String {
        self.state
            .versions
            .get(&(kind.url().to_string(), String::new()))
            .cloned()
            .unwrap_or_default()
    }

    fn held_versions(
        &self,
        kind: Kind,
        only: Option<&BTreeSet<String>>,
    ) -> BTreeMap<String, String> {
        self.state
            .versions
            .iter()
            .filter(|((t, n), _)| {
                t == kind.url() && !n.is_empty() && only.is_none_or(|o| o.contains(n))
            })
            .map(|((_, n), v)| (n.clone(), v.clone()))
            .collect()
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff {
            initial: self.opts.backoff_initial,
            max: self.opts.backoff_max,
            attempt: 0,
        };
        loop {
            let started = Instant::now();
            self.received = false;
            let err = match self.connect().await {
                Ok(channel) => match self.opts.variant {
                    Variant::Delta => self.run_delta(channel).await,
                    Variant::Sotw => self.run_sotw(channel).await,
                },
                Err(e) => e,
            };
            let message = describe(&err);
            if self.received || started.elapsed() > HEALTHY_STREAM {
                backoff.reset();
            }
            let delay = backoff.next();
            if self.state.connected {
                tracing::info!(error = %message, retry_in = ?delay, "disconnected from the control plane");
            } else {
                tracing::info!(error = %message, retry_in = ?delay, "cannot reach the control plane");
            }
            self.state.connected = false;
            self.state.last_error = Some(message);
            self.state.reconnects += 1;
            self.publish();
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect(&self) -> Result<Channel, StreamError> {
        let endpoint = self.opts.endpoint.clone();
        let ep = Endpoint::from_shared(endpoint.clone())
            .map_err(|source| StreamError::Endpoint {
                endpoint: endpoint.clone(),
                source,
            })?
            .connect_timeout(self.opts.connect_timeout)
            // Notice a control plane that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let ep = match &self.opts.tls {
            Some(files) => ep
                .tls_config(weft_identity::tls::tonic_client_tls(files)?)
                .map_err(|source| StreamError::Endpoint {
                    endpoint: endpoint.clone(),
                    source,
                })?,
            None => ep,
        };
        // The endpoint's timeout covers TCP only; a port that accepts but never speaks HTTP/2
        // (a control plane still starting) would otherwise hang here.
        let timeout = self.opts.connect_timeout.max(Duration::from_millis(1)) * 2;
        match tokio::time::timeout(timeout, ep.connect()).await {
            Ok(r) => r.map_err(|source| StreamError::Connect { endpoint, source }),
            Err(_) => Err(StreamError::ConnectTimeout { endpoint, timeout }),
        }
    }

    fn on_connected(&mut self) {
        tracing::info!(
            endpoint = %self.opts.endpoint,
            variant = ?self.opts.variant,
            reconnects = self.state.reconnects,
            "connected to the control plane"
        );
        self.state.connected = true;
        self.publish();
    }

    // === SotW ===

    async fn run_sotw(&mut self, channel: Channel) -> StreamError {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = SotwStream::default();
        // Queued before the call: the server may only answer headers once it has a request.
        self.sotw_send(&tx, &mut s, Kind::Cluster, String::new(), None, true);
        if !self.opts.route_names.is_empty() {
            self.sotw_send(&tx, &mut s, Kind::Route, String::new(), None, true);
        }
        if !self.state.clusters.is_empty() {
            self.sotw_send(&tx, &mut s, Kind::Endpoint, String::new(), None, true);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut responses = match client
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return StreamError::Open(status),
        };
        self.on_connected();
        loop {
            match responses.message().await {
                Ok(Some(r)) => {
                    self.received = true;
                    self.on_sotw_response(&tx, &mut s, r);
                }
                Ok(None) => return StreamError::Closed,
                Err(status) => return StreamError::Stream(status),
            }
        }
    }

    /// Names a SotW request of `kind` carries: each request is the full subscription.
    fn sotw_names(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Cluster => Vec::new(),
            Kind::Endpoint => self.state.clusters.keys().cloned().collect(),
            Kind::Route => self.opts.route_names.clone(),
        }
    }

    fn sotw_send(
        &self,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
        s: &mut SotwStream,
        kind: Kind,
        nonce: String,
        error: Option<String>,
        answer: bool,
    ) {
        let names = self.sotw_names(kind);
        if kind == Kind::Endpoint {
            let set: BTreeSet<String> = names.iter().cloned().collect();
            // The server sees an ACK/NACK, or the stream's first EDS request, before it can
            // send the next EDS response (one un-ACKed response per type); a mere
            // subscription change may cross a response in flight and be ignored as stale.
            if answer || s.eds_sent.is_none() {
                s.eds_answered = set.clone();
            }
            s.eds_sent = Some(set);
        }
        let req = DiscoveryRequest {
            version_info: self.version_of(kind),
            node: (!std::mem::replace(&mut s.node_sent, true)).then(|| self.opts.node.clone()),
            resource_names: names,
            type_url: kind.url().to_string(),
            response_nonce: nonce,
            error_detail: error.map(|message| RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        // Fails only once the stream is gone, which the response side reports.
        let _ = tx.send(req);
    }

    fn on_sotw_response(
        &mut self,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
        s: &mut SotwStream,
        r: DiscoveryResponse,
    ) {
        let Some(kind) = Kind::from_url(&r.type_url) else {
            tracing::debug!(type_url = %r.type_url, "ignoring a response of a type we did not ask for");
            return;
        };
        s.nonces.insert(kind, r.nonce.clone());
        // Names our last ACK/NACK (or first request) carried: the server saw that request
        // before it could send this response (one un-ACKed response per type), so any of
        // them this response lacks does not exist.
        let answered = s.eds_answered.clone();
        let checked = check(
            &self.opts,
            kind,
            r.resources.iter().map(|a| (None, Some(a))),
        );
        match checked {
            Err(message) => {
                self.nack(kind, &message);
                self.sotw_send(tx, s, kind, r.nonce, Some(message), true);
            }
            Ok(resources) => {
                let present: Vec<String> = resources.iter().map(|(n, _)| n.clone()).collect();
                let changed = self.apply_sotw(kind, resources, &r.version_info);
                match kind {
                    Kind::Cluster => {
                        self.cds_done = true;
                        let want = self.cluster_names();
                        let sent = s.eds_sent.as_ref();
                        if sent != Some(&want) && (sent.is_some() || !want.is_empty()) {
                            let nonce = s.nonces.get(&Kind::Endpoint).cloned().unwrap_or_default();
                            self.sotw_send(tx, s, Kind::Endpoint, nonce, None, false);
                        }
                    }
                    Kind::Endpoint => {
                        self.eds_covered.extend(present);
                        self.eds_covered.extend(answered);
                    }
                    Kind::Route => {
                        // Every RDS request carries every route name.
                        self.rds_covered.extend(present);
                        self.rds_covered
                            .extend(self.opts.route_names.iter().cloned());
                    }
                }
                self.sotw_send(tx, s, kind, r.nonce, None, true);
                self.accepted(changed);
            }
        }
    }

    // === Delta ===

    async fn run_delta(&mut self, channel: Channel) -> StreamError {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = DeltaStream::default();
        // Resume: what we hold, so an unchanged server sends nothing again.
        let _ = tx.send(DeltaDiscoveryRequest {
            node: Some(self.opts.node.clone()),
            type_url: CLUSTER_TYPE.to_string(),
            resource_names_subscribe: vec!["*".to_string()],
            initial_resource_versions: self
                .held_versions(Kind::Cluster, None)
                .into_iter()
                .collect(),
            ..Default::default()
        });
        if !self.opts.route_names.is_empty() {
            let names: BTreeSet<String> = self.opts.route_names.iter().cloned().collect();
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: ROUTE_TYPE.to_string(),
                initial_resource_versions: self
                    .held_versions(Kind::Route, Some(&names))
                    .into_iter()
                    .collect(),
                resource_names_subscribe: names.into_iter().collect(),
                ..Default::default()
            });
        }
        if !self.state.clusters.is_empty() {
            self.delta_eds_subscription(&tx, &mut s);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut responses = match client
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return StreamError::Open(status),
        };
        self.on_connected();
        loop {
            match responses.message().await {
                Ok(Some(r)) => {
                    self.received = true;
                    self.on_delta_response(&tx, &mut s, r);
                }
                Ok(None) => return StreamError::Closed,
                Err(status) => return StreamError::Stream(status),
            }
        }
    }

    /// Brings the stream's EDS subscription to the current cluster names: the first request
    /// with the versions we hold, later ones as subscribe/unsubscribe diffs.
    fn delta_eds_subscription(
        &self,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        s: &mut DeltaStream,
    ) {
        let want = self.cluster_names();
        let req = match &s.eds_subscribed {
            None if want.is_empty() => return,
            None => DeltaDiscoveryRequest {
                type_url: ENDPOINT_TYPE.to_string(),
                resource_names_subscribe: want.iter().cloned().collect(),
                initial_resource_versions: self
                    .held_versions(Kind::Endpoint, Some(&want))
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            Some(have) if *have == want => return,
            Some(have) => DeltaDiscoveryRequest {
                type_url: ENDPOINT_TYPE.to_string(),
                resource_names_subscribe: want.difference(have).cloned().collect(),
                resource_names_unsubscribe: have.difference(&want).cloned().collect(),
                ..Default::default()
            },
        };
        let _ = tx.send(req);
        s.eds_subscribed = Some(want);
    }

    fn on_delta_response(
        &mut self,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        s: &mut DeltaStream,
        r: DeltaDiscoveryResponse,
    ) {
        let Some(kind) = Kind::from_url(&r.type_url) else {
            tracing::debug!(type_url = %r.type_url, "ignoring a response of a type we did not ask for");
            return;
        };
        let checked = check(
            &self.opts,
            kind,
            r.resources
                .iter()
                .map(|res| (Some(res.name.as_str()), res.resource.as_ref())),
        );
        let ack = |error: Option<String>| DeltaDiscoveryRequest {
            type_url: kind.url().to_string(),
            response_nonce: r.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        match checked {
            Err(message) => {
                self.nack(kind, &message);
                let _ = tx.send(ack(Some(message)));
            }
            Ok(resources) => {
                let versions: BTreeMap<&str, &str> = r
                    .resources
                    .iter()
                    .map(|res| (res.name.as_str(), res.version.as_str()))
                    .collect();
                let resources: Vec<(String, Decoded, String)> = resources
                    .into_iter()
                    .map(|(n, d)| {
                        let v = versions.get(n.as_str()).copied().unwrap_or_default();
                        (n, d, v.to_string())
                    })
                    .collect();
                let answered: Vec<String> = resources
                    .iter()
                    .map(|(n, _, _)| n.clone())
                    .chain(r.removed_resources.iter().cloned())
                    .collect();
                let changed = self.apply_delta(kind, resources, &r.removed_resources);
                match kind {
                    Kind::Cluster => {
                        self.cds_done = true;
                        // Subscribe to a new cluster's endpoints before ACKing it, as Envoy
                        // does while the cluster warms.
                        self.delta_eds_subscription(tx, s);
                    }
                    Kind::Endpoint => self.eds_covered.extend(answered),
                    Kind::Route => self.rds_covered.extend(answered),
                }
                let _ = tx.send(ack(None));
                self.accepted(changed);
            }
        }
    }
}

fn upsert<T: PartialEq>(map: &mut BTreeMap<String, T>, name: String, value: T) -> bool {
    match map.get(&name) {
        Some(old) if *old == value => false,
        _ => {
            map.insert(name, value);
            true
        }
    }
}

#[derive(Default)]
struct SotwStream {
    /// The node goes on the stream's first request only.
    node_sent: bool,
    /// Last nonce received per type.
    nonces: std::collections::HashMap<Kind, String>,
    /// EDS names last sent on this stream; `None` before the first EDS request.
    eds_sent: Option<BTreeSet<String>>,
    /// EDS names of the last request that answered a response (or the first request).
    eds_answered: BTreeSet<String>,
}

#[derive(Default)]
struct DeltaStream {
    /// EDS names subscribed on this stream; `None` before the first EDS request.
    eds_subscribed: Option<BTreeSet<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            attempt: 0,
        };
        let caps = [100, 200, 400, 800, 1000, 1000, 1000];
        for cap in caps {
            let d = b.next();
            assert!(d <= Duration::from_millis(cap), "{d:?} > {cap}ms");
        }
        // Full jitter: over many draws at the cap, some are well below it.
        let draws: Vec<Duration> = (0..50).map(|_| b.next()).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(draws.iter().any(|d| *d < Duration::from_millis(500)));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
        // A huge attempt count neither overflows nor exceeds the cap.
        b.attempt = u32::MAX;
        assert!(b.next() <= Duration::from_secs(1));
    }

    #[test]
    fn describe_includes_the_causes() {
        let e = StreamError::Open(tonic::Status::unavailable("shutting down"));
        assert!(describe(&e).contains("shutting down"));
    }
}
