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
}

impl ForwardAuth {
    /// Checks under `auth_prefix`, original requests read by the `proxy` convention; `/readyz`
    /// answers 200 once `ready` is set and a policy is loaded.
    pub fn new(authorizer: Arc<Authorizer>, auth_prefix: &str, proxy: ProxyKind, ready: Arc<AtomicBool>) -> Self {
        ForwardAuth { authorizer, auth_prefix: auth_prefix.trim_end_matches('/').to_owned(), proxy, ready }
    }

    /// Answer one HTTP request.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let state = self.authorizer.state();
        if path == "/healthz" {
            return text(StatusCode::OK, "ok\n");
        }
        if path == "/readyz" {
            let ready = self.ready.load(Ordering::SeqCst) && !state.store.load().policies.is_empty();
            return if ready {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            };
        }
        if path == "/metrics" {
            state.metrics.pool_in_use.set(state.runtime.instances_in_use() as i64);
            let mut response = text(StatusCode::OK, &state.metrics.encode());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return response;
        }
        let rest = path.strip_prefix(self.auth_prefix.as_str()).filter(|rest| rest.is_empty() || rest.starts_with('/'));
        match rest {
            Some(rest) => {
                let original = from_forward_auth(&request, rest, peer, self.proxy);
                http_response(&self.authorizer.decide(original).await)
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// The original request from a forward-auth request, by the `proxy` convention.
fn from_forward_auth<B>(request: &Request<B>, rest: &str, peer: SocketAddr, proxy: ProxyKind) -> OriginalRequest {
    let headers: Vec<Header> = request
        .headers()
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })
        .collect();
    let find = |name: &str| headers.iter().find(|h| h.name == name).map(|h| h.value.as_str());
    let proxy = match proxy {
        ProxyKind::Auto if find("x-original-uri").is_some() => ProxyKind::Nginx,
        ProxyKind::Auto if find("x-forwarded-uri").is_some() => ProxyKind::Forwarded,
        ProxyKind::Auto => ProxyKind::Envoy,
        explicit => explicit,
    };
    let own_uri = || {
        let path = if rest.is_empty() { "/" } else { rest };
        match request.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        }
    };
    let own_method = request.method().as_str();
    let own_host = find("host").or(request.uri().host());
    // Which headers carry the original method and URI; Envoy sends the request itself.
    let original = match proxy {
        ProxyKind::Nginx => Some(("x-original-method", "x-original-uri")),
        ProxyKind::Forwarded => Some(("x-forwarded-method", "x-forwarded-uri")),
        ProxyKind::Envoy | ProxyKind::Auto => None,
    };
    let (method, uri, host) = match original {
        Some((method, uri)) => (
            find(method).unwrap_or(own_method),
            find(uri).map_or_else(own_uri, str::to_owned),
            find("x-forwarded-host").or(own_host),
        ),
        None => (own_method, own_uri(), own_host),
    };
    let scheme = find("x-forwarded-proto");
    let (path, query) = OriginalRequest::split_target(&uri);
    // The rightmost X-Forwarded-For entry is the one the proxy itself appended; the ones
    // before it are whatever the client sent.
    let peer = find("x-forwarded-for")
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| peer.to_string());
    OriginalRequest {
        method: method.to_ascii_uppercase(),
        scheme: scheme.unwrap_or("http").to_ascii_lowercase(),
        host: host.unwrap_or("").to_ascii_lowercase(),
        path,
        query,
        headers,
        peer,
        body: None,
    }
}

/// The forward-auth answer: 200 with identity headers, or the deny's status, headers and body.
fn http_response(answer: &Answer) -> Response<Full<Bytes>> {
    let mut response = match &answer.evaluation.decision {
        Decision::Allow(_) => Response::new(Full::new(Bytes::new())),
        Decision::Deny(deny) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", deny.message))));
            *response.status_mut() = StatusCode::from_u16(deny.status).unwrap_or(StatusCode::FORBIDDEN);
            put_header(&mut response, "content-type", "text/plain; charset=utf-8");
            response
        }
    };
    for (name, value) in answer.headers() {
        put_header(&mut response, name, value);
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

    #[test]
    fn nginx_reads_the_original_method_and_uri() {
        let r = request(
            "/auth",
            &[("x-original-method", "delete"), ("x-original-uri", "/api/x?y=1"), ("x-forwarded-host", "App.Example")],
        );
        let o = from_forward_auth(&r, "", peer(), ProxyKind::Nginx);
        assert_eq!(
            (o.method.as_str(), o.path.as_str(), o.query.as_deref(), o.host.as_str()),
            ("DELETE", "/api/x", Some("y=1"), "app.example")
        );
    }

    #[test]
    fn forwarded_reads_the_x_forwarded_headers_and_the_rightmost_client() {
        let r = request(
            "/auth",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/orders"),
                ("x-forwarded-proto", "HTTPS"),
                ("x-forwarded-for", "6.6.6.6, 192.0.2.7"),
            ],
        );
        let o = from_forward_auth(&r, "", peer(), ProxyKind::Forwarded);
        assert_eq!(
            (o.method.as_str(), o.path.as_str(), o.scheme.as_str(), o.peer.as_str()),
            ("POST", "/orders", "https", "192.0.2.7")
        );
    }

    #[test]
    fn envoy_uses_the_path_after_the_prefix_and_ignores_other_conventions() {
        let r = request("/auth/api/orders?x=1", &[("x-original-uri", "/public"), ("host", "app")]);
        let o = from_forward_auth(&r, "/api/orders", peer(), ProxyKind::Envoy);
        assert_eq!(
            (o.path.as_str(), o.query.as_deref(), o.host.as_str(), o.peer.as_str()),
            ("/api/orders", Some("x=1"), "app", "10.0.0.9:4000")
        );
        // A proxy named explicitly never reads another proxy's headers.
        let o = from_forward_auth(&request("/auth", &[("x-forwarded-uri", "/public")]), "", peer(), ProxyKind::Nginx);
        assert_eq!(o.path, "/");
    }
}
