//! The connection cap of a listener (`server.max_connections`, `server.admin_max_connections`)
//! and how a full listener makes room.
//!
//! Every served connection is registered with when it last became idle and whether it is busy.
//! It is *busy* from the moment hyper hands a request to the service until the response body is
//! finished (or dropped), and while a response could not be written out because the client does
//! not read it. Otherwise it is *idle*: kept alive between requests, or still sending (or not
//! yet sending) its request headers. When a connection arrives at the cap, the connection idle
//! the longest is closed and the new one takes its slot; a busy connection is never closed for
//! that. If every connection is busy, the new one waits until one finishes or becomes idle
//! (further ones wait in the kernel's listen backlog).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::sync::Notify;

use crate::proxy::body::ProxyBody;

/// A request is in progress: the service was called and its response body is not finished.
const ACTIVE: u8 = 1;
/// hyper could not write all it had: the client is not reading its response.
const WRITE_BLOCKED: u8 = 2;
/// Chosen to make room for a new connection.
const SHED: u8 = 4;
/// lfguard is shutting down: finish the request in progress, then close. A kept-alive connection
/// idle between requests closes at once; a connection that has not had a request yet (it may be
/// sending the first, accepted during the drain delay) gets to send it, within
/// `server.header_read_timeout`.
const STOP: u8 = 8;
/// The connection has had a request.
const SERVED: u8 = 16;

/// The connections of one listener, at most `cap` of them.
pub struct Connections {
    listener: &'static str,
    cap: usize,
    slots: Mutex<Slots>,
    wake: Arc<Wake>,
    shed: IntCounter,
}

/// How the acceptor, waiting for room, learns that a connection closed or became idle.
struct Wake {
    /// Set only while the acceptor waits, so that connections do not signal on every request.
    waiting: AtomicBool,
    changed: Notify,
    /// Orders connections by when they became idle: a counter rather than a clock, which costs
    /// more on every request.
    idle_order: AtomicU64,
}

impl Wake {
    fn signal(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    fn next_idle(&self) -> u64 {
        self.idle_order.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Slots {
    entries: Vec<Option<Arc<ConnState>>>,
    free: Vec<usize>,
    open: usize,
}

impl Slots {
    fn insert(&mut self, state: Arc<ConnState>) -> usize {
        self.open += 1;
        match self.free.pop() {
            Some(index) => {
                self.entries[index] = Some(state);
                index
            }
            None => {
                self.entries.push(Some(state));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, index: usize) {
        if self.entries[index].take().is_some() {
            self.free.push(index);
            self.open -= 1;
        }
    }
}

/// What the registry and a connection's task share about it.
pub struct ConnState {
    flags: AtomicU8,
    /// When it last became idle (`Wake::idle_order`).
    idle_since: AtomicU64,
    /// The connection's task, woken when `SHED` or `STOP` is set.
    task: Mutex<Option<Waker>>,
    wake: Arc<Wake>,
}

impl ConnState {
    /// Sets `flag` (`SHED`, `STOP`) and wakes the connection's task to act on it.
    fn signal(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::SeqCst);
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl ConnState {
    /// Hands the connection's task waker to the registry, once per task (`SHED` and `STOP`
    /// wake it).
    fn register(&self, registered: &mut Option<Waker>, cx: &Context<'_>) {
        if registered
            .as_ref()
            .is_none_or(|waker| !waker.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *self
                .task
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(waker.clone());
            *registered = Some(waker);
        }
    }
}

impl Connections {
    pub fn new(listener: &'static str, cap: usize, shed: IntCounter) -> Arc<Self> {
        Arc::new(Connections {
            listener,
            cap,
            slots: Mutex::new(Slots::default()),
            wake: Arc::new(Wake {
                waiting: AtomicBool::new(false),
                changed: Notify::new(),
                idle_order: AtomicU64::new(0),
            }),
            shed,
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections being served (a connection closed to make room no longer counts).
    pub fn open(&self) -> usize {
        self.slots().open
    }

    /// Shutdown: every connection finishes the request in progress (if any) and closes.
    pub fn stop_all(&self) {
        let slots = self.slots();
        for state in slots.entries.iter().flatten() {
            state.signal(STOP);
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection: at once while there is room or an idle connection to close,
    /// otherwise once a connection closes or becomes idle.
    pub async fn admit(self: &Arc<Self>) -> Connection {
        if let Some(connection) = self.try_admit() {
            return connection;
        }
        loop {
            let changed = self.wake.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.wake.waiting.store(true, Ordering::SeqCst);
            if let Some(connection) = self.try_admit() {
                self.wake.waiting.store(false, Ordering::SeqCst);
                return connection;
            }
            changed.await;
        }
    }

    fn try_admit(self: &Arc<Self>) -> Option<Connection> {
        let mut slots = self.slots();
        if slots.open >= self.cap {
            let (index, victim) = choose_idlest(&slots)?;
            slots.remove(index);
            victim.signal(SHED);
            self.shed.inc();
            tracing::debug!(
                listener = self.listener,
                cap = self.cap,
                "connection limit reached: closed the connection idle the longest"
            );
        }
        let state = Arc::new(ConnState {
            flags: AtomicU8::new(0),
            idle_since: AtomicU64::new(self.wake.next_idle()),
            task: Mutex::new(None),
            wake: self.wake.clone(),
        });
        let index = slots.insert(state.clone());
        Some(Connection {
            registry: self.clone(),
            state,
            index,
        })
    }
}

/// The idle connection that became idle first, marked `SHED` so that it cannot be chosen twice.
/// A connection that turns busy between the scan and the mark is skipped.
fn choose_idlest(slots: &Slots) -> Option<(usize, Arc<ConnState>)> {
    let idle = |flags: u8| flags & !SERVED == 0;
    loop {
        let (index, state, flags) = slots
            .entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                let state = entry.as_ref()?;
                let flags = state.flags.load(Ordering::SeqCst);
                idle(flags).then_some((index, state, flags))
            })
            .min_by_key(|(_, state, _)| state.idle_since.load(Ordering::Relaxed))?;
        if state
            .flags
            .compare_exchange(flags, flags | SHED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Some((index, state.clone()));
        }
    }
}

/// A registered connection; dropping it frees its slot (unless it was closed to make room,
/// which freed the slot already).
pub struct Connection {
    registry: Arc<Connections>,
    state: Arc<ConnState>,
    index: usize,
}

impl Drop for Connection {
    fn drop(&mut self) {
        {
            let mut slots = self.registry.slots();
            if slots.entries[self.index]
                .as_ref()
                .is_some_and(|entry| Arc::ptr_eq(entry, &self.state))
            {
                slots.remove(self.index);
            }
        }
        self.registry.wake.signal();
    }
}

impl Connection {
    /// Runs `opening` (the TLS handshake) before the connection serves, holding its slot:
    /// `None` when the registry closed it meanwhile to make room. Until it has had a request, a
    /// connection is idle, in its handshake as much as while it sends its first headers.
    pub async fn opening<F: Future>(&self, opening: F) -> Option<F::Output> {
        let state = &self.state;
        let mut registered: Option<Waker> = None;
        let mut opening = std::pin::pin!(opening);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = opening.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            state.register(&mut registered, cx);
            // `STOP` lets it go on, as a connection that may be sending its first request does;
            // the caller's timeout bounds it.
            if state.flags.load(Ordering::SeqCst) & SHED != 0 {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Serves HTTP/1.1 on `stream` with `handler` until the client closes, hyper ends the
    /// connection (timeouts, errors), the registry closes it to make room, or `stop_all` asks it
    /// to finish its request and close.
    pub async fn serve<S, F, Fut>(self, stream: S, builder: &http1::Builder, handler: F)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
    {
        let state = self.state.clone();
        let service = {
            let state = state.clone();
            service_fn(move |request| {
                let busy = Busy::enter(&state);
                let response = handler(request);
                async move {
                    let response = response.await?;
                    Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
                }
            })
        };
        let io = TrackedIo {
            io: TokioIo::new(stream),
            state: state.clone(),
            blocked: false,
        };
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        // Polled by hand rather than selected against a `Notify` and a shutdown channel: those
        // would be polled again on every wake-up of the connection, several times per request.
        // The task's waker is handed to `ConnState` once, and `SHED` / `STOP` are a flag test.
        let mut registered: Option<Waker> = None;
        let mut closing = false;
        let ended = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            state.register(&mut registered, cx);
            let flags = state.flags.load(Ordering::SeqCst);
            if closing || flags & (SHED | STOP) == 0 {
                return Poll::Pending;
            }
            if flags & (SHED | SERVED) == 0 && flags & (ACTIVE | WRITE_BLOCKED) == 0 {
                // Stopping, but its first request may be on the way: it is answered with
                // `Connection: close` (lfguard is draining), and hyper's header timeout bounds
                // the wait.
                return Poll::Pending;
            }
            if flags & (ACTIVE | WRITE_BLOCKED) == 0 {
                // Idle (also halfway through its request headers): dropping the connection
                // closes it.
                return Poll::Ready(None);
            }
            // A request in progress is finished first.
            connection.as_mut().graceful_shutdown();
            closing = true;
            connection.as_mut().poll(cx).map(Some)
        })
        .await;
        if let Some(Err(err)) = ended {
            tracing::debug!(error = %err, listener = self.registry.listener, "connection ended with an error");
        }
    }
}

/// Marks a connection busy from the service call until the response body is dropped.
struct Busy(Arc<ConnState>);

impl Busy {
    fn enter(state: &Arc<ConnState>) -> Self {
        state.flags.fetch_or(ACTIVE | SERVED, Ordering::SeqCst);
        Busy(state.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        state
            .idle_since
            .store(state.wake.next_idle(), Ordering::Relaxed);
        state.flags.fetch_and(!ACTIVE, Ordering::SeqCst);
        state.wake.signal();
    }
}

/// A response body that keeps its connection busy until it is finished or dropped.
pub struct Tracked {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, noting whether the last write had to wait (the client does not read).
struct TrackedIo<S> {
    io: TokioIo<S>,
    state: Arc<ConnState>,
    blocked: bool,
}

impl<S> TrackedIo<S> {
    fn note<T>(&mut self, polled: Poll<T>) -> Poll<T> {
        let blocked = polled.is_pending();
        if blocked != self.blocked {
            self.blocked = blocked;
            if blocked {
                self.state.flags.fetch_or(WRITE_BLOCKED, Ordering::SeqCst);
            } else {
                self.state.flags.fetch_and(!WRITE_BLOCKED, Ordering::SeqCst);
                self.state.wake.signal();
            }
        }
        polled
    }
}

impl<S: tokio::io::AsyncRead + Unpin> hyper::rt::Read for TrackedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> hyper::rt::Write for TrackedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.note(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(cap: usize) -> Arc<Connections> {
        Connections::new("test", cap, IntCounter::new("shed", "shed").unwrap())
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room_and_busy_ones_never_do() {
        let connections = registry(3);
        let oldest = connections.admit().await;
        let middle = connections.admit().await;
        let newest = connections.admit().await;
        assert_eq!(connections.open(), 3);

        // The oldest is busy: the next oldest idle one goes.
        let busy = Busy::enter(&oldest.state);
        let fourth = connections.admit().await;
        assert_eq!(connections.open(), 3);
        assert_eq!(middle.state.flags.load(Ordering::SeqCst) & !SERVED, SHED);
        assert_eq!(oldest.state.flags.load(Ordering::SeqCst) & !SERVED, ACTIVE);
        assert_eq!(connections.shed.get(), 1);
        // Its task ends later; that frees no second slot.
        drop(middle);
        assert_eq!(connections.open(), 3);

        // `newest` became idle before `fourth` was accepted: it goes first.
        let _fifth = connections.admit().await;
        assert_eq!(newest.state.flags.load(Ordering::SeqCst) & !SERVED, SHED);
        assert_eq!(fourth.state.flags.load(Ordering::SeqCst) & !SERVED, 0);
        drop(newest);

        // A connection that finished a request just now is idle more recently than `fourth`.
        drop(busy);
        let _sixth = connections.admit().await;
        assert_eq!(fourth.state.flags.load(Ordering::SeqCst) & !SERVED, SHED);
        assert_eq!(oldest.state.flags.load(Ordering::SeqCst) & !SERVED, 0);
        assert_eq!(connections.shed.get(), 3);
    }

    #[tokio::test]
    async fn when_every_connection_is_busy_a_new_one_waits_for_one_to_turn_idle() {
        let connections = registry(1);
        let only = connections.admit().await;
        let busy = Busy::enter(&only.state);
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(busy);
        let admitted = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the busy connection turned idle")
            .unwrap();
        assert_eq!(only.state.flags.load(Ordering::SeqCst) & !SERVED, SHED);
        drop(admitted);
        assert_eq!(connections.open(), 0);
        // A connection that closes frees its slot for a waiting one too.
        let first = connections.admit().await;
        let _busy = Busy::enter(&first.state);
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the connection closed")
            .unwrap();
    }
}
