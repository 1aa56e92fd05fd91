//! `xds.push` spans: one per response sent to a client, a child of the `config.change` span
//! whose snapshot the response was computed from, ended when the client ACKs or NACKs it.
//!
//! Spans are made only for responses actually sent (never per idle stream on a change), and
//! only when a subscriber enables [`TRACE_TARGET`] (the binary does when `--otlp-endpoint` is
//! set). Otherwise [`Pushes::sent`] is one disabled-callsite check and allocates nothing.
//!
//! Responses of a snapshot that was already current when the stream sent its first one (a
//! client connecting, or subscribing later to more of the same state) are the client's
//! initial fetch, not part of that change's fan-out: they are root spans with a link to the
//! change, so a change made an hour ago does not grow a trace an hour long.

use std::any::Any;

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use weft_xds_cache::{FlavorSnapshot, TraceParent};

use crate::codec::{DeltaResponse, SotwResponse};
use crate::state::{RequestKind, RequestOutcome, Variant};

/// The `tracing` target of the spans meant for export (`xds.push` here, the binary's
/// `config.change`). A subscriber exporting spans enables it; log output should not, so that
/// without an exporter these spans are never built.
pub const TRACE_TARGET: &str = "weft::trace";

/// Which stream the pushes are on; borrowed from the stream task for its whole life.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamInfo<'a> {
    pub node_id: &'a str,
    pub variant: Variant,
    pub service: &'static str,
    pub flavor: &'a str,
    pub stream_id: u64,
}

/// One stream's pushes awaiting an answer. Bounded by the protocol: at most one response per
/// type is un-answered, so at most one span per type URL is held.
pub(crate) struct Pushes<'a> {
    stream: StreamInfo<'a>,
    pending: Vec<Pending>,
    /// Generation of the snapshot the stream's first response came from.
    first_generation: Option<u64>,
}

struct Pending {
    type_url: String,
    nonce: String,
    span: Span,
}

impl<'a> Pushes<'a> {
    pub(crate) fn new(stream: StreamInfo<'a>) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            first_generation: None,
        }
    }

    /// A response computed from `snap` is about to be sent. `resp` is the stream's response
    /// type (`SotwResponse` or `DeltaResponse`): the stream loop is generic over it, so the two
    /// are told apart here rather than by widening the loop's `Flow` trait.
    pub(crate) fn sent<R: Any>(&mut self, type_url: &str, resp: &R, snap: &FlavorSnapshot) {
        let first = *self.first_generation.get_or_insert(snap.generation);
        let resp: &dyn Any = resp;
        let (version, nonce, resources, removed) =
            if let Some(r) = resp.downcast_ref::<SotwResponse>() {
                (&r.version_info, &r.nonce, r.resources.len(), 0)
            } else if let Some(r) = resp.downcast_ref::<DeltaResponse>() {
                (
                    &r.system_version_info,
                    &r.nonce,
                    r.resources.len(),
                    r.removed_resources.len(),
                )
            } else {
                return;
            };
        let change = snap.trace.filter(|_| snap.generation > first);
        // Parent-based sampling: the pushes of an unsampled change are not recorded either,
        // and not making their spans at all is what keeps sampling cheap at 10,000 clients.
        if change.is_some_and(|tp| !tp.sampled) {
            return;
        }
        let s = &self.stream;
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            parent: None,
            "xds.push",
            otel.kind = "producer",
            xds.node_id = s.node_id,
            xds.variant = s.variant.as_str(),
            xds.service = s.service,
            xds.flavor = s.flavor,
            xds.stream_id = int(s.stream_id),
            xds.type_url = type_url,
            xds.version = version.as_str(),
            xds.nonce = nonce.as_str(),
            xds.resources = int(resources),
            xds.removed = int(removed),
            xds.generation = int(snap.generation),
            xds.initial = change.is_none(),
            xds.outcome = tracing::field::Empty,
        );
        if span.is_disabled() {
            return;
        }
        match (change, snap.trace) {
            (Some(tp), _) => {
                // Fails only without the OpenTelemetry layer, which then records nothing anyway.
                let _ = span.set_parent(Context::new().with_remote_span_context(span_context(tp)));
            }
            (None, Some(tp)) if tp.sampled => span.add_link(span_context(tp)),
            (None, _) => {}
        }
        if let Some(i) = self.pending.iter().position(|p| p.type_url == type_url) {
            // Only a re-opened subscription (an empty nonce) is answered while a response is
            // pending; the client will never answer the older one.
            let old = self.pending.swap_remove(i);
            old.span.record("xds.outcome", "superseded");
        }
        self.pending.push(Pending {
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            span,
        });
    }

    /// A request was judged: an ACK or NACK ends the span of the response it answers.
    pub(crate) fn answered(&mut self, o: &RequestOutcome) {
        if self.pending.is_empty() {
            return;
        }
        let Some(i) = self.pending.iter().position(|p| p.type_url == o.type_url) else {
            return;
        };
        match &o.kind {
            // Only the latest nonce of a type can be ACKed (older ones are stale), and that is
            // the pending one.
            RequestKind::Ack { .. } => {
                let p = self.pending.swap_remove(i);
                p.span.record("xds.outcome", "ack");
            }
            RequestKind::Nack(nack) if nack.nonce == self.pending[i].nonce => {
                let p = self.pending.swap_remove(i);
                p.span.record("xds.outcome", "nack");
                p.span.set_status(Status::error(nack.message.clone()));
            }
            _ => {}
        }
    }
}

impl Drop for Pushes<'_> {
    fn drop(&mut self) {
        for p in self.pending.drain(..) {
            p.span.record("xds.outcome", "stream_closed");
        }
    }
}

/// OpenTelemetry integers are i64, and tracing-opentelemetry records a `u64` field as text.
fn int<T: TryInto<i64>>(n: T) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn span_context(tp: TraceParent) -> SpanContext {
    let flags = if tp.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    // Not remote: the change's span is in this process, only on another task.
    SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.span_id),
        flags,
        false,
        TraceState::default(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::{KeyValue, Value};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use crate::state::{Nack, SotwResources};

    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// Runs `f` under a subscriber exporting `TRACE_TARGET` spans; returns what was exported.
    fn recorded(f: impl FnOnce()) -> Vec<SpanData> {
        let rec = Recorder::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(rec.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
        provider.shutdown().unwrap();
        rec.0.lock().unwrap().clone()
    }

    const CHANGE: TraceParent = TraceParent {
        trace_id: [7; 16],
        span_id: [9; 8],
        sampled: true,
    };
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    fn stream() -> StreamInfo<'static> {
        StreamInfo {
            node_id: "envoy-1",
            variant: Variant::Sotw,
            service: "ads",
            flavor: "envoy",
            stream_id: 3,
        }
    }

    fn snap(generation: u64, trace: Option<TraceParent>) -> FlavorSnapshot {
        FlavorSnapshot {
            generation,
            trace,
            ..Default::default()
        }
    }

    fn response(nonce: &str) -> SotwResponse {
        SotwResponse {
            version_info: "v1".into(),
            resources: SotwResources::Each(vec![bytes::Bytes::from_static(b"x")]),
            type_url: RDS.into(),
            nonce: nonce.into(),
        }
    }

    fn answer(kind: RequestKind) -> RequestOutcome {
        RequestOutcome {
            type_url: RDS.into(),
            kind,
            rejected: Vec::new(),
            cleared: Vec::new(),
        }
    }

    fn ack() -> RequestOutcome {
        answer(RequestKind::Ack {
            version: "v1".into(),
            convergence: None,
        })
    }

    fn attr<'s>(s: &'s SpanData, key: &str) -> Option<&'s Value> {
        s.attributes
            .iter()
            .find(|kv: &&KeyValue| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_push_of_a_change_is_its_child_and_ends_at_the_ack() {
        let spans = recorded(|| {
            let mut p = Pushes::new(stream());
            p.sent(RDS, &response("1"), &snap(1, None));
            p.answered(&ack());
            p.sent(RDS, &response("2"), &snap(2, Some(CHANGE)));
            assert_eq!(p.pending.len(), 1);
            p.answered(&ack());
            assert!(p.pending.is_empty());
        });
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let initial = &spans[0];
        assert_eq!(initial.parent_span_id, SpanId::INVALID);
        assert_eq!(attr(initial, "xds.initial"), Some(&Value::Bool(true)));
        let push = &spans[1];
        assert_eq!(push.name, "xds.push");
        assert_eq!(push.span_context.trace_id(), TraceId::from_bytes([7; 16]));
        assert_eq!(push.parent_span_id, SpanId::from_bytes([9; 8]));
        assert_eq!(attr(push, "xds.node_id"), Some(&Value::from("envoy-1")));
        assert_eq!(attr(push, "xds.type_url"), Some(&Value::from(RDS)));
        assert_eq!(attr(push, "xds.nonce"), Some(&Value::from("2")));
        assert_eq!(attr(push, "xds.resources"), Some(&Value::I64(1)));
        assert_eq!(attr(push, "xds.generation"), Some(&Value::I64(2)));
        assert_eq!(attr(push, "xds.outcome"), Some(&Value::from("ack")));
        assert_eq!(push.status, Status::Unset);
        assert!(push.end_time >= push.start_time);
    }

    #[test]
    fn the_initial_fetch_is_a_root_linked_to_the_change() {
        let spans = recorded(|| {
            let mut p = Pushes::new(stream());
            p.sent(RDS, &response("1"), &snap(5, Some(CHANGE)));
            p.answered(&ack());
        });
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert_ne!(
            spans[0].span_context.trace_id(),
            TraceId::from_bytes([7; 16])
        );
        let links: Vec<_> = spans[0].links.iter().collect();
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].span_context.span_id(), SpanId::from_bytes([9; 8]));
    }

    #[test]
    fn a_nack_is_an_error_with_the_clients_message() {
        let spans = recorded(|| {
            let mut p = Pushes::new(stream());
            p.sent(RDS, &response("1"), &snap(1, None));
            p.answered(&ack());
            p.sent(RDS, &response("2"), &snap(2, Some(CHANGE)));
            // A NACK of another nonce is not this push's answer.
            let nack = |nonce: &str| {
                answer(RequestKind::Nack(Nack {
                    version: "v1".into(),
                    nonce: nonce.into(),
                    message: "regex too big".into(),
                    at_unix_ms: 0,
                    resources: vec!["weft_http".into()],
                }))
            };
            p.answered(&nack("1"));
            assert_eq!(p.pending.len(), 1);
            p.answered(&nack("2"));
            assert!(p.pending.is_empty());
        });
        let push = &spans[1];
        assert_eq!(push.status, Status::error("regex too big"));
        assert_eq!(attr(push, "xds.outcome"), Some(&Value::from("nack")));
    }

    #[test]
    fn pending_pushes_end_with_the_stream_and_unsampled_changes_make_none() {
        let spans = recorded(|| {
            let mut p = Pushes::new(stream());
            p.sent(RDS, &response("1"), &snap(1, None));
            p.answered(&ack());
            let unsampled = TraceParent {
                sampled: false,
                ..CHANGE
            };
            p.sent(RDS, &response("2"), &snap(2, Some(unsampled)));
            assert!(p.pending.is_empty());
            p.sent(RDS, &response("3"), &snap(3, Some(CHANGE)));
        });
        assert_eq!(spans.len(), 2);
        assert_eq!(
            attr(&spans[1], "xds.outcome"),
            Some(&Value::from("stream_closed"))
        );
    }

    #[test]
    fn without_a_subscriber_for_the_target_nothing_is_kept() {
        use tracing_subscriber::Layer as _;
        // What the binary runs without an exporter: a log layer that leaves the target out.
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target() != TRACE_TARGET
            }));
        let subscriber = tracing_subscriber::registry().with(logs);
        tracing::subscriber::with_default(subscriber, || {
            let mut p = Pushes::new(stream());
            p.sent(RDS, &response("1"), &snap(1, Some(CHANGE)));
            p.sent(RDS, &response("2"), &snap(2, Some(CHANGE)));
            assert!(p.pending.is_empty());
        });
    }
}
