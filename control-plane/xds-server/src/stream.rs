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
                let _ = tx.send(Box::new(Err(malformed(&status)))).await;
            }
            tracing::debug!(%status, "xDS stream failed before its first request");
            return;
        }
    };
    let node = F::node(&first).cloned().unwrap_or_default();
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
    let _entry = inner.register_client(ClientEntry::new(
        &node,
        &flavor,
        F::VARIANT,
        service,
        Arc::clone(&state),
    ));
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
                    inner.record(&node.id, F::VARIANT, o);
                }
            }
        }
        let snap = Arc::clone(&snapshots.borrow_and_update());
        let responses = F::respond(&mut lock(&state), &snap);
        for (type_url, resp) in responses {
            inner
                .metrics
                .pushes
                .get_or_create(&TypeLabels {
                    variant: F::VARIANT.as_str(),
                    type_url,
                })
                .inc();
            if tx.send(Box::new(Ok(resp))).await.is_err() {
                return;
            }
        }
        tokio::select! {
            biased;
            () = drained(&mut drain) => {
                // Ending with UNAVAILABLE tells clients to reconnect (to another replica)
                // rather than treat it as a configuration error.
                let _ = tx.send(Box::new(Err(Status::unavailable("control plane is shutting down")))).await;
                return;
            }
            r = requests.message() => match r {
                Ok(Some(req)) => next = Some(req),
                Ok(None) => return,
                Err(status) => {
                    if is_malformed(&status) {
                        inner.metrics.stream_errors.get_or_create(&labels).inc();
                        tracing::warn!(node = %node.id, %status, "xDS stream ended: malformed request");
                        let _ = tx.send(Box::new(Err(malformed(&status)))).await;
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
fn malformed(status: &Status) -> Status {
    Status::invalid_argument(format!("malformed xDS request: {}", status.message()))
}

impl Inner {
    fn record(&self, node: &str, variant: Variant, o: RequestOutcome) {
        let labels = TypeLabels {
            variant: variant.as_str(),
            type_url: o.type_url.clone(),
        };
        match o.kind {
            RequestKind::Ack { convergence, .. } => {
                self.metrics.acks.get_or_create(&labels).inc();
                if let Some(d) = convergence {
                    self.metrics.convergence.observe(d.as_secs_f64());
                }
            }
            RequestKind::Nack(nack) => {
                self.metrics.nacks.get_or_create(&labels).inc();
                tracing::warn!(
                    node,
                    type_url = %o.type_url,
                    version = %nack.version,
                    message = %nack.message,
                    "client rejected configuration (NACK); it keeps its last good config and \
                     this version will not be re-sent"
                );
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
