//! The gRPC services (ADS and per-type CDS/EDS/LDS/RDS) over one shared [`Inner`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Status, Streaming};

use crate::body::ResponseBody;
use crate::limits::XdsLimits;
use crate::metrics::RefusedLabels;
use weft_xds_cache::Cache;

use crate::metrics::XdsMetrics;
use crate::state::{
    CLUSTER, ENDPOINT, LISTENER, NameSets, ROUTE, StreamState, SyncState, TypeResources,
    TypeStatus, Variant,
};
use crate::stream::{Delta, Flow, Sotw, run};

/// Decides a client's flavour (which cache view it gets) from its node.
pub type Classifier = Arc<dyn Fn(Option<&Node>) -> String + Send + Sync>;

pub(crate) struct Inner {
    pub(crate) cache: Arc<Cache>,
    pub(crate) classify: Classifier,
    pub(crate) metrics: XdsMetrics,
    pub(crate) drain: watch::Receiver<bool>,
    clients: Mutex<BTreeMap<u64, ClientEntry>>,
    next_id: AtomicU64,
    /// Subscription name sets shared by every stream.
    pub(crate) name_sets: Arc<NameSets>,
    /// Set by [`XdsServer::with_authorizer`]; none means every peer may be any node.
    pub(crate) authorizer: std::sync::OnceLock<crate::authz::Authorizer>,
    /// Read once per stream when it opens; see [`XdsServer::with_limits`].
    limits: RwLock<Arc<XdsLimits>>,
    /// Streams admitted and not yet ended (including those waiting for their first request),
    /// for [`XdsLimits::max_streams`].
    open_streams: AtomicUsize,
    /// The latest rejections, newest last, kept after their streams end (an operator asks
    /// "what was rejected" after the proxy has restarted).
    nack_log: Mutex<VecDeque<NackEvent>>,
    /// Connected streams rejecting each (type URL, resource): the truth behind the
    /// `weft_xds_rejected_resources` gauge, kept here so that a series can be removed at zero
    /// without racing another stream's increment.
    rejected_counts: Mutex<HashMap<(String, String), i64>>,
    /// Bumped whenever a stream starts or stops rejecting a resource.
    rejections_tx: watch::Sender<u64>,
}

/// A resource some connected clients reject, for feedback to where its config came from
/// (a custom resource's status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedResource {
    pub flavor: String,
    pub type_url: String,
    pub name: String,
    /// Node ids of the streams rejecting it, sorted, each once.
    pub nodes: Vec<String>,
    /// The most recent rejection's reason.
    pub reason: String,
}

/// How many rejections `/debug/nacks` keeps.
pub const NACK_LOG_LEN: usize = 100;

/// One rejection as `/debug/nacks` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NackEvent {
    pub node_id: String,
    pub stream_id: u64,
    pub variant: Variant,
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub message: String,
    /// The resources it was attributed to.
    pub resources: Vec<String>,
    pub at_unix_ms: u64,
}

/// One stream of a node with every resource it holds, for `/debug/proxy_config` and CSDS.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResources {
    pub stream_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub user_agent: String,
    pub variant: Variant,
    pub flavor: String,
    pub service: &'static str,
    pub types: BTreeMap<String, TypeResources>,
}

/// One stream in the client list. Cheap to clone (the state is shared), which is how status
/// requests copy it out of the list's lock.
#[derive(Clone)]
pub(crate) struct ClientEntry {
    node_id: String,
    cluster: String,
    user_agent: String,
    flavor: String,
    variant: Variant,
    service: &'static str,
    connected_unix_ms: u64,
    state: Arc<Mutex<StreamState>>,
}

impl ClientEntry {
    pub(crate) fn new(
        node: &Node,
        flavor: &str,
        variant: Variant,
        service: &'static str,
        state: Arc<Mutex<StreamState>>,
    ) -> Self {
        Self {
            node_id: node.id.clone(),
            cluster: node.cluster.clone(),
            user_agent: node.user_agent_name.clone(),
            flavor: flavor.to_string(),
            variant,
            service,
            connected_unix_ms: unix_ms(),
            state,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Removes a stream from the client list when the stream ends.
pub(crate) struct ClientGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl ClientGuard {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.inner.clients_lock().remove(&self.id);
    }
}

impl Inner {
    fn clients_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientEntry>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn limits(&self) -> Arc<XdsLimits> {
        Arc::clone(&self.limits.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.metrics
            .streams_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    /// Takes a slot of [`XdsLimits::max_streams`], or says why not.
    fn admit(self: &Arc<Self>) -> Result<StreamPermit, Status> {
        let max = self.limits().max_streams;
        let before = self.open_streams.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.open_streams.fetch_sub(1, Ordering::AcqRel);
            self.refused("max_streams");
            // RESOURCE_EXHAUSTED rather than UNAVAILABLE: the client should back off before
            // retrying (Envoy does), ideally against another replica.
            return Err(Status::resource_exhausted(format!(
                "this control plane serves at most {max} xDS streams (--xds-max-streams); \
                 retry later or connect to another replica"
            )));
        }
        Ok(StreamPermit(Arc::clone(self)))
    }

    /// Keeps `event` in the recent-rejections log.
    pub(crate) fn log_nack(&self, event: NackEvent) {
        let mut log = self.nack_log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= NACK_LOG_LEN {
            log.pop_front();
        }
        log.push_back(event);
    }

    /// Moves the count of streams rejecting (type URL, resource) by `delta`, and the gauge
    /// with it; a series at zero is removed, so the gauge lists only what is rejected now.
    pub(crate) fn count_rejection(&self, type_url: &str, resource: &str, delta: i64) {
        let mut counts = self
            .rejected_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (type_url.to_string(), resource.to_string());
        let labels = crate::metrics::ResourceLabels {
            type_url: key.0.clone(),
            resource: key.1.clone(),
        };
        let n = counts.entry(key.clone()).or_insert(0);
        *n += delta;
        if *n <= 0 {
            counts.remove(&key);
            self.metrics.rejected_resources.remove(&labels);
        } else {
            self.metrics
                .rejected_resources
                .get_or_create(&labels)
                .set(*n);
        }
        self.rejections_tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(crate) fn register_client(self: &Arc<Self>, entry: ClientEntry) -> ClientGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients_lock().insert(id, entry);
        ClientGuard {
            inner: Arc::clone(self),
            id,
        }
    }
}

/// A slot of [`XdsLimits::max_streams`], given back when the stream task ends.
struct StreamPermit(Arc<Inner>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connected stream as `/debug/clients` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub user_agent: String,
    pub flavor: String,
    pub variant: Variant,
    pub service: &'static str,
    pub connected_unix_ms: u64,
    /// The worst state of its types.
    pub state: SyncState,
    pub types: BTreeMap<String, TypeStatus>,
}

/// The xDS server. Cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer").finish_non_exhaustive()
    }
}

impl XdsServer {
    /// `drain`: when it becomes true, every stream ends with UNAVAILABLE so the gRPC server can
    /// stop (an open stream would otherwise keep it up forever, tonic #1820).
    pub fn new(
        cache: Arc<Cache>,
        classify: impl Fn(Option<&Node>) -> String + Send + Sync + 'static,
        drain: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache,
                classify: Arc::new(classify),
                metrics: XdsMetrics::default(),
                drain,
                clients: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(0),
                name_sets: Arc::default(),
                authorizer: std::sync::OnceLock::new(),
                limits: RwLock::new(Arc::new(XdsLimits::default())),
                open_streams: AtomicUsize::new(0),
                nack_log: Mutex::new(VecDeque::with_capacity(NACK_LOG_LEN)),
                rejected_counts: Mutex::new(HashMap::new()),
                rejections_tx: watch::channel(0).0,
            }),
        }
    }

    /// Sets the stream-level limits (the connection-level ones are set on the gRPC server with
    /// [`XdsLimits::configure`]). Streams already open keep the limits they opened with.
    #[must_use]
    pub fn with_limits(self, limits: XdsLimits) -> Self {
        *self.inner.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(limits);
        self
    }

    /// Checks every stream's peer against its first node id (see [`crate::authz`]). Set once;
    /// a second call is ignored.
    #[must_use]
    pub fn with_authorizer(self, authorizer: crate::authz::Authorizer) -> Self {
        let _ = self.inner.authorizer.set(authorizer);
        self
    }

    pub(crate) fn authorizer(&self) -> Option<crate::authz::Authorizer> {
        self.inner.authorizer.get().cloned()
    }

    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(reg);
        reg.register_collector(Box::new(SyncStateCollector(self.clone())));
    }

    /// Every connected stream with its per-type protocol state, judged against the cache's
    /// current state.
    pub fn clients(&self) -> Vec<ClientStatus> {
        let entries = self.entries();
        entries
            .into_iter()
            .map(|(id, e, snap)| {
                let types = e
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .status(snap.as_deref());
                ClientStatus {
                    stream_id: id,
                    node_id: e.node_id,
                    cluster: e.cluster,
                    user_agent: e.user_agent,
                    flavor: e.flavor,
                    variant: e.variant,
                    service: e.service,
                    connected_unix_ms: e.connected_unix_ms,
                    state: types.values().map(|t| t.state).max().unwrap_or_default(),
                    types,
                }
            })
            .collect()
    }

    /// Every stream of node `node_id` with every resource it holds; empty when no connected
    /// stream has that node id.
    pub fn proxy_config(&self, node_id: &str) -> Vec<StreamResources> {
        self.entries()
            .into_iter()
            .filter(|(_, e, _)| e.node_id == node_id)
            .map(|(id, e, snap)| Self::stream_resources(id, e, snap.as_deref()))
            .collect()
    }

    /// Every stream whose node id `matches`, with every resource it holds (CSDS).
    pub fn streams_matching(&self, matches: impl Fn(&str) -> bool) -> Vec<StreamResources> {
        self.entries()
            .into_iter()
            .filter(|(_, e, _)| matches(&e.node_id))
            .map(|(id, e, snap)| Self::stream_resources(id, e, snap.as_deref()))
            .collect()
    }

    fn stream_resources(
        id: u64,
        e: ClientEntry,
        snap: Option<&weft_xds_cache::FlavorSnapshot>,
    ) -> StreamResources {
        let types = e
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resources(snap);
        StreamResources {
            stream_id: id,
            node_id: e.node_id,
            cluster: e.cluster,
            user_agent: e.user_agent,
            variant: e.variant,
            flavor: e.flavor,
            service: e.service,
            types,
        }
    }

    /// A copy of the client list with each flavour's current snapshot, taken under the list's
    /// lock only briefly: streams' states are locked one at a time afterwards, so a status
    /// request never holds up streams registering or ending.
    fn entries(
        &self,
    ) -> Vec<(
        u64,
        ClientEntry,
        Option<Arc<weft_xds_cache::FlavorSnapshot>>,
    )> {
        let views: Vec<(u64, ClientEntry)> = self
            .inner
            .clients_lock()
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let mut snaps: HashMap<String, Option<Arc<weft_xds_cache::FlavorSnapshot>>> =
            HashMap::new();
        views
            .into_iter()
            .map(|(id, v)| {
                let snap = snaps
                    .entry(v.flavor.clone())
                    .or_insert_with(|| self.inner.cache.snapshot(&v.flavor))
                    .clone();
                (id, v, snap)
            })
            .collect()
    }

    /// Every resource some connected stream rejects, with who and why, sorted by flavour, type
    /// and name.
    pub fn rejected_resources(&self) -> Vec<RejectedResource> {
        /// Who rejects one resource, and the latest reason.
        #[derive(Default)]
        struct Acc {
            nodes: Vec<String>,
            at: u64,
            reason: String,
        }
        let mut by: BTreeMap<(String, String, String), Acc> = BTreeMap::new();
        for (_, e, _) in self.entries() {
            let st = e.state.lock().unwrap_or_else(|p| p.into_inner());
            for (type_url, r) in st.rejection_details() {
                let acc = by
                    .entry((e.flavor.clone(), type_url, r.name.clone()))
                    .or_default();
                acc.nodes.push(e.node_id.clone());
                if r.at_unix_ms >= acc.at {
                    (acc.at, acc.reason) = (r.at_unix_ms, r.reason.clone());
                }
            }
        }
        by.into_iter()
            .map(|((flavor, type_url, name), mut acc)| {
                acc.nodes.sort();
                acc.nodes.dedup();
                RejectedResource {
                    flavor,
                    type_url,
                    name,
                    nodes: acc.nodes,
                    reason: acc.reason,
                }
            })
            .collect()
    }

    /// Changes whenever the set of rejected resources may have changed (see
    /// [`XdsServer::rejected_resources`]).
    pub fn rejections_changed(&self) -> watch::Receiver<u64> {
        self.inner.rejections_tx.subscribe()
    }

    /// The latest rejections (at most [`NACK_LOG_LEN`]), newest first.
    pub fn nacks(&self) -> Vec<NackEvent> {
        let log = self
            .inner
            .nack_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        log.iter().rev().cloned().collect()
    }

    pub fn ads(&self) -> XdsService<Ads> {
        self.service()
    }
    pub fn cds(&self) -> XdsService<Cds> {
        self.service()
    }
    pub fn eds(&self) -> XdsService<Eds> {
        self.service()
    }
    pub fn lds(&self) -> XdsService<Lds> {
        self.service()
    }
    pub fn rds(&self) -> XdsService<Rds> {
        self.service()
    }

    fn service<K: Kind>(&self) -> XdsService<K> {
        XdsService {
            inner: Arc::clone(&self.inner),
            _kind: PhantomData,
        }
    }

    /// All five services, ready for `tonic::transport::Server::builder().add_routes(..)`.
    pub fn routes(&self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.ads())
            .add_service(self.cds())
            .add_service(self.eds())
            .add_service(self.lds())
            .add_service(self.rds())
    }
}

/// `weft_xds_sync_state_streams`: judged at scrape time, like `/debug/clients`, because the
/// state of every stream changes with every snapshot and keeping gauges current on the push
/// path would cost each push a walk of all streams.
struct SyncStateCollector(XdsServer);

impl std::fmt::Debug for SyncStateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncStateCollector")
    }
}

impl prometheus_client::collector::Collector for SyncStateCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::TypedMetric;
        let family: prometheus_client::metrics::family::Family<
            crate::metrics::SyncLabels,
            prometheus_client::metrics::gauge::Gauge,
        > = Default::default();
        for c in self.0.clients() {
            for (type_url, t) in &c.types {
                // Every state of a subscribed type has a series, zero included, so an alert on
                // `{state="NACKED"} > 0` needs no `absent()`.
                for s in SyncState::ALL {
                    let g = family.get_or_create(&crate::metrics::SyncLabels {
                        type_url: type_url.clone(),
                        state: s.as_str(),
                    });
                    if s == t.state {
                        g.inc();
                    }
                }
            }
        }
        let metric = encoder.encode_descriptor(
            "weft_xds_sync_state_streams",
            "Connected streams per subscribed type URL by sync state: SYNCED (ACKed the current config), STALE (not yet sent or ACKed it), NACKED (rejects a resource of it)",
            None,
            prometheus_client::metrics::gauge::Gauge::<i64>::TYPE,
        )?;
        family.encode(metric)
    }
}

/// Which gRPC service a [`XdsService`] is.
pub trait Kind: Send + Sync + 'static {
    const NAME: &'static str;
    const SOTW: &'static str;
    const DELTA: &'static str;
    /// Per-type services accept only their type; ADS accepts every type.
    const ONLY_TYPE: Option<&'static str>;
    const LABEL: &'static str;
}

macro_rules! kind {
    ($t:ident, $name:literal, $sotw:literal, $delta:literal, $only:expr, $label:literal) => {
        #[derive(Debug, Clone, Copy)]
        pub struct $t;
        impl Kind for $t {
            const NAME: &'static str = $name;
            const SOTW: &'static str = $sotw;
            const DELTA: &'static str = $delta;
            const ONLY_TYPE: Option<&'static str> = $only;
            const LABEL: &'static str = $label;
        }
    };
}

kind!(
    Ads,
    "envoy.service.discovery.v3.AggregatedDiscoveryService",
    "StreamAggregatedResources",
    "DeltaAggregatedResources",
    None,
    "ads"
);
kind!(
    Cds,
    "envoy.service.cluster.v3.ClusterDiscoveryService",
    "StreamClusters",
    "DeltaClusters",
    Some(CLUSTER),
    "cds"
);
kind!(
    Eds,
    "envoy.service.endpoint.v3.EndpointDiscoveryService",
    "StreamEndpoints",
    "DeltaEndpoints",
    Some(ENDPOINT),
    "eds"
);
kind!(
    Lds,
    "envoy.service.listener.v3.ListenerDiscoveryService",
    "StreamListeners",
    "DeltaListeners",
    Some(LISTENER),
    "lds"
);
kind!(
    Rds,
    "envoy.service.route.v3.RouteDiscoveryService",
    "StreamRoutes",
    "DeltaRoutes",
    Some(ROUTE),
    "rds"
);

/// One xDS gRPC service, written by hand rather than generated so that SotW and Delta on all
/// five services share one stream loop and send the cache's pre-encoded bytes.
pub struct XdsService<K> {
    inner: Arc<Inner>,
    _kind: PhantomData<K>,
}

impl<K> Clone for XdsService<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _kind: PhantomData,
        }
    }
}

impl<K: Kind> NamedService for XdsService<K> {
    const NAME: &'static str = K::NAME;
}

impl<K: Kind, B> Service<http::Request<B>> for XdsService<K>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("");
        let inner = Arc::clone(&self.inner);
        if method == K::SOTW {
            Box::pin(async move { Ok(start::<Sotw, K, B>(inner, req)) })
        } else if method == K::DELTA {
            Box::pin(async move { Ok(start::<Delta, K, B>(inner, req)) })
        } else {
            let status = Status::unimplemented(format!(
                "method `{}` is not served; use {} or {}",
                req.uri().path(),
                K::SOTW,
                K::DELTA
            ));
            Box::pin(async move { Ok(status.into_http()) })
        }
    }
}

/// A request decoder whose buffer starts at 1 KiB instead of tonic's 8 KiB. The buffer lives
/// as long as the stream and most requests (ACKs) are a few hundred bytes; it still grows to
/// the largest request when one is larger.
struct SmallBuffer<D>(D);

impl<D: tonic::codec::Decoder> tonic::codec::Decoder for SmallBuffer<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(1024, 32 * 1024)
    }
}

/// Starts a stream: requests are decoded by tonic, responses written by [`ResponseBody`]
/// (see `body.rs` for why not by tonic's encoder).
fn start<F: Flow, K: Kind, B>(
    inner: Arc<Inner>,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    use tonic::codec::Codec;
    // Refused before anything is allocated for it: past the limit a stream costs only this.
    let permit = match inner.admit() {
        Ok(p) => p,
        Err(status) => return status.into_http(),
    };
    let max_request = inner.limits().max_request_bytes;
    let peer = crate::authz::peer_of(&req);
    let decoder = SmallBuffer(tonic_prost::ProstCodec::<F::Resp, F::Req>::default().decoder());
    let requests = Streaming::new_request(decoder, req.into_body(), None, Some(max_request));
    // Small: at most one un-ACKed response per type is outstanding (four types), so a slow
    // client back-pressures its own task and nothing else; a client that ACKs unseen
    // responses fills it, and then its task waits (tests/limits.rs, the blind ACKer).
    let (tx, rx) = mpsc::channel(8);
    let queued = inner.metrics.queued_responses.clone();
    tokio::spawn(async move {
        let _permit = permit;
        run::<F>(inner, K::LABEL, K::ONLY_TYPE, requests, tx, peer).await;
    });
    let mut resp = http::Response::new(tonic::body::Body::new(ResponseBody::new(rx, queued)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}
