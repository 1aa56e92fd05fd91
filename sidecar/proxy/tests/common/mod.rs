//! Test harness: hyper backends that answer with their name (and can be told to fail, stall
//! or hang up), a proxy on loopback built from a registry YAML through the real translation,
//! and small HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weft_proxy::{Mesh, ProxyOptions, SpanRecord, SpanSink};
use weft_registry::{Hub, SourceEvent, parse_document};
use weft_sidecar_config::{MeshConfig, ROUTE_CONFIG_NAME};
use weft_translate::{Flavor, Options, translate};

/// A `MeshConfig` from a registry document, through the control plane's own translation.
pub fn mesh_config(yaml: &str) -> MeshConfig {
    let doc = parse_document("test.yaml", yaml).expect("test registry must be valid");
    let hub = Hub::new();
    let src = hub.add_source("file");
    let mut events = vec![SourceEvent::Init];
    events.extend(doc.into_objects().into_iter().map(SourceEvent::InitApply));
    events.push(SourceEvent::InitDone);
    src.apply(events);
    let reg = (*hub.current().registry).clone();
    let res = translate(&reg, &Options::default(), Flavor::Envoy);
    let rc = res.routes.iter().find(|r| r.name == ROUTE_CONFIG_NAME);
    MeshConfig::from_xds(&res.clusters, &res.endpoints, rc).expect("config must be accepted")
}

/// `- { address: 127.0.0.1, port: N }` lines for a service's endpoints.
pub fn endpoints(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| {
            format!(
                "      - {{ address: 127.0.0.1, port: {} }}\n",
                b.addr.port()
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
pub enum Mode {
    Ok,
    Status(u16),
    Delay(Duration),
    /// Hang up without answering.
    Close,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub mode: Arc<Mutex<Mode>>,
    pub hits: Arc<AtomicUsize>,
    /// Request headers seen, in order.
    pub seen: Arc<Mutex<Vec<(http::Version, HeaderMap)>>>,
    stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend {
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request seen")
            .1
    }
}

/// An HTTP/1.1 + h2c server answering `200 <name>` with `x-backend: <name>`. Per request,
/// `x-delay-ms` delays the answer and `x-status` picks the status.
pub async fn backend(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b = Backend {
        name: name.to_string(),
        addr,
        mode: Arc::new(Mutex::new(Mode::Ok)),
        hits: Arc::new(AtomicUsize::new(0)),
        seen: Arc::new(Mutex::new(Vec::new())),
        stop: CancellationToken::new(),
    };
    let (name, mode, hits, seen, stop) = (
        b.name.clone(),
        b.mode.clone(),
        b.hits.clone(),
        b.seen.clone(),
        b.stop.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            };
            let (name, mode, hits, seen) = (name.clone(), mode.clone(), hits.clone(), seen.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                let (name, mode, hits, seen) =
                    (name.clone(), mode.clone(), hits.clone(), seen.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    seen.lock()
                        .unwrap()
                        .push((req.version(), req.headers().clone()));
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                    };
                    let delay = header("x-delay-ms").map(Duration::from_millis);
                    let status = header("x-status").map(|s| s as u16);
                    let version = format!("{:?}", req.version());
                    // Read the request body so h1 connections stay reusable.
                    let _ = req.into_body().collect().await;
                    let m = mode.lock().unwrap().clone();
                    let mut code = 200u16;
                    match m {
                        Mode::Ok => {}
                        Mode::Status(s) => code = s,
                        Mode::Delay(d) => tokio::time::sleep(d).await,
                        Mode::Close => return Err(std::io::Error::other("hang up")),
                    }
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    if let Some(s) = status {
                        code = s;
                    }
                    let mut resp = Response::new(Full::new(Bytes::from(name.clone())));
                    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                    resp.headers_mut()
                        .insert("x-backend", name.parse().unwrap());
                    resp.headers_mut()
                        .insert("x-version", version.parse().unwrap());
                    Ok::<_, std::io::Error>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    b
}

#[derive(Default)]
pub struct Spans(pub Mutex<Vec<SpanRecord>>);

struct Collector(Arc<Spans>);

impl SpanSink for Collector {
    fn record(&self, span: SpanRecord) {
        self.0.0.lock().unwrap().push(span);
    }
}

pub struct Sidecar {
    pub addr: SocketAddr,
    pub mesh: Arc<Mesh>,
    pub registry: Registry,
    pub spans: Arc<Spans>,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sidecar {
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// The value of the first sample line starting with `prefix`, 0 when absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.0.lock().unwrap().clone()
    }
}

pub fn new_mesh(opts: ProxyOptions) -> (Arc<Mesh>, Registry, Arc<Spans>) {
    let mut registry = Registry::default();
    let spans = Arc::new(Spans::default());
    let mesh = Mesh::new(opts, Arc::new(Collector(spans.clone())), &mut registry);
    (mesh, registry, spans)
}

/// An outbound proxy on loopback serving `config`.
pub async fn outbound(config: MeshConfig) -> Sidecar {
    let (mesh, registry, spans) = new_mesh(ProxyOptions {
        service: "client".into(),
        ..Default::default()
    });
    mesh.apply(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(weft_proxy::serve_outbound(
        listener,
        mesh.clone(),
        stop.clone(),
    ));
    Sidecar {
        addr,
        mesh,
        registry,
        spans,
        stop,
        task: Some(task),
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    pub fn weft_error(&self) -> String {
        self.headers
            .get("x-weft-error")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

/// GET `path` through the proxy at `proxy` with `Host: host`.
pub async fn get(
    c: &TestClient,
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Polls `cond` every 20 ms for up to 10 s.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
