//! A Consul agent's HTTP API: register the service with its check, keep a TTL check updated
//! every TTL/3 and on health changes (or, with a check Consul runs itself, poll the service
//! every TTL/3), register again when the agent answers 404 for it, deregister on request.
//!
//! The HTTP client is hyper's HTTP/1.1 connection API over one kept-alive connection (TLS by
//! tokio-rustls for `https://`): a request every TTL/3 to one agent needs no pool, and it
//! reuses the hyper and rustls builds tonic already brings in.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::etcd::TlsFiles;
use crate::{ConsulCheck, Ctx, Health, RegisterError, Reply, backoff, control_plane::ttl_secs};

/// What [`crate::Backend::Consul`] carries into the task.
pub(crate) struct Config {
    pub(crate) addr: String,
    pub(crate) token: Option<String>,
    pub(crate) tls: TlsFiles,
    pub(crate) check: ConsulCheck,
    pub(crate) deregister_after: Option<Duration>,
}

/// Consul reaps critical services no sooner than this (its reaper ignores shorter values), so
/// the default never promises less.
const MIN_DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

struct State {
    http: Http,
    instance_id: String,
    check: ConsulCheck,
    check_id: String,
    ttl: Duration,
    deregister_after: Duration,
    /// A register call was sent, so the agent may hold an entry to remove on deregistration.
    maybe_registered: bool,
    registered: bool,
    last_ok: Instant,
}

pub(crate) async fn run(conf: Config, mut ctx: Ctx, stop: oneshot::Receiver<Reply>) {
    let ttl = Duration::from_secs(u64::from(ttl_secs(ctx.instance.ttl)));
    let rpc_timeout = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let http = match Http::new(&conf.addr, conf.token.as_deref(), conf.tls, rpc_timeout) {
        Ok(h) => h,
        Err(e) => {
            // A malformed address or token will not heal by retrying; say so and wait to be
            // stopped.
            tracing::error!(error = %e, "cannot register with consul");
            ctx.record_error(&e);
            if let Ok(reply) = stop.await {
                let _ = reply.send(Ok(()));
            }
            return;
        }
    };
    let instance_id = ctx.instance.instance_id.clone();
    let mut st = State {
        http,
        check_id: format!("service:{instance_id}"),
        instance_id,
        check: conf.check,
        ttl,
        deregister_after: conf
            .deregister_after
            .unwrap_or_else(|| (ttl * 3).max(MIN_DEFAULT_DEREGISTER_AFTER)),
        maybe_registered: false,
        registered: false,
        last_ok: Instant::now(),
    };
    let reply = {
        let keep = st.keep(&mut ctx);
        tokio::pin!(keep);
        tokio::select! {
            () = &mut keep => None,
            r = stop => r.ok(),
        }
    };
    if let Some(reply) = reply {
        let result = st.deregister().await;
        if result.is_ok() {
            ctx.update(|s| s.registered = false);
        }
        let _ = reply.send(result);
    }
}

/// Consul's check states for our health. Draining is critical so that Consul-aware clients
/// (health API with `?passing`, DNS) stop choosing the instance while it finishes its work.
fn check_status(h: Health) -> (&'static str, &'static str) {
    match h {
        Health::Healthy => ("passing", "healthy (weft sidecar)"),
        Health::Unhealthy => ("critical", "unhealthy (weft sidecar)"),
        Health::Draining => ("critical", "draining"),
    }
}

impl State {
    /// Keeps the service registered and its check current; returns only if the
    /// [`crate::Registration`] handle is gone.
    async fn keep(&mut self, ctx: &mut Ctx) {
        let mut failures = 0u32;
        let mut next_refresh = Instant::now();
        loop {
            if !self.registered {
                match self.register(ctx).await {
                    Ok(()) => {
                        failures = 0;
                        next_refresh = Instant::now() + ctx.period(self.ttl);
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, attempt = failures, "consul registration failed; retrying");
                        ctx.record_error(&e);
                        tokio::time::sleep(backoff(failures, ctx.period(self.ttl))).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_refresh) => {}
                r = ctx.health.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            match self.refresh(ctx).await {
                Ok(Known::Yes) => {
                    failures = 0;
                    next_refresh = Instant::now() + ctx.period(self.ttl);
                }
                Ok(Known::No) => {
                    // The agent restarted without its state, or reaped us after we were critical
                    // for DeregisterCriticalServiceAfter: register again at once.
                    tracing::info!(
                        instance_id = %self.instance_id,
                        "consul agent does not know this service; registering again"
                    );
                    self.registered = false;
                    ctx.update(|s| s.registered = false);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, attempt = failures, "consul check update failed; retrying");
                    ctx.record_error(&e);
                    // A TTL check not updated for a whole TTL is critical: the entry no longer
                    // serves traffic even though the agent still lists it.
                    let alive = self.last_ok.elapsed() < self.ttl;
                    ctx.update(|s| s.registered = alive);
                    // Capped at TTL/3 so that a short outage does not let the check expire.
                    next_refresh = Instant::now() + backoff(failures, ctx.period(self.ttl));
                }
            }
        }
    }

    fn registration_body(&self, ctx: &Ctx, health: Health) -> serde_json::Value {
        let inst = &ctx.instance;
        let mut meta: BTreeMap<String, String> = inst.metadata.clone();
        if let Some(zone) = &inst.zone {
            meta.insert("zone".into(), zone.clone());
        }
        meta.insert("protocol".into(), inst.protocol.clone());
        let mut tags = vec!["weft".to_string()];
        if inst.protocol == "grpc" {
            tags.push("grpc".into());
        }
        // Output is not part of a check definition (the agent sets it on updates).
        let (status, _) = check_status(health);
        let mut check = json!({
            "CheckID": self.check_id,
            "Name": format!("{} health (weft sidecar)", inst.service),
            "DeregisterCriticalServiceAfter": go_duration(self.deregister_after),
            // Explicit, so the entry is neither critical until the first update (Consul's
            // default for a TTL check) nor passing while the app is not.
            "Status": status,
        });
        match &self.check {
            ConsulCheck::Ttl => check["TTL"] = json!(go_duration(self.ttl)),
            ConsulCheck::Http { url, interval } => {
                check["HTTP"] = json!(url);
                check["Interval"] = json!(go_duration(*interval));
            }
            ConsulCheck::Grpc { target, interval } => {
                check["GRPC"] = json!(target);
                check["Interval"] = json!(go_duration(*interval));
            }
        }
        json!({
            "ID": self.instance_id,
            "Name": inst.service,
            "Address": inst.address.to_string(),
            "Port": inst.port,
            "Tags": tags,
            "Meta": meta,
            // Consul rejects a passing weight of 0; the other backends read 0 as 1 too.
            "Weights": {"Passing": inst.weight.max(1), "Warning": 1},
            "Check": check,
        })
    }

    async fn register(&mut self, ctx: &mut Ctx) -> Result<(), RegisterError> {
        let health = ctx.take_health();
        let body = self.registration_body(ctx, health);
        self.maybe_registered = true;
        // replace-existing-checks: a re-registration with another check kind (after a config
        // change under the same id) must not leave the old check behind to fail.
        self.http
            .call_ok(
                Method::PUT,
                "/v1/agent/service/register?replace-existing-checks=true",
                Some(&body),
            )
            .await?;
        self.registered = true;
        self.last_ok = Instant::now();
        tracing::info!(
            service = %ctx.instance.service,
            instance_id = %self.instance_id,
            ttl_seconds = self.ttl.as_secs(),
            ?health,
            "registered with the consul agent"
        );
        ctx.update(|s| {
            s.registered = true;
            s.health = Some(health);
            s.registrations += 1;
            s.last_error = None;
        });
        Ok(())
    }

    /// Pushes the current health (TTL check) or asks whether the agent still has us.
    async fn refresh(&mut self, ctx: &mut Ctx) -> Result<Known, RegisterError> {
        let health = ctx.take_health();
        let known = match self.check {
            ConsulCheck::Ttl => {
                let (status, output) = check_status(health);
                let path = format!("/v1/agent/check/update/{}", encode_segment(&self.check_id));
                let body = json!({"Status": status, "Output": output});
                let (code, text) = self.http.call(Method::PUT, &path, Some(&body)).await?;
                if (200..300).contains(&code) {
                    Known::Yes
                } else if code == 404 {
                    Known::No
                } else {
                    // Older agents answer 500 for an unknown check id; only the service lookup
                    // tells that apart from a real server error.
                    match self.service_known().await? {
                        Known::No => Known::No,
                        Known::Yes => return Err(self.http.status_err(&path, code, &text)),
                    }
                }
            }
            ConsulCheck::Http { .. } | ConsulCheck::Grpc { .. } => self.service_known().await?,
        };
        if known == Known::Yes {
            self.last_ok = Instant::now();
            ctx.update(|s| {
                s.registered = true;
                s.health = Some(health);
                s.last_error = None;
            });
        }
        Ok(known)
    }

    async fn service_known(&mut self) -> Result<Known, RegisterError> {
        let path = format!("/v1/agent/service/{}", encode_segment(&self.instance_id));
        let (code, text) = self.http.call(Method::GET, &path, None).await?;
        match code {
            200..=299 => Ok(Known::Yes),
            404 => Ok(Known::No),
            _ => Err(self.http.status_err(&path, code, &text)),
        }
    }

    async fn deregister(&mut self) -> Result<(), RegisterError> {
        if !self.maybe_registered {
            return Ok(());
        }
        let path = format!(
            "/v1/agent/service/deregister/{}",
            encode_segment(&self.instance_id)
        );
        let (code, text) = self.http.call(Method::PUT, &path, None).await?;
        // 404: already gone (reaped, or the agent lost its state), which is what we wanted.
        if (200..300).contains(&code) || code == 404 {
            tracing::info!(instance_id = %self.instance_id, "deregistered from the consul agent");
            Ok(())
        } else {
            Err(self.http.status_err(&path, code, &text))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Yes,
    No,
}

/// A Go duration string as Consul parses it: whole seconds where exact, else milliseconds.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// Percent-encodes one path segment (ids are usually `host-port`, but nothing guarantees it).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A minimal HTTP/1.1 client for one Consul agent.
struct Http {
    /// `http(s)://host:port`, for error messages.
    base: String,
    /// `host:port`, to connect to and for the Host header.
    authority: String,
    /// The host without IPv6 brackets, for TLS server-name checks.
    host: String,
    https: bool,
    tls_files: TlsFiles,
    tls: Option<TlsConnector>,
    token: Option<HeaderValue>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Http {
    fn new(
        addr: &str,
        token: Option<&str>,
        tls_files: TlsFiles,
        timeout: Duration,
    ) -> Result<Http, RegisterError> {
        let bad = |message: String| RegisterError::Connect {
            endpoint: addr.to_string(),
            message,
        };
        let (https, authority) = if let Some(rest) = addr.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = addr.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(bad("expected http://host:port or https://host:port".into()));
        };
        let authority = authority.trim_end_matches('/');
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => {
                h.trim_start_matches('[').trim_end_matches(']')
            }
            _ => return Err(bad("expected host:port with a port in 1..=65535".into())),
        };
        let token = token
            .map(|t| {
                let mut v = HeaderValue::from_str(t.trim())
                    .map_err(|_| bad("the ACL token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Ok::<_, RegisterError>(v)
            })
            .transpose()?;
        Ok(Http {
            base: format!("{}://{authority}", if https { "https" } else { "http" }),
            authority: authority.to_string(),
            host: host.to_string(),
            https,
            tls_files,
            tls: None,
            token,
            timeout,
            conn: None,
        })
    }

    fn connect_err(&self, message: String) -> RegisterError {
        RegisterError::Connect {
            endpoint: self.base.clone(),
            message,
        }
    }

    fn status_err(&self, path: &str, status: u16, body: &str) -> RegisterError {
        RegisterError::Consul {
            url: format!("{}{path}", self.base),
            status,
            body: body.trim().chars().take(512).collect(),
        }
    }

    /// [`Http::call`] that turns a non-2xx answer into an error.
    async fn call_ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, RegisterError> {
        let (code, text) = self.call(method, path, body).await?;
        if (200..300).contains(&code) {
            Ok(text)
        } else {
            Err(self.status_err(path, code, &text))
        }
    }

    /// One request, bounded by the timeout; the status and body of any answer.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), RegisterError> {
        let body = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.call_inner(method.clone(), path, body)).await {
            Ok(Ok((code, bytes))) => Ok((code, String::from_utf8_lossy(&bytes).into_owned())),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                // The connection may be stuck mid-request; never reuse it.
                self.conn = None;
                Err(self.connect_err(format!("{method} {path} timed out after {timeout:?}")))
            }
        }
    }

    async fn call_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), RegisterError> {
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        let mut sender = match self.conn.take() {
            Some(c) if reused => c,
            _ => self.connect().await?,
        };
        let resp = match self.send(&mut sender, &method, path, body.clone()).await {
            Ok(r) => r,
            // A kept-alive connection the agent closed while idle fails the next request; every
            // request here is idempotent, so once more on a fresh connection.
            Err(_) if reused => {
                sender = self.connect().await?;
                self.send(&mut sender, &method, path, body).await?
            }
            Err(e) => return Err(e),
        };
        let code = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.connect_err(format!("reading the answer to {method} {path}: {e}")))?
            .to_bytes();
        self.conn = Some(sender);
        Ok((code, bytes))
    }

    async fn send(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        method: &Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RegisterError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, self.authority.as_str());
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token.clone());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| self.connect_err(format!("building {method} {path}: {e}")))?;
        sender
            .ready()
            .await
            .map_err(|e| self.connect_err(format!("connection not ready: {e}")))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.connect_err(format!("{method} {path}: {e}")))
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>, RegisterError> {
        let tcp = TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|e| self.connect_err(format!("connecting: {e}")))?;
        // Small requests answered at once: Nagle would only add latency.
        let _ = tcp.set_nodelay(true);
        if !self.https {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| self.connect_err(format!("HTTP handshake: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "consul connection closed");
                }
            });
            return Ok(sender);
        }
        let connector = match &self.tls {
            Some(c) => c.clone(),
            None => {
                let c = tls_connector(&self.tls_files).map_err(|m| self.connect_err(m))?;
                self.tls = Some(c.clone());
                c
            }
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| self.connect_err(format!("TLS server name `{}`: {e}", self.host)))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| self.connect_err(format!("TLS handshake: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.connect_err(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "consul connection closed");
            }
        });
        Ok(sender)
    }
}

/// A rustls client: the CA file's roots (else the system's), and the client certificate when
/// both cert and key are given.
fn tls_connector(files: &TlsFiles) -> Result<TlsConnector, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("reading TLS file {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            let pem = read(ca)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {} holds no certificate", ca.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no CA file given and no system trust roots found".into());
            }
        }
    }
    // An explicit provider: the process-wide default is ambiguous when several are linked in.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("certificate file {}: {e}", cert.display()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| format!("key file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both a cert and a key file".into()),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_secs(90)), "90s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("host-1_8080.a"), "host-1_8080.a");
        assert_eq!(encode_segment("service:a b/c"), "service:a%20b%2Fc");
    }

    #[test]
    fn addresses_are_checked() {
        let http = |a: &str| Http::new(a, None, no_tls(), Duration::from_secs(1));
        let h = http("http://127.0.0.1:8500").unwrap();
        assert_eq!(
            (h.authority.as_str(), h.host.as_str()),
            ("127.0.0.1:8500", "127.0.0.1")
        );
        let h = http("https://[::1]:8501/").unwrap();
        assert_eq!(
            (h.authority.as_str(), h.host.as_str()),
            ("[::1]:8501", "::1")
        );
        assert!(h.https);
        for bad in ["consul://a:1", "http://a", "http://:1", "http://a:0"] {
            assert!(http(bad).is_err(), "{bad}");
        }
        let e = Http::new(
            "http://a:1",
            Some("bad\ntoken"),
            no_tls(),
            Duration::from_secs(1),
        );
        assert!(e.is_err());
    }

    #[test]
    fn tls_file_problems_are_named() {
        let missing = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            cert: None,
            key: None,
        };
        let e = tls_connector(&missing).err().unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let half = TlsFiles {
            ca: None,
            cert: Some("/nonexistent/cert.pem".into()),
            key: None,
        };
        // Either no system roots here or the half client identity: both are named errors.
        assert!(tls_connector(&half).is_err());
    }

    fn no_tls() -> TlsFiles {
        TlsFiles {
            ca: None,
            cert: None,
            key: None,
        }
    }
}
