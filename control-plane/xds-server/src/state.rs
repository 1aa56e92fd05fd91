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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use serde::Serialize;
use weft_xds_cache::FlavorSnapshot;

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
}

#[derive(Debug, Clone)]
struct Pending {
    nonce: String,
    version: String,
    /// Oldest registry change among the resources this response brought the client.
    oldest_change: Option<Instant>,
}

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds as far as we know: name -> version. Updated when we send
    /// (optimistically; a NACK does not roll it back, which is what stops resend loops).
    known: HashMap<String, String>,
    /// Delta: subscribed names we already told the client do not exist.
    absent_reported: HashSet<String>,
    /// Answer even if nothing changed (first request, re-subscription, cluster changed).
    force: bool,
    /// Delta: names to send again even if the client has this version.
    resend: HashSet<String>,
    pending: Option<Pending>,
    /// The client has sent at least one request for this type on this stream.
    started: bool,
    status: TypeStatus,
}

impl TypeState {
    /// Records that a response went out: it is now the one un-ACKed response of the type.
    fn sent(&mut self, nonce: &str, version: &str, oldest_change: Option<Instant>) {
        self.force = false;
        self.pending = Some(Pending {
            nonce: nonce.to_string(),
            version: version.to_string(),
            oldest_change,
        });
        self.status.pushes += 1;
        self.status.last_sent_version = Some(version.to_string());
        self.status.last_sent_nonce = Some(nonce.to_string());
    }
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
}

/// A SotW response, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct SotwOut {
    pub type_url: String,
    pub version_info: String,
    pub resources: Vec<Bytes>,
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
    next_nonce: u64,
    /// Convergence counts only changes made while the stream was open: a new client fetching
    /// config that changed an hour ago is not a one-hour convergence.
    opened_at: Instant,
}

impl StreamState {
    pub fn new(variant: Variant, only_type: Option<&'static str>) -> Self {
        Self {
            variant,
            only_type,
            types: BTreeMap::new(),
            next_nonce: 0,
            opened_at: Instant::now(),
        }
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Per-type status for `/debug/clients`.
    pub fn status(&self) -> BTreeMap<String, TypeStatus> {
        self.types
            .iter()
            .map(|(t, s)| {
                let mut st = s.status.clone();
                st.wildcard = s.wildcard;
                st.subscriptions = s.names.iter().cloned().collect();
                st.pending_nonce = s.pending.as_ref().map(|p| p.nonce.clone());
                (t.clone(), st)
            })
            .collect()
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
        let kind = judge(ts, &req.response_nonce, req.error_detail.as_ref(), now);
        if kind == RequestKind::Stale {
            // The client has not seen our latest response yet; its view is out of date.
            return Ok(outcome(type_url, kind));
        }
        let mut names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = names.remove("*") || (names.is_empty() && is_full_state(type_url));
        if wildcard != ts.wildcard || names != ts.names {
            ts.wildcard = wildcard;
            // Forget what the client dropped, so a name that comes back is sent again
            // (go-control-plane #431: a resubscription must be answered).
            ts.known.retain(|n, _| wildcard || names.contains(n));
            ts.names = names;
        }
        if req.response_nonce.is_empty() {
            // A request without a nonce opens (or reopens) the subscription: always answer it,
            // whatever version_info it carries, since that may come from a previous control
            // plane that happened to use the same version string.
            ts.force = true;
        }
        ts.started = true;
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
            for (n, v) in &req.initial_resource_versions {
                ts.known.insert(n.clone(), v.clone());
            }
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                ts.wildcard = true;
                continue;
            }
            ts.names.insert(n.clone());
            ts.absent_reported.remove(n);
            // Subscribing asks for the resource (again): unless the client just told us it
            // holds it (initial_resource_versions), it must be sent.
            if !(first && req.initial_resource_versions.contains_key(n)) {
                ts.known.remove(n);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                ts.wildcard = false;
                let names = &ts.names;
                ts.known.retain(|k, _| names.contains(k));
                continue;
            }
            ts.names.remove(n);
            ts.absent_reported.remove(n);
            if !ts.wildcard {
                ts.known.remove(n);
            }
        }
        Ok(outcome(type_url, kind))
    }

    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// The SotW responses due now, in push order. Each sets its type's pending nonce.
    pub fn sotw_responses(&mut self, snap: &FlavorSnapshot) -> Vec<SotwOut> {
        let mut out = Vec::new();
        for type_url in ORDER {
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.pending.is_some() {
                continue;
            }
            let resources = snap.get(type_url).map(|t| &t.resources);
            let empty = BTreeMap::new();
            let resources = resources.unwrap_or(&empty);
            let selected: Vec<_> = if ts.wildcard {
                resources.values().collect()
            } else {
                ts.names.iter().filter_map(|n| resources.get(n)).collect()
            };
            let candidate: HashMap<&str, &str> = selected
                .iter()
                .map(|r| (r.name.as_str(), r.version.as_str()))
                .collect();
            let same = candidate.len() == ts.known.len()
                && candidate
                    .iter()
                    .all(|(n, v)| ts.known.get(*n).map(String::as_str) == Some(*v));
            let brings_new = candidate
                .iter()
                .any(|(n, v)| ts.known.get(*n).map(String::as_str) != Some(*v));
            let due = ts.force
                || if is_full_state(type_url) {
                    !same
                } else {
                    brings_new
                };
            if !due {
                continue;
            }
            let changed_clusters: Vec<String> = if type_url == CLUSTER {
                selected
                    .iter()
                    .filter(|r| ts.known.get(&r.name).is_some_and(|v| *v != r.version))
                    .map(|r| r.name.clone())
                    .collect()
            } else {
                Vec::new()
            };
            let oldest_change = selected
                .iter()
                .filter(|r| ts.known.get(&r.name) != Some(&r.version))
                .map(|r| r.changed_at)
                .filter(|t| *t >= self.opened_at)
                .min();
            let version = sotw_version(&selected);
            let resources_bytes: Vec<Bytes> = selected.iter().map(|r| r.any.clone()).collect();
            let known: HashMap<String, String> = selected
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect();
            let nonce = self.nonce();
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            ts.known = known;
            ts.sent(&nonce, &version, oldest_change);
            out.push(SotwOut {
                type_url: type_url.to_string(),
                version_info: version,
                resources: resources_bytes,
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
        for type_url in ORDER {
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.pending.is_some() {
                continue;
            }
            let empty = BTreeMap::new();
            let tsnap = snap.get(type_url);
            let resources = tsnap.map(|t| &t.resources).unwrap_or(&empty);
            let in_scope = |name: &str| ts.wildcard || ts.names.contains(name);
            let mut send = Vec::new();
            if ts.wildcard {
                send.extend(resources.values());
            } else {
                send.extend(ts.names.iter().filter_map(|n| resources.get(n)));
            }
            send.retain(|r| {
                ts.resend.contains(&r.name) || ts.known.get(&r.name) != Some(&r.version)
            });
            let mut removed: Vec<String> = ts
                .known
                .keys()
                .filter(|n| !resources.contains_key(*n) || !in_scope(n))
                .cloned()
                .collect();
            let absent: Vec<String> = ts
                .names
                .iter()
                .filter(|n| {
                    !resources.contains_key(*n)
                        && !ts.known.contains_key(*n)
                        && !ts.absent_reported.contains(*n)
                })
                .cloned()
                .collect();
            removed.extend(absent.iter().cloned());
            removed.sort();
            removed.dedup();
            if send.is_empty() && removed.is_empty() && !ts.force {
                continue;
            }
            if send.is_empty() && removed.is_empty() {
                // Forced but nothing to say (e.g. first wildcard request on an empty type):
                // Envoy waits for a first response before finishing initialisation, so answer
                // with an empty one.
                if !ts.wildcard {
                    if let Some(ts) = self.types.get_mut(type_url) {
                        ts.force = false;
                    }
                    continue;
                }
            }
            let changed_clusters: Vec<String> = if type_url == CLUSTER {
                send.iter()
                    .filter(|r| ts.known.get(&r.name).is_some_and(|v| *v != r.version))
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
            let sent: Vec<(String, String, Bytes)> = send
                .iter()
                .map(|r| (r.name.clone(), r.version.clone(), r.delta.clone()))
                .collect();
            let system_version_info = tsnap.map(|t| t.version.clone()).unwrap_or_default();
            let nonce = self.nonce();
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            for n in &removed {
                ts.known.remove(n);
            }
            ts.absent_reported.extend(absent);
            let mut resources_bytes = Vec::with_capacity(sent.len());
            for (name, version, bytes) in sent {
                ts.resend.remove(&name);
                ts.known.insert(name, version);
                resources_bytes.push(bytes);
            }
            ts.sent(&nonce, &system_version_info, oldest_change);
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

fn outcome(type_url: &str, kind: RequestKind) -> RequestOutcome {
    RequestOutcome {
        type_url: type_url.to_string(),
        kind,
    }
}

/// Judges a request's nonce and error against the type's pending response, and records it.
fn judge(
    ts: &mut TypeState,
    nonce: &str,
    error: Option<&envoy_types::pb::google::rpc::Status>,
    now: Instant,
) -> RequestKind {
    if nonce.is_empty() {
        return RequestKind::Subscribe;
    }
    // Stale means "not the latest nonce we sent": the client has not seen our latest
    // response. The latest nonce again, after it was ACKed, is a subscription change
    // (Envoy sends one when it adds a cluster and needs its endpoints).
    if ts.status.last_sent_nonce.as_deref() != Some(nonce) {
        return RequestKind::Stale;
    }
    let Some(pending) = ts.pending.as_ref().filter(|p| p.nonce == nonce) else {
        return RequestKind::Subscribe;
    };
    let pending = pending.clone();
    ts.pending = None;
    match error {
        Some(err) => {
            let nack = Nack {
                version: pending.version,
                nonce: pending.nonce,
                message: err.message.clone(),
                at_unix_ms: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            };
            ts.status.nacks += 1;
            ts.status.last_nack = Some(nack.clone());
            RequestKind::Nack(nack)
        }
        None => {
            ts.status.acks += 1;
            ts.status.last_acked_version = Some(pending.version.clone());
            RequestKind::Ack {
                version: pending.version,
                convergence: pending
                    .oldest_change
                    .map(|t| now.saturating_duration_since(t)),
            }
        }
    }
}

/// A SotW `version_info`: content hash of exactly what the response carries.
fn sotw_version(selected: &[&std::sync::Arc<weft_xds_cache::EncodedResource>]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for r in selected {
        h.update(r.name.as_bytes());
        h.update(&[0]);
        h.update(r.version.as_bytes());
        h.update(&[0]);
    }
    format!("{:016x}", h.digest())
}
