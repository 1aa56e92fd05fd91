//! A model xDS client driving `weft_xds_server::state::StreamState` (SotW or Delta) through an
//! arbitrary sequence of requests and cache changes, checking the protocol's promises after
//! every step. Shared by the `xds_sotw` and `xds_delta` targets.
//!
//! The client keeps what it holds exactly as a real one would (SotW: a full-state response
//! replaces the type, an EDS/RDS one updates the resources it carries; Delta: resources and
//! removals), and the subscription it asked for, so the checks need nothing from the server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use weft_xds_cache::{Cache, FlavorSnapshot, TypeUpdate};
use weft_xds_server::state::{
    DeltaOut, NameSets, ProtocolError, RequestKind, SotwOut, SotwResources, StreamState,
};
use weft_xds_server::{CLUSTER, ENDPOINT, LISTENER, ORDER, Variant};

/// Few names, so subscriptions, changes and removals keep meeting each other.
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const FLAVOR: &str = "envoy";
/// Rounds of "answer everything" before a stream must be quiet (a cluster change forces
/// its endpoints once more, so two are needed; more means a loop).
const SETTLE_ROUNDS: usize = 6;

#[derive(Debug, Arbitrary)]
pub struct Input {
    /// `Some(k)`: a per-type service (CDS, EDS, ...) for `ORDER[k % 4]`; `None`: ADS.
    pub only_type: Option<u8>,
    pub ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
pub enum Op {
    /// One resource set to a content variant, or removed.
    Set {
        ty: u8,
        name: u8,
        content: Option<u8>,
    },
    /// A whole type replaced by these (name, content) pairs.
    Replace {
        ty: u8,
        items: Vec<(u8, u8)>,
    },
    Request(Req),
    /// The stream task asks for due responses after every request and cache change; the
    /// fuzzer may also skip asking (several changes folded into one evaluation).
    Respond,
    /// ACK everything until nothing is due, then check the client converged.
    Settle,
}

#[derive(Debug, Arbitrary)]
pub struct Req {
    /// `ORDER[ty % 4]`; 4: empty type URL, 5: an unknown one.
    ty: u8,
    nonce: NonceChoice,
    nack: bool,
    /// Name indices; `NAMES.len()` and above mean `*`. SotW: `resource_names`; Delta:
    /// `resource_names_subscribe`.
    names: Vec<u8>,
    /// Delta only.
    unsubscribe: Vec<u8>,
    /// Delta only: (name, whether to claim the current version or a stale one).
    initial: Vec<(u8, bool)>,
}

#[derive(Debug, Arbitrary)]
enum NonceChoice {
    /// The latest nonce the client received for the type (an ACK/NACK when unanswered).
    Latest,
    Empty,
    /// Some other nonce: stale.
    Other(u8),
}

fn type_of(ty: u8) -> Result<&'static str, &'static str> {
    match ty % 6 {
        k @ 0..=3 => Ok(ORDER[usize::from(k)]),
        4 => Err(""),
        _ => Err("type.googleapis.com/unknown.Type"),
    }
}

fn name_of(n: u8) -> &'static str {
    NAMES.get(usize::from(n)).copied().unwrap_or("*")
}

fn is_full_state(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// A resource's own bytes: its name (so responses can be read back) and a content variant.
fn content(name: &str, variant: u8) -> Vec<u8> {
    format!("{name}\0{}", variant % 4).into_bytes()
}

fn name_in_any(any: &Any) -> String {
    let end = any
        .value
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(any.value.len());
    String::from_utf8_lossy(&any.value[..end]).into_owned()
}

/// What the model client knows and holds of one type.
#[derive(Debug, Default)]
struct ClientType {
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Latest nonce received, and whether it still awaits the client's ACK/NACK.
    latest_nonce: Option<String>,
    unanswered: bool,
    latest_version: String,
    /// SotW: name -> Any bytes; Delta: name -> version.
    held: BTreeMap<String, Bytes>,
    /// The version just NACKed; must not come again until something changes.
    nacked: Option<String>,
    /// Delta: names the server may send again at a version the client has (re-subscribed,
    /// or endpoints of a changed cluster).
    may_resend: BTreeSet<String>,
    /// Delta: explicitly subscribed names not yet answered by the resource or a removal.
    awaiting: BTreeSet<String>,
    /// A request that must be answered whatever the client holds (SotW: no nonce; Delta: the
    /// first) is not answered yet: the answer may repeat a NACKed version.
    forced: bool,
}

impl ClientType {
    fn in_scope(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub struct Harness {
    variant: Variant,
    only_type: Option<&'static str>,
    cache: Arc<Cache>,
    state: StreamState,
    client: HashMap<&'static str, ClientType>,
    nonces: BTreeSet<String>,
    now: Instant,
}

impl Harness {
    pub fn new(variant: Variant, only_type: Option<u8>) -> Self {
        let only_type = only_type.map(|k| ORDER[usize::from(k % 4)]);
        Self {
            variant,
            only_type,
            cache: Cache::new(&[FLAVOR], &ORDER),
            state: StreamState::new(variant, only_type, Arc::new(NameSets::default())),
            client: ORDER.iter().map(|t| (*t, ClientType::default())).collect(),
            nonces: BTreeSet::new(),
            now: Instant::now(),
        }
    }

    fn snapshot(&self) -> Arc<FlavorSnapshot> {
        self.cache.snapshot(FLAVOR).expect("the flavour exists")
    }

    pub fn run(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.now += Duration::from_millis(1);
            match op {
                Op::Set {
                    ty,
                    name,
                    content: c,
                } => {
                    let Ok(type_url) = type_of(ty % 4) else {
                        continue;
                    };
                    let name = NAMES[usize::from(name) % NAMES.len()];
                    let update = match c {
                        Some(v) => TypeUpdate::Upsert {
                            type_url: type_url.to_string(),
                            resources: vec![(name.to_string(), content(name, v))],
                        },
                        None => TypeUpdate::Remove {
                            type_url: type_url.to_string(),
                            names: vec![name.to_string()],
                        },
                    };
                    self.change(update);
                }
                Op::Replace { ty, items } => {
                    let Ok(type_url) = type_of(ty % 4) else {
                        continue;
                    };
                    let mut resources: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
                    for (n, v) in items {
                        let name = NAMES[usize::from(n) % NAMES.len()];
                        resources.insert(name, content(name, v));
                    }
                    self.change(TypeUpdate::Replace {
                        type_url: type_url.to_string(),
                        resources: resources
                            .into_iter()
                            .map(|(n, b)| (n.to_string(), b))
                            .collect(),
                    });
                }
                Op::Request(req) => {
                    if !self.request(req) {
                        // A protocol error ends the stream.
                        return;
                    }
                }
                Op::Respond => self.respond(),
                Op::Settle => self.settle(),
            }
        }
        self.settle();
    }

    fn change(&mut self, update: TypeUpdate) {
        let before = self.snapshot().generation;
        self.cache.apply(FLAVOR, vec![update], self.now);
        if self.snapshot().generation != before {
            // New content may legitimately be what was NACKed before.
            for c in self.client.values_mut() {
                c.nacked = None;
            }
        }
    }

    /// Sends one request; false when the server refused it (the stream would end).
    fn request(&mut self, req: Req) -> bool {
        let wire_type = match type_of(req.ty) {
            Ok(t) | Err(t) => t,
        };
        // A per-type stream takes an empty type URL as its own type.
        let type_url = match (type_of(req.ty), self.only_type) {
            (Err(""), Some(only)) => Ok(only),
            (t, _) => t,
        };
        let c = type_url.ok().and_then(|t| self.client.get(t));
        let latest = c.and_then(|c| c.latest_nonce.clone());
        let nonce = match req.nonce {
            NonceChoice::Latest => latest.clone().unwrap_or_default(),
            NonceChoice::Empty => String::new(),
            NonceChoice::Other(n) => format!("other-{n}"),
        };
        let error_detail = req.nack.then(|| Status {
            code: 3,
            message: "rejected by the fuzzer".into(),
            details: Vec::new(),
        });
        let names: Vec<String> = req.names.iter().map(|&n| name_of(n).to_string()).collect();
        let result = match self.variant {
            Variant::Sotw => self.state.on_sotw_request(
                &DiscoveryRequest {
                    version_info: c.map(|c| c.latest_version.clone()).unwrap_or_default(),
                    resource_names: names.clone(),
                    type_url: wire_type.to_string(),
                    response_nonce: nonce.clone(),
                    error_detail: error_detail.clone(),
                    ..Default::default()
                },
                self.now,
            ),
            Variant::Delta => {
                let snap = self.snapshot();
                let lookup_type = type_url.unwrap_or(wire_type);
                let initial = req
                    .initial
                    .iter()
                    .map(|&(n, current)| {
                        let name = NAMES[usize::from(n) % NAMES.len()];
                        let version = snap
                            .resource(lookup_type, name)
                            .filter(|_| current)
                            .map(|r| r.version.clone())
                            .unwrap_or_else(|| "stale".to_string());
                        (name.to_string(), version)
                    })
                    .collect();
                self.state.on_delta_request(
                    &DeltaDiscoveryRequest {
                        type_url: wire_type.to_string(),
                        resource_names_subscribe: names.clone(),
                        resource_names_unsubscribe: req
                            .unsubscribe
                            .iter()
                            .map(|&n| name_of(n).to_string())
                            .collect(),
                        initial_resource_versions: initial,
                        response_nonce: nonce.clone(),
                        error_detail: error_detail.clone(),
                        ..Default::default()
                    },
                    self.now,
                )
            }
        };
        let type_url = match (type_url, result) {
            (Ok(t), Ok(outcome)) => {
                assert_eq!(outcome.type_url, t);
                if let Some(only) = self.only_type {
                    assert_eq!(only, t, "a per-type stream accepted another type");
                }
                self.judged(t, &nonce, req.nack, &outcome.kind);
                t
            }
            (Err(""), Err(e)) => {
                assert!(
                    self.only_type.is_none(),
                    "a per-type stream refused an empty type"
                );
                assert_eq!(e, ProtocolError::MissingType);
                return false;
            }
            (Err(_), Err(e)) => {
                assert!(matches!(e, ProtocolError::UnknownType(_)), "{e:?}");
                return false;
            }
            (Ok(t), Err(e)) => {
                assert_eq!(
                    e,
                    ProtocolError::WrongType {
                        expected: self.only_type.expect("ADS serves every type"),
                        got: t.to_string(),
                    }
                );
                return false;
            }
            (Err(t), Ok(o)) => panic!("type URL {t:?} accepted as {o:?}"),
        };
        let stale = !nonce.is_empty() && Some(&nonce) != latest.as_ref();
        match self.variant {
            Variant::Sotw if stale => {}
            Variant::Sotw => self.sotw_subscribe(type_url, &names, nonce.is_empty()),
            Variant::Delta => {
                let unsubscribe: Vec<String> = req
                    .unsubscribe
                    .iter()
                    .map(|&n| name_of(n).to_string())
                    .collect();
                let initial: Vec<String> = req
                    .initial
                    .iter()
                    .map(|&(n, _)| NAMES[usize::from(n) % NAMES.len()].to_string())
                    .collect();
                self.delta_subscribe(type_url, &names, &unsubscribe, &initial, req.initial);
            }
        }
        self.respond();
        true
    }

    /// Checks how the server judged the request against what the client knows.
    fn judged(&mut self, type_url: &'static str, nonce: &str, nack: bool, kind: &RequestKind) {
        let c = self
            .client
            .get_mut(type_url)
            .expect("every type has a client state");
        let latest = c.latest_nonce.as_deref();
        if nonce.is_empty() {
            assert_eq!(*kind, RequestKind::Subscribe);
        } else if Some(nonce) != latest {
            assert_eq!(
                *kind,
                RequestKind::Stale,
                "nonce {nonce} vs latest {latest:?}"
            );
        } else if c.unanswered {
            c.unanswered = false;
            match kind {
                RequestKind::Nack(n) => {
                    assert!(nack, "an ACK judged a NACK");
                    assert_eq!(n.version, c.latest_version);
                    assert_eq!(n.nonce, nonce);
                    c.nacked = Some(c.latest_version.clone());
                }
                RequestKind::Ack { version, .. } => {
                    assert!(!nack, "a NACK judged an ACK");
                    assert_eq!(*version, c.latest_version);
                }
                other => panic!("an answer to the latest response judged {other:?}"),
            }
        } else {
            assert_eq!(
                *kind,
                RequestKind::Subscribe,
                "a second answer to one response"
            );
        }
    }

    fn sotw_subscribe(&mut self, type_url: &'static str, names: &[String], opening: bool) {
        let c = self.client.get_mut(type_url).expect("client state");
        let star = names.iter().any(|n| n == "*");
        let listed: BTreeSet<String> = names.iter().filter(|n| *n != "*").cloned().collect();
        let wildcard = star || (names.is_empty() && is_full_state(type_url));
        if wildcard != c.wildcard || listed != c.names || opening {
            c.nacked = None;
        }
        c.forced |= opening;
        c.wildcard = wildcard;
        c.names = listed;
        c.started = true;
        // A client forgets what it no longer subscribes to (the server does the same).
        let (w, names) = (c.wildcard, c.names.clone());
        c.held.retain(|k, _| w || names.contains(k));
    }

    fn delta_subscribe(
        &mut self,
        type_url: &'static str,
        subscribe: &[String],
        unsubscribe: &[String],
        initial_names: &[String],
        initial: Vec<(u8, bool)>,
    ) {
        let snap = self.snapshot();
        let c = self.client.get_mut(type_url).expect("client state");
        let first = !c.started;
        c.started = true;
        c.forced |= first;
        if first {
            if subscribe.is_empty() && is_full_state(type_url) {
                c.wildcard = true;
            }
            for (name, (_, current)) in initial_names.iter().zip(initial) {
                let version = snap
                    .resource(type_url, name)
                    .filter(|_| current)
                    .map(|r| r.version.clone())
                    .unwrap_or_else(|| "stale".to_string());
                c.held.insert(name.clone(), Bytes::from(version));
            }
        }
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            c.nacked = None;
        }
        for n in subscribe {
            if n == "*" {
                c.wildcard = true;
                continue;
            }
            c.names.insert(n.clone());
            c.awaiting.insert(n.clone());
            if !(first && initial_names.contains(n)) {
                c.may_resend.insert(n.clone());
            } else {
                c.awaiting.remove(n);
            }
        }
        for n in unsubscribe {
            if n == "*" {
                c.wildcard = false;
                let names = c.names.clone();
                c.held.retain(|k, _| names.contains(k));
                continue;
            }
            c.names.remove(n);
            c.awaiting.remove(n);
            if !c.wildcard {
                c.held.remove(n);
            }
        }
    }

    fn respond(&mut self) {
        let snap = self.snapshot();
        match self.variant {
            Variant::Sotw => {
                let out = self.state.sotw_responses(&snap);
                self.check_order(out.iter().map(|o| o.type_url.as_str()));
                for o in out {
                    self.receive_sotw(&snap, o);
                }
            }
            Variant::Delta => {
                let out = self.state.delta_responses(&snap);
                self.check_order(out.iter().map(|o| o.type_url.as_str()));
                for o in out {
                    self.receive_delta(&snap, o);
                }
            }
        }
    }

    fn check_order<'a>(&self, types: impl Iterator<Item = &'a str>) {
        let pos: Vec<usize> = types
            .map(|t| ORDER.iter().position(|o| *o == t).expect("a served type"))
            .collect();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "push order broken: {pos:?}"
        );
    }

    fn new_nonce(&mut self, type_url: &str, nonce: &str) {
        assert!(!nonce.is_empty(), "{type_url}: a response without a nonce");
        assert!(
            self.nonces.insert(nonce.to_string()),
            "nonce {nonce} reused"
        );
        if let Some(only) = self.only_type {
            assert_eq!(only, type_url, "a per-type stream sent another type");
        }
    }

    fn receive_sotw(&mut self, snap: &FlavorSnapshot, o: SotwOut) {
        let type_url = ORDER
            .iter()
            .copied()
            .find(|t| *t == o.type_url)
            .expect("a served type");
        self.new_nonce(type_url, &o.nonce);
        let anys: Vec<Any> = match &o.resources {
            SotwResources::Each(each) => each
                .iter()
                .map(|b| Any::decode(b.clone()).expect("an encoded Any"))
                .collect(),
            SotwResources::Shared { bytes, count } => {
                let r = DiscoveryResponse::decode(bytes.clone()).expect("field 2 of a response");
                assert_eq!(r.resources.len(), *count);
                r.resources
            }
        };
        let c = self.client.get_mut(type_url).expect("client state");
        assert!(c.started, "{type_url}: a response before any request");
        assert!(
            !c.unanswered,
            "{type_url}: a second response before the ACK of the first"
        );
        if let Some(v) = &c.nacked
            && c.may_resend.is_empty()
            && !c.forced
        {
            assert_ne!(
                &o.version_info, v,
                "{type_url}: the NACKed version sent again"
            );
        }
        let mut changed_clusters = Vec::new();
        let mut seen = BTreeSet::new();
        let mut got = BTreeMap::new();
        for any in anys {
            assert_eq!(any.type_url, type_url);
            let name = name_in_any(&any);
            assert!(c.in_scope(&name), "{type_url}: sent unsubscribed {name}");
            assert!(seen.insert(name.clone()), "{type_url}: {name} twice");
            let current = snap
                .resource(type_url, &name)
                .expect("sent resources exist");
            assert_eq!(
                any.encode_to_vec(),
                current.any.to_vec(),
                "{name}: not the current one"
            );
            let bytes = Bytes::from(any.encode_to_vec());
            if type_url == CLUSTER && c.held.get(&name).is_some_and(|b| *b != bytes) {
                changed_clusters.push(name.clone());
            }
            got.insert(name, bytes);
        }
        if is_full_state(type_url) {
            c.held = got;
        } else {
            c.held.extend(got);
        }
        c.latest_nonce = Some(o.nonce);
        c.latest_version = o.version_info;
        c.unanswered = true;
        c.nacked = None;
        c.forced = false;
        c.may_resend.clear();
        if !changed_clusters.is_empty() {
            // The endpoints of a changed cluster are pushed again after it, even unchanged.
            let eds = self.client.get_mut(ENDPOINT).expect("client state");
            eds.may_resend.extend(changed_clusters);
        }
    }

    fn receive_delta(&mut self, snap: &FlavorSnapshot, o: DeltaOut) {
        let type_url = ORDER
            .iter()
            .copied()
            .find(|t| *t == o.type_url)
            .expect("a served type");
        self.new_nonce(type_url, &o.nonce);
        let c = self.client.get_mut(type_url).expect("client state");
        assert!(c.started, "{type_url}: a response before any request");
        assert!(
            !c.unanswered,
            "{type_url}: a second response before the ACK of the first"
        );
        if let Some(v) = &c.nacked
            && c.may_resend.is_empty()
            && !c.forced
        {
            assert_ne!(
                &o.system_version_info, v,
                "{type_url}: the NACKed version sent again"
            );
        }
        let mut changed_clusters = Vec::new();
        let mut seen = BTreeSet::new();
        for b in &o.resources {
            let r = Resource::decode(b.clone()).expect("an encoded Resource");
            let any = r.resource.as_ref().expect("a resource with its value");
            assert_eq!(any.type_url, type_url);
            assert_eq!(
                name_in_any(any),
                r.name,
                "Resource.name differs from the value"
            );
            assert!(
                c.in_scope(&r.name),
                "{type_url}: sent unsubscribed {}",
                r.name
            );
            assert!(seen.insert(r.name.clone()), "{type_url}: {} twice", r.name);
            assert!(!o.removed.contains(&r.name), "{}: sent and removed", r.name);
            let current = snap
                .resource(type_url, &r.name)
                .expect("sent resources exist");
            assert_eq!(
                r.version, current.version,
                "{}: not the current version",
                r.name
            );
            let held = c.held.get(&r.name);
            if held.map(|v| v.as_ref()) == Some(r.version.as_bytes()) {
                assert!(
                    c.may_resend.contains(&r.name),
                    "{type_url}: {} re-sent at the version the client has",
                    r.name
                );
            } else if type_url == CLUSTER && held.is_some() {
                changed_clusters.push(r.name.clone());
            }
            c.held
                .insert(r.name.clone(), Bytes::from(r.version.clone()));
            c.awaiting.remove(&r.name);
        }
        for name in &o.removed {
            assert!(
                snap.resource(type_url, name).is_none() || !c.in_scope(name),
                "{type_url}: removed {name}, which exists and is subscribed"
            );
            c.held.remove(name);
            c.awaiting.remove(name);
        }
        c.latest_nonce = Some(o.nonce);
        c.latest_version = o.system_version_info;
        c.unanswered = true;
        c.nacked = None;
        c.forced = false;
        c.may_resend.clear();
        if !changed_clusters.is_empty() {
            let eds = self.client.get_mut(ENDPOINT).expect("client state");
            eds.may_resend.extend(changed_clusters);
        }
    }

    /// ACKs every response until nothing is due; then the client holds what the cache has.
    fn settle(&mut self) {
        for _ in 0..SETTLE_ROUNDS {
            self.respond();
            let due: Vec<(&'static str, String)> = self
                .client
                .iter()
                .filter(|(_, c)| c.unanswered)
                .filter_map(|(t, c)| c.latest_nonce.clone().map(|n| (*t, n)))
                .collect();
            if due.is_empty() {
                break;
            }
            for (type_url, nonce) in due {
                let c = self.client.get_mut(type_url).expect("client state");
                let names: Vec<String> = if c.wildcard && self.variant == Variant::Sotw {
                    if is_full_state(type_url) && c.names.is_empty() {
                        Vec::new()
                    } else {
                        std::iter::once("*".to_string())
                            .chain(c.names.iter().cloned())
                            .collect()
                    }
                } else if self.variant == Variant::Sotw {
                    c.names.iter().cloned().collect()
                } else {
                    Vec::new()
                };
                let kind = match self.variant {
                    Variant::Sotw => self.state.on_sotw_request(
                        &DiscoveryRequest {
                            version_info: c.latest_version.clone(),
                            resource_names: names,
                            type_url: type_url.to_string(),
                            response_nonce: nonce.clone(),
                            ..Default::default()
                        },
                        self.now,
                    ),
                    Variant::Delta => self.state.on_delta_request(
                        &DeltaDiscoveryRequest {
                            type_url: type_url.to_string(),
                            response_nonce: nonce.clone(),
                            ..Default::default()
                        },
                        self.now,
                    ),
                }
                .expect("an ACK of the server's own type is accepted")
                .kind;
                self.judged(type_url, &nonce, false, &kind);
            }
        }
        let snap = self.snapshot();
        match self.variant {
            Variant::Sotw => assert!(self.state.sotw_responses(&snap).is_empty(), "never quiet"),
            Variant::Delta => assert!(self.state.delta_responses(&snap).is_empty(), "never quiet"),
        }
        for (type_url, c) in &self.client {
            if !c.started {
                continue;
            }
            let tsnap = snap.get(type_url);
            let resources = tsnap.map(|t| &t.resources);
            for (name, r) in resources.into_iter().flatten() {
                if !c.in_scope(name) {
                    continue;
                }
                let expect = match self.variant {
                    Variant::Sotw => r.any.clone(),
                    Variant::Delta => Bytes::from(r.version.clone()),
                };
                assert_eq!(
                    c.held.get(name),
                    Some(&expect),
                    "{type_url}: {name} not converged"
                );
            }
            let exists = |n: &str| resources.is_some_and(|r| r.contains_key(n));
            if self.variant == Variant::Delta || is_full_state(type_url) {
                for name in c.held.keys() {
                    assert!(
                        exists(name) && c.in_scope(name),
                        "{type_url}: client still holds {name}"
                    );
                }
            }
            if self.variant == Variant::Delta {
                for name in &c.awaiting {
                    assert!(
                        exists(name),
                        "{type_url}: subscribed {name} never said not to exist"
                    );
                }
            }
        }
    }
}
