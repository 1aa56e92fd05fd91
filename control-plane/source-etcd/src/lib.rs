//! The etcd source: keeps the hub's copy of the keys under one prefix equal to etcd's.
//!
//! What it does:
//! - Lists every key under `<prefix>/` at one revision `R` (paged, all pages at the same `R`)
//!   and sends them as one `Init, InitApply*, InitDone` relist; the first one marks the source
//!   synced. It then watches from `R+1` with `progress_notify` and require-leader.
//! - Decodes keys by shape (`services/<svc>/<id>`, `service-config/<svc>`, `routes/<name>`,
//!   `policies/<name>`; see `docs/sources/etcd.md`) and values with `weft_registry::schema`.
//!   An invalid key or value is skipped and reported under its key (`report_error`); a key that
//!   was valid and turns invalid is *removed*, because etcd is the source of truth and serving a
//!   value etcd no longer holds would be a ghost.
//! - Survives failures without touching the hub: on any error or disconnect the last known state
//!   keeps serving; it reconnects with exponential backoff and full jitter and resumes the watch
//!   at the last revision seen + 1. A compacted resume revision, a server revision behind the
//!   one seen, or a changed cluster id (etcd wiped and recreated) makes it relist instead.
//! - Detects a silently stalled watch: it asks for a progress notification every
//!   `stall_timeout / 2` and tears the connection down when neither an event nor a progress
//!   response arrived within `stall_timeout`.
//!
//! What it does not do: write to etcd (registration is someone else's job), keep leases alive,
//! merge with other sources (the hub does that). TLS (server verification with a CA, optionally
//! mTLS with a client certificate) is rustls through etcd-client's `tls` feature; `https://`
//! endpoints and TLS files go together, so a half-configured TLS setup is an error at startup
//! rather than a silent plaintext connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse,
    WatchStream,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use rand::Rng;
use tokio::time::{Instant, MissedTickBehavior};
use weft_registry::kv::{self, KeyShape, decode_value};
use weft_registry::{Object, ObjectKey, SourceEvent, SourceHandle};

/// Keys fetched per range page. Small enough that a page of values near etcd's default request
/// limit (1.5 MiB) stays below [`MAX_DECODE_BYTES`].
const PAGE_SIZE: i64 = 64;

/// Largest gRPC message accepted from etcd. tonic's 4 MiB default would make one page holding a
/// few large (even if invalid) values fail the whole relist forever.
const MAX_DECODE_BYTES: usize = 128 << 20;

/// Files for a TLS connection to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the PEM files into etcd-client's TLS options.
    pub fn load(&self) -> Result<etcd_client::TlsOptions, EtcdError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                path: path.clone(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err(EtcdError::TlsHalfIdentity),
        }
        Ok(tls)
    }
}

/// How to reach etcd and how patiently.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash; default `/weft`.
    pub prefix: String,
    /// User and password.
    pub user: Option<(String, String)>,
    pub tls: Option<TlsFiles>,
    /// First reconnect delay bound (default 100 ms); doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Upper bound on the reconnect delay (default 10 s).
    pub backoff_max: Duration,
    /// No event and no progress response within this long tears the watch down (default 10 s).
    pub stall_timeout: Duration,
    /// Bound on establishing a connection and on each range request (default 3 s).
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: "/weft".to_string(),
            user: None,
            tls: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl EtcdOptions {
    /// Checks what can be checked without a server. The binary should call this at startup and
    /// refuse to start on an error; [`EtcdSource::run`] also checks and, on an error, never
    /// syncs (so the control plane never becomes ready on a half-configured source).
    pub fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&self.tls, https) {
            (Some(_), n) if n != self.endpoints.len() => {
                return Err(EtcdError::TlsMismatch(
                    "TLS files are set, so every etcd endpoint must be https://".to_string(),
                ));
            }
            (None, n) if n > 0 => {
                return Err(EtcdError::TlsMismatch(
                    "https:// etcd endpoints need a CA to verify them (--etcd-ca)".to_string(),
                ));
            }
            _ => {}
        }
        if let Some(tls) = &self.tls {
            tls.load()?;
        }
        if self.prefix.ends_with('/') {
            return Err(EtcdError::BadPrefix(self.prefix.clone()));
        }
        Ok(())
    }
}

/// Why a session with etcd ended, or why the options are unusable.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("{0}")]
    TlsMismatch(String),
    #[error("cannot read etcd TLS file {}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--etcd-cert and --etcd-key go together: one is set without the other")]
    TlsHalfIdentity,
    #[error("etcd prefix {0:?} must not end with '/'")]
    BadPrefix(String),
    #[error("etcd request failed: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd did not answer {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("etcd response without a header")]
    NoHeader,
    #[error("etcd closed the watch stream")]
    WatchClosed,
    #[error("etcd canceled the watch: {0}")]
    WatchCanceled(String),
    #[error("no watch event or progress response for {0:?}; assuming a stalled connection")]
    Stalled(Duration),
}

/// The counters and gauges of one source; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct EtcdMetrics {
    events_applied: Counter,
    relists: Counter,
    reconnects: Counter,
    invalid_values: Counter,
    revision: Gauge,
    connected: Gauge,
}

impl EtcdMetrics {
    pub fn events_applied(&self) -> u64 {
        self.events_applied.get()
    }
    pub fn relists(&self) -> u64 {
        self.relists.get()
    }
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }
    pub fn invalid_values(&self) -> u64 {
        self.invalid_values.get()
    }
    pub fn revision(&self) -> i64 {
        self.revision.get()
    }
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }
}

/// See the crate documentation.
#[derive(Debug)]
pub struct EtcdSource {
    opts: EtcdOptions,
    source: SourceHandle,
    metrics: EtcdMetrics,
    /// Where the watch resumes from: the last revision whose events were all applied. `None`
    /// until the first list, and after anything that forces a relist.
    revision: Option<i64>,
    /// The cluster the revision belongs to; a different id means a different etcd.
    cluster_id: Option<u64>,
    /// Keys currently reported invalid, with why, so a relist reports only what changed.
    errors: BTreeMap<String, String>,
}

/// How a session ended without an error.
enum SessionEnd {
    /// The resume revision is gone; list again at once (not a failure, so no backoff).
    Relist,
}

impl EtcdSource {
    pub fn new(opts: EtcdOptions, source: SourceHandle) -> Self {
        EtcdSource {
            opts,
            source,
            metrics: EtcdMetrics::default(),
            revision: None,
            cluster_id: None,
            errors: BTreeMap::new(),
        }
    }

    /// A handle on this source's metrics (for tests and status pages).
    pub fn metrics(&self) -> EtcdMetrics {
        self.metrics.clone()
    }

    /// Registers `weft_etcd_events_applied_total`, `weft_etcd_relists_total`,
    /// `weft_etcd_reconnects_total`, `weft_etcd_invalid_values_total`, `weft_etcd_revision` and
    /// `weft_etcd_connected`.
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.metrics;
        // prometheus-client appends `_total` to counter names.
        reg.register(
            "weft_etcd_events_applied",
            "Watch events from etcd applied to the registry",
            m.events_applied.clone(),
        );
        reg.register(
            "weft_etcd_relists",
            "Full lists of the etcd prefix (startup, compaction, etcd recreated)",
            m.relists.clone(),
        );
        reg.register(
            "weft_etcd_reconnects",
            "Sessions with etcd that ended in an error and were retried",
            m.reconnects.clone(),
        );
        reg.register(
            "weft_etcd_invalid_values",
            "etcd keys or values rejected by the schema",
            m.invalid_values.clone(),
        );
        reg.register(
            "weft_etcd_revision",
            "etcd revision up to which the registry is current",
            m.revision.clone(),
        );
        reg.register(
            "weft_etcd_connected",
            "1 while a watch on etcd is established, else 0",
            m.connected.clone(),
        );
    }

    /// Runs until shutdown: keeps the registry equal to etcd's state, through failures.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        if let Err(e) = self.opts.validate() {
            // Never syncing keeps the control plane unready, which is the visible failure.
            tracing::error!(error = %e, "etcd source not started");
            self.source.set_info("error", e.to_string());
            shutdown.await;
            return;
        }
        self.source
            .set_info("endpoints", self.opts.endpoints.join(","));
        let mut attempt: u32 = 0;
        loop {
            let result = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                r = self.session(&mut attempt) => r,
            };
            self.metrics.connected.set(0);
            match result {
                Ok(SessionEnd::Relist) => {
                    self.revision = None;
                    continue;
                }
                Err(e) => {
                    self.metrics.reconnects.inc();
                    let delay = backoff(
                        self.opts.backoff_initial,
                        self.opts.backoff_max,
                        attempt,
                        &mut rand::rng(),
                    );
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        error = %e,
                        retry_in = ?delay,
                        resume_revision = ?self.revision.map(|r| r + 1),
                        "etcd session failed; registry keeps its last known state"
                    );
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection: (re)list if needed, then watch until something breaks. `attempt` is reset
    /// once the watch is established, so backoff grows only over consecutive failures.
    async fn session(&mut self, attempt: &mut u32) -> Result<SessionEnd, EtcdError> {
        let mut client = self.connect().await?;
        let prefix = format!("{}/", self.opts.prefix);
        let range_end = prefix_end(prefix.as_bytes());

        match self.revision {
            None => self.relist(&client, &prefix, &range_end).await?,
            Some(seen) => {
                // A cheap request just for the header: is this still the etcd we watched?
                let resp = self
                    .timed(
                        "a revision check",
                        client.get(
                            prefix.as_bytes(),
                            Some(
                                GetOptions::new()
                                    .with_range(range_end.clone())
                                    .with_count_only(),
                            ),
                        ),
                    )
                    .await?;
                let header = resp.header().ok_or(EtcdError::NoHeader)?;
                let recreated = self.cluster_id.is_some_and(|id| id != header.cluster_id());
                if header.revision() < seen || recreated {
                    tracing::warn!(
                        server_revision = header.revision(),
                        seen_revision = seen,
                        recreated,
                        "etcd is behind what was seen (wiped or recreated); relisting"
                    );
                    self.relist(&client, &prefix, &range_end).await?;
                }
            }
        }
        let Some(start) = self.revision.map(|r| r + 1) else {
            return Err(EtcdError::NoHeader);
        };

        let opts = WatchOptions::new()
            .with_range(range_end.clone())
            .with_start_revision(start)
            .with_progress_notify();
        let mut watch: WatchStream = self
            .timed(
                "a watch request",
                client
                    .watch_client()
                    .max_decoding_message_size(MAX_DECODE_BYTES)
                    .watch(prefix.as_bytes(), Some(opts)),
            )
            .await?;
        tracing::info!(start_revision = start, "etcd watch started");

        let stall = self.opts.stall_timeout.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(stall / 2);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick fires at once; the watch was just created.
        tick.tick().await;
        let mut last_activity = Instant::now();
        loop {
            tokio::select! {
                msg = watch.message() => {
                    let resp = msg?.ok_or(EtcdError::WatchClosed)?;
                    last_activity = Instant::now();
                    if resp.created() {
                        self.metrics.connected.set(1);
                        *attempt = 0;
                    }
                    if let Some(end) = self.handle_watch_response(resp)? {
                        return Ok(end);
                    }
                }
                _ = tick.tick() => {
                    if last_activity.elapsed() >= stall {
                        return Err(EtcdError::Stalled(stall));
                    }
                    watch.request_progress().await?;
                }
            }
        }
    }

    async fn connect(&self) -> Result<Client, EtcdError> {
        let mut co = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(self.opts.connect_timeout)
            // HTTP/2 pings notice a dead peer even when no watch event is due.
            .with_keep_alive(self.opts.stall_timeout / 2, self.opts.connect_timeout);
        if let Some((u, p)) = &self.opts.user {
            co = co.with_user(u.clone(), p.clone());
        }
        if let Some(tls) = &self.opts.tls {
            co = co.with_tls(tls.load()?);
        }
        self.timed(
            "a connection",
            Client::connect(self.opts.endpoints.clone(), Some(co)),
        )
        .await
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        let timeout = self.opts.connect_timeout.max(Duration::from_millis(100));
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r.map_err(EtcdError::from),
            Err(_) => Err(EtcdError::Timeout { what, timeout }),
        }
    }

    /// Lists the prefix at one revision and replaces what the hub holds for this source.
    async fn relist(
        &mut self,
        client: &Client,
        prefix: &str,
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let mut revision = 0i64;
        let mut cluster_id = 0u64;
        let mut start = prefix.as_bytes().to_vec();
        let mut kvs: Vec<KeyValue> = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(range_end.to_vec())
                .with_limit(PAGE_SIZE);
            if revision > 0 {
                // Every page at the first page's revision: one consistent snapshot. If that
                // revision gets compacted mid-list the request fails and the next session
                // lists afresh.
                opts = opts.with_revision(revision);
            }
            let mut resp = self
                .timed("a range request", kv.get(start.clone(), Some(opts)))
                .await?;
            let header = resp.header().ok_or(EtcdError::NoHeader)?;
            if revision == 0 {
                revision = header.revision();
                cluster_id = header.cluster_id();
            }
            let more = resp.more();
            let page = resp.take_kvs();
            match page.last() {
                Some(last) if more => {
                    // The next key after `last`.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => {
                    kvs.extend(page);
                    break;
                }
            }
            kvs.extend(page);
        }

        let mut events = Vec::with_capacity(kvs.len() + 2);
        events.push(SourceEvent::Init);
        let mut errors = BTreeMap::new();
        for kv in &kvs {
            match decode(&self.opts.prefix, kv.key(), kv.value()) {
                Decoded::Object(obj) => events.push(SourceEvent::InitApply(*obj)),
                Decoded::Invalid { key, reason, .. } => {
                    errors.insert(key, reason);
                }
            }
        }
        events.push(SourceEvent::InitDone);
        let objects = events.len() - 2;
        self.source.apply(events);
        for key in self.errors.keys() {
            if !errors.contains_key(key) {
                self.source.clear_error(key);
            }
        }
        for (key, reason) in &errors {
            if self.errors.get(key) != Some(reason) {
                self.report(key, reason);
            }
        }
        self.errors = errors;
        self.metrics.relists.inc();
        self.cluster_id = Some(cluster_id);
        self.set_revision(revision);
        tracing::info!(
            revision,
            objects,
            invalid = self.errors.len(),
            "etcd prefix listed"
        );
        Ok(())
    }

    /// Applies one watch response. Returns how the session ends, if it does.
    fn handle_watch_response(
        &mut self,
        resp: WatchResponse,
    ) -> Result<Option<SessionEnd>, EtcdError> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    compact_revision = resp.compact_revision(),
                    resume_revision = ?self.revision.map(|r| r + 1),
                    "etcd compacted past the watch revision; relisting"
                );
                return Ok(Some(SessionEnd::Relist));
            }
            let reason = resp.cancel_reason().to_string();
            if reason.contains("compacted") {
                return Ok(Some(SessionEnd::Relist));
            }
            return Err(EtcdError::WatchCanceled(reason));
        }
        let evs = resp.events();
        if evs.is_empty() {
            // A progress response: every event up to its header revision has been sent. A
            // `created` response carries the current revision too but promises nothing.
            if !resp.created()
                && let Some(h) = resp.header()
                && self.revision.is_some_and(|r| h.revision() > r)
            {
                self.set_revision(h.revision());
            }
            return Ok(None);
        }
        let mut batch = Vec::with_capacity(evs.len());
        let mut max_rev = self.revision.unwrap_or(0);
        for ev in evs {
            let Some(kv) = ev.kv() else { continue };
            max_rev = max_rev.max(kv.mod_revision());
            match ev.event_type() {
                EventType::Put => match decode(&self.opts.prefix, kv.key(), kv.value()) {
                    Decoded::Object(obj) => {
                        self.fix(&key_string(kv.key()));
                        batch.push(SourceEvent::Apply(*obj));
                    }
                    Decoded::Invalid {
                        key,
                        reason,
                        object,
                    } => {
                        // etcd no longer holds the valid value: serving it would be a ghost.
                        if let Some(k) = object {
                            batch.push(SourceEvent::Delete(k));
                        }
                        if self.errors.get(&key) != Some(&reason) {
                            self.report(&key, &reason);
                            self.errors.insert(key, reason);
                        }
                    }
                },
                EventType::Delete => {
                    let key = key_string(kv.key());
                    self.fix(&key);
                    if let Ok(k) = decode_key(&self.opts.prefix, kv.key()) {
                        batch.push(SourceEvent::Delete(k.object_key()));
                    }
                }
            }
        }
        let n = batch.len() as u64;
        self.source.apply(batch);
        self.metrics.events_applied.inc_by(n);
        self.set_revision(max_rev);
        Ok(None)
    }

    fn report(&self, key: &str, reason: &str) {
        self.metrics.invalid_values.inc();
        self.source.report_error(key, reason);
    }

    /// Clears a key's error, if it had one.
    fn fix(&mut self, key: &str) {
        if self.errors.remove(key).is_some() {
            self.source.clear_error(key);
        }
    }

    fn set_revision(&mut self, revision: i64) {
        self.revision = Some(revision);
        self.metrics.revision.set(revision);
        self.source.set_info("revision", revision.to_string());
    }
}

/// Delay before reconnect attempt `attempt` (0-based): uniform in `[0, min(max, initial*2^n)]`
/// ("full jitter"), so many control planes restarting with one etcd do not retry in lockstep.
fn backoff(initial: Duration, max: Duration, attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = initial
        .checked_mul(2u32.saturating_pow(attempt.min(31)))
        .unwrap_or(max)
        .min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: everything from the prefix on.
    vec![0]
}

fn key_string(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

enum Decoded {
    // Boxed: a Policy makes Object several hundred bytes, most keys decode to small ones.
    Object(Box<Object>),
    Invalid {
        /// The etcd key as text, as errors are listed.
        key: String,
        reason: String,
        /// What the key would name if its shape is valid, so a previous valid value can go.
        object: Option<ObjectKey>,
    },
}

/// The shared key-value layout (`weft_registry::kv`), with instances: etcd holds them.
fn decode_key(prefix: &str, key: &[u8]) -> Result<KeyShape, String> {
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
    kv::decode_key(prefix, key, kv::Instances::Held)
}

/// One key-value pair as a relist or watch event decodes it: the object, or the key as text,
/// why it was refused and what the key names when its shape is valid. Public so the fuzz
/// targets (tests/fuzz) reach it without an etcd.
#[doc(hidden)]
pub fn decode_pair(
    prefix: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Object, (String, String, Option<ObjectKey>)> {
    match decode(prefix, key, value) {
        Decoded::Object(obj) => Ok(*obj),
        Decoded::Invalid {
            key,
            reason,
            object,
        } => Err((key, reason, object)),
    }
}

fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Decoded {
    let key_text = key_string(key);
    let shape = match decode_key(prefix, key) {
        Ok(s) => s,
        Err(reason) => {
            return Decoded::Invalid {
                key: key_text,
                reason,
                object: None,
            };
        }
    };
    match decode_value(&key_text, &shape, value) {
        Ok(obj) => Decoded::Object(Box::new(obj)),
        Err(reason) => Decoded::Invalid {
            key: key_text,
            reason,
            object: Some(shape.object_key()),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use weft_registry::Protocol;

    #[test]
    fn key_shapes() {
        assert_eq!(
            decode_key("/weft", b"/weft/services/echo/i-1").unwrap(),
            KeyShape::Instance {
                service: "echo".into(),
                id: "i-1".into()
            }
        );
        assert_eq!(
            decode_key("/weft", b"/weft/routes/r1").unwrap(),
            KeyShape::Route("r1".into())
        );
        assert!(
            decode_key("/weft", b"/weft/services/echo")
                .unwrap_err()
                .contains("unknown key shape")
        );
        assert!(decode_key("/weft", b"/weft/services/-x/i").is_err());
        assert!(decode_key("/weft", b"/weft/services/a/").is_err());
        assert!(decode_key("/weft", b"/weftx/routes/a").is_err());
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/weft/"), b"/weft0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut rng = rand::rng();
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(10);
        for attempt in 0..64 {
            let d = backoff(i, m, attempt, &mut rng);
            assert!(d <= m);
            assert!(d <= i * 2u32.saturating_pow(attempt.min(31)));
        }
    }

    #[test]
    fn invalid_values_name_the_problem() {
        let shape = KeyShape::Instance {
            service: "a".into(),
            id: "i".into(),
        };
        let e = decode_value("k", &shape, br#"{"address":"10.0.0.1","port":0}"#).unwrap_err();
        assert!(e.contains("port"), "{e}");
        let e = decode_value("k", &shape, b"\xff\xfe").unwrap_err();
        assert!(e.contains("UTF-8"), "{e}");
        let cfg = KeyShape::ServiceConfig("a".into());
        assert!(decode_value("k", &cfg, br#"{"protocol":"grpc","x":1}"#).is_err());
        assert_eq!(
            decode_value("k", &cfg, br#"{"protocol":"grpc"}"#).unwrap(),
            Object::Service {
                name: "a".into(),
                protocol: Protocol::Grpc
            }
        );
    }

    #[test]
    fn doc_examples_decode() {
        let route = br#"{"name":"echo-canary","service":"echo","rules":[{"backends":[{"service":"echo","weight":90},{"service":"echo-v2","weight":10}]}]}"#;
        assert!(matches!(
            decode("/weft", b"/weft/routes/echo-canary", route),
            Decoded::Object(o) if matches!(*o, Object::Route(_))
        ));
        let policy = b"name: echo\nservice: echo\nlb: least_request\n";
        assert!(matches!(
            decode("/weft", b"/weft/policies/echo", policy),
            Decoded::Object(o) if matches!(*o, Object::Policy(_))
        ));
        let ep = br#"{"address":"10.0.0.6","port":8080,"weight":3,"zone":"eu-1a"}"#;
        assert!(matches!(
            decode("/weft", b"/weft/services/echo/static-1", ep),
            Decoded::Object(o) if matches!(*o, Object::Instance { .. })
        ));
    }

    #[test]
    fn decode_pair_names_the_key_and_what_it_would_name() {
        let (key, reason, object) = decode_pair("/weft", b"/weft/routes/r1", b"{nope").unwrap_err();
        assert_eq!(key, "/weft/routes/r1");
        assert!(!reason.is_empty());
        assert_eq!(object, Some(ObjectKey::Route("r1".into())));
        let (_, _, object) = decode_pair("/weft", b"/weft/other", b"{}").unwrap_err();
        assert_eq!(object, None);
        assert!(decode_pair("/weft", b"/weft/service-config/echo", b"{}").is_ok());
    }
}
