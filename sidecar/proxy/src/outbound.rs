//! The outbound proxy: the app's calls to mesh services, routed by authority, balanced,
//! limited, retried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use weft_balance::{Outcome, Pick};
use weft_sidecar_config::{RequestInfo, RouteDecision};

use crate::Mesh;
use crate::access_log::{Direction, Finisher, RequestLog};
use crate::body::{Held, ProxyBody};
use crate::client::upstream_request;
use crate::errors::{UpstreamError, local_response};
use crate::headers::{authority_of, request_hash, strip_hop_by_hop};
use crate::mesh::ClusterRuntime;
use crate::metrics::{ErrorLabels, Metrics};
use crate::ratelimit::retry_after_secs;
use crate::replay::Replay;
use crate::retry::{backoff, judge_error, judge_response};

/// Builds responses the proxy answers itself, and wraps upstream ones.
struct Responder {
    mesh: Arc<Mesh>,
    log: RequestLog,
}

impl Responder {
    fn local(self, status: StatusCode, code: &'static str, message: &str) -> Response<ProxyBody> {
        self.local_with(status, code, message, None)
    }

    fn local_with(
        mut self,
        status: StatusCode,
        code: &'static str,
        message: &str,
        extra: Option<(http::HeaderName, HeaderValue)>,
    ) -> Response<ProxyBody> {
        let mut resp = local_response(status, code, message);
        if let Some((k, v)) = extra {
            resp.headers_mut().insert(k, v);
        }
        self.log.status = status.as_u16();
        self.log.error = Some(code);
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, ProxyBody::new(body, self.finisher(), Vec::new()))
    }

    fn upstream(mut self, resp: Response<Incoming>, held: Held) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // hyper writes the version of the downstream connection; HTTP/1.1 is what an h1
        // client must see, and HTTP/2 servers ignore it.
        parts.version = Version::HTTP_11;
        self.log.status = parts.status.as_u16();
        let body = body.map_err(Into::into).boxed_unsync();
        Response::from_parts(parts, ProxyBody::new(body, self.finisher(), held))
    }

    fn finisher(self) -> Finisher {
        Finisher {
            telemetry: Arc::clone(&self.mesh.telemetry),
            log: self.log,
        }
    }
}

pub(crate) async fn handle(
    mesh: Arc<Mesh>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let ctx = weft_trace_context::start_span(&parts.headers, mesh.opts.sample_new_traces);
    let log = RequestLog::new(Direction::Outbound, &parts, ctx);
    let mut r = Responder {
        mesh: Arc::clone(&mesh),
        log,
    };
    let Some(authority) = authority_of(&parts) else {
        return r.local(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request names no service (no Host or :authority)",
        );
    };
    r.log.authority = authority.clone();
    let state = mesh.snapshot();
    let info = RequestInfo {
        authority: &authority,
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    let decision = match state.routes.route(&info, rand::random()) {
        Ok(d) => d,
        Err(e) => {
            mesh.telemetry.metrics.no_route.inc();
            return r.local(StatusCode::NOT_FOUND, "no_route", &e.to_string());
        }
    };
    r.log.service = decision.cluster.clone();
    let metrics = &mesh.telemetry.metrics;
    let service = Metrics::service(&decision.cluster);

    if let (Some(limit), Some(key)) = (&decision.rate_limit, &decision.rate_limit_key)
        && let Err(wait) = mesh.limiter.try_acquire(key, limit, Instant::now())
    {
        metrics.rate_limited.get_or_create(&service).inc();
        let secs = retry_after_secs(wait);
        return r.local_with(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("rate limit of `{}` exceeded", decision.virtual_host),
            Some((http::header::RETRY_AFTER, HeaderValue::from(secs))),
        );
    }

    let Some(cluster) = state.clusters.get(&decision.cluster).cloned() else {
        return r.local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            &format!("cluster `{}` is not known (yet)", decision.cluster),
        );
    };
    let cb = &cluster.config.circuit_breakers;
    let Some(request_slot) = cluster.breaker.try_request(cb) else {
        metrics.overloaded.get_or_create(&service).inc();
        return r.local(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            &format!("`{}` has too many requests in flight", decision.cluster),
        );
    };

    let hash = request_hash(&decision.hash_policies, &parts.headers, remote);
    strip_hop_by_hop(&mut parts.headers);
    weft_trace_context::inject(&r.log.ctx, &mut parts.headers);
    let replay = Replay::new(
        body.map_err(Into::into).boxed_unsync(),
        mesh.opts.max_retry_body_bytes,
    );
    let deadline = decision.timeout.map(|t| r.log.start + t);

    let result = attempts(
        &mesh, &cluster, &decision, &parts, &authority, &replay, hash, deadline, &mut r.log,
    )
    .await;
    match result {
        Ok((resp, permit)) => {
            let mut held: Held = vec![Box::new(request_slot)];
            if let Some(p) = permit {
                held.push(Box::new(p));
            }
            r.upstream(resp, held)
        }
        Err(Final::NoEndpoint) => r.local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            &format!(
                "`{}` has no endpoint that can take traffic",
                decision.cluster
            ),
        ),
        Err(Final::Overloaded) => {
            metrics.overloaded.get_or_create(&service).inc();
            r.local(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                &format!("`{}` has too many requests pending", decision.cluster),
            )
        }
        Err(Final::Failed(e)) => {
            let (status, code) = e.answer();
            r.local(status, code, &e.to_string())
        }
    }
}

/// Why no upstream response is returned.
enum Final {
    NoEndpoint,
    Overloaded,
    Failed(UpstreamError),
}

enum Tried {
    Response(Response<Incoming>, Option<OwnedSemaphorePermit>),
    Failed(UpstreamError),
    Overloaded,
}

/// Tries endpoints until one answers in a way the retry policy accepts, the retries or their
/// budget run out, or the route's deadline passes.
#[allow(clippy::too_many_arguments)]
async fn attempts(
    mesh: &Mesh,
    cluster: &ClusterRuntime,
    decision: &RouteDecision,
    parts: &Parts,
    authority: &str,
    replay: &Replay,
    hash: Option<u64>,
    deadline: Option<Instant>,
    log: &mut RequestLog,
) -> Result<(Response<Incoming>, Option<OwnedSemaphorePermit>), Final> {
    let metrics = &mesh.telemetry.metrics;
    let retry = decision.retry.as_ref();
    let retry_on = retry.map(|r| &r.retry_on);
    let max_retries = retry.map_or(0, |r| r.num_retries);
    let per_try = retry.and_then(|r| r.per_try_timeout);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retry_slot = None;
    let Some(mut pick) = cluster.balancer.pick(hash, &tried, Instant::now()) else {
        return Err(Final::NoEndpoint);
    };
    loop {
        let addr = pick.addr();
        tried.push(addr);
        log.upstream = Some(addr);
        let Some(body) = replay.attempt() else {
            // Only reachable on the first attempt if the body was already taken; treat as
            // a client error rather than sending an empty body.
            pick.finish(Outcome::Cancelled, Instant::now());
            return Err(Final::Failed(UpstreamError::Reset {
                addr,
                source: "request body no longer available".into(),
            }));
        };
        let start = Instant::now();
        let attempt_deadline = match (per_try.map(|t| start + t), deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let tried_now = send(
            cluster,
            parts,
            authority,
            addr,
            body,
            attempt_deadline,
            start,
        )
        .await;
        let latency = start.elapsed();
        let (outcome, retriable) = match &tried_now {
            Tried::Response(resp, _) => {
                judge_response(resp.status(), resp.headers(), latency, retry_on)
            }
            Tried::Failed(e) => {
                metrics
                    .upstream_errors
                    .get_or_create(&ErrorLabels {
                        service: decision.cluster.clone(),
                        kind: e.kind(),
                    })
                    .inc();
                tracing::debug!(error = %e, cluster = %decision.cluster, "upstream attempt failed");
                judge_error(e, latency, retry_on)
            }
            Tried::Overloaded => (Outcome::Cancelled, false),
        };
        pick.finish(outcome, Instant::now());
        drop(retry_slot.take());

        let next = if retriable && log.retries < max_retries {
            next_retry(cluster, replay, hash, &tried, deadline, log.retries + 1)
        } else {
            None
        };
        let Some((next_pick, slot, wait)) = next else {
            return match tried_now {
                Tried::Response(resp, permit) => Ok((resp, permit)),
                Tried::Failed(e) => Err(Final::Failed(e)),
                Tried::Overloaded => Err(Final::Overloaded),
            };
        };
        // Dropping an unread HTTP/1.1 response closes its connection, which is right for a
        // failed one.
        drop(tried_now);
        log.retries += 1;
        metrics
            .retries
            .get_or_create(&Metrics::service(&decision.cluster))
            .inc();
        retry_slot = Some(slot);
        pick = next_pick;
        tokio::time::sleep(wait).await;
    }
}

/// The endpoint, retry slot and backoff of the next retry, if one may happen: the body can be
/// replayed, the budget allows it, there is time left, and some endpoint can take it.
fn next_retry(
    cluster: &ClusterRuntime,
    replay: &Replay,
    hash: Option<u64>,
    tried: &[SocketAddr],
    deadline: Option<Instant>,
    retry_number: u32,
) -> Option<(Pick, crate::breaker::Slot, Duration)> {
    if !replay.can_replay() {
        return None;
    }
    let wait = backoff(retry_number);
    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
        return None;
    }
    let slot = cluster
        .breaker
        .try_retry(&cluster.config.circuit_breakers)?;
    let pick = cluster.balancer.pick(hash, tried, Instant::now())?;
    Some((pick, slot, wait))
}

/// One attempt, bounded by `deadline` (per-try and route timeouts).
async fn send(
    cluster: &ClusterRuntime,
    parts: &Parts,
    authority: &str,
    addr: SocketAddr,
    body: crate::replay::ReplayBody,
    deadline: Option<Instant>,
    start: Instant,
) -> Tried {
    let timed_out = || {
        Tried::Failed(UpstreamError::Timeout {
            addr,
            after: start.elapsed(),
        })
    };
    let permit = match &cluster.conn_limit {
        None => None,
        Some(sem) => match Arc::clone(sem).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(TryAcquireError::Closed) => None,
            Err(TryAcquireError::NoPermits) => {
                let Some(_pending) = cluster
                    .breaker
                    .try_pending(&cluster.config.circuit_breakers)
                else {
                    return Tried::Overloaded;
                };
                let acquire = Arc::clone(sem).acquire_owned();
                match deadline {
                    Some(d) => match tokio::time::timeout_at(d.into(), acquire).await {
                        Ok(p) => p.ok(),
                        Err(_) => return timed_out(),
                    },
                    None => acquire.await.ok(),
                }
            }
        },
    };
    let req = match upstream_request(parts, authority, addr, cluster.config.http2, body) {
        Ok(r) => r,
        Err(source) => return Tried::Failed(UpstreamError::Request { addr, source }),
    };
    let fut = cluster.client.request(req);
    let res = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), fut).await {
            Ok(r) => r,
            Err(_) => return timed_out(),
        },
        None => fut.await,
    };
    match res {
        Ok(resp) => Tried::Response(resp, permit),
        Err(e) => Tried::Failed(UpstreamError::from_client(addr, e)),
    }
}
