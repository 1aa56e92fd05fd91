//! Versioned xDS resource cache.
//!
//! What it does:
//! - Holds, per client flavour (`"envoy"`, `"grpc"`) and per type URL, the current resources.
//! - Versions each resource by a content hash of its encoded bytes, so the same config gives
//!   the same version across restarts and replicas, and an unchanged resource never looks new.
//! - Encodes each changed resource exactly once, into the two wire forms streams need (a
//!   `google.protobuf.Any` for SotW and a `discovery.v3.Resource` for Delta), as `Bytes` that
//!   every stream shares. An unchanged resource keeps its existing `Arc`, bytes and version.
//! - Publishes each flavour's state on a `watch` channel: a slow stream skips straight to the
//!   latest state instead of queueing every intermediate one.
//!
//! - Carries, with each published state, the [`TraceParent`] of the change that produced it, so
//!   that whoever sends the state to a client can record the push in the change's trace.
//!
//! What it does not do: translate (that is `weft-translate`), decide what a client is sent or
//! when (that is `weft-xds-server`), know where data came from, or record traces.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::watch;

/// One resource, encoded once.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResource {
    pub name: String,
    /// Hex content hash of the resource's own encoding.
    pub version: String,
    /// The resource as an encoded `google.protobuf.Any` (a SotW `resources` element).
    pub any: Bytes,
    /// The resource as an encoded `envoy.service.discovery.v3.Resource` (a Delta element).
    pub delta: Bytes,
    /// When the registry change that produced this version happened (for convergence metrics).
    pub changed_at: Instant,
}

/// All resources of one type for one flavour. Shared (`Arc`) between successive
/// [`FlavorSnapshot`]s while the type does not change, and by every stream that holds it.
#[derive(Debug, Clone, Default)]
pub struct TypeSnapshot {
    pub resources: BTreeMap<String, Arc<EncodedResource>>,
    /// Hash over every (name, version): equal iff the type's content is equal. Also the SotW
    /// `version_info` of a response carrying every resource.
    pub version: String,
    /// See [`TypeSnapshot::sotw_resources`].
    sotw_resources: OnceLock<Bytes>,
}

impl TypeSnapshot {
    /// The `resources` field (2) of a SotW `DiscoveryResponse` carrying every resource of the
    /// type, in name order: built on first use, then shared. Without it each of M streams
    /// sending the whole type would copy every resource into its own response.
    pub fn sotw_resources(&self) -> &Bytes {
        self.sotw_resources.get_or_init(|| {
            let len: usize = self
                .resources
                .values()
                .map(|r| {
                    prost::encoding::key_len(2)
                        + prost::encoding::encoded_len_varint(r.any.len() as u64)
                        + r.any.len()
                })
                .sum();
            let mut buf = Vec::with_capacity(len);
            for r in self.resources.values() {
                prost::encoding::encode_key(
                    2,
                    prost::encoding::WireType::LengthDelimited,
                    &mut buf,
                );
                prost::encoding::encode_varint(r.any.len() as u64, &mut buf);
                buf.extend_from_slice(&r.any);
            }
            Bytes::from(buf)
        })
    }

    fn recompute_version(&mut self) {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (name, r) in &self.resources {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            h.update(&[0]);
        }
        self.version = format!("{:016x}", h.digest());
    }
}

/// The trace context of the change that published a snapshot: the ids of a W3C
/// `traceparent`. Plain ids rather than an OpenTelemetry type, so the cache (and the fuzz
/// targets that link it) need no tracing library; the xDS server turns them back into a
/// span parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Whether the change was sampled: pushes of an unsampled change record nothing.
    pub sampled: bool,
}

impl std::fmt::Display for TraceParent {
    /// The `traceparent` header form, `00-<trace id>-<span id>-<flags>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.span_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", u8::from(self.sampled))
    }
}

/// One flavour's full state at one moment.
#[derive(Debug, Clone, Default)]
pub struct FlavorSnapshot {
    /// Increases with every change published for this flavour.
    pub generation: u64,
    /// The change that published this state, when it was traced (see [`Cache::apply_traced`]).
    pub trace: Option<TraceParent>,
    /// A type that did not change keeps its `Arc`: publishing a change copies nothing of the
    /// other types, and a stream can tell an unchanged type by pointer.
    pub types: HashMap<String, Arc<TypeSnapshot>>,
}

impl FlavorSnapshot {
    pub fn get(&self, type_url: &str) -> Option<&Arc<TypeSnapshot>> {
        self.types.get(type_url)
    }

    pub fn resource(&self, type_url: &str, name: &str) -> Option<&Arc<EncodedResource>> {
        self.types.get(type_url).and_then(|t| t.resources.get(name))
    }
}

/// A change to one type, applied as part of one atomic [`Cache::apply`].
#[derive(Debug)]
pub enum TypeUpdate {
    /// The full set: names not listed are removed.
    Replace {
        type_url: String,
        resources: Vec<(String, Vec<u8>)>,
    },
    /// Adds or replaces the listed resources only.
    Upsert {
        type_url: String,
        resources: Vec<(String, Vec<u8>)>,
    },
    Remove {
        type_url: String,
        names: Vec<String>,
    },
}

impl TypeUpdate {
    /// Encodes typed messages for a `Replace`.
    pub fn replace<M: Message>(
        type_url: &str,
        items: impl IntoIterator<Item = (String, M)>,
    ) -> Self {
        TypeUpdate::Replace {
            type_url: type_url.to_string(),
            resources: items
                .into_iter()
                .map(|(n, m)| (n, m.encode_to_vec()))
                .collect(),
        }
    }

    /// Encodes typed messages for an `Upsert`.
    pub fn upsert<M: Message>(
        type_url: &str,
        items: impl IntoIterator<Item = (String, M)>,
    ) -> Self {
        TypeUpdate::Upsert {
            type_url: type_url.to_string(),
            resources: items
                .into_iter()
                .map(|(n, m)| (n, m.encode_to_vec()))
                .collect(),
        }
    }
}

/// What one [`Cache::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Resources whose version changed or that appeared (each encoded once).
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// See the crate documentation.
#[derive(Debug)]
pub struct Cache {
    flavors: HashMap<String, watch::Sender<Arc<FlavorSnapshot>>>,
    /// Also `weft_xds_cache_encodes_total` on /metrics.
    encodes: Counter,
}

impl Cache {
    /// A cache for the given flavours, each starting empty for every type URL in `type_urls`.
    pub fn new(flavors: &[&str], type_urls: &[&str]) -> Arc<Cache> {
        let flavors = flavors
            .iter()
            .map(|f| {
                let mut snap = FlavorSnapshot::default();
                for t in type_urls {
                    let mut ts = TypeSnapshot::default();
                    ts.recompute_version();
                    snap.types.insert((*t).to_string(), Arc::new(ts));
                }
                let (tx, _) = watch::channel(Arc::new(snap));
                ((*f).to_string(), tx)
            })
            .collect();
        Arc::new(Cache {
            flavors,
            encodes: Counter::default(),
        })
    }

    pub fn flavors(&self) -> impl Iterator<Item = &str> {
        self.flavors.keys().map(String::as_str)
    }

    /// Subscribes to a flavour's state. `None` for an unknown flavour.
    pub fn subscribe(&self, flavor: &str) -> Option<watch::Receiver<Arc<FlavorSnapshot>>> {
        self.flavors.get(flavor).map(|tx| tx.subscribe())
    }

    pub fn snapshot(&self, flavor: &str) -> Option<Arc<FlavorSnapshot>> {
        self.flavors.get(flavor).map(|tx| Arc::clone(&tx.borrow()))
    }

    /// How many resources have been wrapped and encoded since start: one per changed resource,
    /// however many streams there are.
    pub fn encodes_total(&self) -> u64 {
        self.encodes.get()
    }

    /// Registers `weft_xds_cache_encodes_total`: it must grow by the number of changed
    /// resources per change, however many clients are connected.
    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "weft_xds_cache_encodes",
            "Resources encoded by the xDS cache (once per changed resource, shared by all streams)",
            self.encodes.clone(),
        );
    }

    /// Applies updates to one flavour atomically: streams see all of them or none. Publishes
    /// only if something changed.
    pub fn apply(&self, flavor: &str, updates: Vec<TypeUpdate>, changed_at: Instant) -> ApplyStats {
        self.apply_traced(flavor, updates, changed_at, None)
    }

    /// [`Cache::apply`], recording `trace` (the change's span) on the snapshot it publishes,
    /// so each push of this state can be traced as part of the change.
    pub fn apply_traced(
        &self,
        flavor: &str,
        updates: Vec<TypeUpdate>,
        changed_at: Instant,
        trace: Option<TraceParent>,
    ) -> ApplyStats {
        let mut stats = ApplyStats::default();
        let Some(tx) = self.flavors.get(flavor) else {
            return stats;
        };
        let current = Arc::clone(&tx.borrow());
        let mut next: Option<FlavorSnapshot> = None;
        for update in updates {
            let (type_url, items, replace, removes) = match update {
                TypeUpdate::Replace {
                    type_url,
                    resources,
                } => (type_url, resources, true, Vec::new()),
                TypeUpdate::Upsert {
                    type_url,
                    resources,
                } => (type_url, resources, false, Vec::new()),
                TypeUpdate::Remove { type_url, names } => (type_url, Vec::new(), false, names),
            };
            let old = current.types.get(&type_url);
            let mut resources = BTreeMap::new();
            let mut type_changed = false;
            let mut seen = std::collections::HashSet::new();
            for (name, bytes) in items {
                let version = content_version(&bytes);
                seen.insert(name.clone());
                match old.and_then(|t| t.resources.get(&name)) {
                    Some(existing) if existing.version == version => {
                        stats.unchanged += 1;
                        resources.insert(name, Arc::clone(existing));
                    }
                    _ => {
                        stats.changed += 1;
                        type_changed = true;
                        self.encodes.inc();
                        let r = encode(&type_url, name.clone(), version, &bytes, changed_at);
                        resources.insert(name, Arc::new(r));
                    }
                }
            }
            if let Some(old) = old {
                for (name, r) in &old.resources {
                    if seen.contains(name) {
                        continue;
                    }
                    if replace || removes.contains(name) {
                        stats.removed += 1;
                        type_changed = true;
                    } else {
                        resources.insert(name.clone(), Arc::clone(r));
                    }
                }
            }
            if !type_changed {
                continue;
            }
            let snap = next.get_or_insert_with(|| (*current).clone());
            let mut ts = TypeSnapshot {
                resources,
                ..Default::default()
            };
            ts.recompute_version();
            snap.types.insert(type_url, Arc::new(ts));
        }
        if let Some(mut snap) = next {
            snap.generation = current.generation + 1;
            // Replaced even with `None`: an untraced change must not inherit the last one's.
            snap.trace = trace;
            tx.send_replace(Arc::new(snap));
        }
        stats
    }
}

fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Wraps a resource's own bytes in the two wire forms, by hand, so the bytes are written once
/// and never re-serialised per stream.
fn encode(
    type_url: &str,
    name: String,
    version: String,
    bytes: &[u8],
    changed_at: Instant,
) -> EncodedResource {
    // google.protobuf.Any { type_url = 1; value = 2; }
    let mut any = Vec::with_capacity(bytes.len() + type_url.len() + 16);
    prost::encoding::string::encode(1, &type_url.to_string(), &mut any);
    prost::encoding::bytes::encode(2, &bytes.to_vec(), &mut any);
    // envoy.service.discovery.v3.Resource { version = 1; resource = 2 (Any); name = 3; }
    let mut delta = Vec::with_capacity(any.len() + name.len() + version.len() + 16);
    prost::encoding::string::encode(1, &version, &mut delta);
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut delta);
    prost::encoding::encode_varint(any.len() as u64, &mut delta);
    delta.extend_from_slice(&any);
    prost::encoding::string::encode(3, &name, &mut delta);
    EncodedResource {
        name,
        version,
        any: Bytes::from(any),
        delta: Bytes::from(delta),
        changed_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    fn cluster(name: &str, ms: i64) -> (String, Cluster) {
        (
            name.to_string(),
            Cluster {
                name: name.to_string(),
                connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: (ms * 1_000_000) as i32,
                }),
                ..Default::default()
            },
        )
    }

    fn cache() -> Arc<Cache> {
        Cache::new(&["envoy", "grpc"], &[CDS, EDS])
    }

    #[test]
    fn encodings_decode_as_any_and_resource() {
        let c = cache();
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 5)])],
            Instant::now(),
        );
        let snap = c.snapshot("envoy").unwrap();
        let r = snap.resource(CDS, "a").unwrap();
        let any = Any::decode(r.any.clone()).unwrap();
        assert_eq!(any.type_url, CDS);
        assert_eq!(Cluster::decode(any.value.as_slice()).unwrap().name, "a");
        let res = Resource::decode(r.delta.clone()).unwrap();
        assert_eq!(res.name, "a");
        assert_eq!(res.version, r.version);
        assert_eq!(res.resource.unwrap().type_url, CDS);
    }

    #[test]
    fn unchanged_resources_keep_their_bytes_and_publish_nothing() {
        let c = cache();
        let mut rx = c.subscribe("envoy").unwrap();
        let s = c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 5), cluster("b", 5)])],
            Instant::now(),
        );
        assert_eq!(s.changed, 2);
        assert!(rx.has_changed().unwrap());
        let first = rx.borrow_and_update().clone();
        let s = c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 5), cluster("b", 6)])],
            Instant::now(),
        );
        assert_eq!((s.changed, s.unchanged), (1, 1));
        let second = rx.borrow_and_update().clone();
        assert!(Arc::ptr_eq(
            first.resource(CDS, "a").unwrap(),
            second.resource(CDS, "a").unwrap()
        ));
        assert_ne!(
            first.resource(CDS, "b").unwrap().version,
            second.resource(CDS, "b").unwrap().version
        );
        assert_eq!(c.encodes_total(), 3);
        // Same content again: nothing published.
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 5), cluster("b", 6)])],
            Instant::now(),
        );
        assert!(!rx.has_changed().unwrap());
        assert_eq!(c.encodes_total(), 3);
    }

    #[test]
    fn versions_are_content_hashes_stable_across_caches() {
        let a = cache();
        let b = cache();
        for c in [&a, &b] {
            c.apply(
                "envoy",
                vec![TypeUpdate::replace(CDS, [cluster("x", 7)])],
                Instant::now(),
            );
        }
        let (sa, sb) = (a.snapshot("envoy").unwrap(), b.snapshot("envoy").unwrap());
        assert_eq!(sa.get(CDS).unwrap().version, sb.get(CDS).unwrap().version);
        assert_eq!(
            sa.resource(CDS, "x").unwrap().version,
            sb.resource(CDS, "x").unwrap().version
        );
    }

    #[test]
    fn replace_removes_upsert_keeps_remove_removes() {
        let c = cache();
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 1), cluster("b", 1)])],
            Instant::now(),
        );
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(CDS, [cluster("c", 1)])],
            Instant::now(),
        );
        let names = |c: &Cache| {
            c.snapshot("envoy")
                .unwrap()
                .get(CDS)
                .unwrap()
                .resources
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&c), ["a", "b", "c"]);
        c.apply(
            "envoy",
            vec![TypeUpdate::Remove {
                type_url: CDS.into(),
                names: vec!["b".into()],
            }],
            Instant::now(),
        );
        assert_eq!(names(&c), ["a", "c"]);
        let s = c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 1)])],
            Instant::now(),
        );
        assert_eq!((s.removed, s.unchanged), (1, 1));
        assert_eq!(names(&c), ["a"]);
    }

    #[test]
    fn flavours_are_independent_and_atomic_across_types() {
        let c = cache();
        let rx = c.subscribe("grpc").unwrap();
        c.apply(
            "envoy",
            vec![
                TypeUpdate::replace(CDS, [cluster("a", 1)]),
                TypeUpdate::replace(EDS, Vec::<(String, Cluster)>::new()),
            ],
            Instant::now(),
        );
        assert!(!rx.has_changed().unwrap());
        let s = c.snapshot("envoy").unwrap();
        assert_eq!(s.generation, 1);
        assert!(c.subscribe("nope").is_none());
    }

    #[test]
    fn a_published_snapshot_carries_its_changes_trace_parent() {
        let c = cache();
        let tp = TraceParent {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            sampled: true,
        };
        c.apply_traced(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 1)])],
            Instant::now(),
            Some(tp),
        );
        assert_eq!(c.snapshot("envoy").unwrap().trace, Some(tp));
        assert_eq!(
            tp.to_string(),
            format!("00-{}-{}-01", "ab".repeat(16), "01".repeat(8))
        );
        // Nothing changed: nothing published, so the snapshot keeps the change that made it.
        let other = TraceParent {
            span_id: [0x02; 8],
            ..tp
        };
        c.apply_traced(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 1)])],
            Instant::now(),
            Some(other),
        );
        assert_eq!(c.snapshot("envoy").unwrap().trace, Some(tp));
        // An untraced change clears it.
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(CDS, [cluster("a", 2)])],
            Instant::now(),
        );
        assert_eq!(c.snapshot("envoy").unwrap().trace, None);
    }
}
