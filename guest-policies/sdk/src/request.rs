//! The request a policy decides on, read from the host part by part.

use crate::{
    Credential, Decision, DecisionExt, Header, Principal, SnapshotVersions, StandardClaims, VerifiedCredential, deny,
};
use std::sync::OnceLock;

/// The request a policy decides on: what the proxy or application asks about, and the host's
/// verdict on its bearer token.
///
/// In a policy built for WebAssembly each part is read from the host the first time it is
/// asked for and kept for the rest of the check, so a policy pays only for what it reads. Under
/// `cargo test` it is built whole, from [`RequestParts`] or by [`crate::testing`].
#[derive(Clone)]
pub struct Request {
    request_id: OnceLock<String>,
    method: OnceLock<String>,
    scheme: OnceLock<String>,
    host: OnceLock<String>,
    path: OnceLock<String>,
    query: OnceLock<Option<String>>,
    headers: OnceLock<Vec<Header>>,
    peer: OnceLock<Option<String>>,
    body: OnceLock<Option<Vec<u8>>>,
    credential: OnceLock<Credential>,
    /// The verified credential's subject, roles and scopes, when read without the rest of it.
    principal: OnceLock<Option<Principal>>,
    /// The pinned time and versions: one host call answers both.
    context: OnceLock<(u64, SnapshotVersions)>,
}

/// Every part of a [`Request`], to build one whole (in tests).
#[derive(Debug, Clone)]
pub struct RequestParts {
    /// Unique id of this check, also written in the decision log.
    pub request_id: String,
    /// HTTP method, uppercase.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// The `Host` the client asked for.
    pub host: String,
    /// The path, percent-encoding preserved, starting with `/`.
    pub path: String,
    /// The query string without `?`.
    pub query: Option<String>,
    /// Every header, lowercase names, in the order received.
    pub headers: Vec<Header>,
    /// The client's address as `ip:port`.
    pub peer: Option<String>,
    /// The body, if the proxy sent it.
    pub body: Option<Vec<u8>>,
    /// The host's verdict on the bearer token.
    pub credential: Credential,
    /// The time of the check, Unix seconds.
    pub now: u64,
    /// The pinned snapshot versions.
    pub versions: SnapshotVersions,
}

/// The host's answers, one call each (contract 0.2.0's `request` interface).
#[cfg(target_arch = "wasm32")]
mod from_host {
    pub(super) use crate::bindings::sandgate::policy::request::{
        body, claim, context, credential, header, headers, host, method, path, peer, principal, query, request_id,
        scheme,
    };
}

/// Natively a [`Request`] is always built whole: these never run.
#[cfg(not(target_arch = "wasm32"))]
mod from_host {
    use crate::{Credential, Header, Principal};

    pub(super) struct Context {
        pub(super) now: u64,
        pub(super) versions: crate::SnapshotVersions,
    }

    macro_rules! empty {
        ($($name:ident -> $ty:ty),*) => { $(pub(super) fn $name() -> $ty { Default::default() })* };
    }
    empty!(request_id -> String, method -> String, scheme -> String, host -> String, path -> String,
        query -> Option<String>, headers -> Vec<Header>, peer -> Option<String>, body -> Option<Vec<u8>>);

    pub(super) fn header(_: &str) -> Option<String> {
        None
    }

    pub(super) fn credential() -> Credential {
        Credential::None
    }

    pub(super) fn principal() -> Option<Principal> {
        None
    }

    pub(super) fn claim(_: &str) -> Option<String> {
        None
    }

    pub(super) fn context() -> Context {
        let versions =
            crate::SnapshotVersions { snapshot: 0, policy_digest: String::new(), key_set: 0, revocations: 0, data: 0 };
        Context { now: 0, versions }
    }
}

impl Request {
    /// The request of this check, read from the host as its parts are asked for.
    #[doc(hidden)]
    pub fn from_host() -> Self {
        Request {
            request_id: OnceLock::new(),
            method: OnceLock::new(),
            scheme: OnceLock::new(),
            host: OnceLock::new(),
            path: OnceLock::new(),
            query: OnceLock::new(),
            headers: OnceLock::new(),
            peer: OnceLock::new(),
            body: OnceLock::new(),
            credential: OnceLock::new(),
            principal: OnceLock::new(),
            context: OnceLock::new(),
        }
    }

    /// A request with every part given (natively, in tests).
    pub fn from_parts(parts: RequestParts) -> Self {
        Request {
            request_id: parts.request_id.into(),
            method: parts.method.into(),
            scheme: parts.scheme.into(),
            host: parts.host.into(),
            path: parts.path.into(),
            query: parts.query.into(),
            headers: parts.headers.into(),
            peer: parts.peer.into(),
            body: parts.body.into(),
            credential: parts.credential.into(),
            principal: OnceLock::new(),
            context: (parts.now, parts.versions).into(),
        }
    }

    /// Unique id of this check, also written in the decision log.
    pub fn request_id(&self) -> &str {
        self.request_id.get_or_init(from_host::request_id)
    }

    /// HTTP method, uppercase, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.method.get_or_init(from_host::method)
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &str {
        self.scheme.get_or_init(from_host::scheme)
    }

    /// The `Host` (authority) the client asked for, without port if none was given.
    pub fn host(&self) -> &str {
        self.host.get_or_init(from_host::host)
    }

    /// The path, percent-encoding preserved, always starting with `/`.
    pub fn path(&self) -> &str {
        self.path.get_or_init(from_host::path)
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.query.get_or_init(from_host::query).as_deref()
    }

    /// The first value of header `name` (case-insensitive). Asks the host for this header
    /// alone unless [`Request::headers`] has already read them all. Each call is a new host
    /// call and a new copy, and a policy's memory is never freed during a check: keep the
    /// value if you need it again, or read [`Request::headers`] once.
    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.get() {
            Some(headers) => headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.clone()),
            None => from_host::header(name),
        }
    }

    /// Every request header, lowercase names, grouped by name; a header sent several times
    /// appears several times, its values in the order they were received.
    pub fn headers(&self) -> &[Header] {
        self.headers.get_or_init(from_host::headers)
    }

    /// The client's address, if known: the last `X-Forwarded-For` entry (the one the proxy
    /// appended) or Envoy's source address, else the check's connection as `ip:port`.
    pub fn peer(&self) -> Option<&str> {
        self.peer.get_or_init(from_host::peer).as_deref()
    }

    /// The request body, if the proxy sent it, truncated to the host's configured cap.
    pub fn body(&self) -> Option<&[u8]> {
        self.body.get_or_init(from_host::body).as_deref()
    }

    /// The host's verdict on the caller's bearer token: none, verified or rejected.
    pub fn verdict(&self) -> &Credential {
        self.credential.get_or_init(from_host::credential)
    }

    /// The time of this check as Unix seconds, pinned once: use it instead of a clock.
    pub fn now(&self) -> u64 {
        self.context().0
    }

    /// The versions of everything the host pinned for this check.
    pub fn versions(&self) -> &SnapshotVersions {
        &self.context().1
    }

    /// One `context` call answers both the time and the versions.
    fn context(&self) -> &(u64, SnapshotVersions) {
        self.context.get_or_init(|| {
            let context = from_host::context();
            (context.now, context.versions)
        })
    }

    /// The bearer token of the `Authorization` header, if any.
    pub fn bearer_token(&self) -> Option<String> {
        let value = self.header("authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned()).filter(|t| !t.is_empty())
    }

    /// The verified credential, if the host verified one.
    pub fn credential(&self) -> Option<&VerifiedCredential> {
        match self.verdict() {
            Credential::Verified(v) => Some(v),
            _ => None,
        }
    }

    /// The verified standard claims, if the host verified a credential. This reads the whole
    /// credential; [`Request::subject`], [`Request::roles`] and [`Request::has_scope`] cost
    /// less when they are all a policy needs.
    pub fn claims(&self) -> Option<&StandardClaims> {
        self.credential().map(|c| &c.claims)
    }

    /// The subject, roles and scopes of the verified credential, read alone unless the whole
    /// credential has been read already.
    fn principal(&self) -> Option<&Principal> {
        self.principal
            .get_or_init(|| match self.credential.get() {
                Some(Credential::Verified(c)) => Some(Principal {
                    subject: c.claims.subject.clone(),
                    roles: c.claims.roles.clone(),
                    scopes: c.claims.scopes.clone(),
                }),
                Some(Credential::None | Credential::Rejected(_)) => None,
                None => from_host::principal(),
            })
            .as_ref()
    }

    /// The verified credential's subject (`sub`, empty when absent), if the host verified a
    /// credential.
    pub fn subject(&self) -> Option<&str> {
        self.principal().map(|p| p.subject.as_str())
    }

    /// The verified credential's roles; none without a verified credential.
    pub fn roles(&self) -> &[String] {
        self.principal().map_or(&[], |p| &p.roles)
    }

    /// Any claim of the verified credential by name. Asked of the host alone (one claim, not
    /// the whole credential) unless the whole credential has been read already; each call is
    /// a new host call.
    pub fn claim(&self, name: &str) -> Option<serde_json::Value> {
        match self.credential.get() {
            Some(Credential::Verified(c)) => sandgate_spec::claim(&c.claims_json, name),
            Some(Credential::None | Credential::Rejected(_)) => None,
            None => serde_json::from_str(&from_host::claim(name)?).ok(),
        }
    }

    /// Whether the verified credential carries this OAuth scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.principal().is_some_and(|p| p.scopes.iter().any(|s| s == scope))
    }

    /// Whether the verified credential carries this role.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles().iter().any(|r| r == role)
    }

    /// The deny a policy usually answers when the credential is missing or was rejected:
    /// 401 with `WWW-Authenticate: Bearer` and the host's reason code. `None` when verified.
    /// A verified credential is recognised without reading it whole (a missing or rejected one
    /// takes a second host call, for its reason).
    pub fn unauthenticated(&self) -> Option<Decision> {
        if self.principal().is_some() {
            return None;
        }
        let (reason, message) = match self.verdict() {
            Credential::Verified(_) => return None,
            Credential::None => ("missing_credential", "a bearer token is required"),
            Credential::Rejected(e) => (e.reason.as_str(), e.message.as_str()),
        };
        Some(deny(401, reason).message(message).set_header("www-authenticate", "Bearer"))
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // What has been read so far; nothing is fetched to print it.
        f.debug_struct("Request")
            .field("method", &self.method.get())
            .field("path", &self.path.get())
            .field("credential", &self.credential.get())
            .finish_non_exhaustive()
    }
}
