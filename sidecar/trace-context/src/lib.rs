//! W3C Trace Context Level 1 (`traceparent`, `tracestate`) for the sidecar's hops.
//!
//! What it does: parses incoming `traceparent`/`tracestate` exactly as the W3C Trace Context
//! Level 1 recommendation says, starts a new trace when the incoming one is absent or invalid,
//! gives each hop a fresh span id whose parent is the caller's span, and writes the headers for
//! the next hop. `tracestate` and `baggage` pass through (tracestate cleaned of invalid members
//! and capped at 32).
//!
//! What it does not do: export spans or decide sampling beyond honouring the sampled flag; the
//! proxy records spans and the binary exports them (OTLP).
//!
//! Why not opentelemetry's propagator: it drops a whole `tracestate` header when one member is
//! invalid and does not follow the spec's rules for future versions; the spec asks for both.
//!
//! ## Interface contract (shared with weft-proxy; keep it stable)

use http::HeaderMap;

/// A 16-byte trace id; never all zeros once valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros once valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A parsed, valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The version the sender used (00..=fe). We always send 00.
    pub version: u8,
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    /// trace-flags; bit 0 is `sampled`.
    pub flags: u8,
}

/// Why an incoming `traceparent` was not used (a new trace was started instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceParent {
    #[error("traceparent: {0}")]
    Malformed(&'static str),
    #[error("traceparent: version ff is invalid")]
    VersionFf,
    #[error("traceparent: all-zero trace id")]
    ZeroTraceId,
    #[error("traceparent: all-zero parent id")]
    ZeroParentId,
    #[error("traceparent: more than one traceparent header")]
    Multiple,
}

/// `tracestate` list members in order (most recent first), at most 32, all valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceState {
    pub members: Vec<(String, String)>,
}

/// The trace context of one hop: the span this sidecar starts for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    /// This hop's new span id.
    pub span_id: SpanId,
    /// The caller's span id (from the incoming traceparent); `None` for a new trace.
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: TraceState,
    /// Why the incoming traceparent was discarded, if it was.
    pub discarded: Option<InvalidTraceParent>,
}

/// Parses one `traceparent` header value per the spec (including future versions: a version
/// above 00 is parsed for its first four fields if followed by end-of-string or `-`).
pub fn parse_traceparent(value: &[u8]) -> Result<TraceParent, InvalidTraceParent> {
    let _ = value;
    unimplemented!()
}

/// Combines every `tracestate` header value (comma-joined, in order), drops invalid or
/// duplicate-key members, keeps at most 32.
pub fn parse_tracestate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> TraceState {
    let _ = values;
    unimplemented!()
}

/// Starts this hop's span from incoming request headers (header names case-insensitive, as
/// `HeaderMap` already is). `sample_new` decides the sampled flag of a trace started here.
pub fn start_span(headers: &HeaderMap, sample_new: bool) -> SpanContext {
    let _ = (headers, sample_new);
    unimplemented!()
}

/// Writes `traceparent` (version 00, this span as parent) and `tracestate` (when non-empty)
/// into outgoing headers, replacing any incoming ones; leaves `baggage` alone.
pub fn inject(ctx: &SpanContext, headers: &mut HeaderMap) {
    let _ = (ctx, headers);
    unimplemented!()
}

/// A new random, non-zero span id.
pub fn new_span_id() -> SpanId {
    unimplemented!()
}

/// A new random, non-zero trace id.
pub fn new_trace_id() -> TraceId {
    unimplemented!()
}
