//! Load generators: open-loop at a fixed rate (for latency) and closed-loop (for saturation),
//! over HTTP/1.1 keep-alive and gRPC unary (`weft.demo.v1.Echo`).
//!
//! The fixed-rate generator schedules request `i` at `start + i / rate` and measures each
//! latency from that scheduled time, not from when it was sent: a stalled proxy then shows as
//! the queueing delay users would see, instead of silently lowering the offered load
//! ("coordinated omission", as wrk2 and oha correct for).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::Mutex;
use weft_proto::demo::v1::EchoRequest;
use weft_proto::demo::v1::echo_client::EchoClient;

use crate::report::{Latency, latency_histogram};

/// What each request does.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST`/`GET` `http://<addr><path>` with `Host: <host>` over HTTP/1.1 keep-alive; a
    /// non-empty body makes it a POST.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
        body: Bytes,
    },
    /// `weft.demo.v1.Echo/Echo` over one HTTP/2 connection to `addr`, with `:authority` set to
    /// `authority` (the service name, which is what a sidecar routes on).
    Grpc { addr: SocketAddr, authority: String },
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub sent: u64,
    /// Requests that failed (connect error, timeout, non-2xx HTTP status, gRPC error).
    pub errors: u64,
    pub elapsed_s: f64,
    /// Completed (successful) requests per second.
    pub throughput: f64,
    pub latency: Latency,
    /// Share of successful requests slower than each threshold, keyed by milliseconds.
    pub slower_than: BTreeMap<u64, f64>,
    /// HTTP status codes seen (gRPC: 200 for OK, 500 otherwise).
    pub statuses: BTreeMap<u16, u64>,
}

/// Share of recorded requests slower than `threshold`.
pub fn share_slower(h: &Histogram<u64>, threshold: Duration) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let limit = threshold.as_micros() as u64;
    let slow: u64 = h
        .iter_recorded()
        .filter(|v| v.value_iterated_to() > limit)
        .map(|v| v.count_at_value())
        .sum();
    slow as f64 / h.len() as f64
}

struct Recorder {
    hist: Histogram<u64>,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
}

impl Recorder {
    fn new() -> Result<Self> {
        Ok(Self {
            hist: latency_histogram()?,
            errors: 0,
            statuses: BTreeMap::new(),
        })
    }

    fn record(&mut self, outcome: std::result::Result<u16, ()>, latency: Duration) {
        match outcome {
            Ok(status) => {
                *self.statuses.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    self.hist
                        .saturating_record(latency.as_micros().max(1) as u64);
                } else {
                    self.errors += 1;
                }
            }
            Err(()) => self.errors += 1,
        }
    }

    fn finish(self, sent: u64, elapsed: Duration, thresholds: &[Duration]) -> LoadResult {
        let secs = elapsed.as_secs_f64().max(1e-9);
        LoadResult {
            sent,
            errors: self.errors,
            elapsed_s: secs,
            throughput: self.hist.len() as f64 / secs,
            latency: Latency::of(&self.hist),
            slower_than: thresholds
                .iter()
                .map(|t| (t.as_millis() as u64, share_slower(&self.hist, *t)))
                .collect(),
            statuses: self.statuses,
        }
    }
}

/// A connection pool for one target, shared by all requests of a run.
// One per run, cloned per request: boxing the larger variant would add an allocation per
// request to save a few hundred bytes once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Sender {
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        uri: http::Uri,
        host: String,
        body: Bytes,
    },
    Grpc(EchoClient<tonic::transport::Channel>),
}

impl Sender {
    async fn connect(target: &Target) -> Result<Self> {
        match target {
            Target::Http {
                addr,
                host,
                path,
                body,
            } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(usize::MAX)
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(connector);
                let uri: http::Uri = format!("http://{addr}{path}")
                    .parse()
                    .with_context(|| format!("bad path {path:?}"))?;
                Ok(Sender::Http {
                    client,
                    uri,
                    host: host.clone(),
                    body: body.clone(),
                })
            }
            Target::Grpc { addr, authority } => {
                let origin: http::Uri = format!("http://{authority}")
                    .parse()
                    .with_context(|| format!("bad authority {authority:?}"))?;
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .origin(origin)
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                Ok(Sender::Grpc(EchoClient::new(channel)))
            }
        }
    }

    /// Sends one request; `Ok(status)` when a response arrived.
    async fn send(&self) -> std::result::Result<u16, ()> {
        match self {
            Sender::Http {
                client,
                uri,
                host,
                body,
            } => {
                let method = if body.is_empty() {
                    http::Method::GET
                } else {
                    http::Method::POST
                };
                let req = http::Request::builder()
                    .method(method)
                    .uri(uri.clone())
                    .header(http::header::HOST, host.as_str())
                    .body(Full::new(body.clone()))
                    .map_err(|_| ())?;
                let resp = client.request(req).await.map_err(|_| ())?;
                let status = resp.status().as_u16();
                // Read the whole body: the request is done when the last byte arrived.
                resp.into_body().collect().await.map_err(|_| ())?;
                Ok(status)
            }
            Sender::Grpc(client) => {
                let mut c = client.clone();
                match c
                    .echo(EchoRequest {
                        message: "bench".into(),
                    })
                    .await
                {
                    Ok(_) => Ok(200),
                    Err(_) => Ok(500),
                }
            }
        }
    }
}

/// Open-loop settings.
#[derive(Debug, Clone)]
pub struct FixedRate {
    /// Requests per second offered, whatever the latency.
    pub rate: u32,
    pub duration: Duration,
    /// Requests sent (and not measured) before the measured window, to open connections and
    /// let the proxy settle.
    pub warmup: Duration,
    /// A request with no response after this long counts as an error.
    pub timeout: Duration,
    /// Latency thresholds whose "share slower than" is reported.
    pub thresholds: Vec<Duration>,
}

impl Default for FixedRate {
    fn default() -> Self {
        Self {
            rate: 1_000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            thresholds: vec![Duration::from_secs(1)],
        }
    }
}

/// Offers `cfg.rate` requests per second to `target` for `cfg.duration` (after a warm-up) and
/// reports latency measured from each request's scheduled start.
pub async fn fixed_rate(target: &Target, cfg: &FixedRate) -> Result<LoadResult> {
    if cfg.rate == 0 {
        bail!("rate must be positive");
    }
    let sender = Sender::connect(target).await?;
    run_open_loop(&sender, cfg).await
}

/// One uninterrupted schedule: the warm-up's requests are sent but not recorded, and the
/// measured window follows without a pause (waiting for slow warm-up requests to finish
/// first would let a balancer's state age in between).
async fn run_open_loop(sender: &Sender, cfg: &FixedRate) -> Result<LoadResult> {
    let rate = cfg.rate;
    let timeout = cfg.timeout;
    let total = ((cfg.warmup + cfg.duration).as_secs_f64() * f64::from(rate)).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let rec = Arc::new(Mutex::new(Recorder::new()?));
    let start = Instant::now();
    let measured_from = start + cfg.warmup;
    let mut measured = 0u64;
    // tokio's timer rounds every deadline up to the next millisecond, which would add up to a
    // millisecond of the generator's own lateness to latencies measured in tens of
    // microseconds. A plain thread sleeps to within tens of microseconds (hrtimers) and hands
    // each due request to the runtime over a channel, which wakes it at once.
    let (due_tx, mut due) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let ticker = std::thread::Builder::new()
        .name("load-ticker".into())
        .spawn(move || {
            for i in 0..total {
                let scheduled = start + period.mul_f64(i as f64);
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                if due_tx.send(scheduled).is_err() {
                    break;
                }
            }
        })
        .context("starting the load ticker thread")?;
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(scheduled) = due.recv().await {
        let sender = sender.clone();
        let rec = rec.clone();
        let record = scheduled >= measured_from;
        measured += u64::from(record);
        tasks.spawn(async move {
            let outcome = match tokio::time::timeout(timeout, sender.send()).await {
                Ok(o) => o,
                Err(_) => Err(()),
            };
            let latency = scheduled.elapsed();
            if record {
                rec.lock().await.record(outcome, latency);
            }
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    if ticker.join().is_err() {
        bail!("the load ticker thread panicked");
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = measured_from.elapsed();
    let rec = Arc::try_unwrap(rec)
        .map_err(|_| anyhow::anyhow!("recorder still shared"))?
        .into_inner();
    Ok(rec.finish(measured, elapsed, &cfg.thresholds))
}

/// Closed-loop: `concurrency` workers each send the next request as soon as the previous one
/// completed, for `duration`. Measures saturation throughput.
pub async fn closed_loop(
    target: &Target,
    concurrency: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<LoadResult> {
    let sender = Sender::connect(target).await?;
    let rec = Arc::new(Mutex::new(Recorder::new()?));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let sender = sender.clone();
        let rec = rec.clone();
        tasks.spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let outcome = match tokio::time::timeout(timeout, sender.send()).await {
                    Ok(o) => o,
                    Err(_) => Err(()),
                };
                rec.lock().await.record(outcome, t0.elapsed());
                sent += 1;
            }
            sent
        });
    }
    let mut sent = 0;
    while let Some(n) = tasks.join_next().await {
        sent += n.unwrap_or(0);
    }
    let elapsed = start.elapsed();
    let rec = Arc::try_unwrap(rec)
        .map_err(|_| anyhow::anyhow!("recorder still shared"))?
        .into_inner();
    Ok(rec.finish(sent, elapsed, &[]))
}
