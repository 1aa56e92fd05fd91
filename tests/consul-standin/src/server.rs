//! HTTP front of the stand-in: routing, query parsing, ACL token check and blocking queries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::state::{ApiError, State, parse_duration};

/// Consul's defaults: `wait` is 5 minutes unless given, and capped at 10 minutes.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Bumped after every mutation so blocked queries re-evaluate their index.
    pub(crate) changes: watch::Sender<u64>,
    pub(crate) token: Option<String>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a stand-in bug; keep serving what is there.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn notify(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs a mutation and wakes blocked queries.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.notify();
        r
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: u16, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_resp(value: &Value, index: Option<u64>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Some(i) = index {
        add_index_headers(&mut r, i);
    }
    r
}

fn add_index_headers(r: &mut Resp, index: u64) {
    let h = r.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(&index.to_string()) {
        h.insert("X-Consul-Index", v);
    }
    h.insert(
        "X-Consul-KnownLeader",
        hyper::header::HeaderValue::from_static("true"),
    );
    h.insert(
        "X-Consul-LastContact",
        hyper::header::HeaderValue::from_static("0"),
    );
}

fn err(e: ApiError) -> Resp {
    text(e.status, e.message)
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        out.insert(dec(k), dec(v));
    }
    out
}

/// Consul treats a present flag (`?recurse`, `?passing`) as true unless it says `false`.
fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name)
        .is_some_and(|v| !matches!(v.as_str(), "false" | "0"))
}

struct Blocking {
    min_index: u64,
    wait: Duration,
}

fn blocking_params(q: &HashMap<String, String>) -> Result<Blocking, ApiError> {
    let min_index = match q.get("index") {
        None => 0,
        Some(s) => s.parse::<u64>().map_err(|_| ApiError {
            status: 400,
            message: format!("Invalid index: {s:?}"),
        })?,
    };
    let wait = match q.get("wait") {
        None => DEFAULT_WAIT,
        Some(s) => parse_duration(s).ok_or_else(|| ApiError {
            status: 400,
            message: format!("Invalid wait time: {s:?}"),
        })?,
    };
    Ok(Blocking {
        min_index,
        wait: wait.min(MAX_WAIT),
    })
}

/// Runs `view` until its index exceeds the client's, `wait` elapses, or the state is
/// abandoned (`reset_index`), then answers with the view as it is then.
async fn block_on<T>(
    shared: &Shared,
    params: &Blocking,
    view: impl Fn(&State) -> (u64, T),
) -> (u64, T) {
    let mut rx = shared.changes.subscribe();
    let deadline = Instant::now() + params.wait;
    let abandon_at_start = shared.lock().abandon;
    loop {
        rx.borrow_and_update();
        {
            let st = shared.lock();
            let (idx, v) = view(&st);
            if params.min_index == 0
                || idx > params.min_index
                || st.abandon != abandon_at_start
                || Instant::now() >= deadline
            {
                return (idx, v);
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) | Err(_) => continue,
            Ok(Err(_)) => {
                let st = shared.lock();
                return view(&st);
            }
        }
    }
}

fn authorized(
    shared: &Shared,
    req: &Request<Incoming>,
    q: &HashMap<String, String>,
) -> Result<(), Box<Resp>> {
    let Some(want) = &shared.token else {
        return Ok(());
    };
    let header = req
        .headers()
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let given = header.or(bearer).or_else(|| q.get("token").cloned());
    match given {
        Some(t) if &t == want => Ok(()),
        Some(_) => Err(Box::new(text(403, "ACL not found"))),
        None => Err(Box::new(text(403, "Permission denied"))),
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    {
        let mut st = shared.lock();
        *st.requests.entry(path.clone()).or_insert(0) += 1;
    }
    let q = parse_query(req.uri().query());
    if let Err(r) = authorized(&shared, &req, &q) {
        return *r;
    }
    if let Some(dc) = q.get("dc") {
        let ours = shared.lock().datacenter.clone();
        if !dc.is_empty() && dc != &ours {
            return text(500, "No path to datacenter");
        }
    }
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(400, format!("reading body: {e}")),
    };
    route(&shared, &method, &path, &q, body).await
}

fn decode_path(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn parse_json(body: &Bytes) -> Result<Value, Box<Resp>> {
    if body.is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    serde_json::from_slice(body)
        .map_err(|e| Box::new(text(400, format!("Request decode failed: {e}"))))
}

async fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    body: Bytes,
) -> Resp {
    let now = Instant::now().into_std();
    let ok = || text(200, "");
    match (method, path) {
        (&Method::GET, "/v1/status/leader") => json_resp(&Value::from("127.0.0.1:8300"), None),
        (&Method::GET, "/v1/agent/self") => {
            let dc = shared.lock().datacenter.clone();
            json_resp(
                &serde_json::json!({"Config": {"Datacenter": dc, "NodeName": crate::state::NODE}}),
                None,
            )
        }
        (&Method::GET, "/v1/agent/services") => json_resp(&shared.lock().agent_services(), None),
        (&Method::GET, "/v1/agent/checks") => json_resp(&shared.lock().agent_checks(), None),
        (&Method::PUT, "/v1/agent/service/register") => {
            let v = match parse_json(&body) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            match shared.mutate(|st| st.register(&v, now)) {
                Ok(()) => ok(),
                Err(e) => err(e),
            }
        }
        (&Method::PUT, "/v1/agent/maintenance") => {
            let enable = q.get("enable").map(String::as_str);
            let Some(enable) = enable.and_then(|e| e.parse::<bool>().ok()) else {
                return text(400, "Missing value for enable");
            };
            let reason = q.get("reason").cloned().unwrap_or_default();
            shared.mutate(|st| st.node_maintenance(enable, &reason));
            ok()
        }
        (m, p) if p.starts_with("/v1/agent/service/deregister/") && m == Method::PUT => {
            let id = decode_path(&p["/v1/agent/service/deregister/".len()..]);
            match shared.mutate(|st| st.deregister(&id)) {
                Ok(()) => ok(),
                Err(e) => err(e),
            }
        }
        (m, p) if p.starts_with("/v1/agent/service/maintenance/") && m == Method::PUT => {
            let id = decode_path(&p["/v1/agent/service/maintenance/".len()..]);
            let Some(enable) = q.get("enable").and_then(|e| e.parse::<bool>().ok()) else {
                return text(400, "Missing value for enable");
            };
            let reason = q.get("reason").cloned().unwrap_or_default();
            match shared.mutate(|st| st.service_maintenance(&id, enable, &reason)) {
                Ok(()) => ok(),
                Err(e) => err(e),
            }
        }
        (m, p) if p.starts_with("/v1/agent/service/") && m == Method::GET => {
            let id = decode_path(&p["/v1/agent/service/".len()..]);
            match shared.lock().agent_service(&id) {
                Some(v) => json_resp(&v, None),
                None => text(404, format!("unknown service ID: {id}")),
            }
        }
        (m, p) if p.starts_with("/v1/agent/check/") && m == Method::PUT => {
            let rest = &p["/v1/agent/check/".len()..];
            let Some((verb, id)) = rest.split_once('/') else {
                return text(404, "");
            };
            let id = decode_path(id);
            let note = q.get("note").cloned();
            let (status, output) = match verb {
                "pass" => ("passing".to_string(), note),
                "warn" => ("warning".to_string(), note),
                "fail" => ("critical".to_string(), note),
                "update" => {
                    let v = match parse_json(&body) {
                        Ok(v) => v,
                        Err(r) => return *r,
                    };
                    let status = v
                        .get("Status")
                        .or_else(|| v.get("status"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let output = v
                        .get("Output")
                        .or_else(|| v.get("output"))
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    (status, output)
                }
                _ => return text(404, ""),
            };
            // pass/warn/fail without a note clear the output, as Consul does.
            let output = Some(output.unwrap_or_default());
            match shared.mutate(|st| st.update_ttl(&id, &status, output, now)) {
                Ok(()) => ok(),
                Err(e) => err(e),
            }
        }
        (&Method::GET, "/v1/catalog/services") => {
            let params = match blocking_params(q) {
                Ok(p) => p,
                Err(e) => return err(e),
            };
            let tag_filter = q.get("tag").cloned();
            let (idx, v) = block_on(shared, &params, |st| st.catalog_services()).await;
            let v = match (tag_filter, v) {
                (Some(tag), Value::Object(m)) => Value::Object(
                    m.into_iter()
                        .filter(|(_, tags)| {
                            tags.as_array()
                                .is_some_and(|a| a.iter().any(|t| t.as_str() == Some(&tag)))
                        })
                        .collect(),
                ),
                (_, v) => v,
            };
            json_resp(&v, Some(idx))
        }
        (&Method::GET, p) if p.starts_with("/v1/health/service/") => {
            let name = decode_path(&p["/v1/health/service/".len()..]);
            let params = match blocking_params(q) {
                Ok(p) => p,
                Err(e) => return err(e),
            };
            let passing = flag(q, "passing");
            let tags: Vec<String> = q.get("tag").into_iter().cloned().collect();
            let (idx, v) = block_on(shared, &params, |st| {
                st.health_service(&name, passing, &tags)
            })
            .await;
            json_resp(&v, Some(idx))
        }
        (m, p) if p.starts_with("/v1/kv/") => {
            let key = decode_path(&p["/v1/kv/".len()..]);
            kv(shared, m, &key, q, body).await
        }
        _ => text(404, format!("stand-in does not implement {method} {path}")),
    }
}

async fn kv(
    shared: &Shared,
    method: &Method,
    key: &str,
    q: &HashMap<String, String>,
    body: Bytes,
) -> Resp {
    let recurse = flag(q, "recurse");
    let cas = match q.get("cas").map(|c| c.parse::<u64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(400, "Invalid cas index"),
    };
    match *method {
        Method::GET => {
            let params = match blocking_params(q) {
                Ok(p) => p,
                Err(e) => return err(e),
            };
            if q.contains_key("keys") {
                let sep = q.get("separator").cloned();
                let (idx, keys) = block_on(shared, &params, |st| {
                    (st.kv_index(key, true), st.kv_keys(key, sep.as_deref()))
                })
                .await;
                if keys.is_empty() {
                    let mut r = text(404, "");
                    add_index_headers(&mut r, idx);
                    return r;
                }
                return json_resp(&serde_json::json!(keys), Some(idx));
            }
            let raw = q.contains_key("raw");
            let (idx, entries, raw_value) = {
                let (idx, (entries, raw_value)) = block_on(shared, &params, |st| {
                    (
                        st.kv_index(key, recurse),
                        (st.kv_get(key, recurse), st.kv_raw(key)),
                    )
                })
                .await;
                (idx, entries, raw_value)
            };
            match entries {
                None => {
                    let mut r = text(404, "");
                    add_index_headers(&mut r, idx);
                    r
                }
                Some(_) if raw && !recurse => {
                    let mut r =
                        Response::new(Full::new(Bytes::from(raw_value.unwrap_or_default())));
                    add_index_headers(&mut r, idx);
                    r
                }
                Some(entries) => json_resp(&Value::Array(entries), Some(idx)),
            }
        }
        Method::PUT => {
            let flags = q.get("flags").and_then(|f| f.parse().ok()).unwrap_or(0);
            let done = shared.mutate(|st| st.kv_put(key, body.to_vec(), flags, cas));
            json_resp(&Value::Bool(done), None)
        }
        Method::DELETE => {
            let done = shared.mutate(|st| st.kv_delete(key, recurse, cas));
            json_resp(&Value::Bool(done), None)
        }
        _ => text(405, "method not allowed"),
    }
}
