//! The hub: where every source's events become one merged [`Registry`].
//!
//! Sources speak one event language, borrowed from kube-runtime's watcher: a (re)list is
//! `Init, InitApply*, InitDone` and replaces everything the source held atomically at `InitDone`;
//! afterwards `Apply` and `Delete` change single objects. So "first full sync" means the same for
//! a file, the registration API, etcd, Consul and Kubernetes: the first `InitDone`.
//!
//! Merging (documented in `docs/registry-schema.md`): a service's instances are the union over
//! sources, each labelled with its source; one address:port appears once, taken from the source
//! registered first. A service's protocol, a route or a policy defined by several sources is
//! taken from the source registered first (registration order is the precedence order).
//!
//! The hub does no I/O. It publishes each merged registry on a `watch` channel, so a slow
//! consumer only ever sees the latest state, never a backlog.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::model::*;

/// One object a source can hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A service's own attributes (protocol). Instances arrive separately.
    Service {
        name: String,
        protocol: Protocol,
    },
    Instance {
        service: String,
        id: String,
        endpoint: Endpoint,
    },
    Route(Route),
    Policy(Policy),
}

/// The key an [`Object`] is stored under within its source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKey {
    Service(String),
    Instance { service: String, id: String },
    Route(String),
    Policy(String),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service { name, .. } => ObjectKey::Service(name.clone()),
            Object::Instance { service, id, .. } => ObjectKey::Instance {
                service: service.clone(),
                id: id.clone(),
            },
            Object::Route(r) => ObjectKey::Route(r.name.clone()),
            Object::Policy(p) => ObjectKey::Policy(p.name.clone()),
        }
    }
}

/// What a source tells the hub. See the module docs for the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A full list begins; objects follow as `InitApply`.
    Init,
    InitApply(Object),
    /// The list is complete: it replaces what the source held. The first one marks the source
    /// synced.
    InitDone,
    Apply(Object),
    Delete(ObjectKey),
}

impl RegistryDoc {
    /// The document as the objects a source holds. File instances are keyed `address:port`.
    pub fn into_objects(self) -> Vec<Object> {
        let mut out = Vec::new();
        for s in self.services {
            out.push(Object::Service {
                name: s.name.clone(),
                protocol: s.protocol,
            });
            for ep in s.endpoints {
                out.push(Object::Instance {
                    service: s.name.clone(),
                    id: format!("{}:{}", ep.address, ep.port),
                    endpoint: ep,
                });
            }
        }
        out.extend(self.routes.into_iter().map(Object::Route));
        out.extend(self.policies.into_iter().map(Object::Policy));
        out
    }
}

/// The merged registry as published, with when its oldest unpublished change happened so the
/// xDS layer can measure change-to-ACK convergence.
#[derive(Debug, Clone)]
pub struct RegistrySnapshot {
    /// Increases by one with every published change.
    pub generation: u64,
    /// When the first source change folded into this snapshot happened.
    pub changed_at: Instant,
    pub registry: Arc<Registry>,
}

/// What `/debug/sources` shows of one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub synced: bool,
    pub objects: usize,
    pub events_applied: u64,
    pub relists: u64,
    /// Unix seconds of the last change applied.
    pub last_change_unix: Option<u64>,
    /// Keys currently rejected, with why. Cleared when the key is fixed or deleted.
    pub errors: BTreeMap<String, String>,
    /// Total invalid values seen since start.
    pub errors_total: u64,
    /// Free-form facts the source wants shown (etcd revision, Consul index, ...).
    pub info: BTreeMap<String, String>,
}

#[derive(Default)]
struct SourceState {
    objects: HashMap<ObjectKey, Object>,
    /// Buffer of an in-progress list, between `Init` and `InitDone`.
    listing: Option<HashMap<ObjectKey, Object>>,
    status: Option<SourceStatus>,
}

struct HubState {
    /// In precedence order.
    sources: Vec<SourceState>,
    generation: u64,
}

/// See the module documentation.
pub struct Hub {
    state: Mutex<HubState>,
    tx: watch::Sender<RegistrySnapshot>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        let (tx, _) = watch::channel(RegistrySnapshot {
            generation: 0,
            changed_at: Instant::now(),
            registry: Arc::new(Registry::default()),
        });
        Arc::new(Hub {
            state: Mutex::new(HubState {
                sources: Vec::new(),
                generation: 0,
            }),
            tx,
        })
    }

    /// Adds a source. Sources added earlier take precedence in merges. The source is not synced
    /// (and the hub not ready) until its first `InitDone`.
    pub fn add_source(self: &Arc<Self>, name: &str) -> SourceHandle {
        let mut st = self.lock();
        let index = st.sources.len();
        st.sources.push(SourceState {
            status: Some(SourceStatus {
                name: name.to_string(),
                synced: false,
                objects: 0,
                events_applied: 0,
                relists: 0,
                last_change_unix: None,
                errors: BTreeMap::new(),
                errors_total: 0,
                info: BTreeMap::new(),
            }),
            ..Default::default()
        });
        SourceHandle {
            hub: Arc::clone(self),
            index,
            name: name.to_string(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<RegistrySnapshot> {
        self.tx.subscribe()
    }

    /// The latest merged registry.
    pub fn current(&self) -> RegistrySnapshot {
        self.tx.borrow().clone()
    }

    /// True once every source has completed its first full sync.
    pub fn is_ready(&self) -> bool {
        self.lock()
            .sources
            .iter()
            .all(|s| s.status.as_ref().is_some_and(|st| st.synced))
    }

    pub fn sources(&self) -> Vec<SourceStatus> {
        self.lock()
            .sources
            .iter()
            .filter_map(|s| s.status.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping: every mutation below is a whole-value replace.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &mut HubState, changed_at: Instant) {
        st.generation += 1;
        let registry = merge(&st.sources);
        let generation = st.generation;
        // Consumers debounce downstream and keep the earliest `changed_at` of a burst.
        self.tx.send_replace(RegistrySnapshot {
            generation,
            changed_at,
            registry: Arc::new(registry),
        });
    }
}

/// A source's handle on the hub.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    hub: Arc<Hub>,
    index: usize,
    name: String,
}

/// For sources that compute their whole desired state each time something changes and want
/// the hub to see only differences (Consul, Kubernetes): the first [`Mirror::publish`] is one
/// full sync (`Init`, `InitApply`*, `InitDone`), later ones only `Delete`/`Apply` of what
/// changed; per-key errors are reported when new or changed and cleared when gone.
#[derive(Debug, Default)]
pub struct Mirror {
    synced: bool,
    emitted: HashMap<ObjectKey, Object>,
    errors: BTreeMap<String, String>,
}

impl Mirror {
    /// Whether the first full sync has been published.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Publishes `desired` through `source`. Returns how many errors were newly reported, for
    /// the source's invalid-values counter.
    pub fn publish(
        &mut self,
        source: &SourceHandle,
        desired: HashMap<ObjectKey, Object>,
        errors: BTreeMap<String, String>,
    ) -> usize {
        if !self.synced {
            let mut events = Vec::with_capacity(desired.len() + 2);
            events.push(SourceEvent::Init);
            events.extend(desired.values().cloned().map(SourceEvent::InitApply));
            events.push(SourceEvent::InitDone);
            source.apply(events);
            self.synced = true;
        } else {
            let mut gone: Vec<&ObjectKey> = self
                .emitted
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .collect();
            gone.sort();
            let mut changed: Vec<&Object> = desired
                .iter()
                .filter(|(k, v)| self.emitted.get(*k) != Some(*v))
                .map(|(_, v)| v)
                .collect();
            // Sorted so the same change always reaches the hub as the same batch.
            changed.sort_by_key(|o| o.key());
            let batch: Vec<SourceEvent> = gone
                .into_iter()
                .cloned()
                .map(SourceEvent::Delete)
                .chain(changed.into_iter().cloned().map(SourceEvent::Apply))
                .collect();
            if !batch.is_empty() {
                source.apply(batch);
            }
        }
        self.emitted = desired;
        for key in self.errors.keys() {
            if !errors.contains_key(key) {
                source.clear_error(key);
            }
        }
        let mut reported = 0;
        for (key, reason) in &errors {
            if self.errors.get(key) != Some(reason) {
                reported += 1;
                source.report_error(key, reason);
            }
        }
        self.errors = errors;
        reported
    }
}

impl SourceHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies a batch of events and publishes once if anything changed.
    pub fn apply(&self, events: impl IntoIterator<Item = SourceEvent>) {
        let now = Instant::now();
        let mut st = self.hub.lock();
        let src = &mut st.sources[self.index];
        let mut changed = false;
        let mut applied = 0u64;
        let mut relisted = 0u64;
        let mut became_synced = false;
        for ev in events {
            applied += 1;
            match ev {
                SourceEvent::Init => src.listing = Some(HashMap::new()),
                SourceEvent::InitApply(obj) => {
                    src.listing
                        .get_or_insert_with(HashMap::new)
                        .insert(obj.key(), obj);
                }
                SourceEvent::InitDone => {
                    let listed = src.listing.take().unwrap_or_default();
                    if listed != src.objects {
                        src.objects = listed;
                        changed = true;
                    }
                    relisted += 1;
                    if let Some(status) = &src.status
                        && !status.synced
                    {
                        became_synced = true;
                    }
                }
                SourceEvent::Apply(obj) => {
                    let key = obj.key();
                    if src.objects.get(&key) != Some(&obj) {
                        src.objects.insert(key, obj);
                        changed = true;
                    }
                }
                SourceEvent::Delete(key) => {
                    if src.objects.remove(&key).is_some() {
                        changed = true;
                    }
                }
            }
        }
        let objects = src.objects.len();
        if let Some(status) = src.status.as_mut() {
            status.events_applied += applied;
            status.relists += relisted;
            status.objects = objects;
            if became_synced {
                status.synced = true;
            }
            if changed {
                status.last_change_unix = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
            }
        }
        if changed {
            self.hub.publish(&mut st, now);
        }
    }

    /// Records that the value at `key` was rejected, and why. The rest of the source keeps
    /// working; the error shows in `/debug/sources` until [`Self::clear_error`].
    pub fn report_error(&self, key: &str, reason: &str) {
        tracing::warn!(source = %self.name, key, reason, "invalid registry value skipped");
        let mut st = self.hub.lock();
        if let Some(status) = st.sources[self.index].status.as_mut() {
            status.errors.insert(key.to_string(), reason.to_string());
            status.errors_total += 1;
        }
    }

    pub fn clear_error(&self, key: &str) {
        let mut st = self.hub.lock();
        if let Some(status) = st.sources[self.index].status.as_mut() {
            status.errors.remove(key);
        }
    }

    /// Replaces the set of current errors (for sources that re-validate everything at once).
    pub fn set_errors(&self, errors: BTreeMap<String, String>) {
        let mut st = self.hub.lock();
        if let Some(status) = st.sources[self.index].status.as_mut() {
            status.errors_total += errors.len() as u64;
            status.errors = errors;
        }
    }

    /// Sets a fact shown in `/debug/sources` (e.g. `revision`).
    pub fn set_info(&self, key: &str, value: String) {
        let mut st = self.hub.lock();
        if let Some(status) = st.sources[self.index].status.as_mut() {
            status.info.insert(key.to_string(), value);
        }
    }

    pub fn is_synced(&self) -> bool {
        self.hub.lock().sources[self.index]
            .status
            .as_ref()
            .is_some_and(|s| s.synced)
    }
}

/// Builds the merged registry. Sources are in precedence order.
fn merge(sources: &[SourceState]) -> Registry {
    let mut reg = Registry::default();
    // Services whose protocol some source has declared; the first declaration wins.
    let mut declared = std::collections::HashSet::new();
    for src in sources {
        let source_name = src.status.as_ref().map(|s| s.name.as_str()).unwrap_or("");
        // Sort for determinism: the same inputs must give byte-identical output, or every
        // restart would look like a config change to every client.
        let mut objs: Vec<&Object> = src.objects.values().collect();
        objs.sort_by_key(|o| o.key());
        for obj in objs {
            match obj {
                Object::Service { name, protocol } => {
                    let svc = service_entry(&mut reg, name);
                    if declared.insert(name.clone()) {
                        svc.protocol = *protocol;
                    }
                }
                Object::Instance {
                    service,
                    id,
                    endpoint,
                } => {
                    let svc = service_entry(&mut reg, service);
                    let dup = svc.instances.iter().any(|i| {
                        i.endpoint.address == endpoint.address && i.endpoint.port == endpoint.port
                    });
                    if !dup {
                        svc.instances.push(Instance {
                            id: id.clone(),
                            source: source_name.to_string(),
                            endpoint: endpoint.clone(),
                        });
                    }
                }
                Object::Route(r) => {
                    reg.routes
                        .entry(r.name.clone())
                        .or_insert_with(|| r.clone());
                }
                Object::Policy(p) => {
                    reg.policies
                        .entry(p.name.clone())
                        .or_insert_with(|| p.clone());
                }
            }
        }
    }
    for svc in reg.services.values_mut() {
        svc.instances.sort_by(|a, b| {
            (&a.endpoint.address, a.endpoint.port).cmp(&(&b.endpoint.address, b.endpoint.port))
        });
    }
    reg
}

fn service_entry<'a>(reg: &'a mut Registry, name: &str) -> &'a mut Service {
    reg.services
        .entry(name.to_string())
        .or_insert_with(|| Service {
            name: name.to_string(),
            protocol: Protocol::default(),
            instances: Vec::new(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: "127.0.0.1".into(),
            port,
            weight: 1,
            zone: None,
            health: Health::Healthy,
            metadata: BTreeMap::new(),
        }
    }

    fn inst(service: &str, port: u16) -> Object {
        Object::Instance {
            service: service.into(),
            id: format!("i{port}"),
            endpoint: ep(port),
        }
    }

    #[test]
    fn not_ready_until_every_source_synced() {
        let hub = Hub::new();
        let a = hub.add_source("a");
        let b = hub.add_source("b");
        assert!(!hub.is_ready());
        a.apply([SourceEvent::Init, SourceEvent::InitDone]);
        assert!(!hub.is_ready());
        b.apply([SourceEvent::Init, SourceEvent::InitDone]);
        assert!(hub.is_ready());
    }

    #[test]
    fn relist_replaces_atomically_and_removes_ghosts() {
        let hub = Hub::new();
        let a = hub.add_source("a");
        a.apply([
            SourceEvent::Init,
            SourceEvent::InitApply(inst("s", 1)),
            SourceEvent::InitApply(inst("s", 2)),
            SourceEvent::InitDone,
        ]);
        assert_eq!(hub.current().registry.services["s"].instances.len(), 2);
        let gen_before = hub.current().generation;
        // A relist that is only half done changes nothing yet.
        a.apply([SourceEvent::Init, SourceEvent::InitApply(inst("s", 2))]);
        assert_eq!(hub.current().generation, gen_before);
        a.apply([SourceEvent::InitDone]);
        let snap = hub.current();
        assert_eq!(snap.registry.services["s"].instances.len(), 1);
        assert_eq!(snap.registry.services["s"].instances[0].endpoint.port, 2);
    }

    #[test]
    fn unchanged_apply_publishes_nothing() {
        let hub = Hub::new();
        let a = hub.add_source("a");
        a.apply([SourceEvent::Apply(inst("s", 1))]);
        let g = hub.current().generation;
        a.apply([SourceEvent::Apply(inst("s", 1))]);
        assert_eq!(hub.current().generation, g);
        a.apply([SourceEvent::Delete(ObjectKey::Instance {
            service: "s".into(),
            id: "i1".into(),
        })]);
        assert_eq!(hub.current().generation, g + 1);
    }

    #[test]
    fn merge_unions_instances_and_labels_sources() {
        let hub = Hub::new();
        let a = hub.add_source("file");
        let b = hub.add_source("registration");
        a.apply([
            SourceEvent::Apply(Object::Service {
                name: "s".into(),
                protocol: Protocol::Grpc,
            }),
            SourceEvent::Apply(inst("s", 2)),
        ]);
        b.apply([
            SourceEvent::Apply(inst("s", 1)),
            // Same address:port as the file's: the file (earlier source) wins.
            SourceEvent::Apply(inst("s", 2)),
        ]);
        let reg = hub.current().registry;
        let s = &reg.services["s"];
        assert_eq!(s.protocol, Protocol::Grpc);
        let got: Vec<_> = s
            .instances
            .iter()
            .map(|i| (i.endpoint.port, i.source.as_str()))
            .collect();
        assert_eq!(got, vec![(1, "registration"), (2, "file")]);
    }

    #[test]
    fn mirror_syncs_once_then_sends_only_differences() {
        let hub = Hub::new();
        let a = hub.add_source("consul");
        let mut m = Mirror::default();
        let desired = |ports: &[u16]| -> HashMap<ObjectKey, Object> {
            ports
                .iter()
                .map(|p| inst("s", *p))
                .map(|o| (o.key(), o))
                .collect()
        };
        let errs = |keys: &[&str]| -> BTreeMap<String, String> {
            keys.iter()
                .map(|k| (k.to_string(), "bad".to_string()))
                .collect()
        };
        assert!(!m.is_synced());
        assert_eq!(m.publish(&a, desired(&[1, 2]), errs(&["k1"])), 1);
        assert!(m.is_synced() && hub.is_ready());
        let st = &hub.sources()[0];
        assert_eq!((st.objects, st.relists, st.errors.len()), (2, 1, 1));
        let applied = st.events_applied;
        // Unchanged: nothing reaches the hub, the known error is not reported again.
        assert_eq!(m.publish(&a, desired(&[1, 2]), errs(&["k1"])), 0);
        assert_eq!(hub.sources()[0].events_applied, applied);
        // One gone, one new, error fixed: a diff, not a relist.
        assert_eq!(m.publish(&a, desired(&[2, 3]), errs(&[])), 0);
        let st = &hub.sources()[0];
        assert_eq!((st.objects, st.relists), (2, 1));
        assert!(st.errors.is_empty());
        let ports: Vec<u16> = hub.current().registry.services["s"]
            .instances
            .iter()
            .map(|i| i.endpoint.port)
            .collect();
        assert_eq!(ports, vec![2, 3]);
    }

    #[test]
    fn errors_are_kept_per_key() {
        let hub = Hub::new();
        let a = hub.add_source("etcd");
        a.report_error("/weft/services/s/x", "port: bad");
        assert_eq!(hub.sources()[0].errors.len(), 1);
        assert_eq!(hub.sources()[0].errors_total, 1);
        a.clear_error("/weft/services/s/x");
        assert!(hub.sources()[0].errors.is_empty());
    }
}
