//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/debug/*`, and optionally the
//! control plane's status page at `/`.
//!
//! What it does: serves liveness, readiness, Prometheus text and JSON debug documents over
//! HTTP/1.1 (hyper 1), and, when asked ([`Admin::status_page`]), one self-contained HTML page
//! (`status.html`: inline CSS and JS, no external resources, since operators reach the port
//! through port-forwards with no Internet) that polls `/readyz`, `/debug/sources`,
//! `/debug/endpoints`, `/debug/clients` and `/debug/nacks` every 2 s.
//!
//! What it does not do: know what it reports. Readiness and every debug document are closures
//! the binary hands in, so this crate depends on no other Weft crate and any component can
//! expose a page without the admin server learning about it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The status page served at `/` by [`Admin::status_page`].
const STATUS_PAGE: &str = include_str!("status.html");

/// The page's only script and style are inline and it only fetches from this server; the
/// policy makes anything else (an injected `<script src>`, a form, a frame) inert.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Produces one debug document on demand from the request's query parameters.
pub type DebugFn = Arc<dyn Fn(&Query) -> Result<serde_json::Value, DebugError> + Send + Sync>;

/// The decoded query string of a request (`?node=envoy~1`), last value of a repeated key.
pub type Query = BTreeMap<String, String>;

/// Why a debug document could not be produced; answered as plain text with its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugError {
    /// The thing asked for does not exist (404), e.g. no connected proxy has that node id.
    #[error("{0}")]
    NotFound(String),
    /// The query is wrong (400), e.g. a required parameter is missing.
    #[error("{0}")]
    BadRequest(String),
}

/// What the admin server reports. Build it once at startup.
#[derive(Clone)]
pub struct Admin {
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// What `/readyz` says while not ready: each binary waits for different things.
    not_ready: String,
    metrics: Arc<prometheus_client::registry::Registry>,
    debug: BTreeMap<String, DebugFn>,
    status_page: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("debug", &self.debug.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Admin {
    pub fn new(
        ready: impl Fn() -> bool + Send + Sync + 'static,
        metrics: prometheus_client::registry::Registry,
    ) -> Self {
        Self {
            ready: Arc::new(ready),
            not_ready: "waiting for the first full sync of every source (see /debug/sources)"
                .to_string(),
            metrics: Arc::new(metrics),
            debug: BTreeMap::new(),
            status_page: false,
        }
    }

    /// Serves the status page at `/` (otherwise `/` is the plain-text index, like `/debug`).
    /// Opt-in because the page reads the control plane's documents (`/debug/sources`,
    /// `/debug/endpoints`, `/debug/clients`, `/debug/nacks` in their shapes): another binary
    /// using this crate, like the sidecar, has other pages, some under the same names.
    pub fn status_page(mut self) -> Self {
        self.status_page = true;
        self
    }

    /// What `/readyz` answers (after `not ready: `) while the ready check fails.
    pub fn not_ready_message(mut self, message: &str) -> Self {
        self.not_ready = message.to_string();
        self
    }

    /// Serves `f()` as JSON at `/debug/<name>`.
    pub fn debug(
        self,
        name: &str,
        f: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.debug_query(name, move |_| Ok(f()))
    }

    /// Serves `f(query)` as JSON at `/debug/<name>?<query>`; an error is answered with its
    /// status (404 or 400) and message.
    pub fn debug_query(
        mut self,
        name: &str,
        f: impl Fn(&Query) -> Result<serde_json::Value, DebugError> + Send + Sync + 'static,
    ) -> Self {
        self.debug.insert(name.to_string(), Arc::new(f));
        self
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                if (self.ready)() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", self.not_ready),
                    )
                }
            }
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.metrics) {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, out);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding metrics: {e}\n"),
                    ),
                }
            }
            "/" if self.status_page => {
                let mut r = text(StatusCode::OK, STATUS_PAGE.to_string());
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    header::HeaderValue::from_static(STATUS_PAGE_CSP),
                );
                h.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    header::HeaderValue::from_static("nosniff"),
                );
                r
            }
            "/" | "/debug" | "/debug/" => {
                let mut out = String::from("weft admin\n\n");
                if self.status_page {
                    out.push_str("/ (status page)\n");
                }
                out.push_str("/healthz\n/readyz\n/metrics\n");
                for name in self.debug.keys() {
                    out.push_str(&format!("/debug/{name}\n"));
                }
                text(StatusCode::OK, out)
            }
            path => match path.strip_prefix("/debug/").and_then(|n| self.debug.get(n)) {
                Some(f) => {
                    let query: Query =
                        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
                            .into_owned()
                            .collect();
                    let doc = match f(&query) {
                        Ok(doc) => doc,
                        Err(e) => {
                            let status = match e {
                                DebugError::NotFound(_) => StatusCode::NOT_FOUND,
                                DebugError::BadRequest(_) => StatusCode::BAD_REQUEST,
                            };
                            return text(status, format!("{e}\n"));
                        }
                    };
                    let body = serde_json::to_string_pretty(&doc).unwrap_or_else(|e| {
                        format!("{{\"error\": \"encoding debug document: {e}\"}}")
                    });
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no admin page at {path}; see /debug\n"),
                ),
            },
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Serves until `shutdown` resolves. Connections are independent: a bad one never affects
/// another or the listener.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let admin = Arc::new(admin);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_metrics_and_debug() {
        let ready = Arc::new(AtomicBool::new(false));
        let r2 = Arc::clone(&ready);
        let mut reg = prometheus_client::registry::Registry::default();
        let c: prometheus_client::metrics::counter::Counter = Default::default();
        c.inc();
        reg.register("weft_test", "a test counter", c);
        let admin = Admin::new(move || r2.load(Ordering::SeqCst), reg)
            .debug("sources", || serde_json::json!({"sources": ["file"]}))
            .debug_query("echo", |q| match q.get("name") {
                Some(n) => Ok(serde_json::json!({ "name": n })),
                None => Err(DebugError::BadRequest("name= is required".into())),
            });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(serve(l, admin, async {
            let _ = rx.await;
        }));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("weft_test_total 1"));
        let d = get(addr, "/debug/sources").await;
        assert!(d.contains("\"file\""), "{d}");
        let nope = get(addr, "/debug/nope").await;
        assert!(
            nope.starts_with("HTTP/1.1 404") && nope.contains("see /debug"),
            "{nope}"
        );
        // Without `status_page()`, `/` is the index too.
        for index in ["/", "/debug", "/debug/"] {
            let i = get(addr, index).await;
            assert!(
                i.starts_with("HTTP/1.1 200")
                    && i.contains(
                        "weft admin\n\n/healthz\n/readyz\n/metrics\n/debug/echo\n/debug/sources\n"
                    ),
                "{i}"
            );
        }
        let q = get(addr, "/debug/echo?name=envoy%7E1&x=y").await;
        assert!(q.contains("\"envoy~1\""), "{q}");
        let q = get(addr, "/debug/echo").await;
        assert!(
            q.starts_with("HTTP/1.1 400") && q.contains("name= is required"),
            "{q}"
        );
        let _ = tx.send(());
        h.await.unwrap();
    }

    #[tokio::test]
    async fn serves_the_status_page_when_asked() {
        let admin = Admin::new(|| true, Default::default())
            .debug("clients", || serde_json::json!({"clients": []}))
            .status_page();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(serve(l, admin, async {
            let _ = rx.await;
        }));
        let page = get(addr, "/").await.to_ascii_lowercase();
        assert!(page.starts_with("http/1.1 200"), "{page}");
        assert!(page.contains("content-type: text/html; charset=utf-8\r\n"));
        assert!(page.contains("content-security-policy: default-src 'none';"));
        assert!(page.contains("<title>weft control plane</title>"));
        for index in ["/debug", "/debug/"] {
            let i = get(addr, index).await;
            assert!(
                i.starts_with("HTTP/1.1 200")
                    && i.contains("weft admin\n\n/ (status page)\n/healthz\n")
                    && i.contains("/debug/clients\n"),
                "{i}"
            );
        }
        let _ = tx.send(());
        h.await.unwrap();
    }

    /// Operators open the page through port-forwards on machines without Internet access, and
    /// it shows strings chosen by clients (node ids, NACK messages).
    #[test]
    fn status_page_is_self_contained_and_never_parses_data_as_html() {
        for banned in [
            "http://",
            "https://",
            " src=",
            "@import",
            "url(",
            "innerhtml",
            "outerhtml",
            "insertadjacenthtml",
            "document.write",
            "eval(",
        ] {
            assert!(
                !STATUS_PAGE.to_ascii_lowercase().contains(banned),
                "status.html contains `{banned}`"
            );
        }
        // Relative, so the page keeps working under a proxy's path prefix.
        for page in [
            "\"readyz\"",
            "\"debug/sources\"",
            "\"debug/endpoints\"",
            "\"debug/clients\"",
            "\"debug/nacks\"",
        ] {
            assert!(
                STATUS_PAGE.contains(page),
                "status.html does not fetch {page}"
            );
        }
    }
}
