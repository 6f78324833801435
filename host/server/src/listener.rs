//! The one accept loop every listener runs (forward-auth, gRPC, admin; TCP or a Unix socket):
//! bounded headers, back-off on accept errors, and a graceful drain when the sidecar stops.

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
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

/// Serve connections from `listener` with the service `make(peer)` builds for each (Unix
/// peers are `0.0.0.0:0`) until `stop` is cancelled; then stop accepting and give open
/// connections `grace` to finish.
pub async fn serve<F, S, B>(name: &'static str, listener: Listener, make: F, stop: CancellationToken, grace: Duration)
where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    // Bounded headers: an oversized request is answered 431 by hyper, never buffered.
    builder.http1().max_buf_size(64 << 10);
    builder.http2().max_header_list_size(64 << 10);
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::ZERO;
                let _ = stream.set_nodelay(true);
                let connection = builder.serve_connection(TokioIo::new(stream), make(peer)).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            Ok(Accepted::Unix(stream)) => {
                backoff = Duration::ZERO;
                let connection = builder
                    .serve_connection(TokioIo::new(stream), make(SocketAddr::from(([0, 0, 0, 0], 0))))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
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
