//! Per-stream protocol state, shared by SotW and Delta, with no I/O.
//!
//! This module decides, from a client's requests and the cache's current state, exactly which
//! responses a stream must send. It follows Envoy's xDS protocol document:
//! - ACK/NACK is judged by `response_nonce` against the last nonce sent for the type; a NACK
//!   carries `error_detail`. A request with a stale nonce is neither; in Delta its subscription
//!   changes still apply (they are deltas and would otherwise be lost).
//! - At most one un-ACKed response per type per stream; when the ACK/NACK arrives the latest
//!   state is sent if it differs (latest wins, intermediate states are skipped).
//! - A NACKed version is never pushed again: what was sent is recorded as the client's state,
//!   so only a new version goes out (no NACK/resend loop, go-control-plane #962).
//! - Wildcard: `*` for any type; an empty first subscription means wildcard for Listener and
//!   Cluster only (the legacy rule; an empty EDS/RDS list means "nothing").
//! - SotW Listener and Cluster responses carry every subscribed resource (absence = deletion);
//!   Endpoint and Route responses carry the subscribed resources that exist.
//! - Delta sends changed resources, `removed_resources` for deleted ones and, once, for
//!   subscribed names that do not exist; `initial_resource_versions` prevents resending what
//!   the client has and makes us remove what it has but we do not (ghosts).
//! - The first request for a type on a stream is always answered, whatever `version_info` it
//!   carries: a client reconnecting after a control-plane restart still gets config.
//! - Make-before-break: responses go out in the order Cluster, Endpoint, Listener, Route, and a
//!   cluster that changed has its endpoints re-sent after it.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use serde::Serialize;
use weft_xds_cache::{EncodedResource, FlavorSnapshot, TypeSnapshot};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Push order: a cluster before its endpoints, a listener before its routes.
pub const ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Types for which absence from a SotW response means deletion and an empty first
/// subscription means wildcard.
fn is_full_state(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Sotw,
    Delta,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Sotw => "sotw",
            Variant::Delta => "delta",
        }
    }
}

/// A request the protocol does not allow; ends the offending stream only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown type URL `{0}`; this server serves {ORDER:?}")]
    UnknownType(String),
    #[error("type URL `{got}` sent on a stream that serves only `{expected}`")]
    WrongType { expected: &'static str, got: String },
    #[error("request has an empty type_url")]
    MissingType,
}

/// The last rejection of a type by the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub message: String,
    pub at_unix_ms: u64,
    /// The resources the rejection was attributed to (see [`attribute`]).
    pub resources: Vec<String>,
}

/// One resource a client rejects: the version it refused and why. Kept until the client ACKs
/// a response carrying another version of it, or the resource leaves its subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub name: String,
    pub version: String,
    /// The client's `error_detail` message.
    pub reason: String,
    pub at_unix_ms: u64,
}

/// Whether a client holds the current configuration of a type, as `weftctl status` and the
/// status page show it (the states of `istioctl proxy-status`, plus NACKED).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// The client ACKed the current configuration.
    #[default]
    Synced,
    /// A response is not yet ACKed, or a change has not been sent yet.
    Stale,
    /// The client rejects at least one resource of the type (its last response of the type was
    /// NACKed, or a rejected resource has not been replaced by an accepted version).
    Nacked,
}

impl SyncState {
    pub const ALL: [SyncState; 3] = [SyncState::Synced, SyncState::Stale, SyncState::Nacked];

    /// The name `/debug/clients` uses, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        }
    }
}

/// What `/debug/clients` shows per type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub wildcard: bool,
    pub subscriptions: Vec<String>,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_sent_version: Option<String>,
    pub last_sent_nonce: Option<String>,
    pub last_acked_version: Option<String>,
    pub pending_nonce: Option<String>,
    pub last_nack: Option<Nack>,
    pub state: SyncState,
    /// When the type entered `state`: the last ACK (SYNCED), the un-ACKed response's send
    /// (STALE), the oldest standing rejection (NACKED).
    pub state_since_unix_ms: u64,
    /// The cache's version of the type now (the Delta `system_version_info`).
    pub current_version: Option<String>,
    pub last_sent_unix_ms: Option<u64>,
    pub last_ack_unix_ms: Option<u64>,
    /// Resources the client currently rejects, by name.
    pub rejected: Vec<Rejection>,
}

/// One resource of a stream as `/debug/proxy_config` and CSDS show it.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceStatus {
    pub name: String,
    /// The version the client was sent and holds (`None`: subscribed, never sent, e.g. a name
    /// that does not exist).
    pub version: Option<String>,
    /// The cache's version now (`None`: the resource does not exist).
    pub current_version: Option<String>,
    pub state: SyncState,
    /// The current resource, shared with the cache; `None` unless the client holds exactly it.
    #[serde(skip)]
    pub current: Option<Arc<EncodedResource>>,
    /// Encoded size of what the client holds, when known (it holds the current version).
    pub bytes: Option<usize>,
    /// Sent in the response the client has not answered yet.
    pub in_flight: bool,
    pub rejected: Option<Rejection>,
}

/// One type of a stream with its resources, for `/debug/proxy_config` and CSDS.
#[derive(Debug, Clone, Serialize)]
pub struct TypeResources {
    pub state: SyncState,
    pub current_version: Option<String>,
    pub last_acked_version: Option<String>,
    pub last_ack_unix_ms: Option<u64>,
    pub resources: Vec<ResourceStatus>,
}

#[derive(Debug, Clone)]
struct Pending {
    nonce: String,
    version: String,
    /// Oldest registry change among the resources this response brought the client.
    oldest_change: Option<Instant>,
    sent_unix_ms: u64,
    /// What the response was made from, to tell on a NACK which resources it brought the
    /// client: the snapshot, the scope, and what the client held before. Kept instead of a
    /// list of the sent resources, which at thousands of streams times thousands of
    /// resources would cost hundreds of megabytes for the rare NACK; these are shared or were
    /// held anyway.
    snapshot: Arc<TypeSnapshot>,
    wildcard: bool,
    names: Arc<BTreeSet<String>>,
    prev_held: Held,
}

impl Pending {
    /// The resources this response brought the client (new to it, or at a new version), with
    /// the version sent, in name order. Only these can be the cause of a NACK: the rest the
    /// client had already accepted.
    fn brought(&self) -> Vec<(&str, &str)> {
        let in_scope = |n: &str| self.wildcard || self.names.contains(n);
        self.snapshot
            .resources
            .values()
            .filter(|r| in_scope(&r.name))
            .filter(|r| self.prev_held.get(&r.name) != Some(r.version.as_str()))
            .map(|r| (r.name.as_str(), r.version.as_str()))
            .collect()
    }
}

/// Which resources a NACK is about. A rejection is of one response, which may carry many
/// resources; Envoy and gRPC name the bad ones in `error_detail` ("Error adding/updating
/// cluster(s) web: …", "resource xds:///echo: …"), so the resources the message names win; a
/// message that names none (Envoy's RDS errors quote the bad value, not the resource) blames
/// every resource the response brought.
pub fn attribute<'a>(brought: &[(&'a str, &'a str)], message: &str) -> Vec<(&'a str, &'a str)> {
    let named: Vec<(&str, &str)> = brought
        .iter()
        .copied()
        .filter(|(name, _)| mentions(message, name))
        .collect();
    if named.is_empty() {
        brought.to_vec()
    } else {
        named
    }
}

/// `message` contains `name` as a whole token: not inside a longer name (`web` is not named
/// by `web-canary`).
fn mentions(message: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || "_-.:/~".contains(c);
    message.match_indices(name).any(|(i, _)| {
        let before = message[..i].chars().next_back();
        let after = message[i + name.len()..].chars().next();
        // A trailing '.' or ':' ends a sentence or starts the reason, not the name.
        let ends = |c: Option<char>| c.is_none_or(|c| !is_name_char(c) || c == '.' || c == ':');
        before.is_none_or(|c| !is_name_char(c)) && ends(after)
    })
}

/// Subscribed-name sets, shared between the streams that subscribe to the same names: every
/// Envoy of a mesh asks for the endpoints of the same clusters, and a private copy of 1,000
/// names cost each stream more than everything else it holds.
#[derive(Debug, Default)]
pub struct NameSets {
    sets: Mutex<HashMap<u64, Weak<BTreeSet<String>>>>,
}

impl NameSets {
    /// The shared set equal to `set`.
    pub fn intern(&self, set: BTreeSet<String>) -> Arc<BTreeSet<String>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        set.hash(&mut h);
        let key = h.finish();
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sets.get(&key).and_then(Weak::upgrade)
            && *s == set
        {
            return s;
        }
        // Sets nobody uses any more are dropped now and then, so the table stays within twice
        // the live sets.
        if sets.len() >= 64 && sets.len().is_power_of_two() {
            sets.retain(|_, w| w.strong_count() > 0);
        }
        let s = Arc::new(set);
        sets.insert(key, Arc::downgrade(&s));
        s
    }
}

/// What the client holds of one type, as far as we know. Updated when we send
/// (optimistically; a NACK does not roll it back, which is what stops resend loops).
#[derive(Debug, Clone)]
enum Held {
    /// Exactly every resource of this snapshot, at its version. After a response the client
    /// usually holds the whole type (every cluster, the endpoints of every cluster): sharing
    /// the cache's snapshot then costs a stream nothing per resource, where a private map of
    /// every name and version cost it tens of kilobytes per type.
    All(Arc<TypeSnapshot>),
    /// Anything else: name -> version.
    Map(HashMap<String, String>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Map(HashMap::new())
    }
}

impl Held {
    fn get(&self, name: &str) -> Option<&str> {
        match self {
            Held::All(s) => s.resources.get(name).map(|r| r.version.as_str()),
            Held::Map(m) => m.get(name).map(String::as_str),
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            Held::All(s) => s.resources.keys().map(String::as_str).collect(),
            Held::Map(m) => m.keys().map(String::as_str).collect(),
        }
    }

    fn map_mut(&mut self) -> &mut HashMap<String, String> {
        if let Held::All(s) = self {
            let m = s
                .resources
                .iter()
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect();
            *self = Held::Map(m);
        }
        match self {
            Held::Map(m) => m,
            // Just replaced by a map.
            Held::All(_) => unreachable!("Held::All was just replaced"),
        }
    }

    fn remove(&mut self, name: &str) {
        if self.get(name).is_some() {
            self.map_mut().remove(name);
        }
    }

    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        match self {
            Held::All(s) if s.resources.keys().all(|n| keep(n)) => {}
            _ => self.map_mut().retain(|n, _| keep(n)),
        }
    }

    /// After a response the client holds exactly the in-scope resources of the snapshot.
    fn after_send(snap: &Arc<TypeSnapshot>, whole: bool, names: &BTreeSet<String>) -> Held {
        if whole {
            return Held::All(Arc::clone(snap));
        }
        Held::Map(
            names
                .iter()
                .filter_map(|n| snap.resources.get(n))
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
        )
    }
}

/// How the snapshot differs from what the client holds, within its subscription.
struct Diff<'a> {
    /// In-scope resources whose version the client does not hold, in name order.
    changed: Vec<&'a Arc<EncodedResource>>,
    /// Names the client holds that no longer exist or are out of scope.
    gone: Vec<String>,
    /// Every resource of the snapshot is in scope.
    whole: bool,
}

/// Every resource of `snap` is among `names` (a merge of two sorted sequences).
fn covers(names: &BTreeSet<String>, snap: &TypeSnapshot) -> bool {
    if names.len() < snap.resources.len() {
        return false;
    }
    let mut it = names.iter();
    'next: for k in snap.resources.keys() {
        for n in it.by_ref() {
            match n.cmp(k) {
                Ordering::Less => {}
                Ordering::Equal => continue 'next,
                Ordering::Greater => return false,
            }
        }
        return false;
    }
    true
}

fn diff<'a>(ts: &TypeState, snap: &'a TypeSnapshot) -> Diff<'a> {
    let whole = ts.wildcard || covers(&ts.names, snap);
    let mut changed = Vec::new();
    let mut gone = Vec::new();
    match &ts.held {
        // The usual case, O(resources) pointer comparisons and no lookups: both sides are
        // sorted by name and an unchanged resource keeps its `Arc`.
        Held::All(prev) if whole => {
            if std::ptr::eq(&**prev, snap) {
                return Diff {
                    changed,
                    gone,
                    whole,
                };
            }
            let mut old = prev.resources.iter().peekable();
            for (name, r) in &snap.resources {
                while let Some((n, _)) = old.peek()
                    && n.as_str() < name.as_str()
                {
                    gone.push((*n).clone());
                    old.next();
                }
                match old.peek() {
                    Some((n, o)) if *n == name => {
                        if !Arc::ptr_eq(o, r) && o.version != r.version {
                            changed.push(r);
                        }
                        old.next();
                    }
                    _ => changed.push(r),
                }
            }
            gone.extend(old.map(|(n, _)| n.clone()));
        }
        held => {
            if whole {
                changed.extend(
                    snap.resources
                        .values()
                        .filter(|r| held.get(&r.name) != Some(r.version.as_str())),
                );
            } else {
                changed.extend(
                    ts.names
                        .iter()
                        .filter_map(|n| snap.resources.get(n))
                        .filter(|r| held.get(&r.name) != Some(r.version.as_str())),
                );
            }
            let is_gone =
                |n: &str| !snap.resources.contains_key(n) || !(ts.wildcard || ts.names.contains(n));
            match held {
                Held::All(prev) => {
                    gone.extend(prev.resources.keys().filter(|n| is_gone(n)).cloned());
                }
                Held::Map(m) => gone.extend(m.keys().filter(|n| is_gone(n)).cloned()),
            }
        }
    }
    Diff {
        changed,
        gone,
        whole,
    }
}

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    /// Shared with other streams subscribed to the same names (see [`NameSets`]).
    names: Arc<BTreeSet<String>>,
    held: Held,
    /// Delta: subscribed names we already told the client do not exist.
    absent_reported: HashSet<String>,
    /// Answer even if nothing changed (first request, re-subscription, cluster changed).
    force: bool,
    /// Delta: names to send again even if the client has this version.
    resend: HashSet<String>,
    pending: Option<Pending>,
    /// The client has sent at least one request for this type on this stream.
    started: bool,
    /// The type's snapshot version last evaluated with nothing pending. Until a request of
    /// the type, a forced send or a new version, evaluating again would send nothing: a
    /// change to another type then costs this type O(1) instead of a scan of every resource,
    /// which with M streams and R resources was O(M x R) per change.
    evaluated: Option<String>,
    /// Resources the client rejects, by name (see [`Rejection`]).
    rejected: BTreeMap<String, Rejection>,
    /// The last response of the type that the client answered was NACKed.
    nacked_last: bool,
    status: TypeStatus,
}

impl TypeState {
    /// Nothing can be due: the snapshot is the one last evaluated and nothing forces a send.
    fn unchanged_since_evaluated(&self, snapshot_version: Option<&str>) -> bool {
        !self.force
            && self.resend.is_empty()
            && self.evaluated.is_some()
            && self.evaluated.as_deref() == snapshot_version
    }
}

impl TypeState {
    /// Records that a response went out: it is now the one un-ACKed response of the type, and
    /// the client holds `held` (the in-scope resources of `snapshot`).
    fn sent(
        &mut self,
        nonce: &str,
        version: &str,
        oldest_change: Option<Instant>,
        snapshot: &Arc<TypeSnapshot>,
        held: Held,
    ) {
        self.force = false;
        let now = unix_ms();
        self.pending = Some(Pending {
            nonce: nonce.to_string(),
            version: version.to_string(),
            oldest_change,
            sent_unix_ms: now,
            snapshot: Arc::clone(snapshot),
            wildcard: self.wildcard,
            names: Arc::clone(&self.names),
            prev_held: std::mem::replace(&mut self.held, held),
        });
        self.status.pushes += 1;
        self.status.last_sent_version = Some(version.to_string());
        self.status.last_sent_nonce = Some(nonce.to_string());
        self.status.last_sent_unix_ms = Some(now);
    }

    fn in_scope(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Ends the rejections `keep` says are over, and returns their names.
    fn end_rejections(&mut self, keep: impl Fn(&str, &Rejection) -> bool) -> Vec<String> {
        let mut gone = Vec::new();
        self.rejected.retain(|n, r| {
            let k = keep(n, r);
            if !k {
                gone.push(n.clone());
            }
            k
        });
        gone
    }

    /// Ends the rejections of resources the client no longer subscribes to.
    fn prune_out_of_scope(&mut self) -> Vec<String> {
        if self.rejected.is_empty() {
            return Vec::new();
        }
        let (wildcard, names) = (self.wildcard, Arc::clone(&self.names));
        self.end_rejections(|n, _| wildcard || names.contains(n))
    }

    /// Whether the client holds the current state of the type (`snap`): nothing un-ACKed,
    /// nothing due.
    fn up_to_date(&self, snap: &TypeSnapshot, type_url: &str) -> bool {
        if self.pending.is_some() || self.force || !self.resend.is_empty() {
            return false;
        }
        if self.evaluated.as_deref() == Some(snap.version.as_str()) {
            return true;
        }
        let d = diff(self, snap);
        d.changed.is_empty() && (d.gone.is_empty() || !is_full_state(type_url))
    }

    fn sync_state(&self, snap: &TypeSnapshot, type_url: &str) -> (SyncState, u64) {
        if self.nacked_last || !self.rejected.is_empty() {
            let since = self
                .rejected
                .values()
                .map(|r| r.at_unix_ms)
                .min()
                .or(self.status.last_nack.as_ref().map(|n| n.at_unix_ms))
                .unwrap_or_default();
            return (SyncState::Nacked, since);
        }
        if !self.up_to_date(snap, type_url) {
            let since = self
                .pending
                .as_ref()
                .map_or_else(unix_ms, |p| p.sent_unix_ms);
            return (SyncState::Stale, since);
        }
        let since = self.status.last_ack_unix_ms.unwrap_or_default();
        (SyncState::Synced, since)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one request meant.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestKind {
    /// A request that opens or changes a subscription without judging a response: no nonce,
    /// or the latest nonce again after it was already ACKed or NACKed.
    Subscribe,
    Ack {
        version: String,
        /// Change-to-ACK time when the acknowledged response carried a registry change.
        convergence: Option<Duration>,
    },
    Nack(Nack),
    /// A nonce that is not the latest sent for the type: ignored for ACK/NACK purposes.
    Stale,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutcome {
    pub type_url: String,
    pub kind: RequestKind,
    /// Resources the client started rejecting with this request (a NACK).
    pub rejected: Vec<String>,
    /// Resources it no longer rejects (an ACK of another version, or out of scope).
    pub cleared: Vec<String>,
}

/// The `resources` of a SotW response.
#[derive(Debug, Clone, PartialEq)]
pub enum SotwResources {
    /// Encoded `google.protobuf.Any` values, each written as field 2.
    Each(Vec<Bytes>),
    /// Field 2 already written for `count` resources: the cache's encoding of a whole type,
    /// shared by every stream that sends it.
    Shared { bytes: Bytes, count: usize },
}

impl SotwResources {
    pub fn len(&self) -> usize {
        match self {
            SotwResources::Each(v) => v.len(),
            SotwResources::Shared { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A SotW response, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct SotwOut {
    pub type_url: String,
    pub version_info: String,
    pub resources: SotwResources,
    pub nonce: String,
}

/// A Delta response, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaOut {
    pub type_url: String,
    pub system_version_info: String,
    pub resources: Vec<Bytes>,
    pub removed: Vec<String>,
    pub nonce: String,
}

/// One stream's protocol state. See the module documentation.
#[derive(Debug)]
pub struct StreamState {
    variant: Variant,
    /// Per-type services (CDS, EDS, ...) accept only their own type.
    only_type: Option<&'static str>,
    types: BTreeMap<String, TypeState>,
    name_sets: Arc<NameSets>,
    next_nonce: u64,
    /// Convergence counts only changes made while the stream was open: a new client fetching
    /// config that changed an hour ago is not a one-hour convergence.
    opened_at: Instant,
    /// See [`StreamState::take_cleared`].
    cleared: Vec<(String, String)>,
}

impl StreamState {
    /// `name_sets` is shared by every stream of a server.
    pub fn new(
        variant: Variant,
        only_type: Option<&'static str>,
        name_sets: Arc<NameSets>,
    ) -> Self {
        Self {
            variant,
            only_type,
            types: BTreeMap::new(),
            name_sets,
            next_nonce: 0,
            opened_at: Instant::now(),
            cleared: Vec::new(),
        }
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Per-type status for `/debug/clients`, judged against the cache's current state `snap`
    /// of the stream's flavour (`None`: no such flavour, the client holds nothing current).
    pub fn status(&self, snap: Option<&FlavorSnapshot>) -> BTreeMap<String, TypeStatus> {
        let empty = TypeSnapshot::default();
        self.types
            .iter()
            .map(|(t, s)| {
                let tsnap = snap.and_then(|f| f.get(t)).map_or(&empty, |a| &**a);
                let mut st = s.status.clone();
                st.wildcard = s.wildcard;
                st.subscriptions = s.names.iter().cloned().collect();
                st.pending_nonce = s.pending.as_ref().map(|p| p.nonce.clone());
                (st.state, st.state_since_unix_ms) = s.sync_state(tsnap, t);
                st.current_version = Some(tsnap.version.clone());
                st.rejected = s.rejected.values().cloned().collect();
                (t.clone(), st)
            })
            .collect()
    }

    /// Every resource of every type the client holds, is being sent or subscribed to, against
    /// the cache's current state `snap`.
    pub fn resources(&self, snap: Option<&FlavorSnapshot>) -> BTreeMap<String, TypeResources> {
        let empty = TypeSnapshot::default();
        self.types
            .iter()
            .map(|(t, ts)| {
                let tsnap = snap.and_then(|f| f.get(t)).map_or(&empty, |a| &**a);
                let in_flight: HashSet<&str> = ts
                    .pending
                    .as_ref()
                    .map(|p| p.brought().into_iter().map(|(n, _)| n).collect())
                    .unwrap_or_default();
                let mut names: BTreeSet<&str> = ts.held.names().into_iter().collect();
                names.extend(ts.names.iter().map(String::as_str));
                if ts.wildcard {
                    names.extend(tsnap.resources.keys().map(String::as_str));
                }
                let resources = names
                    .into_iter()
                    .map(|name| {
                        let version = ts.held.get(name).map(str::to_string);
                        let current = tsnap.resources.get(name).filter(|_| ts.in_scope(name));
                        let rejected = ts.rejected.get(name).cloned();
                        let holds_current =
                            current.is_some_and(|c| Some(c.version.as_str()) == version.as_deref());
                        let in_flight = in_flight.contains(name);
                        let state = if rejected.is_some() {
                            SyncState::Nacked
                        } else if in_flight
                            || (!holds_current && (current.is_some() || version.is_some()))
                        {
                            SyncState::Stale
                        } else {
                            SyncState::Synced
                        };
                        ResourceStatus {
                            name: name.to_string(),
                            version,
                            current_version: current.map(|c| c.version.clone()),
                            state,
                            bytes: current.filter(|_| holds_current).map(|c| c.any.len()),
                            current: current.filter(|_| holds_current).cloned(),
                            in_flight,
                            rejected,
                        }
                    })
                    .collect();
                let (state, _) = ts.sync_state(tsnap, t);
                let typ = TypeResources {
                    state,
                    current_version: Some(tsnap.version.clone()),
                    last_acked_version: ts.status.last_acked_version.clone(),
                    last_ack_unix_ms: ts.status.last_ack_unix_ms,
                    resources,
                };
                (t.clone(), typ)
            })
            .collect()
    }

    /// Every rejection the client holds, with its type URL.
    pub fn rejection_details(&self) -> Vec<(String, Rejection)> {
        self.types
            .iter()
            .flat_map(|(t, ts)| ts.rejected.values().map(move |r| (t.clone(), r.clone())))
            .collect()
    }

    /// Every (type URL, resource name) the client currently rejects.
    pub fn rejections(&self) -> Vec<(String, String)> {
        self.types
            .iter()
            .flat_map(|(t, ts)| ts.rejected.keys().map(move |n| (t.clone(), n.clone())))
            .collect()
    }

    /// Resource names subscribed to, across all types (a wildcard counts as none), for
    /// [`crate::XdsLimits::max_subscriptions`].
    pub fn subscription_count(&self) -> usize {
        self.types.values().map(|t| t.names.len()).sum()
    }

    fn check_type(&self, type_url: &str) -> Result<&'static str, ProtocolError> {
        let type_url = if type_url.is_empty() {
            self.only_type.ok_or(ProtocolError::MissingType)?
        } else {
            type_url
        };
        let known = ORDER
            .iter()
            .copied()
            .find(|t| *t == type_url)
            .ok_or_else(|| ProtocolError::UnknownType(type_url.to_string()))?;
        match self.only_type {
            Some(expected) if expected != known => Err(ProtocolError::WrongType {
                expected,
                got: type_url.to_string(),
            }),
            _ => Ok(known),
        }
    }

    /// Applies a SotW request.
    pub fn on_sotw_request(
        &mut self,
        req: &DiscoveryRequest,
        now: Instant,
    ) -> Result<RequestOutcome, ProtocolError> {
        let type_url = self.check_type(&req.type_url)?;
        let ts = self.types.entry(type_url.to_string()).or_default();
        ts.evaluated = None;
        let kind = judge(ts, &req.response_nonce, req.error_detail.as_ref(), now);
        if kind.kind == RequestKind::Stale {
            // The client has not seen our latest response yet; its view is out of date.
            return Ok(outcome(type_url, kind));
        }
        let star = req.resource_names.iter().any(|n| n == "*");
        let listed = req.resource_names.iter().filter(|n| *n != "*");
        let wildcard = star || (req.resource_names.is_empty() && is_full_state(type_url));
        // Every ACK of an EDS response repeats the full list: compare it in place (it is
        // usually the same, and in the same sorted order) before building anything.
        let same_names = listed.clone().eq(ts.names.iter()) || {
            let names: BTreeSet<&String> = listed.clone().collect();
            names.len() == ts.names.len() && names.iter().all(|n| ts.names.contains(*n))
        };
        if wildcard != ts.wildcard || !same_names {
            ts.wildcard = wildcard;
            if !same_names {
                ts.names = self.name_sets.intern(listed.cloned().collect());
            }
            let names = &ts.names;
            // Forget what the client dropped, so a name that comes back is sent again
            // (go-control-plane #431: a resubscription must be answered).
            ts.held.retain(|n| wildcard || names.contains(n));
        }
        if req.response_nonce.is_empty() {
            // A request without a nonce opens (or reopens) the subscription: always answer it,
            // whatever version_info it carries, since that may come from a previous control
            // plane that happened to use the same version string.
            ts.force = true;
        }
        ts.started = true;
        let mut kind = kind;
        kind.cleared.extend(ts.prune_out_of_scope());
        Ok(outcome(type_url, kind))
    }

    /// Applies a Delta request.
    pub fn on_delta_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<RequestOutcome, ProtocolError> {
        let type_url = self.check_type(&req.type_url)?;
        let ts = self.types.entry(type_url.to_string()).or_default();
        ts.evaluated = None;
        let kind = judge(ts, &req.response_nonce, req.error_detail.as_ref(), now);
        // Subscription changes apply whatever the nonce: in Delta they are increments, and
        // dropping one would lose it for good.
        let first = !ts.started;
        ts.started = true;
        if first {
            ts.force = true;
            if req.resource_names_subscribe.is_empty() && is_full_state(type_url) {
                ts.wildcard = true;
            }
            if !req.initial_resource_versions.is_empty() {
                let held = ts.held.map_mut();
                for (n, v) in &req.initial_resource_versions {
                    held.insert(n.clone(), v.clone());
                }
            }
        }
        if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty() {
            return Ok(outcome(type_url, kind));
        }
        let mut names = (*ts.names).clone();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                ts.wildcard = true;
                continue;
            }
            names.insert(n.clone());
            ts.absent_reported.remove(n);
            // Subscribing asks for the resource (again): unless the client just told us it
            // holds it (initial_resource_versions), it must be sent.
            if !(first && req.initial_resource_versions.contains_key(n)) {
                ts.held.remove(n);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                ts.wildcard = false;
                ts.held.retain(|k| names.contains(k));
                continue;
            }
            names.remove(n);
            ts.absent_reported.remove(n);
            if !ts.wildcard {
                ts.held.remove(n);
            }
        }
        if names != *ts.names {
            ts.names = self.name_sets.intern(names);
        }
        let mut kind = kind;
        kind.cleared.extend(ts.prune_out_of_scope());
        Ok(outcome(type_url, kind))
    }

    /// Rejections that ended because their resources stopped existing, found while computing
    /// responses, as (type URL, name); each is returned once.
    pub fn take_cleared(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.cleared)
    }

    /// A rejection of a resource that no longer exists is over: the client drops it (Delta
    /// removal, SotW absence) or never uses it again.
    fn prune_missing(&mut self, type_url: &str, tsnap: &TypeSnapshot) {
        if let Some(ts) = self.types.get_mut(type_url)
            && !ts.rejected.is_empty()
        {
            let gone = ts.end_rejections(|n, _| tsnap.resources.contains_key(n));
            self.cleared
                .extend(gone.into_iter().map(|n| (type_url.to_string(), n)));
        }
    }

    fn mark_evaluated(&mut self, type_url: &str, snap_version: Option<String>) {
        if let Some(ts) = self.types.get_mut(type_url) {
            ts.evaluated = snap_version;
        }
    }

    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// The SotW responses due now, in push order. Each sets its type's pending nonce.
    pub fn sotw_responses(&mut self, snap: &FlavorSnapshot) -> Vec<SotwOut> {
        let mut out = Vec::new();
        let empty = Arc::new(TypeSnapshot::default());
        for type_url in ORDER {
            let tsnap = snap.get(type_url).unwrap_or(&empty);
            self.prune_missing(type_url, tsnap);
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.pending.is_some() {
                continue;
            }
            let snap_version = Some(tsnap.version.clone());
            if ts.unchanged_since_evaluated(snap_version.as_deref()) {
                continue;
            }
            let d = diff(ts, tsnap);
            let same = d.changed.is_empty() && d.gone.is_empty();
            let due = ts.force
                || if is_full_state(type_url) {
                    !same
                } else {
                    !d.changed.is_empty()
                };
            if !due {
                self.mark_evaluated(type_url, snap_version);
                continue;
            }
            let changed_clusters: Vec<String> = if type_url == CLUSTER {
                d.changed
                    .iter()
                    .filter(|r| ts.held.get(&r.name).is_some())
                    .map(|r| r.name.clone())
                    .collect()
            } else {
                Vec::new()
            };
            let oldest_change = d
                .changed
                .iter()
                .map(|r| r.changed_at)
                .filter(|t| *t >= self.opened_at)
                .min();
            // The whole type goes out as the cache's shared encoding, whose version is the
            // type's: nothing per resource is copied or hashed per stream.
            let (version, resources) = if d.whole {
                (
                    tsnap.version.clone(),
                    SotwResources::Shared {
                        bytes: tsnap.sotw_resources().clone(),
                        count: tsnap.resources.len(),
                    },
                )
            } else {
                let selected: Vec<_> = ts
                    .names
                    .iter()
                    .filter_map(|n| tsnap.resources.get(n))
                    .collect();
                (
                    sotw_version(&selected),
                    SotwResources::Each(selected.iter().map(|r| r.any.clone()).collect()),
                )
            };
            let held = Held::after_send(tsnap, d.whole, &ts.names);
            let nonce = self.nonce();
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            ts.evaluated = snap_version;
            ts.sent(&nonce, &version, oldest_change, tsnap, held);
            out.push(SotwOut {
                type_url: type_url.to_string(),
                version_info: version,
                resources,
                nonce,
            });
            if !changed_clusters.is_empty()
                && let Some(eds) = self.types.get_mut(ENDPOINT)
                && changed_clusters
                    .iter()
                    .any(|c| eds.wildcard || eds.names.contains(c))
            {
                eds.force = true;
            }
        }
        out
    }

    /// The Delta responses due now, in push order. Each sets its type's pending nonce.
    pub fn delta_responses(&mut self, snap: &FlavorSnapshot) -> Vec<DeltaOut> {
        let mut out = Vec::new();
        let empty = Arc::new(TypeSnapshot::default());
        for type_url in ORDER {
            let tsnap = snap.get(type_url).unwrap_or(&empty);
            self.prune_missing(type_url, tsnap);
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.pending.is_some() {
                continue;
            }
            let snap_version = Some(tsnap.version.clone());
            if ts.unchanged_since_evaluated(snap_version.as_deref()) {
                continue;
            }
            let in_scope = |name: &str| ts.wildcard || ts.names.contains(name);
            let d = diff(ts, tsnap);
            let mut send = d.changed;
            if !ts.resend.is_empty() {
                let extra: Vec<_> = ts
                    .resend
                    .iter()
                    .filter(|n| in_scope(n))
                    .filter_map(|n| tsnap.resources.get(n))
                    .filter(|r| !send.iter().any(|s| s.name == r.name))
                    .collect();
                send.extend(extra);
                send.sort_by(|a, b| a.name.cmp(&b.name));
            }
            let mut removed = d.gone;
            // When the names cover every resource and are no more than the resources, they are
            // exactly the resources and none can be missing: skip the per-name lookups. Not
            // under wildcard, where every resource is in scope whatever the names are (found by
            // tests/fuzz xds_delta: `*` plus a missing name was never reported removed).
            let absent: Vec<String> =
                if d.whole && !ts.wildcard && ts.names.len() <= tsnap.resources.len() {
                    Vec::new()
                } else {
                    ts.names
                        .iter()
                        .filter(|n| {
                            !tsnap.resources.contains_key(*n)
                                && ts.held.get(n).is_none()
                                && !ts.absent_reported.contains(*n)
                        })
                        .cloned()
                        .collect()
                };
            removed.extend(absent.iter().cloned());
            removed.sort();
            removed.dedup();
            if send.is_empty() && removed.is_empty() && !ts.force {
                self.mark_evaluated(type_url, snap_version);
                continue;
            }
            if send.is_empty() && removed.is_empty() {
                // Forced but nothing to say (e.g. first wildcard request on an empty type):
                // Envoy waits for a first response before finishing initialisation, so answer
                // with an empty one.
                if !ts.wildcard {
                    if let Some(ts) = self.types.get_mut(type_url) {
                        ts.force = false;
                        ts.evaluated = snap_version;
                    }
                    continue;
                }
            }
            let changed_clusters: Vec<String> = if type_url == CLUSTER {
                send.iter()
                    .filter(|r| ts.held.get(&r.name).is_some_and(|v| v != r.version))
                    .map(|r| r.name.clone())
                    .collect()
            } else {
                Vec::new()
            };
            let oldest_change = send
                .iter()
                .map(|r| r.changed_at)
                .filter(|t| *t >= self.opened_at)
                .min();
            let resources_bytes: Vec<Bytes> = send.iter().map(|r| r.delta.clone()).collect();
            // What the client holds after this response: every in-scope resource at its
            // current version (what differed is sent, what is gone is removed).
            let held = Held::after_send(tsnap, d.whole, &ts.names);
            let system_version_info = tsnap.version.clone();
            let nonce = self.nonce();
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            ts.evaluated = snap_version;
            // A subscribed name removed because it stopped existing has been reported too
            // (found by tests/fuzz xds_delta: it was reported again in the next response).
            let reported: Vec<String> = removed
                .iter()
                .filter(|n| ts.names.contains(*n) && !tsnap.resources.contains_key(*n))
                .cloned()
                .collect();
            ts.absent_reported.extend(absent);
            ts.absent_reported.extend(reported);
            ts.resend.clear();
            ts.sent(&nonce, &system_version_info, oldest_change, tsnap, held);
            out.push(DeltaOut {
                type_url: type_url.to_string(),
                system_version_info,
                resources: resources_bytes,
                removed,
                nonce,
            });
            if !changed_clusters.is_empty()
                && let Some(eds) = self.types.get_mut(ENDPOINT)
            {
                for c in changed_clusters {
                    if eds.wildcard || eds.names.contains(&c) {
                        eds.resend.insert(c);
                    }
                }
            }
        }
        out
    }
}

/// A request judged against the type's pending response.
struct Judged {
    kind: RequestKind,
    rejected: Vec<String>,
    cleared: Vec<String>,
}

impl From<RequestKind> for Judged {
    fn from(kind: RequestKind) -> Self {
        Judged {
            kind,
            rejected: Vec::new(),
            cleared: Vec::new(),
        }
    }
}

fn outcome(type_url: &str, j: Judged) -> RequestOutcome {
    RequestOutcome {
        type_url: type_url.to_string(),
        kind: j.kind,
        rejected: j.rejected,
        cleared: j.cleared,
    }
}

/// Judges a request's nonce and error against the type's pending response, and records it.
fn judge(
    ts: &mut TypeState,
    nonce: &str,
    error: Option<&envoy_types::pb::google::rpc::Status>,
    now: Instant,
) -> Judged {
    if nonce.is_empty() {
        return RequestKind::Subscribe.into();
    }
    // Stale means "not the latest nonce we sent": the client has not seen our latest
    // response. The latest nonce again, after it was ACKed, is a subscription change
    // (Envoy sends one when it adds a cluster and needs its endpoints).
    if ts.status.last_sent_nonce.as_deref() != Some(nonce) {
        return RequestKind::Stale.into();
    }
    if ts.pending.as_ref().is_none_or(|p| p.nonce != nonce) {
        return RequestKind::Subscribe.into();
    }
    let Some(pending) = ts.pending.take() else {
        return RequestKind::Subscribe.into();
    };
    match error {
        Some(err) => {
            let at_unix_ms = unix_ms();
            let brought = pending.brought();
            let blamed = attribute(&brought, &err.message);
            let mut rejected = Vec::new();
            for (name, version) in &blamed {
                let r = Rejection {
                    name: name.to_string(),
                    version: version.to_string(),
                    reason: err.message.clone(),
                    at_unix_ms,
                };
                if ts.rejected.insert(name.to_string(), r).is_none() {
                    rejected.push(name.to_string());
                }
            }
            let nack = Nack {
                version: pending.version.clone(),
                nonce: pending.nonce.clone(),
                message: err.message.clone(),
                at_unix_ms,
                resources: blamed.iter().map(|(n, _)| n.to_string()).collect(),
            };
            ts.nacked_last = true;
            ts.status.nacks += 1;
            ts.status.last_nack = Some(nack.clone());
            Judged {
                kind: RequestKind::Nack(nack),
                rejected,
                cleared: Vec::new(),
            }
        }
        None => {
            ts.nacked_last = false;
            ts.status.acks += 1;
            ts.status.last_acked_version = Some(pending.version.clone());
            ts.status.last_ack_unix_ms = Some(unix_ms());
            // A rejection ends when the client accepts another version of the resource, or
            // when the resource is gone from what it should hold.
            let scope = (ts.wildcard, Arc::clone(&ts.names));
            let cleared = ts.end_rejections(|name, r| {
                (scope.0 || scope.1.contains(name))
                    && pending
                        .snapshot
                        .resources
                        .get(name)
                        .is_some_and(|cur| cur.version == r.version)
            });
            Judged {
                kind: RequestKind::Ack {
                    version: pending.version,
                    convergence: pending
                        .oldest_change
                        .map(|t| now.saturating_duration_since(t)),
                },
                rejected: Vec::new(),
                cleared,
            }
        }
    }
}

/// A SotW `version_info`: content hash of exactly what the response carries.
fn sotw_version(selected: &[&Arc<EncodedResource>]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for r in selected {
        h.update(r.name.as_bytes());
        h.update(&[0]);
        h.update(r.version.as_bytes());
        h.update(&[0]);
    }
    format!("{:016x}", h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use weft_xds_cache::{Cache, TypeUpdate};

    fn cluster(name: &str, ms: i32) -> (String, Cluster) {
        let c = Cluster {
            name: name.to_string(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            }),
            ..Default::default()
        };
        (name.to_string(), c)
    }

    fn cla(name: &str, weight: u32) -> (String, ClusterLoadAssignment) {
        let mut c = ClusterLoadAssignment {
            cluster_name: name.to_string(),
            ..Default::default()
        };
        c.named_endpoints
            .insert(format!("w{weight}"), Default::default());
        (name.to_string(), c)
    }

    fn cache() -> Arc<Cache> {
        let c = Cache::new(&["envoy"], &ORDER);
        c.apply(
            "envoy",
            vec![
                TypeUpdate::replace(CLUSTER, [cluster("a", 1), cluster("b", 1)]),
                TypeUpdate::replace(ENDPOINT, [cla("a", 1), cla("b", 1)]),
            ],
            Instant::now(),
        );
        c
    }

    fn sotw(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }

    fn delta(type_url: &str, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }

    fn evaluated(st: &StreamState, type_url: &str) -> Option<String> {
        st.types.get(type_url).and_then(|t| t.evaluated.clone())
    }

    #[test]
    fn sotw_skips_types_whose_snapshot_did_not_change() {
        let c = cache();
        let mut st = StreamState::new(Variant::Sotw, None, Arc::default());
        let now = Instant::now();
        st.on_sotw_request(&sotw(CLUSTER, &[], ""), now).unwrap();
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], ""), now)
            .unwrap();
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 2);
        st.on_sotw_request(&sotw(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        // A SotW EDS ACK carries the names, or it would unsubscribe.
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], &out[1].nonce), now)
            .unwrap();
        let snap = c.snapshot("envoy").unwrap();
        assert!(st.sotw_responses(&snap).is_empty());
        let cds_seen = evaluated(&st, CLUSTER);
        assert!(cds_seen.is_some());
        // An endpoint change: only EDS goes out; CDS is recognised as unchanged.
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(ENDPOINT, [cla("a", 2)])],
            Instant::now(),
        );
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].type_url, ENDPOINT);
        assert_eq!(out[0].resources.len(), 2);
        assert_eq!(evaluated(&st, CLUSTER), cds_seen);
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], &out[0].nonce), now)
            .unwrap();
        // A cluster change still forces the endpoints after it (make-before-break).
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(CLUSTER, [cluster("a", 2)])],
            Instant::now(),
        );
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        let types: Vec<&str> = out.iter().map(|o| o.type_url.as_str()).collect();
        assert_eq!(types, [CLUSTER, ENDPOINT]);
    }

    #[test]
    fn delta_skip_keeps_subscription_changes_and_forced_resends() {
        let c = cache();
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        let now = Instant::now();
        st.on_delta_request(&delta(CLUSTER, &[], ""), now).unwrap();
        st.on_delta_request(&delta(ENDPOINT, &["a"], ""), now)
            .unwrap();
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 2);
        for o in &out {
            st.on_delta_request(&delta(&o.type_url, &[], &o.nonce), now)
                .unwrap();
        }
        let snap = c.snapshot("envoy").unwrap();
        assert!(st.delta_responses(&snap).is_empty());
        assert!(evaluated(&st, ENDPOINT).is_some());
        // Same snapshot, but a new subscription: it must be answered.
        st.on_delta_request(&delta(ENDPOINT, &["b"], &out[1].nonce), now)
            .unwrap();
        let out = st.delta_responses(&snap);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 1);
        st.on_delta_request(&delta(ENDPOINT, &[], &out[0].nonce), now)
            .unwrap();
        // A changed cluster re-sends its assignment although the assignment did not change.
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(CLUSTER, [cluster("b", 3)])],
            Instant::now(),
        );
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        let types: Vec<&str> = out.iter().map(|o| o.type_url.as_str()).collect();
        assert_eq!(types, [CLUSTER, ENDPOINT]);
        assert_eq!(out[1].resources.len(), 1);
    }

    #[test]
    fn streams_up_to_date_share_the_cache_snapshot_and_name_sets() {
        let c = cache();
        let sets = Arc::new(NameSets::default());
        let now = Instant::now();
        let mut streams: Vec<StreamState> = (0..2)
            .map(|_| StreamState::new(Variant::Sotw, None, Arc::clone(&sets)))
            .collect();
        let mut outs = Vec::new();
        for st in &mut streams {
            st.on_sotw_request(&sotw(CLUSTER, &[], ""), now).unwrap();
            // Not in sorted order: still one shared set.
            st.on_sotw_request(&sotw(ENDPOINT, &["b", "a"], ""), now)
                .unwrap();
            outs.push(st.sotw_responses(&c.snapshot("envoy").unwrap()));
        }
        let snap = c.snapshot("envoy").unwrap();
        for (st, out) in streams.iter().zip(&outs) {
            for (o, t) in out.iter().zip([CLUSTER, ENDPOINT]) {
                let shared = snap.get(t).unwrap();
                assert!(matches!(&st.types[t].held, Held::All(s) if Arc::ptr_eq(s, shared)));
                assert_eq!(o.version_info, shared.version);
                match &o.resources {
                    SotwResources::Shared { bytes, count } => {
                        assert_eq!(*count, 2);
                        assert_eq!(bytes.as_ptr(), shared.sotw_resources().as_ptr());
                    }
                    other => panic!("expected the shared encoding, got {other:?}"),
                }
            }
        }
        assert!(Arc::ptr_eq(
            &streams[0].types[ENDPOINT].names,
            &streams[1].types[ENDPOINT].names
        ));
        // The shared encoding is byte for byte the per-resource one.
        let each: Vec<u8> = snap
            .get(CLUSTER)
            .unwrap()
            .resources
            .values()
            .flat_map(|r| {
                let mut b = Vec::new();
                prost::encoding::bytes::encode(2, &r.any.to_vec(), &mut b);
                b
            })
            .collect();
        assert_eq!(snap.get(CLUSTER).unwrap().sotw_resources().as_ref(), each);
    }

    #[test]
    fn sotw_subscription_narrowing_then_widening_resends() {
        let c = cache();
        let mut st = StreamState::new(Variant::Sotw, None, Arc::default());
        let now = Instant::now();
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], ""), now)
            .unwrap();
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out[0].resources.len(), 2);
        // Dropping "b" forgets it; a subset goes out per resource, with its own version.
        st.on_sotw_request(&sotw(ENDPOINT, &["a"], &out[0].nonce), now)
            .unwrap();
        assert!(matches!(&st.types[ENDPOINT].held, Held::Map(m) if m.len() == 1));
        assert!(st.sotw_responses(&c.snapshot("envoy").unwrap()).is_empty());
        // "b" comes back: it must be sent again (go-control-plane #431).
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], &out[0].nonce), now)
            .unwrap();
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 2);
        // A name that does not exist keeps the subscription partial: per-resource encoding.
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "zz"], &out[0].nonce), now)
            .unwrap();
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(ENDPOINT, [cla("a", 9)])],
            Instant::now(),
        );
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        assert!(matches!(&out[0].resources, SotwResources::Each(v) if v.len() == 1));
    }

    #[test]
    fn delta_wildcard_reports_a_missing_explicit_name() {
        // Found by tests/fuzz (xds_delta): wildcard plus an explicit name that does not exist,
        // with as many names as resources, skipped the check for missing names.
        let c = Cache::new(&["envoy"], &ORDER);
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(ENDPOINT, [cla("b", 1)])],
            Instant::now(),
        );
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        st.on_delta_request(&delta(ENDPOINT, &["*", "a"], ""), Instant::now())
            .unwrap();
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 1);
        assert_eq!(out[0].removed, ["a"]);
    }

    #[test]
    fn delta_reports_a_missing_name_once() {
        // Found by tests/fuzz (xds_delta): a subscribed name the client claimed to hold
        // (initial_resource_versions) but that does not exist was removed, then reported
        // missing again in a second response.
        let c = Cache::new(&["envoy"], &ORDER);
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        let mut req = delta(ENDPOINT, &["a"], "");
        req.initial_resource_versions = [("a".to_string(), "1".to_string())].into();
        st.on_delta_request(&req, Instant::now()).unwrap();
        let snap = c.snapshot("envoy").unwrap();
        let out = st.delta_responses(&snap);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].removed, ["a"]);
        st.on_delta_request(&delta(ENDPOINT, &[], &out[0].nonce), Instant::now())
            .unwrap();
        assert!(st.delta_responses(&snap).is_empty());
    }

    #[test]
    fn delta_sends_only_the_change_and_removes_what_is_gone() {
        let c = cache();
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        let now = Instant::now();
        st.on_delta_request(&delta(CLUSTER, &[], ""), now).unwrap();
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out[0].resources.len(), 2);
        st.on_delta_request(&delta(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        c.apply(
            "envoy",
            vec![TypeUpdate::replace(
                CLUSTER,
                [cluster("a", 1), cluster("c", 1)],
            )],
            Instant::now(),
        );
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 1);
        assert_eq!(out[0].removed, ["b"]);
        st.on_delta_request(&delta(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        assert!(st.delta_responses(&c.snapshot("envoy").unwrap()).is_empty());
        // Ghosts from a previous control plane are removed; what the client has is not resent.
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        let snap = c.snapshot("envoy").unwrap();
        let a = snap.resource(CLUSTER, "a").unwrap().version.clone();
        let mut req = delta(CLUSTER, &[], "");
        req.initial_resource_versions = [("a".to_string(), a), ("old".into(), "1".into())].into();
        st.on_delta_request(&req, now).unwrap();
        let out = st.delta_responses(&snap);
        assert_eq!(out[0].resources.len(), 1);
        assert_eq!(out[0].removed, ["old"]);
        assert!(matches!(&st.types[CLUSTER].held, Held::All(_)));
    }
    fn nack(type_url: &str, nonce: &str, message: &str) -> DeltaDiscoveryRequest {
        let mut r = delta(type_url, &[], nonce);
        r.error_detail = Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: message.to_string(),
            details: vec![],
        });
        r
    }

    #[test]
    fn attribution_prefers_the_resources_the_message_names() {
        let brought = [("web", "1"), ("web-canary", "2"), ("echo", "3")];
        // Envoy's CDS/LDS wording, and a name that is a prefix of another.
        let got = attribute(
            &brought,
            "Error adding/updating cluster(s) web: bad lb_policy",
        );
        assert_eq!(got, [("web", "1")]);
        let got = attribute(&brought, "cluster web-canary: bad; echo.");
        assert_eq!(got, [("web-canary", "2"), ("echo", "3")]);
        // No name in the message: every resource the response brought.
        let got = attribute(&brought, "Invalid regex '/x{300}': program size too large");
        assert_eq!(got.len(), 3);
        assert!(!mentions("webby", "web") && !mentions("a/web", "web"));
        assert!(mentions("xds:///echo: bad", "xds:///echo"));
    }

    #[test]
    fn a_nack_is_kept_per_resource_until_another_version_is_acked() {
        let c = cache();
        let mut st = StreamState::new(Variant::Delta, None, Arc::default());
        let now = Instant::now();
        st.on_delta_request(&delta(CLUSTER, &[], ""), now).unwrap();
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        let o = st
            .on_delta_request(&delta(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        assert!(o.rejected.is_empty() && o.cleared.is_empty());
        let status = |st: &StreamState| st.status(c.snapshot("envoy").as_deref())[CLUSTER].clone();
        assert_eq!(status(&st).state, SyncState::Synced);

        // Two clusters change; the client rejects b by name, a is accepted.
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(
                CLUSTER,
                [cluster("a", 5), cluster("b", 5)],
            )],
            Instant::now(),
        );
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        assert_eq!(status(&st).state, SyncState::Stale);
        let o = st
            .on_delta_request(
                &nack(
                    CLUSTER,
                    &out[0].nonce,
                    "Error adding/updating cluster(s) b: no",
                ),
                now,
            )
            .unwrap();
        assert_eq!(o.rejected, ["b"]);
        let RequestKind::Nack(n) = &o.kind else {
            panic!("{o:?}")
        };
        assert_eq!(n.resources, ["b"]);
        let s = status(&st);
        assert_eq!(s.state, SyncState::Nacked);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.rejected[0].name, "b");
        assert_eq!(
            s.rejected[0].reason,
            "Error adding/updating cluster(s) b: no"
        );
        let b_v5 = c
            .snapshot("envoy")
            .unwrap()
            .resource(CLUSTER, "b")
            .unwrap()
            .version
            .clone();
        assert_eq!(s.rejected[0].version, b_v5);
        let res = &st.resources(c.snapshot("envoy").as_deref())[CLUSTER];
        let states: Vec<(&str, SyncState)> = res
            .resources
            .iter()
            .map(|r| (r.name.as_str(), r.state))
            .collect();
        assert_eq!(states, [("a", SyncState::Synced), ("b", SyncState::Nacked)]);
        assert!(res.resources[0].current.is_some() && res.resources[0].bytes.is_some());
        assert_eq!(st.rejections(), [(CLUSTER.to_string(), "b".to_string())]);

        // Not re-sent, and an ACK of a change to a does not clear b: it still runs its old b.
        assert!(st.delta_responses(&c.snapshot("envoy").unwrap()).is_empty());
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(CLUSTER, [cluster("a", 6)])],
            Instant::now(),
        );
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        let o = st
            .on_delta_request(&delta(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        assert!(o.cleared.is_empty(), "{o:?}");
        assert_eq!(status(&st).state, SyncState::Nacked);

        // A fixed b, ACKed, ends the rejection.
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(CLUSTER, [cluster("b", 7)])],
            Instant::now(),
        );
        let out = st.delta_responses(&c.snapshot("envoy").unwrap());
        let o = st
            .on_delta_request(&delta(CLUSTER, &[], &out[0].nonce), now)
            .unwrap();
        assert_eq!(o.cleared, ["b"]);
        let s = status(&st);
        assert_eq!(s.state, SyncState::Synced);
        assert!(s.rejected.is_empty() && st.rejections().is_empty());
        assert!(s.last_nack.is_some(), "the last NACK stays on record");
    }

    #[test]
    fn a_sotw_nack_that_names_nothing_blames_what_changed_and_removal_clears_it() {
        let c = cache();
        let mut st = StreamState::new(Variant::Sotw, None, Arc::default());
        let now = Instant::now();
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], ""), now)
            .unwrap();
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], &out[0].nonce), now)
            .unwrap();
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(ENDPOINT, [cla("a", 3)])],
            Instant::now(),
        );
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        // Both are in a SotW response, but only a is new to the client.
        assert_eq!(out[0].resources.len(), 2);
        let mut req = sotw(ENDPOINT, &["a", "b"], &out[0].nonce);
        req.error_detail = Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: "malformed".into(),
            details: vec![],
        });
        let o = st.on_sotw_request(&req, now).unwrap();
        assert_eq!(o.rejected, ["a"]);
        // The resource goes away: the next ACK clears it.
        c.apply(
            "envoy",
            vec![TypeUpdate::Remove {
                type_url: ENDPOINT.to_string(),
                names: vec!["a".into()],
            }],
            Instant::now(),
        );
        // (SotW EDS sends nothing for a removal; the rejection ends when it is noticed.)
        assert!(st.sotw_responses(&c.snapshot("envoy").unwrap()).is_empty());
        assert_eq!(st.take_cleared(), [(ENDPOINT.to_string(), "a".to_string())]);
        assert!(st.take_cleared().is_empty());
        let s = st.status(c.snapshot("envoy").as_deref());
        assert_eq!(
            s[ENDPOINT].state,
            SyncState::Nacked,
            "the NACK is the last answer"
        );
        // The next ACK ends the NACKED state.
        c.apply(
            "envoy",
            vec![TypeUpdate::upsert(ENDPOINT, [cla("b", 4)])],
            Instant::now(),
        );
        let out = st.sotw_responses(&c.snapshot("envoy").unwrap());
        st.on_sotw_request(&sotw(ENDPOINT, &["a", "b"], &out[0].nonce), now)
            .unwrap();
        let s = st.status(c.snapshot("envoy").as_deref());
        assert_eq!(s[ENDPOINT].state, SyncState::Synced);
    }
}
