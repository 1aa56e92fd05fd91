//! Logs on stderr and, with `--otlp-endpoint`, spans over OTLP/gRPC.
//!
//! Exported spans are those of target [`TRACE_TARGET`]: the pipeline's `config.change` and
//! the xDS server's `xds.push`. Logs never include that target, so without an exporter no
//! layer wants those spans and they are never built (see docs/xds.md, "Tracing").
//!
//! The exporter has a small runtime of its own: tonic's channel must be created inside a
//! runtime and keep one running until the last batch is flushed, which happens after the
//! main runtime has stopped (on [`Telemetry`]'s drop, at the end of `main`).

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use weft_xds_cache::TraceParent;
use weft_xds_server::TRACE_TARGET;

/// Longest shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one export request (the OTLP default is 10s; a change is long over by then).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a span waits to be exported (the OTLP default is 5s), unless
/// `OTEL_BSP_SCHEDULE_DELAY` says otherwise.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// Spans queued for export, unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise. One change makes
/// a span per proxy it reaches, and the OTLP default of 2048 would drop most of those of a
/// large mesh; beyond this, spans are dropped (sample with `--otlp-sample-ratio` instead).
const QUEUE: usize = 16 * 1024;

/// Where and how to export spans.
#[derive(Debug, Clone)]
pub struct OtlpOptions {
    /// `http://host:port` of an OTLP/gRPC collector.
    pub endpoint: String,
    pub service_name: String,
    /// Fraction of traces recorded; a change's pushes follow the change's decision.
    pub sample_ratio: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// TLS to the collector is not built in: ring is the one crypto provider, and there is no
    /// flag for a CA to verify the collector with.
    #[error(
        "--otlp-endpoint `{0}`: only plaintext OTLP/gRPC is supported, as `http://host:port` \
         (e.g. http://127.0.0.1:4317, a collector on the same host or network)"
    )]
    Scheme(String),
    /// The exporter refused the endpoint (not a URI, …).
    #[error("--otlp-endpoint `{endpoint}`: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("--otlp-endpoint: cannot start the span export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

impl TelemetryError {
    /// A mistake in the flags (exit 64), rather than a failure of the machine.
    pub fn is_bad_config(&self) -> bool {
        matches!(
            self,
            TelemetryError::Scheme(_) | TelemetryError::Exporter { .. }
        )
    }
}

/// Keeps the exporter running; dropping it flushes the spans still queued.
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    /// Held only to be dropped last.
    _otlp: Option<Otlp>,
}

struct Otlp {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "OTLP: the last spans may not have been exported");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Installs the global subscriber: logs in `log_format` filtered by `RUST_LOG` (default
/// `info`), and the OTLP exporter when `otlp` is given.
pub fn init(log_format: &str, otlp: Option<OtlpOptions>) -> Result<Telemetry, TelemetryError> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Whatever RUST_LOG says: these spans are for the exporter, and a log layer that wanted
    // them would make every push build one.
    if let Ok(off) = format!("{TRACE_TARGET}=off").parse() {
        filter = filter.add_directive(off);
    }
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if log_format == "json" {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let Some(opts) = otlp else {
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(TelemetryError::Subscriber)?;
        return Ok(Telemetry { _otlp: None });
    };
    let otlp = exporter(&opts)?;
    let tracer = otlp.provider.tracer_with_scope(
        InstrumentationScope::builder("weft-control-plane")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    );
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Attributes are what the spans declare; code location, thread and busy/idle times
        // would only add bytes to every push span.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(TRACE_TARGET, tracing::Level::INFO),
        );
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(TelemetryError::Subscriber)?;
    tracing::info!(
        endpoint = %opts.endpoint,
        service_name = %opts.service_name,
        sample_ratio = opts.sample_ratio,
        "exporting config-change and xDS-push spans over OTLP"
    );
    Ok(Telemetry { _otlp: Some(otlp) })
}

fn exporter(opts: &OtlpOptions) -> Result<Otlp, TelemetryError> {
    // Checked here: without a scheme the exporter would assume https and blame a missing
    // cargo feature.
    if !opts.endpoint.starts_with("http://") {
        return Err(TelemetryError::Scheme(opts.endpoint.clone()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weft-otlp")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        let _rt = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(opts.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: opts.endpoint.clone(),
                source,
            })?
    };
    let mut batch = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batch = batch.with_scheduled_delay(EXPORT_DELAY);
    }
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(QUEUE);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let resource = Resource::builder()
        .with_service_name(opts.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            opts.sample_ratio,
        ))))
        .build();
    Ok(Otlp {
        provider,
        runtime: Some(runtime),
    })
}

/// `span`'s trace context, for the snapshots a change publishes; `None` when the span is not
/// recorded (no exporter).
pub fn trace_parent(span: &tracing::Span) -> Option<TraceParent> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        sampled: sc.is_sampled(),
    })
}
