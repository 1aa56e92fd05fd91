//! Exports the proxy's spans over OTLP/gRPC.
//!
//! The proxy has already chosen trace and span ids (they are in the `traceparent` it sent on),
//! so spans are handed to the OTLP exporter as finished `SpanData` carrying those ids, rather
//! than re-created through an SDK tracer, which would mint ids of its own.
//!
//! [`OtlpSink::record`] runs on the data path: it only `try_send`s into a bounded channel and
//! counts what does not fit. One task batches the channel into exports.

use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_proxy::{SpanRecord, SpanSink};

/// Spans waiting for export; beyond this the collector is not keeping up and spans are dropped
/// rather than buffered without bound.
const QUEUE: usize = 4096;
/// Spans per export request.
const BATCH: usize = 512;
/// Longest a span waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Bound on one export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters shared by the sink and the export task.
#[derive(Debug, Clone, Default)]
pub struct SpanMetrics {
    dropped: Counter,
    exported: Counter,
    export_errors: Counter,
}

impl SpanMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_sidecar_spans_dropped",
            "Spans dropped because the export queue was full or closed",
            self.dropped.clone(),
        );
        registry.register(
            "weft_sidecar_spans_exported",
            "Spans accepted by the OTLP collector",
            self.exported.clone(),
        );
        registry.register(
            "weft_sidecar_span_export_errors",
            "OTLP export requests that failed (their spans are lost)",
            self.export_errors.clone(),
        );
    }
}

/// The proxy's [`SpanSink`] when `--otlp-endpoint` is set.
pub struct OtlpSink {
    tx: mpsc::Sender<SpanRecord>,
    metrics: SpanMetrics,
}

impl SpanSink for OtlpSink {
    fn record(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

/// Builds the exporter and the sink; `run` must then be spawned to move spans from one to the
/// other. Fails only on an endpoint the exporter cannot use.
pub fn start(
    endpoint: &str,
    service: &str,
    instance_id: &str,
    metrics: SpanMetrics,
) -> anyhow::Result<(OtlpSink, Exporter)> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(KeyValue::new(
            "service.instance.id",
            instance_id.to_string(),
        ))
        .build();
    exporter.set_resource(&resource);
    let scope = InstrumentationScope::builder("weft-sidecar")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok((
        OtlpSink {
            tx,
            metrics: metrics.clone(),
        },
        Exporter {
            exporter,
            rx,
            scope,
            metrics,
        },
    ))
}

/// The export task's state.
pub struct Exporter {
    exporter: opentelemetry_otlp::SpanExporter,
    rx: mpsc::Receiver<SpanRecord>,
    scope: InstrumentationScope,
    metrics: SpanMetrics,
}

impl Exporter {
    /// Exports batches until `flush` is cancelled, then exports what is queued and returns.
    pub async fn run(mut self, flush: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut flushing = false;
        loop {
            if !flushing {
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, BATCH) => if n == 0 { break },
                    () = flush.cancelled() => {
                        // New spans now count as dropped; the queue is drained below.
                        self.rx.close();
                        flushing = true;
                        continue;
                    }
                }
                let deadline = tokio::time::Instant::now() + BATCH_DELAY;
                while batch.len() < BATCH {
                    let room = BATCH - batch.len();
                    tokio::select! {
                        n = self.rx.recv_many(&mut batch, room) => if n == 0 { break },
                        () = tokio::time::sleep_until(deadline) => break,
                        () = flush.cancelled() => break,
                    }
                }
            } else if self.rx.recv_many(&mut batch, BATCH).await == 0 {
                break;
            }
            self.export(&mut batch).await;
        }
        self.export(&mut batch).await;
        if let Err(e) = self.exporter.shutdown() {
            tracing::debug!(error = %e, "OTLP exporter shutdown");
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanRecord>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans: Vec<SpanData> = batch
            .drain(..)
            .map(|r| to_span_data(r, &self.scope))
            .collect();
        match self.exporter.export(spans).await {
            Ok(()) => {
                self.metrics.exported.inc_by(n);
            }
            Err(e) => {
                self.metrics.export_errors.inc();
                tracing::warn!(error = %e, spans = n, "OTLP export failed; spans lost");
            }
        }
    }
}

/// Attributes OpenTelemetry's semantic conventions type as integers.
const INT_ATTRIBUTES: &[&str] = &["http.response.status_code", "weft.retries"];

fn to_span_data(r: SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let ctx = &r.context;
    let flags = if ctx.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    // The trace-context crate already dropped invalid members, so a failure here would be a
    // disagreement between the two parsers: export without tracestate rather than not at all.
    let trace_state = TraceState::from_key_value(
        ctx.tracestate
            .members
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .unwrap_or_default();
    let kind = match r.kind {
        weft_proxy::SpanKind::Client => SpanKind::Client,
        weft_proxy::SpanKind::Server => SpanKind::Server,
    };
    let status = span_status(&r);
    let attributes = r
        .attributes
        .into_iter()
        .map(|(k, v)| {
            let value = match v.parse::<i64>() {
                Ok(i) if INT_ATTRIBUTES.contains(&k) => Value::I64(i),
                _ => Value::from(v),
            };
            KeyValue::new(k, value)
        })
        .collect();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(ctx.trace_id.0),
            SpanId::from_bytes(ctx.span_id.0),
            flags,
            false,
            trace_state,
        ),
        parent_span_id: ctx
            .parent_id
            .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.0)),
        // A parent always comes from an incoming traceparent, i.e. another process.
        parent_span_is_remote: ctx.parent_id.is_some(),
        span_kind: kind,
        name: Cow::Owned(r.name),
        start_time: r.start,
        end_time: r.end,
        attributes,
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// OpenTelemetry's HTTP conventions: an `error.type`, or a 5xx (and for client spans a 4xx),
/// makes the span an error; anything else leaves the status unset.
fn span_status(r: &SpanRecord) -> Status {
    let attr = |name: &str| {
        r.attributes
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(e) = attr("error.type") {
        return Status::error(e.to_string());
    }
    let code = attr("http.response.status_code").and_then(|c| c.parse::<u16>().ok());
    let min_error = match r.kind {
        weft_proxy::SpanKind::Client => 400,
        weft_proxy::SpanKind::Server => 500,
    };
    match code {
        Some(c) if c >= min_error => Status::error(format!("HTTP {c}")),
        _ => Status::Unset,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;
    use weft_trace_context as tc;

    fn record(kind: weft_proxy::SpanKind, status: &str) -> SpanRecord {
        SpanRecord {
            context: tc::SpanContext {
                trace_id: tc::TraceId([1; 16]),
                span_id: tc::SpanId([2; 8]),
                parent_id: Some(tc::SpanId([3; 8])),
                sampled: true,
                tracestate: tc::TraceState {
                    members: vec![("vendor".into(), "v1".into())],
                },
                discarded: None,
            },
            name: "outbound web".into(),
            kind,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(5),
            attributes: vec![
                ("http.request.method", "GET".into()),
                ("http.response.status_code", status.into()),
            ],
        }
    }

    #[test]
    fn span_data_keeps_our_ids_and_parent() {
        let scope = InstrumentationScope::builder("t").build();
        let d = to_span_data(record(weft_proxy::SpanKind::Client, "200"), &scope);
        assert_eq!(d.span_context.trace_id(), TraceId::from_bytes([1; 16]));
        assert_eq!(d.span_context.span_id(), SpanId::from_bytes([2; 8]));
        assert!(d.span_context.is_sampled());
        assert_eq!(d.parent_span_id, SpanId::from_bytes([3; 8]));
        assert!(d.parent_span_is_remote);
        assert_eq!(d.span_context.trace_state().get("vendor"), Some("v1"));
        assert_eq!(d.span_kind, SpanKind::Client);
        assert_eq!(d.status, Status::Unset);
        assert!(d.attributes.iter().any(
            |kv| kv.key.as_str() == "http.response.status_code" && kv.value == Value::I64(200)
        ));
    }

    #[test]
    fn status_follows_http_conventions() {
        let scope = InstrumentationScope::builder("t").build();
        let client_404 = to_span_data(record(weft_proxy::SpanKind::Client, "404"), &scope);
        assert!(matches!(client_404.status, Status::Error { .. }));
        let server_404 = to_span_data(record(weft_proxy::SpanKind::Server, "404"), &scope);
        assert_eq!(server_404.status, Status::Unset);
        let server_503 = to_span_data(record(weft_proxy::SpanKind::Server, "503"), &scope);
        assert!(matches!(server_503.status, Status::Error { .. }));
    }

    /// A collector that hands every request it gets to the test.
    struct Collector(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    #[tokio::test]
    async fn exports_our_ids_to_a_collector_and_flushes_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let metrics = SpanMetrics::default();
        let (sink, exporter) =
            start(&format!("http://{addr}"), "shop", "shop-1", metrics.clone()).unwrap();
        let flush = CancellationToken::new();
        let task = tokio::spawn(exporter.run(flush.clone()));
        sink.record(record(weft_proxy::SpanKind::Server, "200"));
        // Flushing must send what is queued without waiting for the batch delay.
        flush.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        let req = rx.try_recv().unwrap();
        let rs = &req.resource_spans[0];
        let service = rs
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .unwrap();
        assert_eq!(
            format!("{:?}", service.value),
            format!(
                "{:?}",
                Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            "shop".into()
                        )
                    )
                })
            )
        );
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.trace_id, vec![1; 16]);
        assert_eq!(span.span_id, vec![2; 8]);
        assert_eq!(span.parent_span_id, vec![3; 8]);
        assert_eq!(span.name, "outbound web");
        assert_eq!(span.trace_state, "vendor=v1");
        assert_eq!(metrics.exported.get(), 1);
        // After the flush the sink is closed: a late span is counted, never blocks.
        sink.record(record(weft_proxy::SpanKind::Server, "200"));
        assert_eq!(metrics.dropped.get(), 1);
    }
}
