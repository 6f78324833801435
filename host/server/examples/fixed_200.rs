//! The load benchmark's ceiling: hyper answering every request with an empty 200, on the same
//! server plumbing Sandgate uses. Run: `cargo run --release -p sandgate-server --example fixed_200 -- 127.0.0.1:9000`.
//!
//! A gRPC request (`content-type: application/grpc`, over HTTP/2) is answered with one empty
//! message and `grpc-status: 0`: to Envoy's ext_authz an empty `CheckResponse` is an allow. So
//! this is also an authorization service that does no work, over HTTP and over gRPC: the floor
//! any ext_authz service reaches behind an Envoy (`scripts/bench_envoy.py`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an example: a failed set-up should stop it loudly"
)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;

/// The shipped binary's allocator (host/cli/src/main.rs), so the comparison is like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("fixed_200: listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                let grpc = request
                    .headers()
                    .get(hyper::header::CONTENT_TYPE)
                    .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
                // Envoy's gRPC health check wants `SERVING` (field 1 = 1); a `Check` gets an
                // empty message. Each is framed: a compression flag, a 4-byte length, the message.
                let message: &'static [u8] = if request.uri().path() == "/grpc.health.v1.Health/Check" {
                    &[0, 0, 0, 0, 2, 0x08, 0x01]
                } else {
                    &[0; 5]
                };
                // Read the request to its end, as a real service would.
                let _ = request.into_body().collect().await;
                let response = if grpc {
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    let body = Full::new(Bytes::from_static(message))
                        .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) })
                        .boxed();
                    let mut response = hyper::Response::new(body);
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/grpc"),
                    );
                    response
                } else {
                    hyper::Response::new(Full::new(Bytes::new()).boxed())
                };
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
