//! A fake Kubernetes API server for tests: plain HTTP/1.1 on loopback, JSON only, no real
//! cluster. It follows the list/watch contract kube-runtime's watcher relies on:
//!
//! - one global resourceVersion counter; every write bumps it and is kept in a history;
//! - `GET <collection>` lists (with `metadata.resourceVersion`), `?watch=1&resourceVersion=R`
//!   streams JSON lines `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` of
//!   every change after `R` and then live ones, honouring `labelSelector` (an object that stops
//!   matching is sent as DELETED), `allowWatchBookmarks` and `timeoutSeconds` (the stream then
//!   closes);
//! - a watch from a version older than the last compaction gets an ERROR event with a
//!   410 Status ("too old resource version") and closes, as the real API server does;
//! - GET/POST/PUT of single objects with `resourceVersion` optimistic concurrency (409
//!   Conflict), 404 and 409 AlreadyExists Status bodies; `PATCH .../status` as a JSON merge
//!   patch of `status` (generation unchanged).
//!
//! Several listeners can share one state, so a test can tell two clients apart by the port a
//! request came in on.

#![allow(dead_code)] // each test file uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const SERVICES: &str = "v1/services";
pub const SLICES: &str = "discovery.k8s.io/v1/endpointslices";
pub const ROUTES: &str = "mesh.weft.dev/v1alpha1/trafficroutes";
pub const POLICIES: &str = "mesh.weft.dev/v1alpha1/trafficpolicies";
pub const EXTERNALS: &str = "mesh.weft.dev/v1alpha1/externalservices";
pub const LEASES: &str = "coordination.k8s.io/v1/leases";

/// (apiVersion, kind) of a collection key `<group/version or v1>/<plural>`.
fn type_of(coll: &str) -> (String, String) {
    let (gv, plural) = coll.rsplit_once('/').unwrap();
    let kind = match plural {
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "trafficroutes" => "TrafficRoute",
        "trafficpolicies" => "TrafficPolicy",
        "externalservices" => "ExternalService",
        "leases" => "Lease",
        other => panic!("fake API server: unknown collection {other}"),
    };
    (gv.to_string(), kind.to_string())
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The listener port the request arrived on.
    pub port: u16,
    pub status: u16,
}

struct Change {
    rv: u64,
    coll: String,
    ns: String,
    old: Option<Value>,
    /// The new object, or for a deletion the object as deleted.
    new: Value,
    deleted: bool,
}

struct Watcher {
    id: u64,
    coll: String,
    ns: Option<String>,
    selector: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
pub struct Inner {
    rv: u64,
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    compacted: u64,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    pub log: Vec<Logged>,
    /// Upper bound on any watch's duration, whatever `timeoutSeconds` asks.
    pub max_watch: Option<Duration>,
    /// Every request fails with 500 while set (an API server outage).
    pub failing: bool,
    /// 410 Gone answers sent.
    pub gone: u64,
}

/// Does `labels` satisfy `selector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`, comma = and)?
pub fn selects(selector: Option<&str>, labels: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    sel.split(',').all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term).is_some()
        }
    })
}

fn labels(obj: &Value) -> Value {
    obj.pointer("/metadata/labels")
        .cloned()
        .unwrap_or(json!({}))
}

fn line(typ: &str, obj: &Value) -> Bytes {
    let mut s = serde_json::to_string(&json!({"type": typ, "object": obj})).unwrap();
    s.push('\n');
    Bytes::from(s)
}

impl Inner {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// What a watcher should be sent for one change, if anything.
    fn event_for(w: &Watcher, c: &Change) -> Option<Bytes> {
        if w.coll != c.coll || w.ns.as_ref().is_some_and(|n| *n != c.ns) {
            return None;
        }
        let sel = w.selector.as_deref();
        let was = c.old.as_ref().is_some_and(|o| selects(sel, &labels(o)));
        let is = selects(sel, &labels(&c.new));
        match (c.deleted, was, is) {
            (true, _, true) => Some(line("DELETED", &c.new)),
            (true, _, false) => None,
            (false, true, true) => Some(line("MODIFIED", &c.new)),
            (false, false, true) => Some(line("ADDED", &c.new)),
            (false, true, false) => Some(line("DELETED", &c.new)),
            (false, false, false) => None,
        }
    }

    fn record(&mut self, c: Change) {
        self.watchers
            .retain(|w| Self::event_for(w, &c).is_none_or(|b| w.tx.send(b).is_ok()));
        self.history.push(c);
    }

    /// Creates or replaces an object (from a test), as `kubectl apply` would: the generation
    /// goes up when anything but metadata and status changed, and status is kept.
    pub fn apply(&mut self, coll: &str, mut obj: Value) -> Value {
        let (api_version, kind) = type_of(coll);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        obj["metadata"]["namespace"] = json!(ns);
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let old = self
            .objects
            .get(coll)
            .and_then(|m| m.get(&(ns.clone(), name.clone())))
            .cloned();
        let spec_of = |o: &Value| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            o
        };
        let generation = match &old {
            None => 1,
            Some(o) => {
                let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                if spec_of(o) == spec_of(&obj) {
                    g
                } else {
                    g + 1
                }
            }
        };
        if let Some(o) = &old {
            if obj.get("status").is_none()
                && let Some(s) = o.get("status")
            {
                obj["status"] = s.clone();
            }
            obj["metadata"]["uid"] = o["metadata"]["uid"].clone();
        } else {
            obj["metadata"]["uid"] = json!(format!("uid-{}", self.rv + 1));
        }
        obj["metadata"]["generation"] = json!(generation);
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects
            .entry(coll.to_string())
            .or_default()
            .insert((ns.clone(), name), obj.clone());
        self.record(Change {
            rv,
            coll: coll.to_string(),
            ns,
            old,
            new: obj.clone(),
            deleted: false,
        });
        obj
    }

    pub fn delete(&mut self, coll: &str, ns: &str, name: &str) {
        let Some(mut obj) = self
            .objects
            .get_mut(coll)
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
        else {
            return;
        };
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Change {
            rv,
            coll: coll.to_string(),
            ns: ns.to_string(),
            old: Some(obj.clone()),
            new: obj,
            deleted: true,
        });
    }

    pub fn get(&self, coll: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(coll)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets history up to now: a watch resuming from an older version gets 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// Ends every open watch (as an API server restart or a load balancer would).
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    /// Sends a BOOKMARK at the current version to every watch that asked for bookmarks.
    pub fn bookmark(&mut self) {
        let rv = self.rv.to_string();
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let (api_version, kind) = type_of(&w.coll);
            let obj = json!({"apiVersion": api_version, "kind": kind,
                             "metadata": {"resourceVersion": rv}});
            w.tx.send(line("BOOKMARK", &obj)).is_ok()
        });
    }

    pub fn watch_count(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }
}

/// The server. Stops listening when dropped.
pub struct FakeApi {
    pub state: Arc<Mutex<Inner>>,
    pub port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status_body(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let mut f = FakeApi {
            state: Arc::new(Mutex::new(Inner::default())),
            port: 0,
            tasks: Vec::new(),
        };
        f.port = f.listen().await;
        f
    }

    /// Another port onto the same state.
    pub async fn listen(&mut self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::clone(&self.state);
        self.tasks.push(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((io, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&state);
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(state, port, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
                });
            }
        }));
        port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig pointing at this server (no credentials), for the real binary's
    /// `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             users:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    pub fn client(&self) -> kube::Client {
        Self::client_for(self.port)
    }

    pub fn client_for(port: u16) -> kube::Client {
        let cfg = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        weft_source_kubernetes::client_from_config(cfg).unwrap()
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub fn apply(&self, coll: &str, obj: Value) -> Value {
        self.with(|s| s.apply(coll, obj))
    }

    pub fn delete(&self, coll: &str, ns: &str, name: &str) {
        self.with(|s| s.delete(coll, ns, name));
    }

    pub fn get(&self, coll: &str, ns: &str, name: &str) -> Option<Value> {
        self.with(|s| s.get(coll, ns, name))
    }

    pub fn log(&self) -> Vec<Logged> {
        self.with(|s| s.log.clone())
    }
}

struct Parsed {
    coll: String,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Parsed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match *segs.first()? {
        "api" => (segs.get(1)?.to_string(), &segs[2..]),
        "apis" => (format!("{}/{}", segs.get(1)?, segs.get(2)?), &segs[3..]),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some(n.to_string()), false),
        [p, n, "status"] => (*p, Some(n.to_string()), true),
        _ => return None,
    };
    Some(Parsed {
        coll: format!("{gv}/{plural}"),
        ns,
        name,
        status,
    })
}

fn query_map(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect()
}

fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let h = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

async fn handle(state: Arc<Mutex<Inner>>, port: u16, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let resp = route(&state, &method, &path, &query, &body);
    state.lock().unwrap().log.push(Logged {
        method: method.to_string(),
        path,
        query,
        port,
        status: resp.status().as_u16(),
    });
    resp
}

fn route(
    state: &Arc<Mutex<Inner>>,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Response<Body> {
    let Some(p) = parse_path(path) else {
        return status_body(404, "NotFound", &format!("no route {path}"));
    };
    let q = query_map(query);
    let mut s = state.lock().unwrap();
    if s.failing {
        return status_body(500, "InternalError", "the fake API server is failing");
    }
    let (api_version, kind) = type_of(&p.coll);
    match (method.clone(), &p.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("1" | "true")) => {
            watch(&mut s, state, &p, &q)
        }
        (Method::GET, None) => {
            let selector = q.get("labelSelector").cloned();
            let items: Vec<Value> = s
                .objects
                .get(&p.coll)
                .map(|m| {
                    m.iter()
                        .filter(|((ns, _), _)| p.ns.as_ref().is_none_or(|n| n == ns))
                        .filter(|(_, o)| selects(selector.as_deref(), &labels(o)))
                        .map(|(_, o)| o.clone())
                        .collect()
                })
                .unwrap_or_default();
            full(
                StatusCode::OK,
                &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match s.get(&p.coll, p.ns.as_deref().unwrap_or(""), name) {
            Some(o) => full(StatusCode::OK, &o),
            None => status_body(404, "NotFound", &format!("{kind} {name:?} not found")),
        },
        (Method::POST, None) => {
            let obj: Value = serde_json::from_slice(body).unwrap_or(json!({}));
            let ns = p.ns.clone().unwrap_or_default();
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if s.get(&p.coll, &ns, &name).is_some() {
                return status_body(
                    409,
                    "AlreadyExists",
                    &format!("{kind} {name:?} already exists"),
                );
            }
            let mut obj = obj;
            obj["metadata"]["namespace"] = json!(ns);
            let created = s.apply(&p.coll, obj);
            full(StatusCode::CREATED, &created)
        }
        (Method::PUT, Some(name)) => {
            let obj: Value = serde_json::from_slice(body).unwrap_or(json!({}));
            let ns = p.ns.clone().unwrap_or_default();
            let Some(cur) = s.get(&p.coll, &ns, name) else {
                return status_body(404, "NotFound", &format!("{kind} {name:?} not found"));
            };
            let want = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !want.is_empty() && Some(want) != cur["metadata"]["resourceVersion"].as_str() {
                return status_body(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {kind} {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            let mut obj = obj;
            obj["metadata"]["namespace"] = json!(ns);
            let updated = s.apply(&p.coll, obj);
            full(StatusCode::OK, &updated)
        }
        (Method::PATCH, Some(name)) if p.status => {
            let patch: Value = serde_json::from_slice(body).unwrap_or(json!({}));
            let ns = p.ns.clone().unwrap_or_default();
            let Some(mut cur) = s.get(&p.coll, &ns, name) else {
                return status_body(404, "NotFound", &format!("{kind} {name:?} not found"));
            };
            let old = cur.clone();
            if let Some(st) = patch.get("status") {
                merge(
                    cur.as_object_mut()
                        .unwrap()
                        .entry("status")
                        .or_insert(json!({})),
                    st,
                );
            }
            let rv = s.bump();
            cur["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.objects
                .entry(p.coll.clone())
                .or_default()
                .insert((ns.clone(), name.clone()), cur.clone());
            s.record(Change {
                rv,
                coll: p.coll.clone(),
                ns,
                old: Some(old),
                new: cur.clone(),
                deleted: false,
            });
            full(StatusCode::OK, &cur)
        }
        _ => status_body(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

fn watch(
    s: &mut Inner,
    state: &Arc<Mutex<Inner>>,
    p: &Parsed,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let from: Option<u64> = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let w = Watcher {
        id: s.next_watcher,
        coll: p.coll.clone(),
        ns: p.ns.clone(),
        selector: q.get("labelSelector").cloned(),
        bookmarks: q
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true" || v == "1"),
        tx,
    };
    s.next_watcher += 1;
    let stream_response = |rx: mpsc::UnboundedReceiver<Bytes>| {
        let body = StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(|b| Ok::<_, Infallible>(Frame::data(b))),
        );
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .unwrap()
    };
    match from {
        Some(rv) if rv < s.compacted => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {rv} ({})", s.compacted)});
            let _ = w.tx.send(line("ERROR", &status));
            s.gone += 1;
            drop(w);
            return stream_response(rx);
        }
        Some(rv) => {
            for c in s.history.iter().filter(|c| c.rv > rv) {
                if let Some(b) = Inner::event_for(&w, c) {
                    let _ = w.tx.send(b);
                }
            }
        }
        None => {
            let sel = w.selector.clone();
            for ((ns, _), o) in s.objects.get(&p.coll).into_iter().flatten() {
                if p.ns.as_ref().is_none_or(|n| n == ns) && selects(sel.as_deref(), &labels(o)) {
                    let _ = w.tx.send(line("ADDED", o));
                }
            }
        }
    }
    let secs = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let limit = match (secs, s.max_watch) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let id = w.id;
    s.watchers.push(w);
    if let Some(limit) = limit {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            state.lock().unwrap().watchers.retain(|w| w.id != id);
        });
    }
    stream_response(rx)
}
