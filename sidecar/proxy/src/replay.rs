//! Request bodies that can be sent again on a retry.
//!
//! The body streams to the first attempt as it arrives (a streaming gRPC call must not wait for
//! its whole body) while a copy of up to `limit` bytes is kept. A retry replays the copy and then
//! continues with what the client has not sent yet. Once the body outgrows the limit the copy is
//! dropped and the request can no longer be retried. The same idea as linkerd2-proxy's
//! `ReplayBody`, reduced to what the proxy needs: one attempt reads the client's body at a time.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use crate::body::{BoxError, InnerBody};

struct Shared {
    /// The client's body while no attempt reads it (before the first, or handed back by an
    /// attempt that was dropped before the end).
    source: Option<InnerBody>,
    /// Every data frame read from `source` so far, unless `overflow`.
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// `source` reached its end: the copy is the whole body.
    complete: bool,
    /// The copy was given up (too big, or the client's body failed).
    overflow: bool,
    limit: usize,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic elsewhere must not make every later retry panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's request body and its copy, shared by the attempts.
#[derive(Clone)]
pub(crate) struct Replay {
    shared: Arc<Mutex<Shared>>,
}

impl Replay {
    pub(crate) fn new(body: InnerBody, limit: usize) -> Self {
        // A body known to be empty (most GETs) is complete before anyone reads it.
        let complete = body.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!complete).then_some(body),
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                complete,
                overflow: false,
                limit,
            })),
        }
    }

    /// Whether [`Replay::attempt`] would give a body now.
    pub(crate) fn can_replay(&self) -> bool {
        let s = lock(&self.shared);
        !s.overflow && (s.complete || s.source.is_some())
    }

    /// The body for the next attempt: the copy so far, then the rest of the client's body.
    /// `None` when the copy was given up, or another attempt still holds the client's body.
    pub(crate) fn attempt(&self) -> Option<ReplayBody> {
        let mut s = lock(&self.shared);
        if s.overflow {
            return None;
        }
        let prefix: VecDeque<Bytes> = s.chunks.iter().cloned().collect();
        if s.complete {
            return Some(ReplayBody {
                shared: Arc::clone(&self.shared),
                prefix,
                source: None,
                trailers: s.trailers.clone(),
            });
        }
        let source = s.source.take()?;
        Some(ReplayBody {
            shared: Arc::clone(&self.shared),
            prefix,
            source: Some(source),
            trailers: None,
        })
    }
}

/// One attempt's request body.
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    prefix: VecDeque<Bytes>,
    source: Option<InnerBody>,
    /// Trailers to replay after the prefix (only when the body is complete).
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// A body that is never replayed (inbound requests).
    pub(crate) fn once(body: InnerBody) -> Self {
        let replay = Replay::new(body, 0);
        let mut s = lock(&replay.shared);
        s.overflow = true;
        let source = s.source.take();
        drop(s);
        ReplayBody {
            shared: Arc::clone(&replay.shared),
            prefix: VecDeque::new(),
            source,
            trailers: None,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(src) = this.source.as_mut() {
            return match Pin::new(src).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    this.source = None;
                    lock(&this.shared).complete = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    this.source = None;
                    lock(&this.shared).overflow = true;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let mut s = lock(&this.shared);
                    if let Some(data) = frame.data_ref() {
                        if !s.overflow {
                            if s.len + data.len() > s.limit {
                                s.overflow = true;
                                s.chunks = Vec::new();
                            } else {
                                s.len += data.len();
                                s.chunks.push(data.clone());
                            }
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        s.trailers = Some(t.clone());
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            };
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.trailers.is_none()
            && self.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        match &self.source {
            None => SizeHint::with_exact(buffered),
            Some(src) => {
                let rest = src.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(buffered));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
        }
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(src) = self.source.take() {
            let mut s = lock(&self.shared);
            if src.is_end_stream() {
                s.complete = true;
            } else {
                // Hand the unread rest back so the next attempt can continue it.
                s.source = Some(src);
            }
        }
    }
}
