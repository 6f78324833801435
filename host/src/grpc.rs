//! Envoy's external authorization over gRPC: `envoy.service.auth.v3.Authorization/Check`, plus
//! `grpc.health.v1` so Envoy can health-check the sidecar. The same routing, verification,
//! snapshots, policies, decision log and metrics as HTTP forward-auth ([`App::decide`]).
//!
//! Mapping: `attributes.request.http` (method, host, path with query, headers, body) is the
//! original request. An allow is `OK` with an `OkHttpResponse` (headers to set on the upstream
//! request, headers to remove); a deny is `UNAUTHENTICATED` (401), `UNAVAILABLE` (503) or
//! `PERMISSION_DENIED` (anything else) with a `DeniedHttpResponse` carrying the policy's status,
//! headers and message. A request without HTTP attributes, or with oversized headers, is denied
//! (`INVALID_ARGUMENT`, 400 / 431): never allowed.

use crate::bindings::sandgate::policy::types::{Decision, Header};
use crate::server::{App, Decided, OriginalRequest};
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use std::sync::Arc;

/// Total header bytes accepted in one check; more is denied with 431.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Body bytes passed to the policy; the rest is cut off.
const MAX_BODY_BYTES: usize = 64 << 10;

/// gRPC status codes used here (google.rpc.Code).
mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The `Authorization` service.
pub struct ExtAuthz {
    app: Arc<App>,
}

impl ExtAuthz {
    /// The service for `app`.
    pub fn new(app: Arc<App>) -> Self {
        ExtAuthz { app }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(&self, request: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let response = match original_request(request.get_ref()) {
            Ok(original) => check_response(&self.app.decide(original).await),
            Err((status, message)) => denied(code::INVALID_ARGUMENT, status, message, &[]),
        };
        Ok(tonic::Response::new(response))
    }
}

/// The original request from Envoy's attributes, or why it cannot be checked.
fn original_request(request: &CheckRequest) -> Result<OriginalRequest, (u16, &'static str)> {
    let attributes = request.attributes.as_ref().ok_or((400, "malformed check request: no attributes"))?;
    let http = attributes
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or((400, "malformed check request: no attributes.request.http"))?;
    let size: usize = http.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + http.header_map.as_ref().map_or(0, |m| m.headers.iter().map(|h| h.key.len() + h.value.len() + h.raw_value.len()).sum());
    if size > MAX_HEADER_BYTES {
        return Err((431, "request headers too large"));
    }
    let mut headers: Vec<Header> = http
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(':'))
        .map(|(name, value)| Header { name: name.to_ascii_lowercase(), value: value.clone() })
        .collect();
    // Newer Envoys may send `header_map` instead of `headers`.
    if let Some(map) = &http.header_map {
        headers.extend(map.headers.iter().filter(|h| !h.key.starts_with(':')).map(|h| Header {
            name: h.key.to_ascii_lowercase(),
            value: if h.raw_value.is_empty() { h.value.clone() } else { String::from_utf8_lossy(&h.raw_value).into_owned() },
        }));
    }
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    let (path, query) = OriginalRequest::split_target(&http.path);
    let body = if !http.raw_body.is_empty() {
        Some(http.raw_body.iter().take(MAX_BODY_BYTES).copied().collect())
    } else if !http.body.is_empty() {
        Some(http.body.as_bytes().iter().take(MAX_BODY_BYTES).copied().collect())
    } else {
        None
    };
    let peer = attributes
        .source
        .as_ref()
        .and_then(|s| s.address.as_ref())
        .and_then(|a| a.address.as_ref())
        .and_then(|a| match a {
            envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => Some(s.address.clone()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(OriginalRequest {
        method: http.method.to_ascii_uppercase(),
        scheme: if http.scheme.is_empty() { "http".into() } else { http.scheme.to_ascii_lowercase() },
        host: http.host.to_ascii_lowercase(),
        path,
        query,
        headers,
        peer,
        body,
    })
}

fn header(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue { key: name.to_owned(), value: value.to_owned(), raw_value: Vec::new() }),
        append: None,
        append_action: action.into(),
        keep_empty_value: false,
    }
}

fn check_response(decided: &Decided) -> CheckResponse {
    let headers = decided.headers();
    match &decided.evaluation.decision {
        Decision::Allow(allow) => CheckResponse {
            status: Some(rpc::Status { code: code::OK, message: String::new(), details: Vec::new() }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                // Overwrite: a client must not be able to send its own `x-user`.
                headers: headers.iter().map(|(n, v)| header(n, v, HeaderAppendAction::OverwriteIfExistsOrAdd)).collect(),
                headers_to_remove: allow.remove_headers.iter().chain(&decided.unset_identity).cloned().collect(),
                ..Default::default()
            })),
            ..Default::default()
        },
        Decision::Deny(deny) => {
            let grpc = match deny.status {
                401 => code::UNAUTHENTICATED,
                503 => code::UNAVAILABLE,
                _ => code::PERMISSION_DENIED,
            };
            denied(grpc, deny.status, &deny.message, &headers)
        }
    }
}

fn denied(grpc: i32, status: u16, message: &str, headers: &[(&str, &str)]) -> CheckResponse {
    let mut headers: Vec<HeaderValueOption> =
        headers.iter().map(|(n, v)| header(n, v, HeaderAppendAction::OverwriteIfExistsOrAdd)).collect();
    headers.push(header("content-type", "text/plain; charset=utf-8", HeaderAppendAction::OverwriteIfExistsOrAdd));
    CheckResponse {
        status: Some(rpc::Status { code: grpc, message: message.to_owned(), details: Vec::new() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(status) }),
            headers,
            body: format!("{message}\n"),
        })),
        ..Default::default()
    }
}

/// Serve ext_authz and gRPC health on `listener` until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AuthorizationServer<ExtAuthz>>().await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(AuthorizationServer::new(ExtAuthz::new(app)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
