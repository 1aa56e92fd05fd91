//! An OTLP/gRPC collector that keeps whole spans: ids, names and attributes ([`ReceivedSpan`],
//! all [`crate::OtlpReceiver`] hands the sidecar tests) plus start and end times, status and
//! links, and how many connections and export requests it saw, so a test can also prove that
//! nothing was even attempted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::codegen::tokio_stream::StreamExt as _;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One span a [`Collector`] received, ids in lowercase hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span (empty parent id).
    pub parent_span_id: Option<String>,
    pub name: String,
    /// OTLP `SpanKind` (2 = server, 3 = client).
    pub kind: i32,
    /// The resource's `service.name`.
    pub service_name: Option<String>,
    /// Span attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Resource attributes, values as text.
    pub resource: BTreeMap<String, String>,
}

/// OTLP `Status.code` of an error.
pub const STATUS_ERROR: i32 = 2;

/// One span as exported.
#[derive(Debug, Clone, PartialEq)]
pub struct FullSpan {
    pub span: ReceivedSpan,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// OTLP `Status.code`: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    /// Linked spans, as (trace id, span id) in lowercase hex.
    pub links: Vec<(String, String)>,
}

impl FullSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.span.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Seen {
    spans: Mutex<Vec<FullSpan>>,
    exports: AtomicUsize,
    connections: AtomicUsize,
}

/// An in-test OTLP/gRPC collector on a free loopback port. Stops when dropped.
pub struct Collector {
    port: u16,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("otlp::Collector")
            .field("port", &self.port)
            .finish()
    }
}

struct Service(Arc<Seen>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.exports.fetch_add(1, Ordering::SeqCst);
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes_text(&r.attributes))
                .unwrap_or_default();
            let service_name = resource.get("service.name").cloned();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let status = s.status.unwrap_or_default();
                    got.push(FullSpan {
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        status_code: status.code,
                        status_message: status.message,
                        links: s
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        span: ReceivedSpan {
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent_span_id: (!s.parent_span_id.is_empty()
                                && s.parent_span_id.iter().any(|b| *b != 0))
                            .then(|| hex(&s.parent_span_id)),
                            name: s.name,
                            kind: s.kind,
                            service_name: service_name.clone(),
                            attributes: attributes_text(&s.attributes),
                            resource: resource.clone(),
                        },
                    });
                }
            }
        }
        self.0
            .spans
            .lock()
            .map_err(|_| tonic::Status::internal("span store poisoned"))?
            .extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP collector")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Seen::default());
        let counted = Arc::clone(&seen);
        let incoming = tonic::transport::server::TcpIncoming::from(listener).map(move |c| {
            counted.connections.fetch_add(1, Ordering::SeqCst);
            c
        });
        let svc = TraceServiceServer::new(Service(Arc::clone(&seen)));
        let task = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = r {
                eprintln!("OTLP collector stopped: {e}");
            }
        });
        Ok(Self { port, seen, task })
    }

    /// `http://127.0.0.1:<port>`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<FullSpan> {
        self.seen
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Export requests received (whatever they held).
    pub fn exports(&self) -> usize {
        self.seen.exports.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes_text(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value_text(kv.value.as_ref())))
        .collect()
}

fn any_value_text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
