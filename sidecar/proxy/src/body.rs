//! The response body handed to the client: the upstream's body passed through frame by frame
//! (trailers included), with the request's bookkeeping released when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, SizeHint};

use crate::access_log::Finisher;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Boxed once here so the server and client types stay small (compile times).
pub(crate) type InnerBody = UnsyncBoxBody<Bytes, BoxError>;

/// Anything held until the response is done: circuit-breaker slots, connection permits.
pub(crate) type Held = Vec<Box<dyn Send>>;

/// A response body that logs, counts and releases its request's slots when it ends, errors or
/// is dropped (client gone). A backend dying mid-response ends only this body, with an error.
pub(crate) struct ProxyBody {
    inner: InnerBody,
    finisher: Option<Finisher>,
    held: Held,
}

impl ProxyBody {
    pub(crate) fn new(inner: InnerBody, finisher: Finisher, held: Held) -> Self {
        Self {
            inner,
            finisher: Some(finisher),
            held,
        }
    }

    fn finish(&mut self) {
        // Dropping the finisher emits the access log, span and metrics.
        self.finisher.take();
        self.held.clear();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = this.finisher.as_mut() {
                    f.log.error = Some("response_body");
                    tracing::debug!(error = %e, "upstream response body failed");
                }
                this.finish();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
