//! Envoy's external authorization over gRPC: `envoy.service.auth.v3.Authorization/Check`, plus
//! `grpc.health.v1` so Envoy can health-check the sidecar. The same routing, verification,
//! snapshots, policies, decision log and metrics as HTTP forward-auth ([`Authorizer::decide`]).
//!
//! Mapping: `attributes.request.http` (method, host, path with query, headers, body) is the
//! original request. An allow is `OK` with an `OkHttpResponse` (headers to set on the upstream
//! request, headers to remove); a deny is `UNAUTHENTICATED` (401), `UNAVAILABLE` (503) or
//! `PERMISSION_DENIED` (anything else) with a `DeniedHttpResponse` carrying the policy's status,
//! headers and message. A request without HTTP attributes, or with oversized headers, is denied
//! (`INVALID_ARGUMENT`, 400 / 431): never allowed.

use crate::decide::{Answer, Authorizer};
use crate::original_request::OriginalRequest;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use sandgate_runtime::bindings::sandgate::policy::types::{Decision, Header};
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
    authorizer: Arc<Authorizer>,
}

impl ExtAuthz {
    /// The service for `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        ExtAuthz { authorizer }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let response = match original_request(request.get_ref()) {
            Ok(mut original) => {
                if self.authorizer.tracing_on() {
                    original.trace_metadata = trace_metadata(request.metadata());
                }
                check_response(&self.authorizer.decide(original).await)
            }
            Err((status, message)) => denied(code::INVALID_ARGUMENT, status, message, &[]),
        };
        Ok(tonic::Response::new(response))
    }
}

/// The trace context in the gRPC call's metadata: Envoy puts its ext_authz span there.
fn trace_metadata(metadata: &tonic::metadata::MetadataMap) -> Vec<Header> {
    const NAMES: [&str; 7] =
        ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];
    NAMES
        .iter()
        .filter_map(|name| {
            let value = metadata.get(*name)?.to_str().ok()?;
            Some(Header { name: (*name).to_owned(), value: value.to_owned() })
        })
        .collect()
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
        + http
            .header_map
            .as_ref()
            .map_or(0, |m| m.headers.iter().map(|h| h.key.len() + h.value.len() + h.raw_value.len()).sum());
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
            value: if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            },
        }));
    }
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    // Two `Authorization` headers: the upstream might use the one not checked.
    if headers.iter().filter(|h| h.name == "authorization").count() > 1 {
        return Err((400, "the request has more than one `authorization` header"));
    }
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
        client_request_id: None,
        trace_metadata: Vec::new(),
    })
}

fn header(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    #[allow(
        deprecated,
        reason = "`append` is deprecated in favour of `append_action`, which is set; the field must still be named"
    )]
    HeaderValueOption {
        header: Some(HeaderValue { key: name.to_owned(), value: value.to_owned(), raw_value: Vec::new() }),
        append: None,
        append_action: action.into(),
        keep_empty_value: false,
    }
}

fn check_response(answer: &Answer) -> CheckResponse {
    let headers = answer.headers();
    match &answer.evaluation.decision {
        Decision::Allow(allow) => CheckResponse {
            status: Some(rpc::Status { code: code::OK, message: String::new(), details: Vec::new() }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                // Overwrite: a client must not be able to send its own `x-user`.
                headers: headers
                    .iter()
                    .map(|(n, v)| header(n, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                    .collect(),
                headers_to_remove: allow.remove_headers.iter().chain(&answer.unset_identity).cloned().collect(),
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

/// The gRPC routes: ext_authz and `grpc.health.v1` (reporting `SERVING` for the
/// Authorization service), served by the shared accept loop.
pub async fn routes(authorizer: Arc<Authorizer>) -> tonic::service::Routes {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AuthorizationServer<ExtAuthz>>().await;
    tonic::service::Routes::new(health).add_service(AuthorizationServer::new(ExtAuthz::new(authorizer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandgate_runtime::Evaluation;
    use sandgate_runtime::bindings::sandgate::policy::types::AllowResponse;

    fn code_of(response: &CheckResponse) -> i32 {
        response.status.as_ref().map_or(-1, |s| s.code)
    }

    #[test]
    fn denies_map_to_grpc_codes_and_carry_their_http_status() {
        for (status, grpc) in [
            (401, code::UNAUTHENTICATED),
            (503, code::UNAVAILABLE),
            (403, code::PERMISSION_DENIED),
            (400, code::PERMISSION_DENIED),
        ] {
            let response = check_response(&Answer::host_deny("r".into(), status, "some_reason", "no"));
            assert_eq!(code_of(&response), grpc, "{status}");
            let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
                panic!("{status}: not a denied response")
            };
            assert_eq!(denied.status.as_ref().map(|s| s.code), Some(i32::from(status)));
            assert!(
                denied.headers.iter().any(|h| h
                    .header
                    .as_ref()
                    .is_some_and(|h| h.key == "x-sandgate-reason" && h.value == "some_reason"))
            );
        }
    }

    #[test]
    fn an_allow_overwrites_identity_headers_and_removes_unset_ones() {
        let decision = Decision::Allow(AllowResponse {
            set_headers: vec![Header { name: "x-user".into(), value: "alice".into() }],
            remove_headers: vec!["x-internal".into()],
        });
        let answer = Answer {
            request_id: "r".into(),
            evaluation: Evaluation::decided(decision),
            identity: vec![("x-auth-subject".into(), "alice".into())],
            unset_identity: vec!["x-auth-tenant".into()],
        };
        let response = check_response(&answer);
        assert_eq!(code_of(&response), code::OK);
        let Some(HttpResponse::OkResponse(ok)) = &response.http_response else { panic!("not an ok response") };
        let set: Vec<_> = ok.headers.iter().filter_map(|h| h.header.as_ref().map(|h| h.key.as_str())).collect();
        assert_eq!(set, ["x-user", "x-auth-subject", "x-sandgate-request-id"]);
        assert!(ok.headers.iter().all(|h| h.append_action == i32::from(HeaderAppendAction::OverwriteIfExistsOrAdd)));
        assert_eq!(ok.headers_to_remove, ["x-internal", "x-auth-tenant"]);
    }

    #[test]
    fn a_check_without_http_attributes_is_invalid() {
        assert_eq!(
            original_request(&CheckRequest::default()).err(),
            Some((400, "malformed check request: no attributes"))
        );
    }

    #[test]
    fn two_authorization_headers_are_invalid() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue as EnvoyHeader};
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
        let header =
            |value: &str| EnvoyHeader { key: "authorization".into(), value: value.into(), raw_value: Vec::new() };
        let http = attribute_context::HttpRequest {
            path: "/x".into(),
            header_map: Some(HeaderMap { headers: vec![header("Bearer a"), header("Bearer b")] }),
            ..Default::default()
        };
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request { http: Some(http), ..Default::default() }),
                ..Default::default()
            }),
        };
        assert_eq!(original_request(&request).err().map(|e| e.0), Some(400));
    }
}
