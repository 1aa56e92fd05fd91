//! One task per xDS stream: feeds requests and cache changes to the [`StreamState`] and sends
//! what it says. SotW and Delta share this loop through the small [`Flow`] trait.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use weft_xds_cache::FlavorSnapshot;

use crate::body::Outgoing;
use crate::codec::{DeltaResponse, SotwResponse};
use crate::limits::RequestBucket;
use crate::metrics::{StreamLabels, TypeLabels};
use crate::server::{ClientEntry, Inner};
use crate::state::{ProtocolError, RequestKind, RequestOutcome, StreamState, Variant};

/// What differs between SotW and Delta for the stream loop.
pub(crate) trait Flow: Send + Sync + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: prost::Message + crate::codec::Frames + Default + Send + 'static;
    const VARIANT: Variant;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn apply(
        st: &mut StreamState,
        req: &Self::Req,
        now: Instant,
    ) -> Result<RequestOutcome, ProtocolError>;
    /// Responses due now with their type URLs, in push order.
    fn respond(st: &mut StreamState, snap: &FlavorSnapshot) -> Vec<(String, Self::Resp)>;
}

pub(crate) struct Sotw;
pub(crate) struct Delta;

impl Flow for Sotw {
    type Req = DiscoveryRequest;
    type Resp = SotwResponse;
    const VARIANT: Variant = Variant::Sotw;
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn apply(
        st: &mut StreamState,
        req: &DiscoveryRequest,
        now: Instant,
    ) -> Result<RequestOutcome, ProtocolError> {
        st.on_sotw_request(req, now)
    }
    fn respond(st: &mut StreamState, snap: &FlavorSnapshot) -> Vec<(String, SotwResponse)> {
        st.sotw_responses(snap)
            .into_iter()
            .map(|o| (o.type_url.clone(), o.into()))
            .collect()
    }
}

impl Flow for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaResponse;
    const VARIANT: Variant = Variant::Delta;
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn apply(
        st: &mut StreamState,
        req: &DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<RequestOutcome, ProtocolError> {
        st.on_delta_request(req, now)
    }
    fn respond(st: &mut StreamState, snap: &FlavorSnapshot) -> Vec<(String, DeltaResponse)> {
        st.delta_responses(snap)
            .into_iter()
            .map(|o| (o.type_url.clone(), o.into()))
            .collect()
    }
}

fn lock(st: &Mutex<StreamState>) -> MutexGuard<'_, StreamState> {
    st.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves once draining starts; never, if the drain signal's sender is gone.
pub(crate) async fn drained(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub(crate) async fn run<F: Flow>(
    inner: Arc<Inner>,
    service: &'static str,
    only_type: Option<&'static str>,
    mut requests: Streaming<F::Req>,
    tx: mpsc::Sender<Outgoing<F::Resp>>,
    peer: weft_identity::PeerIdentity,
) {
    let labels = StreamLabels {
        variant: F::VARIANT.as_str(),
        service,
    };
    let mut drain = inner.drain.clone();
    let first = tokio::select! {
        r = requests.message() => r,
        () = drained(&mut drain) => return,
    };
    let first = match first {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(status) => {
            if is_malformed(&status) {
                inner.metrics.stream_errors.get_or_create(&labels).inc();
                let _ = tx.send(Box::new(Err(malformed(&inner, &status)))).await;
            }
            tracing::debug!(%status, "xDS stream failed before its first request");
            return;
        }
    };
    let limits = inner.limits();
    // Checked before the node is copied, classified or listed in /debug/clients. Only the
    // first request's node is used; later ones are bounded by the request size limit.
    let node_bytes = F::node(&first).map_or(0, prost::Message::encoded_len);
    if node_bytes > limits.max_node_bytes {
        inner.refused("node_too_large");
        tracing::warn!(
            node_bytes,
            limit = limits.max_node_bytes,
            "xDS stream refused: node too large"
        );
        let _ = tx
            .send(Box::new(Err(Status::invalid_argument(format!(
                "node is {node_bytes} bytes encoded, over the limit of {} bytes \
                 (--xds-max-node-bytes)",
                limits.max_node_bytes
            )))))
            .await;
        return;
    }
    let mut bucket = RequestBucket::new(&limits, Instant::now());
    bucket.take(Instant::now());
    // Set when reading paused for lack of tokens; the request read after it counts as throttled.
    let mut throttled = false;
    let node = F::node(&first).cloned().unwrap_or_default();
    if let Err(status) = crate::authz::check(&inner, &peer, &node.id) {
        let _ = tx.send(Box::new(Err(status))).await;
        return;
    }
    let flavor = (inner.classify)(F::node(&first));
    let Some(mut snapshots) = inner.cache.subscribe(&flavor) else {
        let _ = tx
            .send(Box::new(Err(Status::internal(format!(
                "no configuration for client flavour `{flavor}`"
            )))))
            .await;
        return;
    };
    let state = Arc::new(Mutex::new(StreamState::new(
        F::VARIANT,
        only_type,
        Arc::clone(&inner.name_sets),
    )));
    // A client that goes away no longer rejects anything. Declared before the client-list
    // entry so that it runs after the entry is gone: whoever is told of the change then no
    // longer sees the stream.
    let _rejections = scopeguard(|| {
        for (type_url, name) in lock(&state).rejections() {
            inner.count_rejection(&type_url, &name, -1);
        }
    });
    let entry = inner.register_client(ClientEntry::new(
        &node,
        &flavor,
        F::VARIANT,
        service,
        Arc::clone(&state),
    ));
    let stream_id = entry.id();
    inner.metrics.streams.get_or_create(&labels).inc();
    inner.metrics.streams_total.get_or_create(&labels).inc();
    let _gauge = scopeguard(|| {
        inner.metrics.streams.get_or_create(&labels).dec();
    });
    tracing::info!(node = %node.id, %flavor, variant = F::VARIANT.as_str(), service, "xDS stream opened");

    // Types this stream has asked for, so the per-type gauge can be undone when it ends.
    let subscribed: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let _subscribed_gauge = scopeguard(|| {
        let types = subscribed.lock().map(|v| v.clone()).unwrap_or_default();
        for type_url in types {
            inner
                .metrics
                .subscribed
                .get_or_create(&TypeLabels {
                    variant: F::VARIANT.as_str(),
                    type_url,
                })
                .dec();
        }
    });
    let mut pushes = crate::trace::Pushes::new(crate::trace::StreamInfo {
        node_id: &node.id,
        variant: F::VARIANT,
        service,
        flavor: &flavor,
        stream_id,
    });
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            let outcome = F::apply(&mut lock(&state), &req, Instant::now());
            match outcome {
                Err(e) => {
                    inner.metrics.stream_errors.get_or_create(&labels).inc();
                    tracing::warn!(node = %node.id, error = %e, "xDS stream ended: bad request");
                    let _ = tx
                        .send(Box::new(Err(Status::invalid_argument(e.to_string()))))
                        .await;
                    return;
                }
                Ok(o) => {
                    let mut seen = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                    if !seen.contains(&o.type_url) {
                        seen.push(o.type_url.clone());
                        inner
                            .metrics
                            .subscribed
                            .get_or_create(&TypeLabels {
                                variant: F::VARIANT.as_str(),
                                type_url: o.type_url.clone(),
                            })
                            .inc();
                    }
                    drop(seen);
                    inner.record(&node.id, stream_id, F::VARIANT, o, &mut pushes);
                }
            }
            let subscriptions = lock(&state).subscription_count();
            if subscriptions > limits.max_subscriptions {
                inner.refused("too_many_subscriptions");
                tracing::warn!(node = %node.id, subscriptions, "xDS stream ended: too many subscriptions");
                let _ = tx
                    .send(Box::new(Err(Status::resource_exhausted(format!(
                        "request would subscribe this stream to {subscriptions} resource \
                         names, over the limit of {} (--xds-max-subscriptions); use a \
                         wildcard subscription instead",
                        limits.max_subscriptions
                    )))))
                    .await;
                return;
            }
        }
        let snap = Arc::clone(&snapshots.borrow_and_update());
        let (responses, cleared) = {
            let mut st = lock(&state);
            (F::respond(&mut st, &snap), st.take_cleared())
        };
        for (type_url, name) in cleared {
            inner.count_rejection(&type_url, &name, -1);
        }
        for (type_url, resp) in responses {
            pushes.sent(&type_url, &resp, &snap);
            inner
                .metrics
                .pushes
                .get_or_create(&TypeLabels {
                    variant: F::VARIANT.as_str(),
                    type_url,
                })
                .inc();
            inner.metrics.queued_responses.inc();
            if tx.send(Box::new(Ok(resp))).await.is_err() {
                inner.metrics.queued_responses.dec();
                return;
            }
        }
        let wait = bucket.wait(Instant::now());
        throttled |= wait.is_some();
        tokio::select! {
            biased;
            () = drained(&mut drain) => {
                // Ending with UNAVAILABLE tells clients to reconnect (to another replica)
                // rather than treat it as a configuration error.
                let _ = tx.send(Box::new(Err(Status::unavailable("control plane is shutting down")))).await;
                return;
            }
            // Out of tokens: leave requests unread until one refills (see `RequestBucket`).
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            r = requests.message(), if wait.is_none() => match r {
                Ok(Some(req)) => {
                    bucket.take(Instant::now());
                    if std::mem::take(&mut throttled) {
                        inner.metrics.requests_throttled.inc();
                    }
                    next = Some(req);
                }
                Ok(None) => return,
                Err(status) => {
                    if is_malformed(&status) {
                        inner.metrics.stream_errors.get_or_create(&labels).inc();
                        tracing::warn!(node = %node.id, %status, "xDS stream ended: malformed request");
                        let _ = tx.send(Box::new(Err(malformed(&inner, &status)))).await;
                    } else {
                        tracing::debug!(node = %node.id, %status, "xDS stream ended by the client");
                    }
                    return;
                }
            },
            changed = snapshots.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

/// tonic reports a request it could not decode as INTERNAL, and one over the size limit as
/// OUT_OF_RANGE or RESOURCE_EXHAUSTED; anything else is the client or transport going away,
/// which is not an error of ours or theirs worth counting.
fn is_malformed(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Internal | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    )
}

/// Tells the client why its stream ends when its request could not be read (garbage that is
/// not a protobuf message, or a message over the size limit). A transport failure (client
/// gone) makes the send fail silently, which is fine.
fn malformed(inner: &Inner, status: &Status) -> Status {
    // tonic says OUT_OF_RANGE when the length prefix is over the limit, before reading the
    // body. gRPC servers answer RESOURCE_EXHAUSTED for that; name the flag that sets it.
    if status.code() == tonic::Code::OutOfRange {
        inner.refused("request_too_large");
        return Status::resource_exhausted(format!(
            "xDS request over the size limit (--xds-max-request-bytes): {}",
            status.message()
        ));
    }
    Status::invalid_argument(format!("malformed xDS request: {}", status.message()))
}

impl Inner {
    fn record(
        &self,
        node: &str,
        stream_id: u64,
        variant: Variant,
        o: RequestOutcome,
        pushes: &mut crate::trace::Pushes<'_>,
    ) {
        pushes.answered(&o);
        let labels = TypeLabels {
            variant: variant.as_str(),
            type_url: o.type_url.clone(),
        };
        for name in &o.rejected {
            self.count_rejection(&o.type_url, name, 1);
        }
        for name in &o.cleared {
            self.count_rejection(&o.type_url, name, -1);
        }
        match o.kind {
            RequestKind::Ack { convergence, .. } => {
                self.metrics.acks.get_or_create(&labels).inc();
                if let Some(d) = convergence {
                    self.metrics.convergence.observe(d.as_secs_f64());
                }
            }
            RequestKind::Nack(nack) => {
                self.metrics.nacks.get_or_create(&labels).inc();
                self.metrics
                    .resource_rejections
                    .get_or_create(&labels)
                    .inc_by(nack.resources.len() as u64);
                tracing::warn!(
                    node,
                    type_url = %o.type_url,
                    version = %nack.version,
                    resources = ?nack.resources,
                    message = %nack.message,
                    "client rejected configuration (NACK); it keeps its last good config and \
                     this version will not be re-sent"
                );
                self.log_nack(crate::server::NackEvent {
                    node_id: node.to_string(),
                    stream_id,
                    variant,
                    type_url: o.type_url.clone(),
                    version: nack.version,
                    nonce: nack.nonce,
                    message: nack.message,
                    resources: nack.resources,
                    at_unix_ms: nack.at_unix_ms,
                });
            }
            RequestKind::Subscribe | RequestKind::Stale => {}
        }
    }
}

/// Runs a closure when dropped (stream end, whatever the path out).
pub(crate) struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

pub(crate) fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}
