//! What every request leaves behind when it is done: one access-log line (tracing target
//! `weft::access`), metrics, and a span for sampled traces.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::request::Parts;
use weft_trace_context::SpanContext;

use crate::metrics::{DurationLabels, Metrics, RequestLabels};
use crate::{SpanKind, SpanRecord, SpanSink};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Displays the value, or nothing when there is none.
struct OrEmpty<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrEmpty<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

/// Where finished requests are reported.
pub(crate) struct Telemetry {
    pub metrics: Metrics,
    pub spans: Arc<dyn SpanSink>,
}

/// Everything known about one request by the time it is done.
#[derive(Debug)]
pub(crate) struct RequestLog {
    pub direction: Direction,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    /// Cluster (outbound) or this sidecar's service (inbound); empty when unrouted.
    pub service: String,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub retries: u32,
    /// `error.type` of the span when the proxy answered or the response broke.
    pub error: Option<&'static str>,
    pub ctx: SpanContext,
    pub start: Instant,
    pub wall_start: SystemTime,
}

impl RequestLog {
    pub(crate) fn new(direction: Direction, parts: &Parts, ctx: SpanContext) -> Self {
        Self {
            direction,
            method: parts.method.clone(),
            authority: String::new(),
            path: parts.uri.path().to_string(),
            service: String::new(),
            status: 0,
            upstream: None,
            retries: 0,
            error: None,
            ctx,
            start: Instant::now(),
            wall_start: SystemTime::now(),
        }
    }
}

/// Reports its [`RequestLog`] when dropped, i.e. when the response body is done or abandoned.
pub(crate) struct Finisher {
    pub telemetry: Arc<Telemetry>,
    pub log: RequestLog,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        let l = &self.log;
        let elapsed = l.start.elapsed();
        let m = &self.telemetry.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                direction: l.direction.as_str(),
                service: l.service.clone(),
                code: l.status.to_string(),
            })
            .inc();
        m.duration
            .get_or_create(&DurationLabels {
                direction: l.direction.as_str(),
                service: l.service.clone(),
            })
            .observe(elapsed.as_secs_f64());
        // The fields are formatted straight into the log line (no intermediate Strings), and
        // not at all when `weft::access` is filtered out.
        tracing::info!(
            target: "weft::access",
            direction = l.direction.as_str(),
            method = %l.method,
            authority = %l.authority,
            path = %l.path,
            status = l.status,
            upstream = %OrEmpty(l.upstream),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            retries = l.retries,
            trace_id = %l.ctx.trace_id,
            span_id = %l.ctx.span_id,
            parent_span_id = %OrEmpty(l.ctx.parent_id),
            error = l.error.unwrap_or(""),
            "request"
        );
        if !l.ctx.sampled || !self.telemetry.spans.enabled() {
            return;
        }
        let upstream = l.upstream.map(|a| a.to_string()).unwrap_or_default();
        let service = if l.service.is_empty() {
            l.authority.clone()
        } else {
            l.service.clone()
        };
        let mut attributes = vec![
            ("http.request.method", l.method.to_string()),
            ("url.path", l.path.clone()),
            ("http.response.status_code", l.status.to_string()),
            ("weft.service", service.clone()),
            ("weft.retries", l.retries.to_string()),
        ];
        if !upstream.is_empty() {
            attributes.push(("server.address", upstream));
        }
        if let Some(e) = l.error {
            attributes.push(("error.type", e.to_string()));
        }
        let (name, kind) = match l.direction {
            Direction::Outbound => (format!("outbound {service}"), SpanKind::Client),
            Direction::Inbound => (format!("inbound {service}"), SpanKind::Server),
        };
        self.telemetry.spans.record(SpanRecord {
            context: l.ctx.clone(),
            name,
            kind,
            start: l.wall_start,
            end: l.wall_start + elapsed,
            attributes,
        });
    }
}
