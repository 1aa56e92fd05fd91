//! The Consul source: keeps the hub's copy of Consul's services, instances and health, and of
//! the routes and policies kept in Consul KV, equal to what Consul says.
//!
//! What it does:
//! - Watches `/v1/catalog/services` and, for each selected service (all but Consul's own
//!   `consul`, or those named by `service_names` / tagged with one of `service_tags`), its
//!   `/v1/health/service/<name>` (every instance, not only passing ones, because health is
//!   mapped, not filtered). One watch per service, started and stopped as the list changes.
//! - Watches `/v1/kv/<prefix>/?recurse` for `<prefix>/routes/<name>`,
//!   `<prefix>/policies/<name>` and `<prefix>/service-config/<service>`, decoded and validated
//!   with `weft_registry::schema` like the etcd source's keys; a bad value is skipped and
//!   reported under its key (`report_error`, `weft_consul_invalid_values_total`).
//! - Every watch is a blocking query (`index`, `wait` with jitter, `X-Consul-Index`), with
//!   Consul's client rules: an index that goes backwards restarts from 0, an index below 1
//!   counts as 1, and a watch never queries more often than `min_query_interval`, so a busy
//!   catalog cannot make it spin.
//! - Emits one `Init, InitApply*, InitDone` once the service list, every selected service's
//!   first health answer and the KV prefix have all been read (that is the first full sync and
//!   readiness), then `Apply`/`Delete` for what changed.
//! - Survives Consul being down: the hub keeps the last known state; each watch retries with
//!   exponential backoff and full jitter, restarting its index from 0.
//!
//! What it does not do: write to Consul (the sidecar registers itself), read Consul's
//! prepared queries, Connect intentions or service-defaults config entries, use several
//! datacenters at once, or use `?filter=` expressions (filtering by name and tag is done here).
//! The HTTP client is reqwest with rustls (ring); TLS is verified against `--consul-ca` when
//! given, else against the webpki roots.

mod decode;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_registry::schema;
use weft_registry::{Mirror, Object, ObjectKey, Protocol, SourceHandle};

pub use decode::WarningAs;
#[doc(hidden)]
pub use decode::{Entry, decode_health_body, decode_kv_body};

use crate::decode::{HealthEntry, KvPair};
use crate::watch::{Ctx, Kind, Msg};

/// Files for TLS to Consul.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA (PEM) to verify Consul; without it the webpki roots are used.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS (`verify_incoming`); both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How to reach Consul and what to read.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    /// e.g. `http://127.0.0.1:8500`.
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// `?dc=`; the agent's own datacenter when unset.
    pub datacenter: Option<String>,
    pub tls: TlsFiles,
    /// Watch only services with one of these tags (their instances without the tag are left
    /// out), in addition to `service_names`. Both empty: every service but `consul`.
    pub service_tags: Vec<String>,
    /// Watch these services (all their instances).
    pub service_names: Vec<String>,
    pub warning_as: WarningAs,
    /// KV prefix without leading or trailing `/`; default `weft`.
    pub kv_prefix: String,
    /// Blocking query `wait` (default 5 min, Consul's default; at most 10 min).
    pub wait: Duration,
    /// Least time between two queries of one watch (default 200 ms: at most 5 per second).
    pub min_query_interval: Duration,
    /// First retry delay bound (default 100 ms); doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Upper bound on the retry delay (default 10 s).
    pub backoff_max: Duration,
    /// Connection timeout, and the timeout of a non-blocking request (default 5 s).
    pub request_timeout: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            address: "http://127.0.0.1:8500".to_string(),
            token: None,
            datacenter: None,
            tls: TlsFiles::default(),
            service_tags: Vec::new(),
            service_names: Vec::new(),
            warning_as: WarningAs::Healthy,
            kv_prefix: "weft".to_string(),
            wait: Duration::from_secs(300),
            min_query_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the options are unusable, or why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("Consul address {url:?} is invalid: {reason}")]
    BadAddress { url: String, reason: String },
    #[error("{0}")]
    TlsMismatch(String),
    #[error("cannot read Consul TLS file {}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Consul TLS file {} is not usable: {source}", path.display())]
    TlsPem {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("--consul-cert and --consul-key go together: one is set without the other")]
    TlsHalfIdentity,
    #[error("Consul KV prefix {0:?} must be non-empty and not start or end with '/'")]
    BadPrefix(String),
    #[error("Consul wait {0:?} must be between 1ms and 10min")]
    BadWait(Duration),
    #[error("service name {0:?} is invalid (1-253 of [A-Za-z0-9._-], alphanumeric at both ends)")]
    BadServiceName(String),
    #[error("building the HTTP client for Consul {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Consul request to {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Consul answered {url} with status {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

impl ConsulOptions {
    /// Checks what can be checked without a server, and builds the HTTP client. The binary
    /// calls it at startup and refuses to start on an error; [`ConsulSource::run`] calls it too
    /// and, on an error, never syncs (so the control plane never becomes ready).
    pub fn validate(&self) -> Result<(), ConsulError> {
        self.client().map(|_| ())
    }

    fn base_url(&self) -> Result<String, ConsulError> {
        let url = reqwest::Url::parse(&self.address).map_err(|e| ConsulError::BadAddress {
            url: self.address.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConsulError::BadAddress {
                url: self.address.clone(),
                reason: "expected http://host:port or https://host:port".to_string(),
            });
        }
        Ok(self.address.trim_end_matches('/').to_string())
    }

    fn client(&self) -> Result<reqwest::Client, ConsulError> {
        let base = self.base_url()?;
        let https = base.starts_with("https://");
        let tls = &self.tls;
        let any_tls = tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
        if any_tls && !https {
            return Err(ConsulError::TlsMismatch(
                "TLS files are set, so the Consul address must be https://".to_string(),
            ));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConsulError::TlsHalfIdentity);
        }
        let p = &self.kv_prefix;
        if p.is_empty() || p.starts_with('/') || p.ends_with('/') {
            return Err(ConsulError::BadPrefix(p.clone()));
        }
        if self.wait.is_zero() || self.wait > Duration::from_secs(600) {
            return Err(ConsulError::BadWait(self.wait));
        }
        if let Some(bad) = self
            .service_names
            .iter()
            .find(|n| !schema::is_valid_name(n))
        {
            return Err(ConsulError::BadServiceName(bad.clone()));
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ConsulError::TlsFile {
                path: path.clone(),
                source,
            })
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.request_timeout)
            // Blocking queries idle for minutes; keep the pool's connections for reuse.
            .pool_idle_timeout(Duration::from_secs(90))
            .use_rustls_tls();
        if let Some(ca) = &tls.ca {
            let cert = reqwest::Certificate::from_pem(&read(ca)?).map_err(|source| {
                ConsulError::TlsPem {
                    path: ca.clone(),
                    source,
                }
            })?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|source| ConsulError::TlsPem {
                path: cert.clone(),
                source,
            })?;
            builder = builder.identity(id);
        }
        builder
            .build()
            .map_err(|source| ConsulError::Client { url: base, source })
    }
}

/// The counters and gauges of one source; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct ConsulMetrics {
    queries: Counter,
    index_resets: Counter,
    errors: Counter,
    invalid_values: Counter,
    connected: Gauge,
}

impl ConsulMetrics {
    pub fn queries(&self) -> u64 {
        self.queries.get()
    }
    pub fn index_resets(&self) -> u64 {
        self.index_resets.get()
    }
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }
    pub fn invalid_values(&self) -> u64 {
        self.invalid_values.get()
    }
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }
}

/// Why a service is watched: by name (all instances) or by tag (only tagged instances).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    All,
    Tagged,
}

struct Watched {
    task: JoinHandle<()>,
    generation: u64,
    selection: Selection,
    /// `None` until the first answer.
    entries: Option<Vec<HealthEntry>>,
}

/// See the crate documentation.
#[derive(Debug)]
pub struct ConsulSource {
    opts: ConsulOptions,
    source: SourceHandle,
    metrics: ConsulMetrics,
}

impl ConsulSource {
    pub fn new(opts: ConsulOptions, source: SourceHandle) -> Self {
        ConsulSource {
            opts,
            source,
            metrics: ConsulMetrics::default(),
        }
    }

    /// A handle on this source's metrics (for tests and status pages).
    pub fn metrics(&self) -> ConsulMetrics {
        self.metrics.clone()
    }

    /// Registers `weft_consul_queries_total`, `weft_consul_index_resets_total`,
    /// `weft_consul_errors_total`, `weft_consul_invalid_values_total` and
    /// `weft_consul_connected`.
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.metrics;
        // prometheus-client appends `_total` to counter names.
        reg.register(
            "weft_consul_queries",
            "HTTP queries sent to Consul (blocking or not)",
            m.queries.clone(),
        );
        reg.register(
            "weft_consul_index_resets",
            "Blocking loops restarted because Consul's index went backwards",
            m.index_resets.clone(),
        );
        reg.register(
            "weft_consul_errors",
            "Consul queries that failed (connection, status or undecodable answer)",
            m.errors.clone(),
        );
        reg.register(
            "weft_consul_invalid_values",
            "Consul KV values or instances rejected by the schema",
            m.invalid_values.clone(),
        );
        reg.register(
            "weft_consul_connected",
            "1 while the last query to Consul succeeded, else 0",
            m.connected.clone(),
        );
    }

    /// Runs until shutdown: keeps the registry equal to Consul's state, through failures.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let (client, base) = match self
            .opts
            .client()
            .and_then(|c| Ok((c, self.opts.base_url()?)))
        {
            Ok(x) => x,
            Err(e) => {
                // Never syncing keeps the control plane unready, which is the visible failure.
                tracing::error!(error = %e, "Consul source not started");
                self.source.set_info("error", e.to_string());
                shutdown.await;
                return;
            }
        };
        self.source.set_info("address", base.clone());
        let ctx = Arc::new(Ctx {
            client,
            opts: self.opts.clone(),
            metrics: self.metrics.clone(),
            base,
        });
        let mut state = State {
            ctx: Arc::clone(&ctx),
            source: self.source.clone(),
            metrics: self.metrics.clone(),
            tx: None,
            catalog: None,
            watched: BTreeMap::new(),
            next_generation: 0,
            kv: None,
            mirror: Mirror::default(),
        };
        // Bounded: a flood of answers slows the watches down rather than growing memory.
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let fixed = [
            tokio::spawn(watch::run(Arc::clone(&ctx), Kind::Catalog, tx.clone())),
            tokio::spawn(watch::run(Arc::clone(&ctx), Kind::Kv, tx.clone())),
        ];
        state.tx = Some(tx);
        loop {
            let first = tokio::select! {
                biased;
                () = &mut shutdown => break,
                m = rx.recv() => m,
            };
            let Some(first) = first else { break };
            state.handle(first);
            // Fold whatever else is queued into the same update.
            while let Ok(m) = rx.try_recv() {
                state.handle(m);
            }
            state.publish();
        }
        for t in fixed {
            t.abort();
        }
        for w in state.watched.values() {
            w.task.abort();
        }
    }
}

struct State {
    ctx: Arc<Ctx>,
    source: SourceHandle,
    metrics: ConsulMetrics,
    tx: Option<mpsc::Sender<Msg>>,
    /// Service name -> tags, once the catalog answered.
    catalog: Option<BTreeMap<String, Vec<String>>>,
    watched: BTreeMap<String, Watched>,
    next_generation: u64,
    kv: Option<Vec<KvPair>>,
    /// What the hub holds from this source, and which keys are reported invalid.
    mirror: Mirror,
}

impl State {
    fn selection(&self, name: &str, tags: &[String]) -> Option<Selection> {
        let opts = &self.ctx.opts;
        if opts.service_names.is_empty() && opts.service_tags.is_empty() {
            // Consul's own servers are not an application service.
            return (name != "consul").then_some(Selection::All);
        }
        if opts.service_names.iter().any(|n| n == name) {
            Some(Selection::All)
        } else if tags.iter().any(|t| opts.service_tags.contains(t)) {
            Some(Selection::Tagged)
        } else {
            None
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Catalog(services, index) => {
                self.source.set_info("catalog_index", index.to_string());
                let mut wanted = BTreeMap::new();
                for (name, tags) in &services {
                    if let Some(sel) = self.selection(name, tags) {
                        wanted.insert(name.clone(), sel);
                    }
                }
                let gone: Vec<String> = self
                    .watched
                    .keys()
                    .filter(|n| !wanted.contains_key(*n))
                    .cloned()
                    .collect();
                for name in gone {
                    if let Some(w) = self.watched.remove(&name) {
                        w.task.abort();
                    }
                }
                for (name, sel) in wanted {
                    if let Some(w) = self.watched.get_mut(&name) {
                        w.selection = sel;
                        continue;
                    }
                    let Some(tx) = self.tx.clone() else { continue };
                    self.next_generation += 1;
                    let generation = self.next_generation;
                    let task = tokio::spawn(watch::run(
                        Arc::clone(&self.ctx),
                        Kind::Health {
                            service: name.clone(),
                            generation,
                        },
                        tx,
                    ));
                    self.watched.insert(
                        name,
                        Watched {
                            task,
                            generation,
                            selection: sel,
                            entries: None,
                        },
                    );
                }
                self.source
                    .set_info("services_watched", self.watched.len().to_string());
                self.catalog = Some(services);
            }
            Msg::Health {
                service,
                generation,
                entries,
            } => {
                // An answer from a watch already stopped (or replaced) is stale.
                if let Some(w) = self.watched.get_mut(&service)
                    && w.generation == generation
                {
                    w.entries = Some(entries);
                }
            }
            Msg::Kv(pairs, index) => {
                self.source.set_info("kv_index", index.to_string());
                self.kv = Some(pairs);
            }
        }
    }

    fn complete(&self) -> bool {
        self.catalog.is_some()
            && self.kv.is_some()
            && self.watched.values().all(|w| w.entries.is_some())
    }

    /// Everything Consul currently says, as objects, and the keys rejected with why.
    fn desired(&self) -> (HashMap<ObjectKey, Object>, BTreeMap<String, String>) {
        let opts = &self.ctx.opts;
        let mut out = HashMap::new();
        let mut errors = BTreeMap::new();
        for (name, w) in &self.watched {
            let Some(entries) = &w.entries else { continue };
            if !schema::is_valid_name(name) {
                errors.insert(
                    format!("service/{name}"),
                    "service name is invalid (1-253 of [A-Za-z0-9._-], alphanumeric at both ends)"
                        .to_string(),
                );
                continue;
            }
            let mut protocol: Option<Protocol> = None;
            for e in entries {
                if w.selection == Selection::Tagged
                    && !e.tags().iter().any(|t| opts.service_tags.contains(t))
                {
                    continue;
                }
                match (protocol, e.protocol()) {
                    (_, Some(Protocol::Grpc)) => protocol = Some(Protocol::Grpc),
                    (None, p) => protocol = p,
                    _ => {}
                }
                match decode::instance(name, e, opts.warning_as) {
                    Ok(obj) => {
                        out.insert(obj.key(), obj);
                    }
                    Err(reason) => {
                        errors.insert(format!("health/{name}/{}", e.instance_id()), reason);
                    }
                }
            }
            if let Some(protocol) = protocol {
                let obj = Object::Service {
                    name: name.clone(),
                    protocol,
                };
                out.insert(obj.key(), obj);
            }
        }
        // KV after the catalog: an explicit service-config overrides what tags and meta say.
        for pair in self.kv.iter().flatten() {
            match decode::decode_pair(&opts.kv_prefix, pair) {
                Ok(Some(obj)) => {
                    out.insert(obj.key(), obj);
                }
                Ok(None) => {}
                Err((reason, _)) => {
                    errors.insert(pair.key.clone(), reason);
                }
            }
        }
        (out, errors)
    }

    fn publish(&mut self) {
        if !self.mirror.is_synced() && !self.complete() {
            return;
        }
        let (desired, errors) = self.desired();
        let first = !self.mirror.is_synced();
        let (objects, invalid) = (desired.len(), errors.len());
        let reported = self.mirror.publish(&self.source, desired, errors);
        self.metrics.invalid_values.inc_by(reported as u64);
        if first {
            tracing::info!(
                services = self.watched.len(),
                objects,
                invalid,
                "Consul fully read: first sync done"
            );
        }
    }
}
