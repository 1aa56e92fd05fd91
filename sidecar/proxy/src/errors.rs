//! Why an upstream attempt failed, and the answers the proxy writes itself.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::body::{BoxError, InnerBody};

/// Header naming why the proxy, not the upstream, answered.
pub(crate) const X_WEFT_ERROR: &str = "x-weft-error";
/// Envoy's `x-envoy-overloaded` counterpart, set on circuit-breaker rejections.
pub(crate) const X_WEFT_OVERLOADED: &str = "x-weft-overloaded";

/// One failed attempt to get response headers from an upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("{addr} refused the stream: {source}")]
    RefusedStream {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("{addr} reset or closed the request: {source}")]
    Reset {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("{addr} sent no response headers within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("could not build the upstream request for {addr}: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: http::Error,
    },
}

impl UpstreamError {
    /// Reads a legacy-client error: connect failures are flagged by the client, a refused
    /// HTTP/2 stream is found in the cause chain, anything else broke after connecting.
    pub(crate) fn from_client(addr: SocketAddr, e: hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            return UpstreamError::Connect {
                addr,
                source: Box::new(e),
            };
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut refused = false;
        while let Some(c) = cause {
            if let Some(h2e) = c.downcast_ref::<h2::Error>()
                && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
            {
                refused = true;
                break;
            }
            cause = c.source();
        }
        if refused {
            UpstreamError::RefusedStream {
                addr,
                source: Box::new(e),
            }
        } else {
            UpstreamError::Reset {
                addr,
                source: Box::new(e),
            }
        }
    }

    /// `kind` label of `weft_sidecar_upstream_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::RefusedStream { .. } => "refused_stream",
            UpstreamError::Reset { .. } => "reset",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Request { .. } => "request",
        }
    }

    /// The status, `x-weft-error` code and message the client gets when this is final.
    pub(crate) fn answer(&self) -> (StatusCode, &'static str) {
        match self {
            UpstreamError::Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream_connect"),
            UpstreamError::RefusedStream { .. } | UpstreamError::Reset { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream_reset")
            }
            UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            UpstreamError::Request { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
        }
    }
}

/// A response the proxy writes itself: `weft: <message>` and `x-weft-error: <code>`.
pub(crate) fn local_response(
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Response<InnerBody> {
    let body = Full::new(Bytes::from(format!("weft: {message}\n")))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(X_WEFT_ERROR, HeaderValue::from_static(code));
    if code == "overloaded" {
        headers.insert(X_WEFT_OVERLOADED, HeaderValue::from_static("true"));
    }
    resp
}
