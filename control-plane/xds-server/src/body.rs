//! The response side of a stream, written without tonic's encoder: each response goes out as
//! the pieces [`Frames`] makes, then the gRPC status as trailers.
//!
//! tonic encodes every message of a stream into one `BytesMut` that keeps the capacity of the
//! largest message for the stream's life (the encoded message is split off it, and the rest
//! shares the allocation). With 1,000 clusters that was a few hundred kilobytes per idle
//! stream, the largest part of a stream's memory. Here nothing outlives h2's write of it, and
//! large resources are the cache's own `Bytes`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::http::{HeaderMap, HeaderValue};

use crate::codec::Frames;

/// What a stream task hands its response body. Boxed because tokio's channel allocates its
/// slots 32 at a time whatever its capacity: 32 unboxed responses-or-statuses were about 6 KB
/// per stream, 32 pointers are 256 bytes.
pub(crate) type Outgoing<M> = Box<Result<M, Status>>;

/// A gRPC response body fed by a stream task.
pub(crate) struct ResponseBody<M> {
    rx: mpsc::Receiver<Outgoing<M>>,
    queue: VecDeque<Bytes>,
    done: bool,
    /// `weft_xds_queued_responses`: the stream task adds one before it sends a response, this
    /// body takes it off when it receives one (or drops it unsent).
    queued: Gauge,
}

impl<M> ResponseBody<M> {
    pub(crate) fn new(rx: mpsc::Receiver<Outgoing<M>>, queued: Gauge) -> Self {
        Self {
            rx,
            queue: VecDeque::new(),
            done: false,
            queued,
        }
    }
}

impl<M> Drop for ResponseBody<M> {
    fn drop(&mut self) {
        // Closing first means no response can be sent after the count below.
        self.rx.close();
        while let Ok(o) = self.rx.try_recv() {
            if o.is_ok() {
                self.queued.dec();
            }
        }
    }
}

fn trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert("grpc-status", HeaderValue::from_static("13"));
    }
    h
}

impl<M: Frames + Send + 'static> http_body::Body for ResponseBody<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx).map(|o| o.map(|b| *b)) {
                Poll::Ready(Some(Ok(m))) => {
                    this.queued.dec();
                    this.queue = m.frames().into();
                }
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let ok = Status::new(tonic::Code::Ok, "");
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&ok)))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queue.is_empty()
    }
}
