//! One blocking-query loop per Consul endpoint watched (the catalog, each service's health,
//! the KV prefix), following Consul's documented client rules for blocking queries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::decode::{HealthEntry, KvPair};
use crate::{ConsulError, ConsulMetrics, ConsulOptions};

/// What a watch reports to the source's main loop.
#[derive(Debug)]
pub(crate) enum Msg {
    Catalog(BTreeMap<String, Vec<String>>, u64),
    Health {
        service: String,
        generation: u64,
        entries: Vec<HealthEntry>,
    },
    Kv(Vec<KvPair>, u64),
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Catalog,
    Health { service: String, generation: u64 },
    Kv,
}

impl Kind {
    fn describe(&self) -> String {
        match self {
            Kind::Catalog => "catalog services".to_string(),
            Kind::Health { service, .. } => format!("health of service {service}"),
            Kind::Kv => "KV prefix".to_string(),
        }
    }
}

/// What every watch shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) client: reqwest::Client,
    pub(crate) opts: ConsulOptions,
    pub(crate) metrics: ConsulMetrics,
    /// The base URL without a trailing slash.
    pub(crate) base: String,
}

struct Answer {
    status: u16,
    index: Option<u64>,
    body: Bytes,
}

impl Ctx {
    async fn fetch(
        &self,
        path: &str,
        extra: &[(&str, String)],
        index: u64,
        wait: Duration,
    ) -> Result<Answer, ConsulError> {
        let url = format!("{}{path}", self.base);
        let mut query: Vec<(&str, String)> = extra.to_vec();
        if let Some(dc) = &self.opts.datacenter {
            query.push(("dc", dc.clone()));
        }
        // Consul may add up to wait/16 of its own jitter before answering.
        let mut timeout = self.opts.request_timeout;
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", wait.as_millis())));
            timeout += wait + wait / 16;
        }
        let mut req = self.client.get(&url).query(&query).timeout(timeout);
        if let Some(token) = &self.opts.token {
            req = req.header("X-Consul-Token", token);
        }
        let resp = req.send().await.map_err(|source| ConsulError::Request {
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = resp.bytes().await.map_err(|source| ConsulError::Request {
            url: url.clone(),
            source,
        })?;
        Ok(Answer {
            status,
            index,
            body,
        })
    }
}

/// Delay before retry `attempt` (0-based): uniform in `[0, min(max, initial*2^n)]` ("full
/// jitter"), so many control planes do not retry against one Consul in lockstep.
pub(crate) fn backoff(
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: &mut impl Rng,
) -> Duration {
    let cap = initial
        .checked_mul(2u32.saturating_pow(attempt.min(31)))
        .unwrap_or(max)
        .min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// The next blocking index after an answer, by Consul's rules: an index that went backwards
/// (snapshot restore, a different server) restarts the loop from 0; an index below 1 is
/// treated as 1 so that the next query still blocks. Returns the index and whether it reset.
pub(crate) fn next_index(previous: u64, answered: Option<u64>) -> (u64, bool) {
    let answered = answered.unwrap_or(0);
    if answered < previous {
        (0, true)
    } else {
        (answered.max(1), false)
    }
}

/// The `wait` to ask for: the configured one minus up to 1/16 of it, so that watches started
/// together do not all come back at the same instant.
fn jittered_wait(wait: Duration, rng: &mut impl Rng) -> Duration {
    let spread = u64::try_from((wait / 16).as_millis()).unwrap_or(0);
    wait.saturating_sub(Duration::from_millis(rng.random_range(0..=spread)))
        .max(Duration::from_millis(1))
}

/// Runs one watch until its receiver is gone (the source stopped or dropped this watch).
pub(crate) async fn run(ctx: Arc<Ctx>, kind: Kind, tx: mpsc::Sender<Msg>) {
    let (path, extra): (String, Vec<(&str, String)>) = match &kind {
        Kind::Catalog => ("/v1/catalog/services".to_string(), vec![]),
        Kind::Health { service, .. } => (
            format!(
                "/v1/health/service/{}",
                percent_encoding::utf8_percent_encode(service, percent_encoding::NON_ALPHANUMERIC)
            ),
            vec![],
        ),
        // The trailing slash keeps `weft` from also matching `weftx/...`.
        Kind::Kv => (
            format!("/v1/kv/{}/", ctx.opts.kv_prefix),
            vec![("recurse", String::new())],
        ),
    };
    let mut index: u64 = 0;
    let mut attempt: u32 = 0;
    let mut last_start: Option<Instant> = None;
    let mut warned = false;
    loop {
        // Rate limit: however busy the data, this watch never asks more often than this.
        if let Some(start) = last_start {
            tokio::time::sleep_until(start + ctx.opts.min_query_interval).await;
        }
        last_start = Some(Instant::now());
        let wait = jittered_wait(ctx.opts.wait, &mut rand::rng());
        ctx.metrics.queries.inc();
        let result = ctx.fetch(&path, &extra, index, wait).await.and_then(|a| {
            let ok = a.status == 200 || (a.status == 404 && matches!(kind, Kind::Kv));
            if ok {
                Ok(a)
            } else {
                Err(ConsulError::Status {
                    url: format!("{}{path}", ctx.base),
                    status: a.status,
                    body: String::from_utf8_lossy(&a.body).chars().take(200).collect(),
                })
            }
        });
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                ctx.metrics.errors.inc();
                ctx.metrics.connected.set(0);
                let delay = backoff(
                    ctx.opts.backoff_initial,
                    ctx.opts.backoff_max,
                    attempt,
                    &mut rand::rng(),
                );
                attempt = attempt.saturating_add(1);
                // One warning per outage per watch; with a watch per service, more is noise.
                if warned {
                    tracing::debug!(watch = %kind.describe(), error = %e, retry_in = ?delay, "Consul query failed");
                } else {
                    tracing::warn!(watch = %kind.describe(), error = %e, retry_in = ?delay,
                        "Consul query failed; the registry keeps its last known state");
                    warned = true;
                }
                // A restarted or different Consul may be far behind our index, and a blocking
                // query with it would hang for a whole `wait`: ask afresh instead.
                index = 0;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = tx.closed() => return,
                }
                continue;
            }
        };
        ctx.metrics.connected.set(1);
        if warned {
            tracing::info!(watch = %kind.describe(), "Consul query succeeded again");
            warned = false;
        }
        attempt = 0;
        let previous = index;
        let (next, reset) = next_index(previous, answer.index);
        if reset {
            ctx.metrics.index_resets.inc();
            tracing::info!(watch = %kind.describe(), previous, answered = ?answer.index,
                "Consul index went backwards; restarting the blocking loop from 0");
        }
        index = next;
        // A blocking query that returns with the same index is the normal "nothing changed".
        if previous != 0 && !reset && answer.index == Some(previous) {
            continue;
        }
        let msg = match parse(&kind, &answer, index) {
            Ok(m) => m,
            Err(reason) => {
                ctx.metrics.errors.inc();
                tracing::warn!(watch = %kind.describe(), reason, "cannot decode Consul's answer");
                index = 0;
                let delay = backoff(
                    ctx.opts.backoff_initial,
                    ctx.opts.backoff_max,
                    attempt,
                    &mut rand::rng(),
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = tx.closed() => return,
                }
                continue;
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

fn parse(kind: &Kind, answer: &Answer, index: u64) -> Result<Msg, String> {
    match kind {
        Kind::Catalog => {
            let m: BTreeMap<String, Option<Vec<String>>> =
                serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
            Ok(Msg::Catalog(
                m.into_iter()
                    .map(|(k, v)| (k, v.unwrap_or_default()))
                    .collect(),
                index,
            ))
        }
        Kind::Health {
            service,
            generation,
        } => {
            let entries: Vec<HealthEntry> =
                serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
            Ok(Msg::Health {
                service: service.clone(),
                generation: *generation,
                entries,
            })
        }
        Kind::Kv => {
            if answer.status == 404 {
                return Ok(Msg::Kv(Vec::new(), index));
            }
            let pairs: Vec<KvPair> =
                serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
            Ok(Msg::Kv(pairs, index))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, Some(10)), (10, false));
        assert_eq!(next_index(10, Some(12)), (12, false));
        assert_eq!(next_index(10, Some(10)), (10, false));
        assert_eq!(next_index(10, Some(3)), (0, true));
        assert_eq!(next_index(0, Some(0)), (1, false));
        assert_eq!(next_index(0, None), (1, false));
    }

    #[test]
    fn wait_jitter_stays_within_a_sixteenth() {
        let mut rng = rand::rng();
        let w = Duration::from_secs(160);
        for _ in 0..100 {
            let j = jittered_wait(w, &mut rng);
            assert!(j <= w && j >= w - Duration::from_secs(10), "{j:?}");
        }
    }

    #[test]
    fn backoff_is_bounded() {
        let mut rng = rand::rng();
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(10);
        for attempt in 0..64 {
            assert!(backoff(i, m, attempt, &mut rng) <= m);
        }
    }
}
