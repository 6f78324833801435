//! Envoy's external authorization over gRPC: `envoy.service.auth.v3.Authorization/Check`, plus
//! `grpc.health.v1` so Envoy can health-check the sidecar. The same routing, verification,
//! snapshots, policies, decision log and metrics as HTTP forward-auth ([`Authorizer::decide`]).
//!
//! Mapping: `attributes.request.http` (method, host, path with query, headers, body) is the
//! original request. An allow is `OK` with an `OkHttpResponse` (headers to set on the upstream
//! request, headers to remove); a deny is `UNAUTHENTICATED` (401), `UNAVAILABLE` (503) or
//! `PERMISSION_DENIED` (anything else) with a `DeniedHttpResponse` carrying the policy's status,
//! headers and message. A request without HTTP attributes, or with oversized headers, is denied
//! (`INVALID_ARGUMENT`, 400 / 431, with its reason code), counted and logged like any
//! decision: never allowed.

use crate::decide::{Answer, Authorizer};
use crate::listener::{BodyRefused, Receiving};
use crate::original_request::OriginalRequest;
use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use http_body_util::BodyExt;
use sandgate_runtime::bindings::sandgate::policy::types::{Decision, Header};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};

/// Total header bytes accepted in one check; more is denied with 431.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Body bytes passed to the policy; the rest is cut off.
const MAX_BODY_BYTES: usize = 64 << 10;
/// Bytes of one `CheckRequest` message decoded (tonic's default is 4 MiB). A larger one is
/// refused by its length prefix, before it is read, with `OUT_OF_RANGE`, which Envoy answers
/// as a deny (`failure_mode_allow: false`). Room for 64 KiB of headers and a body up to
/// Envoy's `with_request_body.max_request_bytes`: keep that below ~900 KiB. Up to this much is
/// held for each stream still being received.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The gRPC service and method of ext_authz.
const SERVICE: &str = "envoy.service.auth.v3.Authorization";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// `grpc.health.v1.Health/Watch`, refused: only `Check` is served.
const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// gRPC status codes used here (google.rpc.Code).
mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// `envoy.service.auth.v3.CheckRequest` as a check reads it: the same wire format, but only the
/// fields Sandgate uses are decoded (protobuf skips the others: the destination, metadata,
/// context extensions, TLS session), and the `headers` map is read as its entries in order
/// rather than hashed into a map. A key sent twice is therefore seen twice; two
/// `authorization` headers are refused either way.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<Request>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
    }

    /// `envoy.config.core.v3.Address`: of its `oneof`, only the socket address.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "2")]
        pub method: String,
        /// `map<string, string> headers`: on the wire, one entry message a header.
        #[prost(message, repeated, tag = "3")]
        pub headers: Vec<MapEntry>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(string, tag = "5")]
        pub host: String,
        #[prost(string, tag = "6")]
        pub scheme: String,
        #[prost(string, tag = "11")]
        pub body: String,
        #[prost(bytes = "vec", tag = "12")]
        pub raw_body: Vec<u8>,
        #[prost(message, optional, tag = "13")]
        pub header_map: Option<HeaderMap>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MapEntry {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderMap {
        #[prost(message, repeated, tag = "1")]
        pub headers: Vec<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(bytes = "vec", tag = "3")]
        pub raw_value: Vec<u8>,
    }
}

/// The gRPC listener's service: ext_authz `Check`, and `grpc.health.v1` for everything else
/// (which answers `UNIMPLEMENTED` for unknown methods). One match on the path, no router.
#[derive(Clone)]
pub struct GrpcService<H> {
    authorizer: Arc<Authorizer>,
    health: H,
}

impl<H, B> Service<http::Request<B>> for GrpcService<H>
where
    H: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    H::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == WATCH_PATH {
            // A health watch's answer never ends: each would hold a stream for good.
            let status = tonic::Status::unimplemented("use grpc.health.v1.Health/Check");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if request.uri().path() != CHECK_PATH {
            return Box::pin(self.health.call(request));
        }
        let check = Check(self.authorizer.clone());
        // A message refused by the listener (late, or past its budget of bytes being
        // received) ends the call with a status Envoy answers as a deny. The body ends with
        // the message: a peer that never ends the stream does not hold the decoded message
        // until its deadline.
        let request = request.map(|body| OneMessage::new(body.map_err(receive_status)));
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<CheckResponse, wire::CheckRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec).max_decoding_message_size(MAX_MESSAGE_BYTES);
            Ok(grpc.unary(check, request).await)
        })
    }
}

/// A unary gRPC request body cut at the end of its one message (a 5-byte prefix, then the
/// length it gives): what follows is never read, and the body ends there even if the peer
/// never ends its stream.
struct OneMessage<B> {
    inner: B,
    /// The prefix, its first `prefix_len` bytes arrived.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the message still to come, once the prefix is whole.
    remaining: Option<usize>,
}

impl<B> OneMessage<B> {
    fn new(inner: B) -> Self {
        OneMessage { inner, prefix: [0; 5], prefix_len: 0, remaining: None }
    }

    fn done(&self) -> bool {
        self.remaining == Some(0)
    }
}

impl<B> Body for OneMessage<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.done() {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Ok(mut data) = frame.into_data() else {
            // Trailers before the message is whole: tonic reports the message missing.
            return Poll::Ready(None);
        };
        let mut keep = 0;
        if this.remaining.is_none() {
            let take = (5 - this.prefix_len).min(data.len());
            this.prefix[this.prefix_len..this.prefix_len + take].copy_from_slice(&data[..take]);
            this.prefix_len += take;
            keep += take;
            if this.prefix_len == 5 {
                let [_, a, b, c, d] = this.prefix;
                this.remaining = Some(u32::from_be_bytes([a, b, c, d]) as usize);
            }
        }
        if let Some(remaining) = &mut this.remaining {
            let take = (*remaining).min(data.len() - keep);
            *remaining -= take;
            keep += take;
        }
        data.truncate(keep);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.done() || self.inner.is_end_stream()
    }
}

/// The gRPC status for a body that failed while being received: the listener's refusals get
/// their own codes, anything else (a reset stream) passes through as tonic maps it.
fn receive_status<E: Into<StdError>>(error: E) -> StdError {
    let error = error.into();
    match error.downcast_ref::<BodyRefused>() {
        Some(BodyRefused::Late) => Box::new(tonic::Status::deadline_exceeded(BodyRefused::Late.to_string())),
        Some(BodyRefused::Budget) => Box::new(tonic::Status::resource_exhausted(BodyRefused::Budget.to_string())),
        None => error,
    }
}

/// The `Check` method.
struct Check(Arc<Authorizer>);

impl tonic::server::UnaryService<wire::CheckRequest> for Check {
    type Response = CheckResponse;
    type Future = BoxFuture<tonic::Response<CheckResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<wire::CheckRequest>) -> Self::Future {
        let authorizer = self.0.clone();
        Box::pin(async move {
            let trace = authorizer.tracing_on().then(|| trace_metadata(request.metadata()));
            let response = match original_request(request.into_inner()) {
                Ok(mut original) => {
                    if let Some(trace) = trace {
                        original.trace_metadata = trace;
                    }
                    check_response(&authorizer.decide(original).await)
                }
                // Counted and logged like any decision, as forward-auth's refusals are.
                Err(Unreadable { status, reason, message }) => {
                    let answer = authorizer.refuse(status, reason, message);
                    denied(code::INVALID_ARGUMENT, status, message, &answer.headers())
                }
            };
            Ok(tonic::Response::new(response))
        })
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

/// Why a check request cannot be checked: denied with this status and reason code, never
/// guessed at.
#[derive(Debug, PartialEq, Eq)]
struct Unreadable {
    status: u16,
    reason: &'static str,
    message: &'static str,
}

/// The original request from Envoy's attributes, or why it cannot be checked. Takes the
/// decoded message apart: its strings become the check's without copies.
fn original_request(request: wire::CheckRequest) -> Result<OriginalRequest, Unreadable> {
    let malformed = |message| Unreadable { status: 400, reason: "malformed_check_request", message };
    let attributes = request.attributes.ok_or(malformed("malformed check request: no attributes"))?;
    let http = attributes
        .request
        .and_then(|r| r.http)
        .ok_or(malformed("malformed check request: no attributes.request.http"))?;
    // Counted as HTTP/2 counts a header list (RFC 7541 §4.1): 32 bytes an entry besides its
    // name and value, so that many empty entries are not free.
    let size: usize = http.headers.iter().map(|h| h.key.len() + h.value.len() + 32).sum::<usize>()
        + http
            .header_map
            .as_ref()
            .map_or(0, |m| m.headers.iter().map(|h| h.key.len() + h.value.len() + h.raw_value.len() + 32).sum());
    if size > MAX_HEADER_BYTES {
        return Err(Unreadable { status: 431, reason: "headers_too_large", message: "request headers too large" });
    }
    let lowercase = |mut name: String| {
        name.make_ascii_lowercase();
        name
    };
    let mut headers: Vec<Header> = http
        .headers
        .into_iter()
        .filter(|h| !h.key.starts_with(':'))
        .map(|h| Header { name: lowercase(h.key), value: h.value })
        .collect();
    // Newer Envoys may send `header_map` instead of `headers`.
    if let Some(map) = http.header_map {
        headers.extend(map.headers.into_iter().filter(|h| !h.key.starts_with(':')).map(|h| Header {
            name: lowercase(h.key),
            value: if h.raw_value.is_empty() {
                h.value
            } else {
                String::from_utf8(h.raw_value).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            },
        }));
    }
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    // Two `Authorization` headers: the upstream might use the one not checked.
    if headers.iter().filter(|h| h.name == "authorization").count() > 1 {
        return Err(Unreadable {
            status: 400,
            reason: "ambiguous_authorization",
            message: "the request has more than one `authorization` header",
        });
    }
    let (path, query) = OriginalRequest::split_target(&http.path);
    let body = if !http.raw_body.is_empty() {
        Some(http.raw_body)
    } else if !http.body.is_empty() {
        Some(http.body.into_bytes())
    } else {
        None
    }
    .map(|mut body| {
        body.truncate(MAX_BODY_BYTES);
        body
    });
    let peer =
        attributes.source.and_then(|s| s.address).and_then(|a| a.socket_address).map(|s| s.address).unwrap_or_default();
    let mut method = http.method;
    method.make_ascii_uppercase();
    Ok(OriginalRequest {
        method,
        scheme: if http.scheme.is_empty() { "http".into() } else { lowercase(http.scheme) },
        host: lowercase(http.host),
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

/// The gRPC service: ext_authz and `grpc.health.v1` (reporting `SERVING` for the
/// Authorization service), served by the shared accept loop.
pub async fn routes(
    authorizer: Arc<Authorizer>,
) -> GrpcService<
    impl Service<
        http::Request<Receiving>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(SERVICE, tonic_health::ServingStatus::Serving).await;
    GrpcService { authorizer, health }
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

    /// What Envoy sends, through the wire format into the decoded check.
    fn decoded(request: &envoy_types::ext_authz::v3::pb::CheckRequest) -> wire::CheckRequest {
        use prost::Message;
        wire::CheckRequest::decode(request.encode_to_vec().as_slice()).unwrap_or_default()
    }

    #[test]
    fn a_check_without_http_attributes_is_invalid() {
        let empty = envoy_types::ext_authz::v3::pb::CheckRequest::default();
        let refused = original_request(decoded(&empty)).err().map(|e| (e.status, e.reason, e.message));
        assert_eq!(refused, Some((400, "malformed_check_request", "malformed check request: no attributes")));
    }

    fn with_http(
        http: envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
    ) -> envoy_types::ext_authz::v3::pb::CheckRequest {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
        let socket = SocketAddress { address: "10.1.2.3".into(), ..Default::default() };
        let peer = attribute_context::Peer {
            address: Some(Address { address: Some(address::Address::SocketAddress(socket)) }),
            ..Default::default()
        };
        envoy_types::ext_authz::v3::pb::CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer.clone()),
                destination: Some(attribute_context::Peer { service: "upstream".into(), ..peer }),
                request: Some(attribute_context::Request { http: Some(http), ..Default::default() }),
                context_extensions: [("route".to_owned(), "orders".to_owned())].into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn two_authorization_headers_are_invalid() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue as EnvoyHeader};
        use envoy_types::pb::envoy::service::auth::v3::attribute_context;
        let header =
            |value: &str| EnvoyHeader { key: "authorization".into(), value: value.into(), raw_value: Vec::new() };
        let http = attribute_context::HttpRequest {
            path: "/x".into(),
            header_map: Some(HeaderMap { headers: vec![header("Bearer a"), header("Bearer b")] }),
            ..Default::default()
        };
        assert_eq!(
            original_request(decoded(&with_http(http))).err().map(|e| (e.status, e.reason)),
            Some((400, "ambiguous_authorization"))
        );
        // The same through the `headers` map and `header_map` together.
        let http = attribute_context::HttpRequest {
            path: "/x".into(),
            headers: [("Authorization".to_owned(), "Bearer a".to_owned())].into(),
            header_map: Some(HeaderMap { headers: vec![header("Bearer b")] }),
            ..Default::default()
        };
        assert_eq!(
            original_request(decoded(&with_http(http))).err().map(|e| (e.status, e.reason)),
            Some((400, "ambiguous_authorization"))
        );
    }

    /// Many empty header entries count: each decodes to far more than its 2 bytes on the
    /// wire, and 40,000 of them used to count as 0 bytes and be sorted and handed to a policy.
    #[test]
    fn empty_header_entries_count_towards_the_header_limit() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue as EnvoyHeader};
        use envoy_types::pb::envoy::service::auth::v3::attribute_context;
        let http = attribute_context::HttpRequest {
            path: "/x".into(),
            header_map: Some(HeaderMap { headers: vec![EnvoyHeader::default(); 40_000] }),
            ..Default::default()
        };
        assert_eq!(
            original_request(decoded(&with_http(http))).err().map(|e| (e.status, e.reason)),
            Some((431, "headers_too_large"))
        );
    }

    /// The lean message reads Envoy's full `CheckRequest` (with fields it skips: the
    /// destination, context extensions, the request id and protocol) into the same check.
    #[test]
    fn envoys_check_request_decodes_into_the_original_request() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue as EnvoyHeader};
        use envoy_types::pb::envoy::service::auth::v3::attribute_context;
        let http = attribute_context::HttpRequest {
            id: "1234".into(),
            method: "get".into(),
            path: "/api/orders/7?full=1".into(),
            host: "API.Example".into(),
            scheme: "HTTPS".into(),
            protocol: "HTTP/2".into(),
            headers: [
                (":authority".to_owned(), "api.example".to_owned()),
                ("Authorization".to_owned(), "Bearer t".to_owned()),
                ("user-agent".to_owned(), "curl/8".to_owned()),
            ]
            .into(),
            header_map: Some(HeaderMap {
                headers: vec![EnvoyHeader {
                    key: "X-Raw".into(),
                    value: String::new(),
                    raw_value: b"r\xc3\xa9".to_vec(),
                }],
            }),
            body: "ignored: raw_body is set".into(),
            raw_body: vec![7; MAX_BODY_BYTES + 10],
            ..Default::default()
        };
        let original = original_request(decoded(&with_http(http)));
        let Ok(original) = original else { panic!("rejected: {:?}", original.err()) };
        assert_eq!(
            (original.method.as_str(), original.scheme.as_str(), original.host.as_str()),
            ("GET", "https", "api.example")
        );
        assert_eq!((original.path.as_str(), original.query.as_deref()), ("/api/orders/7", Some("full=1")));
        let headers: Vec<(&str, &str)> = original.headers.iter().map(|h| (h.name.as_str(), h.value.as_str())).collect();
        assert_eq!(headers, [("authorization", "Bearer t"), ("user-agent", "curl/8"), ("x-raw", "ré")]);
        assert_eq!(original.peer, "10.1.2.3");
        assert_eq!(original.body, Some(vec![7; MAX_BODY_BYTES]));
    }
}
