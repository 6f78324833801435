//! The one accept loop every listener runs (forward-auth, gRPC, admin; TCP or a Unix socket):
//! bounded headers, a header-read timeout (which also closes idle keep-alive connections), a
//! cap on open connections at which the longest-idle one is closed to make room, request
//! bodies bounded in time and in bytes held at once ([`Receiving`]), back-off on accept errors,
//! and a graceful drain when the sidecar stops.

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket.
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Where it listens: `ip:port` or `unix:PATH`.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_default(),
        }
    }
}

/// Limits every connection of a listener is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may sit idle, before it is closed.
    pub header_read_timeout: Duration,
    /// Connections open at once. At the cap, a new connection closes the open one idle the
    /// longest (no request in flight), gracefully; with none idle, new ones wait in the
    /// kernel's backlog.
    pub max_connections: usize,
    /// How long a request's body may take to arrive once its headers have: past it, reading
    /// the body fails ([`BodyRefused::Late`]).
    pub body_read_timeout: Duration,
    /// Body bytes the listener's services may hold at once from requests still being
    /// received, over all its connections and streams: past it, reading a body fails
    /// ([`BodyRefused::Budget`]).
    pub max_receiving_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(15),
            max_connections: 4096,
            body_read_timeout: Duration::from_secs(15),
            max_receiving_bytes: 64 << 20,
        }
    }
}

/// What a listener counts of its connections, for `/metrics`.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: prometheus_client::metrics::gauge::Gauge,
    /// New connections that found the listener at `max_connections`.
    pub at_cap: prometheus_client::metrics::counter::Counter,
    /// Idle connections closed to make room at `max_connections`.
    pub closed_for_room: prometheus_client::metrics::counter::Counter,
}

/// Why a request body was not read to its end. The services map it to their protocol's answer
/// (gRPC: `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`), which a proxy treats as a failed check:
/// a deny, never an allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyRefused {
    /// The body did not arrive within the listener's body-read timeout.
    #[error("the request body did not arrive in time")]
    Late,
    /// The listener already holds its `max_receiving_bytes` of bodies being received.
    #[error("too many request bytes are being received at once")]
    Budget,
}

/// A request body as every listener hands it to its service: its data frames count against
/// the listener's budget of bytes held from bodies being received (released when the body is
/// dropped), and it fails once the body-read timeout has passed since its headers arrived.
///
/// Without it a peer could open streams (hyper allows 200 on each HTTP/2 connection) and send
/// each a gRPC message of up to 1 MiB that never ends: the service buffers every one until the
/// message is whole, for as long as the connection lives (~200 MiB a connection). A request
/// whose body is read is also charged for itself (its headers, its stream's buffers) from its
/// first read until it is dropped, so streams whose message never starts are bounded too.
/// A body nobody reads (forward-auth ignores request bodies) costs one clock read.
pub struct Receiving<B = Incoming> {
    inner: B,
    budget: Arc<AtomicUsize>,
    limit: usize,
    held: usize,
    /// What the request itself is charged once its body is first read, and `0` after.
    request_cost: usize,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What a request whose body is being read is charged against the budget besides its body's
/// bytes: its share of the stream's state and buffers, and its headers (decoded, an HTTP/2
/// header list of 64 KiB can take several times that in memory).
const REQUEST_COST: usize = 16 << 10;
const HEADER_COST: usize = 96;

impl<B> Receiving<B> {
    /// `inner`, due within `limits.body_read_timeout` from now, counted against `budget`;
    /// `headers` is how many header fields came with it.
    fn new(inner: B, budget: Arc<AtomicUsize>, limits: &Limits, headers: usize) -> Self {
        Receiving {
            inner,
            budget,
            limit: limits.max_receiving_bytes,
            held: 0,
            request_cost: REQUEST_COST + HEADER_COST * headers,
            deadline: tokio::time::Instant::now() + limits.body_read_timeout,
            timer: None,
        }
    }

    /// Count `n` more bytes against the budget, unless that would pass it.
    fn take(&mut self, n: usize) -> bool {
        let limit = self.limit;
        let taken = self.budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|total| *total <= limit)
        });
        if taken.is_ok() {
            self.held += n;
        }
        taken.is_ok()
    }
}

impl<B> Drop for Receiving<B> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.budget.fetch_sub(self.held, Ordering::AcqRel);
        }
    }
}

impl<B> Body for Receiving<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // A request whose body is read holds its headers and stream while it is received:
        // charged at the first read, so that a body nobody reads (forward-auth) costs nothing.
        if this.request_cost > 0 {
            if !this.take(this.request_cost) {
                return Poll::Ready(Some(Err(BodyRefused::Budget.into())));
            }
            this.request_cost = 0;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n > 0 && !this.take(n) {
                    return Poll::Ready(Some(Err(BodyRefused::Budget.into())));
                }
                // A body whose frames are always ready when asked for is held to the deadline
                // too.
                if tokio::time::Instant::now() >= this.deadline {
                    return Poll::Ready(Some(Err(BodyRefused::Late.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The timer exists only for bodies that make a reader wait.
                let deadline = this.deadline;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyRefused::Late.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve connections from `listener` with the service `make(peer)` builds for each (Unix
/// peers are `0.0.0.0:0`) until `stop` is cancelled; then stop accepting and give open
/// connections `grace` to finish. Connections are counted in `metrics`.
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: Listener,
    make: F,
    limits: Limits,
    metrics: ConnectionMetrics,
    stop: CancellationToken,
    grace: Duration,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Receiving>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = Builder::new(TokioExecutor::new());
    // Bounded headers: an oversized request is answered 431 by hyper, never buffered.
    builder.http1().max_buf_size(64 << 10).timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    // A peer that stops answering pings is gone: its connection and slot are released.
    builder
        .http2()
        .max_header_list_size(64 << 10)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    // Body bytes held from requests being received, over every connection.
    let budget = Arc::new(AtomicUsize::new(0));
    // Every open connection, by id, to find the longest idle when the cap is reached.
    let tracked = Arc::new(Tracked::new());
    // Cancelled when the sidecar stops: every connection then closes gracefully.
    let draining = CancellationToken::new();
    let mut backoff = Duration::ZERO;
    // Every open connection's task, so those still open when the grace period ends can be
    // dropped.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        let (io, peer) = match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                (Io::Tcp(stream), peer)
            }
            Ok(Accepted::Unix(stream)) => (Io::Unix(stream), SocketAddr::from(([0, 0, 0, 0], 0))),
            Err(e) => {
                // Out of file descriptors, or the peer gave up: wait before the next accept
                // rather than spin, and never stop serving.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::warn!(listener = name, error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        backoff = Duration::ZERO;
        // A free connection slot. At the cap, the connection idle the longest is asked to
        // close (gracefully: what it has in flight is answered first) and its slot goes to
        // this one; with none idle, this one waits, and those after it in the backlog.
        let slot = match open.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics.at_cap.inc();
                let waited = loop {
                    // A slot freed meanwhile (the connection closed for room has gone) is taken
                    // before another connection is closed.
                    if let Ok(slot) = open.clone().try_acquire_owned() {
                        break Some(slot);
                    }
                    // Asked again while it waits: a connection busy now may be idle soon.
                    if tracked.make_room() {
                        metrics.closed_for_room.inc();
                    }
                    tokio::select! {
                        () = stop.cancelled() => break None,
                        slot = open.clone().acquire_owned() => break slot.ok(),
                        () = tokio::time::sleep(MAKING_ROOM_EVERY) => {}
                    }
                };
                match waited {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        let connection = tracked.add(draining.child_token());
        let service = Guarded { inner: make(peer), budget: budget.clone(), limits, connection: connection.clone() };
        let (builder, draining, wait) = (builder.clone(), draining.clone(), limits.header_read_timeout);
        // Out of the registry and the count when the task ends, even by a panic in a service.
        let registered = Registered { tracked: tracked.clone(), id: connection.id, open: metrics.open.clone() };
        metrics.open.inc();
        let closing_bound = limits.body_read_timeout + MAKING_ROOM_GRACE;
        connections.spawn(async move {
            let registered = registered;
            let announced = tokio::select! {
                announced = io.announced(wait) => announced,
                () = connection.close.cancelled() => false,
            };
            if announced {
                let served = builder.serve_connection(TokioIo::new(io), service).into_owned();
                let mut served = std::pin::pin!(served);
                tokio::select! {
                    _ = served.as_mut() => {}
                    () = connection.close.cancelled() => {
                        served.as_mut().graceful_shutdown();
                        if draining.is_cancelled() {
                            // The sidecar stops: the grace period bounds this.
                            let _ = served.await;
                        } else {
                            // Closed to make room. It had nothing in flight when chosen, but a
                            // request may have come since (an HTTP/2 stream opened before the
                            // GOAWAY's ping is answered): that is answered. Once nothing has
                            // been in flight for a moment, it is dropped, without waiting for a
                            // peer that never acknowledges the ping; in all, it is bounded.
                            let until = tokio::time::Instant::now() + closing_bound;
                            loop {
                                tokio::select! {
                                    _ = served.as_mut() => break,
                                    () = tokio::time::sleep(MAKING_ROOM_CHECK) => {
                                        if connection.idle_for(MAKING_ROOM_CHECK) || tokio::time::Instant::now() >= until {
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // Out of the registry before the slot is free: a connection waiting for the slot
            // must not find this one still closing.
            drop(registered);
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(listener = name, "no longer accepting; finishing open connections");
    draining.cancel();
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(listener = name, "grace period over; dropping the remaining connections");
    }
    connections.shutdown().await;
}

/// How long a connection closed to make room at the cap may take to finish, past the body
/// deadline of what it has in flight.
const MAKING_ROOM_GRACE: Duration = Duration::from_secs(2);
/// How long a connection closed to make room must have had nothing in flight to be dropped.
const MAKING_ROOM_CHECK: Duration = Duration::from_millis(100);
/// How often a connection waiting at the cap looks for one that became idle.
const MAKING_ROOM_EVERY: Duration = Duration::from_millis(20);

/// A connection's stream.
enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Io {
    /// Whether the peer sends something within `wait` (a TCP peer: says which protocol it
    /// speaks; see [`protocol_announced`]).
    async fn announced(&self, wait: Duration) -> bool {
        match self {
            Io::Tcp(stream) => protocol_announced(stream, wait).await,
            Io::Unix(stream) => tokio::time::timeout(wait, stream.readable()).await.is_ok_and(|r| r.is_ok()),
        }
    }
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One open connection as the accept loop sees it.
struct Connection {
    id: u64,
    /// Requests in flight on it.
    in_flight: AtomicUsize,
    /// Since when it has had nothing in flight: milliseconds since `epoch`.
    idle_since: AtomicU64,
    /// When the listener started.
    epoch: std::time::Instant,
    /// Cancelled to close it gracefully: when the sidecar stops, or to make room at the cap.
    close: CancellationToken,
}

impl Connection {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Nothing in flight, and nothing for at least `wait`.
    fn idle_for(&self, wait: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.now_ms().saturating_sub(self.idle_since.load(Ordering::Relaxed)) >= wait.as_millis() as u64
    }
}

/// A connection's place in its listener's registry and count, given up when its task ends.
struct Registered {
    tracked: Arc<Tracked>,
    id: u64,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.tracked.remove(self.id);
        self.open.dec();
    }
}

/// The open connections of a listener.
struct Tracked {
    epoch: std::time::Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl Tracked {
    fn new() -> Self {
        Tracked { epoch: std::time::Instant::now(), next_id: AtomicU64::new(0), open: Mutex::new(HashMap::new()) }
    }

    fn add(&self, close: CancellationToken) -> Arc<Connection> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            id,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            epoch: self.epoch,
            close,
        });
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, connection.clone());
        connection
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Ask the connection with nothing in flight for the longest to close, unless one is
    /// closing already; whether one was asked.
    fn make_room(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.values().any(|c| c.close.is_cancelled()) {
            return false;
        }
        let idle = open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        if let Some(connection) = idle {
            connection.close.cancel();
            return true;
        }
        false
    }
}

pin_project_lite::pin_project! {
    /// A request's answer being made: counted in flight on its connection until it is
    /// answered or dropped.
    struct InFlight<F> {
        #[pin]
        inner: F,
        connection: Arc<Connection>,
    }

    impl<F> PinnedDrop for InFlight<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.connection.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
                this.connection.idle_since.store(this.connection.now_ms(), Ordering::Relaxed);
            }
        }
    }
}

impl<F: Future> Future for InFlight<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// A connection's service with every request body wrapped in [`Receiving`].
struct Guarded<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
    limits: Limits,
    /// The connection it serves, whose requests in flight it counts.
    connection: Arc<Connection>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Guarded<S>
where
    S: hyper::service::Service<Request<Receiving>, Response = Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlight<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let headers = request.headers().len();
        self.connection.in_flight.fetch_add(1, Ordering::AcqRel);
        let inner =
            self.inner.call(request.map(|body| Receiving::new(body, self.budget.clone(), &self.limits, headers)));
        InFlight { inner, connection: self.connection.clone() }
    }
}

/// Whether a TCP peer says within `wait` which protocol it speaks: either bytes that cannot
/// begin the HTTP/2 preface (HTTP/1, whose header-read timeout then applies) or the whole
/// preface. hyper tells the two apart by reading, with no time limit of its own, so a peer that
/// sent nothing, or part of the preface, would hold a connection slot for good.
async fn protocol_announced(stream: &tokio::net::TcpStream, wait: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = [0u8; PREFACE.len()];
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut seen)).await {
            Ok(Ok(n)) => n,
            // Timed out, or the connection failed.
            _ => return false,
        };
        // Closed before a byte: nothing to serve. The whole preface, or bytes that are not
        // its beginning: hyper takes over.
        if peeked == 0 {
            return false;
        }
        if peeked == PREFACE.len() || seen[..peeked] != PREFACE[..peeked] {
            return true;
        }
        // Part of the preface: look again shortly (a peek returns at once while bytes are
        // queued, so waiting for readability would not wait), until the deadline.
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep_until((tokio::time::Instant::now() + Duration::from_millis(5)).min(deadline)).await;
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, peer)| Accepted::Tcp(s, peer)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What an HTTP/2 client sends first: the preface and an empty SETTINGS frame.
    const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

    /// Read until the peer closes or answers; `None` if neither happens within `wait` (a
    /// liveness bound, not a measurement).
    async fn read_some(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            Ok(Err(_)) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn a_request_whose_headers_never_finish_is_closed() {
        let limits = Limits { header_read_timeout: Duration::from_millis(200), ..Limits::default() };
        let (address, stop, _) = holding(limits, Arc::default()).await;
        let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        // Before this limit existed the connection stayed open, waiting, for good.
        let answer = read_some(&mut slow, Duration::from_secs(5)).await.expect("closed by the server");
        assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "a partial request was served");
        stop.cancel();
    }

    /// A connection that sends nothing, or only part of the HTTP/2 preface, is closed after the
    /// header-read timeout: such connections used to hold their slots for good, and
    /// `max_connections` of them shut every proxy out.
    #[tokio::test]
    async fn a_connection_that_never_says_its_protocol_is_closed() {
        let limits = Limits { header_read_timeout: Duration::from_millis(200), ..Limits::default() };
        let (address, stop, _) = holding(limits, Arc::default()).await;
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
            silent.write_all(sent).await.unwrap();
            let answer = read_some(&mut silent, Duration::from_secs(5)).await;
            assert_eq!(answer, Some(Vec::new()), "after {sent:?}: closed by the server, unanswered");
        }
        // A request on a connection that waited a moment first is still served.
        let mut patient = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        patient.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let answer = read_some(&mut patient, Duration::from_secs(5)).await.expect("answered");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        stop.cancel();
    }

    /// A listener answering 200 to everything, with `limits`: requests to `/hold` once
    /// `release` is notified, and `/panic` by panicking. Its address, how to stop it, and
    /// its connection counts.
    async fn holding(
        limits: Limits,
        release: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, CancellationToken, ConnectionMetrics) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let make = move |_| {
            let release = release.clone();
            hyper::service::service_fn(move |request: Request<Receiving>| {
                let release = release.clone();
                async move {
                    if request.uri().path() == "/hold" {
                        release.notified().await;
                    }
                    assert_ne!(request.uri().path(), "/panic", "a service that panics");
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                }
            })
        };
        let metrics = ConnectionMetrics::default();
        tokio::spawn(serve(
            "test",
            Listener::Tcp(listener),
            make,
            limits,
            metrics.clone(),
            stop.clone(),
            Duration::from_secs(1),
        ));
        (address, stop, metrics)
    }

    async fn get(stream: &mut tokio::net::TcpStream, path: &str) {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    }

    /// At the cap, a new connection waits while every open one has a request in flight, and
    /// is served once one of them is idle.
    #[tokio::test]
    async fn connections_past_the_cap_wait_while_none_is_idle() {
        let release = Arc::new(tokio::sync::Notify::new());
        let limits = Limits { max_connections: 1, ..Limits::default() };
        let (address, stop, metrics) = holding(limits, release.clone()).await;
        let mut first = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut first, "/hold").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut second, "/").await;
        assert!(read_some(&mut second, Duration::from_millis(300)).await.is_none(), "served past the cap");
        release.notify_one();
        let answer = read_some(&mut first, Duration::from_secs(5)).await.expect("the held request answered");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        let answer = read_some(&mut second, Duration::from_secs(5)).await.expect("served once a slot was free");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert_eq!((metrics.open.get(), metrics.at_cap.get(), metrics.closed_for_room.get()), (1, 1, 1));
        stop.cancel();
    }

    /// At the cap, the connection idle the longest is closed to make room: an HTTP/2
    /// connection with no stream, kept open for good, or a keep-alive HTTP/1 one. Before,
    /// `max_connections` idle HTTP/2 connections, which answer pings, shut every new
    /// connection out.
    #[tokio::test]
    async fn an_idle_connection_makes_room_at_the_cap() {
        let release = Arc::new(tokio::sync::Notify::new());
        let limits = Limits { max_connections: 2, ..Limits::default() };
        let (address, stop, metrics) = holding(limits, release.clone()).await;
        // Idle the longest: an HTTP/2 connection that never opens a stream.
        let mut idle_h2 = tokio::net::TcpStream::connect(address).await.unwrap();
        idle_h2.write_all(PREFACE_AND_SETTINGS).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Busy: a request in flight.
        let mut busy = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut busy, "/hold").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A third connection takes the idle one's slot, not the busy one's, and soon: the idle
        // connection, which never answers the GOAWAY's ping, is not waited for (a liveness
        // bound; it used to hold the slot for 2 s).
        let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut third, "/").await;
        let answer = read_some(&mut third, Duration::from_secs(1)).await.expect("served at the cap");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        let mut closed = false;
        for _ in 0..20 {
            match read_some(&mut idle_h2, Duration::from_secs(5)).await {
                Some(bytes) if bytes.is_empty() => {
                    closed = true;
                    break;
                }
                Some(_) => continue, // SETTINGS, GOAWAY, PING
                None => break,
            }
        }
        assert!(closed, "the idle HTTP/2 connection was not closed");
        // The third is now idle (keep-alive) and the busy one still is busy: a fourth
        // connection closes the third, and the held request is still answered.
        let mut fourth = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut fourth, "/").await;
        let answer = read_some(&mut fourth, Duration::from_secs(5)).await.expect("served at the cap");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert_eq!(
            read_some(&mut third, Duration::from_secs(5)).await,
            Some(Vec::new()),
            "the idle HTTP/1 connection closed"
        );
        release.notify_one();
        let answer = read_some(&mut busy, Duration::from_secs(5)).await.expect("the held request answered");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        assert_eq!((metrics.open.get(), metrics.at_cap.get(), metrics.closed_for_room.get()), (2, 2, 2));
        stop.cancel();
    }

    /// A connection whose service panicked leaves the registry with its task: its entry used to
    /// stay, look idle, be chosen to close, and never close, and from then on nothing was closed
    /// to make room again.
    #[tokio::test]
    async fn a_connection_whose_service_panicked_leaves_no_trace() {
        let release = Arc::new(tokio::sync::Notify::new());
        let limits = Limits { max_connections: 2, ..Limits::default() };
        let (address, stop, metrics) = holding(limits, release.clone()).await;
        let mut panicking = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut panicking, "/panic").await;
        assert_eq!(read_some(&mut panicking, Duration::from_secs(5)).await, Some(Vec::new()), "closed unanswered");
        let mut idle_h2 = tokio::net::TcpStream::connect(address).await.unwrap();
        idle_h2.write_all(PREFACE_AND_SETTINGS).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut second, "/").await;
        assert!(read_some(&mut second, Duration::from_secs(5)).await.is_some_and(|a| a.starts_with(b"HTTP/1.1 200")));
        // At the cap (the HTTP/2 connection and the keep-alive one): room is made.
        let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
        get(&mut third, "/").await;
        let answer = read_some(&mut third, Duration::from_secs(5)).await.expect("served at the cap");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        assert_eq!(metrics.open.get(), 2);
        stop.cancel();
    }
}
