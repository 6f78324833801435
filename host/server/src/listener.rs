//! The one accept loop every listener runs (forward-auth, gRPC, admin; TCP or a Unix socket):
//! bounded headers, a header-read timeout (which also closes idle keep-alive connections), a
//! cap on open connections, request bodies bounded in time and in bytes held at once
//! ([`Receiving`]), back-off on accept errors, and a graceful drain when the sidecar stops.

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Connections open at once; past it, new ones wait in the kernel's backlog.
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
/// connections `grace` to finish.
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: Listener,
    make: F,
    limits: Limits,
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
    let graceful = GracefulShutdown::new();
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
    let mut backoff = Duration::ZERO;
    // Every open connection, so those still open when the grace period ends can be dropped.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A free connection slot first: at the cap, new connections wait in the backlog.
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = open.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::ZERO;
                let _ = stream.set_nodelay(true);
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                let service = Guarded { inner: make(peer), budget: budget.clone(), limits };
                let wait = limits.header_read_timeout;
                connections.spawn(async move {
                    if protocol_announced(&stream, wait).await {
                        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        let _ = watcher.watch(connection).await;
                    }
                    drop(slot);
                });
            }
            Ok(Accepted::Unix(stream)) => {
                backoff = Duration::ZERO;
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                let service =
                    Guarded { inner: make(SocketAddr::from(([0, 0, 0, 0], 0))), budget: budget.clone(), limits };
                let wait = limits.header_read_timeout;
                connections.spawn(async move {
                    if tokio::time::timeout(wait, stream.readable()).await.is_ok_and(|r| r.is_ok()) {
                        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        let _ = watcher.watch(connection).await;
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors, or the peer gave up: wait before the next accept
                // rather than spin, and never stop serving.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::warn!(listener = name, error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    drop(listener);
    tracing::info!(listener = name, "no longer accepting; finishing open connections");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = name, "grace period over; dropping the remaining connections");
    }
    connections.shutdown().await;
}

/// A connection's service with every request body wrapped in [`Receiving`].
struct Guarded<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
    limits: Limits,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Guarded<S>
where
    S: hyper::service::Service<Request<Receiving>, Response = Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: Request<Incoming>) -> S::Future {
        let headers = request.headers().len();
        self.inner.call(request.map(|body| Receiving::new(body, self.budget.clone(), &self.limits, headers)))
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

    /// A listener answering 200 to everything, with `limits`; returns its address.
    async fn answering(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let make = |_| {
            hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"ok",
                ))))
            })
        };
        tokio::spawn(serve("test", Listener::Tcp(listener), make, limits, stop.clone(), Duration::from_secs(1)));
        (address, stop)
    }

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
        let (address, stop) = answering(limits).await;
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
        let (address, stop) = answering(limits).await;
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

    #[tokio::test]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let limits = Limits { max_connections: 1, ..Limits::default() };
        let (address, stop) = answering(limits).await;
        let mut first = tokio::net::TcpStream::connect(address).await.unwrap();
        first.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        assert!(read_some(&mut first, Duration::from_secs(5)).await.is_some_and(|a| a.starts_with(b"HTTP/1.1 200")));
        let mut second = tokio::net::TcpStream::connect(address).await.unwrap();
        second.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        assert!(read_some(&mut second, Duration::from_millis(300)).await.is_none(), "served past the cap");
        drop(first);
        let answer = read_some(&mut second, Duration::from_secs(5)).await.expect("served once a slot was free");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        stop.cancel();
    }
}
