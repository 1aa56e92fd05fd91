//! Pooled upstream clients: keep-alive HTTP/1.1 and h2c, one per distinct
//! (protocol, connect timeout, idle cap) so clusters with equal settings share a pool, and a
//! cluster whose settings change gets a client built for them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, Request, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::replay::ReplayBody;

pub(crate) type UpstreamClient = Client<HttpConnector, ReplayBody>;

/// hyper refuses buffer limits below this.
const MIN_BUF: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub http2: bool,
    pub connect_timeout: Duration,
    /// Idle connections kept per endpoint (`max_connections` of HTTP/1.1 clusters).
    pub max_idle_per_host: Option<u32>,
}

pub(crate) fn build(
    key: ClientKey,
    idle_timeout: Duration,
    max_header_bytes: usize,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(key.connect_timeout));
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http1_max_buf_size(max_header_bytes.max(MIN_BUF));
    if let Some(n) = key.max_idle_per_host {
        b.pool_max_idle_per_host(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if key.http2 {
        b.http2_only(true)
            .http2_max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    }
    b.build(http)
}

pub(crate) struct ClientCache {
    idle_timeout: Duration,
    max_header_bytes: usize,
    clients: Mutex<HashMap<ClientKey, UpstreamClient>>,
}

impl ClientCache {
    pub(crate) fn new(idle_timeout: Duration, max_header_bytes: usize) -> Self {
        Self {
            idle_timeout,
            max_header_bytes,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, key: ClientKey) -> UpstreamClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(key)
            .or_insert_with(|| build(key, self.idle_timeout, self.max_header_bytes))
            .clone()
    }

    /// Forgets clients no cluster uses; their idle connections close with them.
    pub(crate) fn retain(&self, keep: &HashSet<ClientKey>) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|k, _| keep.contains(k));
    }
}

/// The request to send upstream: same method, path, query and headers, the URI pointing at
/// the chosen endpoint (the pool is keyed by it), `Host` kept as the client sent it.
///
/// HTTP/2 upstreams get the endpoint as `:authority` (the legacy client takes both the
/// connection and the pseudo-header from the URI) and the original authority in `host`.
pub(crate) fn upstream_request(
    parts: &Parts,
    authority: &str,
    addr: SocketAddr,
    http2: bool,
    body: ReplayBody,
) -> Result<Request<ReplayBody>, http::Error> {
    let pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(pq)
        .build()?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = parts.headers.clone();
    if !authority.is_empty() {
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_str(authority)?);
    }
    Ok(req)
}
