//! The Kubernetes source: keeps the hub's copy of the cluster's Services, EndpointSlices and
//! Weft custom resources equal to what the API server says, and reports back on the custom
//! resources through their `status`.
//!
//! What it does:
//! - Watches Services (optionally by label selector), EndpointSlices and, unless turned off,
//!   `TrafficRoute`, `TrafficPolicy` and `ExternalService` (`mesh.weft.dev/v1alpha1`), in every
//!   namespace or one watch per listed namespace. Each watch is kube-runtime's `watcher` with its
//!   default backoff: list then watch from the list's resourceVersion, bookmarks, resume at the
//!   last version seen when a watch ends, and a full relist when the API server answers
//!   410 Gone.
//! - Joins Services with their slices (label `kubernetes.io/service-name`) into a service
//!   `<name>.<namespace>` and one instance per endpoint address at the chosen port (see
//!   [`discovery`]). Custom resources are validated by `weft-crds`; a valid one becomes a route,
//!   a policy or a service with static endpoints, an invalid one is reported (`report_error`,
//!   naming the object and field) and not applied, and nothing else is affected.
//! - Applies changes as a diff against what it last gave the hub, so a relist of one watch
//!   (410) removes what vanished meanwhile and duplicates nothing. The first full sync (and
//!   readiness) is when every watch has completed its first list.
//! - On watch errors the hub keeps the last known state while the watch backs off and retries.
//! - Writes the custom resources' `status` (`observedGeneration`, `Accepted`, `ResolvedRefs`)
//!   from one replica at a time: leader election on a `coordination.k8s.io/v1` Lease
//!   ([`lease`]).
//!
//! What it does not do: write anything but CRD status and its Lease; read Endpoints (the
//! pre-slice API), Pods or Nodes; serve ExternalName Services or FQDN slices (EDS needs
//! addresses); install the CRDs (the chart does). A CRD that is not installed keeps its watch
//! failing, so the source never syncs: the control plane stays unready, visibly, rather than
//! serving without the routes.

pub mod crd;
pub mod discovery;
pub mod lease;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use weft_registry::{Mirror, Object, ObjectKey, RegistrySnapshot, SourceHandle};

pub use lease::LeaseOptions;
pub use status::{CrdKind, ProxyRejections, StatusTarget, Verdict};

/// What to watch and how.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Namespaces in the mesh; empty means all.
    pub namespaces: Vec<String>,
    /// Label selector Services must match to be in the mesh (`app=pay,tier!=batch`).
    pub service_selector: Option<String>,
    /// Service port whose endpoints are served when the Service has a port of that name and no
    /// `mesh.weft.dev/port` annotation; otherwise the first port.
    pub port_name: Option<String>,
    /// Watch Weft's CRDs (and elect a status writer).
    pub crds: bool,
    pub lease: LeaseOptions,
    /// `timeoutSeconds` of each watch request; kube's default (290s) when unset.
    pub watch_timeout: Option<u32>,
    /// How soon a failed status write is retried.
    pub status_retry: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            namespaces: Vec::new(),
            service_selector: None,
            port_name: None,
            crds: true,
            lease: LeaseOptions::default(),
            watch_timeout: None,
            status_retry: Duration::from_secs(2),
        }
    }
}

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("namespace {0:?} is not a valid Kubernetes namespace name")]
    BadNamespace(String),
}

impl KubeOptions {
    /// Checks what can be checked without an API server.
    pub fn validate(&self) -> Result<(), KubeError> {
        for ns in self.namespaces.iter().chain([&self.lease.namespace]) {
            let ok = !ns.is_empty()
                && ns.len() <= 63
                && ns
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !ns.starts_with('-')
                && !ns.ends_with('-');
            if !ok {
                return Err(KubeError::BadNamespace(ns.clone()));
            }
        }
        Ok(())
    }
}

/// A client from the environment: in-cluster service account, else `KUBECONFIG` /
/// `~/.kube/config`.
pub async fn infer_client() -> Result<kube::Client, KubeError> {
    client_from_config(kube::Config::infer().await?)
}

/// A client for `config`. kube's rustls needs a process-wide crypto provider and does not pick
/// one itself; ring is installed unless something else already chose one.
pub fn client_from_config(config: kube::Config) -> Result<kube::Client, KubeError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(kube::Client::try_from(config)?)
}

/// The counters and gauges of the source; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    events: Counter,
    relists: Counter,
    invalid_objects: Counter,
    leader: Gauge,
    status_writes: Counter,
}

impl KubeMetrics {
    pub fn events(&self) -> u64 {
        self.events.get()
    }
    pub fn relists(&self) -> u64 {
        self.relists.get()
    }
    pub fn invalid_objects(&self) -> u64 {
        self.invalid_objects.get()
    }
    pub fn leader(&self) -> bool {
        self.leader.get() == 1
    }
    pub fn status_writes(&self) -> u64 {
        self.status_writes.get()
    }
}

/// One watched object, of any kind.
#[derive(Debug, Clone)]
enum Res {
    Service(Box<KService>),
    Slice(Box<EndpointSlice>),
    Crd(CrdKind, Box<DynamicObject>),
}

impl Res {
    fn key(&self) -> (String, String) {
        let meta = match self {
            Res::Service(o) => &o.metadata,
            Res::Slice(o) => &o.metadata,
            Res::Crd(_, o) => &o.metadata,
        };
        (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

#[derive(Debug)]
enum Ev {
    Init,
    InitApply(Res),
    InitDone,
    Apply(Res),
    Delete(Res),
    Error(String),
}

#[derive(Debug)]
struct Msg {
    stream: usize,
    ev: Ev,
}

/// What one watch holds.
#[derive(Default)]
struct Store {
    what: String,
    objects: BTreeMap<(String, String), Res>,
    listing: Option<BTreeMap<(String, String), Res>>,
    listed: bool,
}

/// See the crate documentation.
pub struct KubernetesSource {
    client: kube::Client,
    opts: KubeOptions,
    source: SourceHandle,
    registry: watch::Receiver<RegistrySnapshot>,
    rejections: watch::Receiver<Arc<ProxyRejections>>,
    metrics: KubeMetrics,
}

impl Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl KubernetesSource {
    /// `registry` is the hub's merged registry (`Hub::subscribe`), against which a route's and
    /// a policy's references are checked for `ResolvedRefs`.
    pub fn new(
        client: kube::Client,
        opts: KubeOptions,
        source: SourceHandle,
        registry: watch::Receiver<RegistrySnapshot>,
    ) -> Self {
        KubernetesSource {
            client,
            opts,
            source,
            registry,
            // Closed at once: without [`KubernetesSource::with_proxy_rejections`] nothing is
            // rejected and `Programmed` stays True.
            rejections: watch::channel(Arc::new(ProxyRejections::new())).1,
            metrics: KubeMetrics::default(),
        }
    }

    /// What connected proxies reject, for the `Programmed` condition (the binary computes it
    /// from the xDS server; see [`ProxyRejections`]).
    #[must_use]
    pub fn with_proxy_rejections(mut self, rx: watch::Receiver<Arc<ProxyRejections>>) -> Self {
        self.rejections = rx;
        self
    }

    pub fn metrics(&self) -> KubeMetrics {
        self.metrics.clone()
    }

    /// Registers `weft_kubernetes_events_total`, `weft_kubernetes_relists_total`,
    /// `weft_kubernetes_invalid_objects_total`, `weft_kubernetes_status_writes_total` and
    /// `weft_kubernetes_leader`.
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.metrics;
        // prometheus-client appends `_total` to counter names.
        reg.register(
            "weft_kubernetes_events",
            "Watch events (listed, added, modified, deleted objects) received from the API server",
            m.events.clone(),
        );
        reg.register(
            "weft_kubernetes_relists",
            "Full lists of one watched kind (startup, 410 Gone, watch recovery)",
            m.relists.clone(),
        );
        reg.register(
            "weft_kubernetes_invalid_objects",
            "Kubernetes objects rejected (not applied) because they are invalid",
            m.invalid_objects.clone(),
        );
        reg.register(
            "weft_kubernetes_status_writes",
            "Status patches written to Weft custom resources",
            m.status_writes.clone(),
        );
        reg.register(
            "weft_kubernetes_leader",
            "1 while this replica holds the status-writer lease, else 0",
            m.leader.clone(),
        );
    }

    /// Runs until shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        if let Err(e) = self.opts.validate() {
            // Never syncing keeps the control plane unready, which is the visible failure.
            tracing::error!(error = %e, "Kubernetes source not started");
            self.source.set_info("error", e.to_string());
            shutdown.await;
            return;
        }
        let scopes: Vec<Option<String>> = if self.opts.namespaces.is_empty() {
            vec![None]
        } else {
            self.opts.namespaces.iter().cloned().map(Some).collect()
        };
        self.source.set_info(
            "namespaces",
            if self.opts.namespaces.is_empty() {
                "*".to_string()
            } else {
                self.opts.namespaces.join(",")
            },
        );
        // Bounded: a flood of events slows the watches down rather than growing memory.
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let mut stores: Vec<Store> = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        let base = watcher::Config {
            timeout: self.opts.watch_timeout,
            ..watcher::Config::default()
        };
        for scope in &scopes {
            let mut svc_cfg = base.clone();
            svc_cfg.label_selector = self.opts.service_selector.clone();
            let mut slice_cfg = base.clone();
            slice_cfg.label_selector = Some(discovery::SERVICE_NAME_LABEL.to_string());
            let client = &self.client;
            let (services, slices): (Api<KService>, Api<EndpointSlice>) = match scope {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (Api::all(client.clone()), Api::all(client.clone())),
            };
            let within = scope
                .as_ref()
                .map(|n| format!(" in {n}"))
                .unwrap_or_default();
            spawn_watch(
                &mut tasks,
                &mut stores,
                services,
                format!("Service{within}"),
                svc_cfg,
                |o| Res::Service(Box::new(o)),
                &tx,
            );
            spawn_watch(
                &mut tasks,
                &mut stores,
                slices,
                format!("EndpointSlice{within}"),
                slice_cfg,
                |o| Res::Slice(Box::new(o)),
                &tx,
            );
            if self.opts.crds {
                for kind in [
                    CrdKind::TrafficRoute,
                    CrdKind::TrafficPolicy,
                    CrdKind::ExternalService,
                ] {
                    let ar = kind.api_resource();
                    let api: Api<DynamicObject> = match scope {
                        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                        None => Api::all_with(client.clone(), &ar),
                    };
                    let wrap = match kind {
                        CrdKind::TrafficRoute => wrap_route,
                        CrdKind::TrafficPolicy => wrap_policy,
                        CrdKind::ExternalService => wrap_external,
                    };
                    spawn_watch(
                        &mut tasks,
                        &mut stores,
                        api,
                        format!("{}{within}", kind.as_str()),
                        base.clone(),
                        wrap,
                        &tx,
                    );
                }
            }
        }
        drop(tx);

        let (targets_tx, targets_rx) = watch::channel(Arc::new(Vec::<StatusTarget>::new()));
        if self.opts.crds {
            let (leader_tx, leader_rx) = watch::channel(false);
            let elector = lease::LeaderElector::new(
                self.client.clone(),
                self.opts.lease.clone(),
                leader_tx,
                self.metrics.leader.clone(),
            );
            tasks.spawn(elector.run(wait_true(stop_rx.clone())));
            let writer = status::StatusWriter {
                client: self.client.clone(),
                targets: targets_rx,
                registry: self.registry.clone(),
                rejections: self.rejections.clone(),
                leader: leader_rx,
                retry: self.opts.status_retry,
                writes: self.metrics.status_writes.clone(),
            };
            tasks.spawn(writer.run(wait_true(stop_rx.clone())));
        }

        let mut state = State {
            source: self.source.clone(),
            metrics: self.metrics.clone(),
            port_name: self.opts.port_name.clone(),
            mirror: Mirror::default(),
            targets_tx,
        };
        loop {
            let first = tokio::select! {
                biased;
                () = &mut shutdown => break,
                m = rx.recv() => m,
            };
            let Some(first) = first else { break };
            let mut changed = state.handle(&mut stores, first);
            // Fold whatever else is queued into the same update.
            while let Ok(m) = rx.try_recv() {
                changed |= state.handle(&mut stores, m);
            }
            if changed {
                state.publish(&stores);
            }
        }
        // The elector releases its lease on this signal; give it a moment to do so.
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            // Watch tasks never end by themselves; the others do on the stop signal.
            while tasks.len() > stores.len() {
                if tasks.join_next().await.is_none() {
                    break;
                }
            }
        })
        .await;
        tasks.abort_all();
    }
}

fn wrap_route(o: DynamicObject) -> Res {
    Res::Crd(CrdKind::TrafficRoute, Box::new(o))
}

fn wrap_policy(o: DynamicObject) -> Res {
    Res::Crd(CrdKind::TrafficPolicy, Box::new(o))
}

fn wrap_external(o: DynamicObject) -> Res {
    Res::Crd(CrdKind::ExternalService, Box::new(o))
}

/// Starts one watch whose events go to `tx` tagged with a new store's index.
fn spawn_watch<K>(
    tasks: &mut tokio::task::JoinSet<()>,
    stores: &mut Vec<Store>,
    api: Api<K>,
    what: String,
    cfg: watcher::Config,
    wrap: fn(K) -> Res,
    tx: &mpsc::Sender<Msg>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = stores.len();
    stores.push(Store {
        what: what.clone(),
        ..Default::default()
    });
    let tx = tx.clone();
    tasks.spawn(async move {
        let mut events = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
        while let Some(item) = events.next().await {
            let ev = match item {
                Ok(Event::Init) => Ev::Init,
                Ok(Event::InitApply(o)) => Ev::InitApply(wrap(o)),
                Ok(Event::InitDone) => Ev::InitDone,
                Ok(Event::Apply(o)) => Ev::Apply(wrap(o)),
                Ok(Event::Delete(o)) => Ev::Delete(wrap(o)),
                Err(e) => Ev::Error(e.to_string()),
            };
            if tx.send(Msg { stream, ev }).await.is_err() {
                return;
            }
        }
        tracing::warn!(watch = %what, "watch stream ended");
    });
}

struct State {
    source: SourceHandle,
    metrics: KubeMetrics,
    port_name: Option<String>,
    /// What the hub holds from this source, and which objects are reported rejected.
    mirror: Mirror,
    targets_tx: watch::Sender<Arc<Vec<StatusTarget>>>,
}

impl State {
    /// Applies one watch event to its store; true when the stores' content may have changed.
    fn handle(&mut self, stores: &mut [Store], msg: Msg) -> bool {
        let Some(store) = stores.get_mut(msg.stream) else {
            return false;
        };
        match msg.ev {
            Ev::Init => {
                store.listing = Some(BTreeMap::new());
                false
            }
            Ev::InitApply(o) => {
                self.metrics.events.inc();
                store
                    .listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(o.key(), o);
                false
            }
            Ev::InitDone => {
                store.objects = store.listing.take().unwrap_or_default();
                if store.listed {
                    tracing::info!(watch = %store.what, objects = store.objects.len(), "relisted");
                }
                store.listed = true;
                self.metrics.relists.inc();
                true
            }
            Ev::Apply(o) => {
                self.metrics.events.inc();
                store.objects.insert(o.key(), o);
                true
            }
            Ev::Delete(o) => {
                self.metrics.events.inc();
                store.objects.remove(&o.key());
                true
            }
            Ev::Error(e) => {
                // The watcher retries by itself, with backoff; the hub keeps the last state.
                tracing::warn!(watch = %store.what, error = %e, "watch failed; retrying with backoff");
                self.source
                    .set_info("last_error", format!("{}: {e}", store.what));
                false
            }
        }
    }

    fn publish(&mut self, stores: &[Store]) {
        if !self.mirror.is_synced() && !stores.iter().all(|s| s.listed) {
            return;
        }
        let (desired, errors, targets) = desired(stores, self.port_name.as_deref());
        let first = !self.mirror.is_synced();
        let (objects, invalid) = (desired.len(), errors.len());
        let reported = self.mirror.publish(&self.source, desired, errors);
        self.metrics.invalid_objects.inc_by(reported as u64);
        if first {
            tracing::info!(objects, invalid, "Kubernetes fully listed: first sync done");
        }
        if *self.targets_tx.borrow() != targets {
            self.targets_tx.send_replace(targets);
        }
    }
}

type Desired = (
    HashMap<ObjectKey, Object>,
    BTreeMap<String, String>,
    Arc<Vec<StatusTarget>>,
);

/// Everything the watched objects say, as registry objects; the objects rejected, with why;
/// and the custom resources whose status is maintained.
fn desired(stores: &[Store], port_name: Option<&str>) -> Desired {
    let mut out = HashMap::new();
    let mut errors = BTreeMap::new();
    let mut targets = Vec::new();
    // Slices by the Service they belong to.
    let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for store in stores {
        for obj in store.objects.values() {
            if let Res::Slice(s) = obj
                && let Some(owner) = discovery::slice_owner(s)
            {
                slices.entry(owner).or_default().push(s);
            }
        }
    }
    for list in slices.values_mut() {
        // Deterministic ids and duplicates resolution whatever order the watch delivered.
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let add = |objs: Vec<Object>, out: &mut HashMap<ObjectKey, Object>| {
        for o in objs {
            out.insert(o.key(), o);
        }
    };
    for store in stores {
        for (key, obj) in &store.objects {
            match obj {
                Res::Service(svc) => {
                    let own = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
                    match discovery::service_objects(svc, own, port_name) {
                        Ok(objs) => add(objs, &mut out),
                        Err(e) => {
                            errors.insert(format!("Service/{}/{}", key.0, key.1), e.to_string());
                        }
                    }
                }
                Res::Slice(_) => {}
                Res::Crd(kind, o) => {
                    let (result, target) = crd::evaluate(*kind, o);
                    record(result, target, &mut out, &mut errors, &mut targets);
                }
            }
        }
    }
    targets.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    (out, errors, Arc::new(targets))
}

fn record(
    result: Result<Vec<Object>, (String, String)>,
    target: StatusTarget,
    out: &mut HashMap<ObjectKey, Object>,
    errors: &mut BTreeMap<String, String>,
    targets: &mut Vec<StatusTarget>,
) {
    match result {
        Ok(objs) => {
            for o in objs {
                out.insert(o.key(), o);
            }
        }
        Err((key, reason)) => {
            errors.insert(key, reason);
        }
    }
    targets.push(target);
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
