//! HTTP forward-auth: proxies ask, Sandgate answers 200 (allow, with identity headers) or the
//! deny's status (401/403/…, with a reason). Also `/healthz`, `/readyz` and `/metrics`.
//!
//! The original request is read from `X-Forwarded-Method`/`-Uri`/`-Host`/`-Proto` (Traefik,
//! Caddy), `X-Original-Method`/`X-Original-URI` (nginx), or the path after the auth prefix
//! (Envoy HTTP ext_authz), as `[server] proxy` says. These headers are trusted: Sandgate is a
//! sidecar that only the proxy in front of the application can reach.
//!
//! [`ForwardAuth::handle`] takes any request body type, so tests call it without a socket.

use crate::config::ProxyKind;
use crate::decide::{Answer, Authorizer};
use crate::original_request::OriginalRequest;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use sandgate_runtime::bindings::sandgate::policy::types::{Decision, Header};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The forward-auth service.
pub struct ForwardAuth {
    authorizer: Arc<Authorizer>,
    auth_prefix: String,
    proxy: ProxyKind,
    ready: Arc<AtomicBool>,
    /// Whether `/healthz`, `/readyz` and `/metrics` are answered here (no `ops_listen`).
    serve_ops: bool,
}

impl ForwardAuth {
    /// Checks under `auth_prefix`, original requests read by the `proxy` convention; `/readyz`
    /// answers 200 once `ready` is set and a policy is loaded.
    pub fn new(authorizer: Arc<Authorizer>, auth_prefix: &str, proxy: ProxyKind, ready: Arc<AtomicBool>) -> Self {
        ForwardAuth {
            authorizer,
            auth_prefix: auth_prefix.trim_end_matches('/').to_owned(),
            proxy,
            ready,
            serve_ops: true,
        }
    }

    /// The same service with `/healthz`, `/readyz` and `/metrics` answered only by
    /// [`ForwardAuth::handle_ops`] on a listener of their own: then no check, however a proxy
    /// builds its path, can be answered by a health endpoint.
    pub fn without_ops(mut self) -> Self {
        self.serve_ops = false;
        self
    }

    /// Answer `/healthz`, `/readyz` and `/metrics`; anything else is 404.
    pub fn handle_ops<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        self.ops(request.uri().path()).unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"))
    }

    fn ops(&self, path: &str) -> Option<Response<Full<Bytes>>> {
        let state = self.authorizer.state();
        match path {
            "/healthz" => Some(text(StatusCode::OK, "ok\n")),
            "/readyz" => {
                // In a fleet: not while out of touch, nor before any state was applied.
                let fleet_ok = state.fleet.as_ref().is_none_or(|f| !f.is_stale() && (f.is_synced() || f.applied() > 0));
                let ready = self.ready.load(Ordering::SeqCst) && fleet_ok && !state.store.load().policies.is_empty();
                Some(if ready {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                })
            }
            "/metrics" => {
                state.metrics.pool_in_use.set(state.runtime.instances_in_use() as i64);
                state.metrics.set_preparations(state.runtime.prepare_counts());
                if let Some(fleet) = &state.fleet {
                    state.metrics.fleet_staleness.set(fleet.staleness().as_secs_f64());
                    state.metrics.fleet_revision.set(state.store.load().fleet_revision.unwrap_or(0) as i64);
                }
                let mut response = text(StatusCode::OK, &state.metrics.encode());
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                Some(response)
            }
            _ => None,
        }
    }

    /// Answer one HTTP request.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if self.serve_ops
            && let Some(response) = self.ops(path)
        {
            return response;
        }
        let rest = path.strip_prefix(self.auth_prefix.as_str()).filter(|rest| rest.is_empty() || rest.starts_with('/'));
        match rest {
            Some(rest) => match from_forward_auth(&request, rest, peer, self.proxy) {
                Ok(original) => http_response(&self.authorizer.decide(original).await),
                Err(unreadable) => http_response(&self.authorizer.refuse(400, unreadable.reason, &unreadable.message)),
            },
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Why a forward-auth request cannot be checked: answered 400 with this reason code, never
/// guessed at.
#[derive(Debug, PartialEq, Eq)]
struct Unreadable {
    reason: &'static str,
    message: String,
}

/// The headers each proxy sets on its auth request, overwriting whatever its client sent:
/// the original method, URI (path and query), host and scheme. `None` where the proxy sends the
/// original request itself (Envoy).
fn convention(proxy: ProxyKind) -> Option<[&'static str; 4]> {
    match proxy {
        ProxyKind::Nginx => Some(["x-original-method", "x-original-uri", "x-forwarded-host", "x-forwarded-proto"]),
        ProxyKind::Forwarded => {
            Some(["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host", "x-forwarded-proto"])
        }
        ProxyKind::Envoy => None,
    }
}

/// The original request from a forward-auth request, by the `proxy` convention: only the
/// headers that proxy sets are read; one of them missing or sent twice is a 400, and so are two
/// `Authorization` headers.
fn from_forward_auth<B>(
    request: &Request<B>,
    rest: &str,
    peer: SocketAddr,
    proxy: ProxyKind,
) -> Result<OriginalRequest, Unreadable> {
    let single = |name: &'static str| -> Result<Option<&str>, Unreadable> {
        let mut values = request.headers().get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            let reason = if name == "authorization" { "ambiguous_authorization" } else { "ambiguous_forwarding" };
            return Err(Unreadable { reason, message: format!("the request has more than one `{name}` header") });
        }
        first
            .map(|v| {
                v.to_str()
                    .map_err(|_| Unreadable { reason: "malformed_header", message: format!("`{name}` is not text") })
            })
            .transpose()
    };
    let required = |name: &'static str| {
        single(name)?.ok_or_else(|| Unreadable {
            reason: "missing_forwarding",
            message: format!("the `{name}` header the configured proxy sets is missing"),
        })
    };
    single("authorization")?;
    let (method, uri, host, scheme) = match convention(proxy) {
        Some([method, uri, host, scheme]) => {
            (required(method)?.to_owned(), required(uri)?.to_owned(), required(host)?, required(scheme)?)
        }
        None => {
            let path = if rest.is_empty() { "/" } else { rest };
            let uri = match request.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            let host = single("host")?.or(request.uri().host()).unwrap_or("");
            (request.method().as_str().to_owned(), uri, host, single("x-forwarded-proto")?.unwrap_or("http"))
        }
    };
    let (path, query) = OriginalRequest::split_target(&uri);
    // The rightmost X-Forwarded-For entry is the one the proxy itself appended; the ones
    // before it are whatever the client sent.
    let peer = single("x-forwarded-for")?
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| peer.to_string());
    let headers: Vec<Header> = request
        .headers()
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })
        .collect();
    Ok(OriginalRequest {
        method: method.to_ascii_uppercase(),
        scheme: scheme.to_ascii_lowercase(),
        host: host.to_ascii_lowercase(),
        path,
        query,
        headers,
        peer,
        body: None,
        client_request_id: None,
        trace_metadata: Vec::new(),
    })
}

/// The HTTP status of a deny in forward-auth. Proxies read a 5xx from their auth service as
/// "the auth service is down", and some can be told to let requests through then (Envoy's
/// `failure_mode_allow`): so no deny is ever a 5xx here. `overloaded` is 429 (with
/// `Retry-After`), any other 5xx a policy or the host chose is 403; the reason code says which.
pub(crate) fn deny_status(status: u16, reason: &str) -> StatusCode {
    match status {
        500.. if reason == "overloaded" => StatusCode::TOO_MANY_REQUESTS,
        500.. => StatusCode::FORBIDDEN,
        status => StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
    }
}

/// The forward-auth answer: 200 with identity headers, or the deny's status (never a 5xx),
/// headers and body.
fn http_response(answer: &Answer) -> Response<Full<Bytes>> {
    let mut response = match &answer.evaluation.decision {
        Decision::Allow(_) => Response::new(Full::new(Bytes::new())),
        Decision::Deny(deny) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", deny.message))));
            *response.status_mut() = deny_status(deny.status, &deny.reason);
            put_header(&mut response, "content-type", "text/plain; charset=utf-8");
            put_header(&mut response, "x-content-type-options", "nosniff");
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                put_header(&mut response, "retry-after", "1");
            }
            response
        }
    };
    for (name, value) in answer.headers() {
        put_header(&mut response, name, value);
    }
    if let Decision::Allow(allow) = &answer.evaluation.decision {
        // A configured identity header this allow has no value for is still sent, empty: the
        // proxy copies it over whatever the client sent (nginx, Caddy, Traefik). Envoy removes
        // what this header names, the policy's `remove_headers` included.
        for name in &answer.unset_identity {
            put_header(&mut response, name, "");
        }
        let remove: Vec<&str> = answer.unset_identity.iter().chain(&allow.remove_headers).map(String::as_str).collect();
        if !remove.is_empty() {
            put_header(&mut response, "x-envoy-auth-headers-to-remove", &remove.join(","));
        }
    }
    response
}

fn put_header(response: &mut Response<Full<Bytes>>, name: &str, value: &str) {
    // Decisions are validated by the runtime; anything still unrepresentable is dropped.
    if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        response.headers_mut().append(name, value);
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method("GET").uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 9], 4000))
    }

    fn nginx() -> Vec<(&'static str, &'static str)> {
        vec![
            ("x-original-method", "delete"),
            ("x-original-uri", "/api/x?y=1"),
            ("x-forwarded-host", "App.Example"),
            ("x-forwarded-proto", "https"),
        ]
    }

    #[test]
    fn nginx_reads_the_original_method_uri_host_and_scheme() {
        let o = from_forward_auth(&request("/auth", &nginx()), "", peer(), ProxyKind::Nginx).unwrap();
        assert_eq!(
            (o.method.as_str(), o.path.as_str(), o.query.as_deref(), o.host.as_str(), o.scheme.as_str()),
            ("DELETE", "/api/x", Some("y=1"), "app.example", "https")
        );
    }

    #[test]
    fn a_missing_or_repeated_convention_header_is_unreadable_never_a_default() {
        for missing in ["x-original-method", "x-original-uri", "x-forwarded-host", "x-forwarded-proto"] {
            let headers: Vec<_> = nginx().into_iter().filter(|(n, _)| *n != missing).collect();
            let error = from_forward_auth(&request("/auth", &headers), "", peer(), ProxyKind::Nginx).err();
            assert_eq!(error.map(|e| e.reason), Some("missing_forwarding"), "{missing}");
        }
        let mut twice = nginx();
        twice.push(("x-original-uri", "/public"));
        let error = from_forward_auth(&request("/auth", &twice), "", peer(), ProxyKind::Nginx).err();
        assert_eq!(error.map(|e| e.reason), Some("ambiguous_forwarding"));
        let mut two_tokens = nginx();
        two_tokens.extend([("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        let error = from_forward_auth(&request("/auth", &two_tokens), "", peer(), ProxyKind::Nginx).err();
        assert_eq!(error.map(|e| e.reason), Some("ambiguous_authorization"));
    }

    #[test]
    fn forwarded_reads_the_x_forwarded_headers_and_the_rightmost_client() {
        let r = request(
            "/auth",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/orders"),
                ("x-forwarded-host", "shop"),
                ("x-forwarded-proto", "HTTPS"),
                ("x-forwarded-for", "6.6.6.6, 192.0.2.7"),
                // A client's nginx-style headers are not read in this mode.
                ("x-original-uri", "/public"),
            ],
        );
        let o = from_forward_auth(&r, "", peer(), ProxyKind::Forwarded).unwrap();
        assert_eq!(
            (o.method.as_str(), o.path.as_str(), o.scheme.as_str(), o.peer.as_str()),
            ("POST", "/orders", "https", "192.0.2.7")
        );
    }

    #[test]
    fn envoy_uses_the_path_after_the_prefix_and_ignores_other_conventions() {
        let r = request(
            "/auth/api/orders?x=1",
            &[("x-original-uri", "/public"), ("x-forwarded-uri", "/public"), ("host", "app")],
        );
        let o = from_forward_auth(&r, "/api/orders", peer(), ProxyKind::Envoy).unwrap();
        assert_eq!(
            (o.path.as_str(), o.query.as_deref(), o.host.as_str(), o.peer.as_str()),
            ("/api/orders", Some("x=1"), "app", "10.0.0.9:4000")
        );
    }

    #[test]
    fn no_deny_is_answered_with_a_5xx_a_proxy_could_fail_open_on() {
        assert_eq!(deny_status(503, "overloaded"), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(deny_status(503, "maintenance"), StatusCode::FORBIDDEN);
        assert_eq!(deny_status(500, "policy_said_so"), StatusCode::FORBIDDEN);
        assert_eq!(deny_status(401, "missing_credential"), StatusCode::UNAUTHORIZED);
        assert_eq!(deny_status(404, "hidden"), StatusCode::NOT_FOUND);
        let overloaded = http_response(&Answer::host_deny("r".into(), 503, "overloaded", "busy"));
        assert_eq!(overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(overloaded.headers()["retry-after"], "1");
        assert_eq!(overloaded.headers()["x-sandgate-reason"], "overloaded");
        assert_eq!(overloaded.headers()["x-content-type-options"], "nosniff");
    }

    #[test]
    fn an_allow_sends_unset_identity_headers_empty_and_tells_envoy_what_to_remove() {
        use sandgate_runtime::Evaluation;
        use sandgate_runtime::bindings::sandgate::policy::types::AllowResponse;
        let decision =
            Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: vec!["x-internal".into()] });
        let answer = Answer {
            request_id: "r".into(),
            evaluation: Evaluation::decided(decision),
            identity: Vec::new(),
            unset_identity: vec!["x-auth-subject".into()],
        };
        let response = http_response(&answer);
        assert_eq!(response.headers()["x-auth-subject"], "");
        assert_eq!(response.headers()["x-envoy-auth-headers-to-remove"], "x-auth-subject,x-internal");
    }
}
