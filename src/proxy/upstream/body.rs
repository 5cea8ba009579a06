//! The backend's response body, streamed through to the client: it gives its connection back to
//! the pool when read to the end, and ends with an error past `upstream.timeout`.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{Connection, Upstream};
use crate::verify::duration::Short;

/// The backend's response body, streamed through. Its connection returns to the pool once the
/// body has been read to the end; a body dropped half-read takes its connection with it.
pub struct UpstreamBody {
    pub(super) body: Incoming,
    pub(super) reuse: Option<(Arc<Upstream>, Connection)>,
}

impl UpstreamBody {
    fn release_connection(&mut self) {
        if let Some((upstream, connection)) = self.reuse.take() {
            upstream.checkin(connection);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release_connection(),
            Poll::Ready(Some(Err(_))) => self.reuse = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release_connection();
        }
    }
}

/// The backend's response body with a deadline: `upstream.timeout` bounds the whole exchange,
/// from the request being sent to the last byte of the response, not only the wait for the
/// response head. Past the deadline the body ends with an error, so hyper cuts the client's
/// connection off (the response is visibly incomplete) and the backend connection is dropped.
///
/// The timer is the one that bounded the wait for the head, handed on: one timer and one
/// allocation for the whole exchange.
pub struct Deadline {
    body: UpstreamBody,
    timer: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

/// The backend's response body did not finish within `upstream.timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the backend's response did not finish within upstream.timeout ({})", Short(self.0))]
pub struct ResponseDeadline(pub Duration);

impl Deadline {
    /// `timer` fires at the deadline, `timeout` after the request was sent.
    pub fn new(body: UpstreamBody, timer: Pin<Box<tokio::time::Sleep>>, timeout: Duration) -> Self {
        Deadline {
            body,
            timer,
            timeout,
        }
    }

    fn expired(&self) -> Poll<Option<Result<Frame<Bytes>, crate::proxy::body::BodyError>>> {
        tracing::warn!(
            timeout = %Short(self.timeout),
            "the backend's response body did not finish within upstream.timeout; the client's \
             connection is cut off"
        );
        Poll::Ready(Some(Err(Box::new(ResponseDeadline(self.timeout)))))
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = crate::proxy::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Checked first too, so that a backend that keeps some data coming cannot outrun it.
        if this.timer.is_elapsed() {
            return this.expired();
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => this.expired(),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
