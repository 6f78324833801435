//! The forward-auth HTTP server: proxies ask, Sandgate answers 2xx (allow, with identity
//! headers) or 401/403 (deny, with a reason).
//!
//! The original request is read from `X-Forwarded-Method`/`-Uri`/`-Host`/`-Proto` (Traefik,
//! Caddy), `X-Original-Method`/`X-Original-URI` (nginx), or, failing those, the path after the
//! auth prefix (Envoy HTTP ext_authz). These headers are trusted: Sandgate is a sidecar that
//! only the proxy in front of the application can reach.

use crate::bindings::sandgate::policy::types::{CheckRequest, Credential, Decision, Header};
use crate::config::{Config, ProxyKind, ServerConfig};
use crate::host_calls::PolicyData;
use crate::jwks_fetcher::JwksFetcher;
use crate::keys::{Issuer, KeySets, Rejection, Revocations};
use crate::metrics::{DecisionLabels, Metrics};
use crate::snapshot::{LoadedPolicy, Route, Snapshot, SnapshotStore};
use crate::token_cache::TokenCache;
use crate::{EvalContext, Evaluation, Runtime};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

/// The longest a check waits for a JWKS fetch triggered by an unknown `kid`.
const UNKNOWN_KID_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything the server shares between connections.
pub struct App {
    /// The current snapshot.
    pub store: Arc<SnapshotStore>,
    /// The policy runtime.
    pub runtime: Arc<Runtime>,
    /// JWKS fetching.
    pub fetcher: Arc<JwksFetcher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    settings: ServerConfig,
    ready: AtomicBool,
    request_ids: AtomicU64,
    id_prefix: String,
    native_baseline: Option<NativePolicy>,
    /// Digests the admin API and policy directory may load; empty: any.
    pub(crate) allowed_digests: std::collections::HashSet<String>,
    pub(crate) recent_modules: crate::admin::RecentModules,
    /// Verified tokens; `None` when `token_cache_size` is 0.
    pub token_cache: Option<TokenCache>,
    /// Serialises module uploads from compile to publish, so a quick upload (a cached
    /// rollback) cannot be overtaken by a slower one that started before it.
    pub(crate) module_writes: tokio::sync::Mutex<()>,
}

/// Policy logic compiled into the host: for the load benchmark's native baseline only.
#[doc(hidden)]
pub type NativePolicy = Arc<dyn Fn(&CheckRequest, &PolicyData) -> Decision + Send + Sync>;

fn native_evaluation(decision: Decision) -> Evaluation {
    Evaluation { decision, fault: None, logs: Vec::new(), memory_grows: 0, queued: false }
}

impl App {
    /// Load policies and static keys from `config` (compiling modules), ready to serve once
    /// [`App::start`] has fetched the JWKS endpoints.
    pub fn new(config: &Config) -> anyhow::Result<Arc<App>> {
        let runtime = Arc::new(Runtime::new(config.runtime.runtime_config())?);
        let mut policies = HashMap::new();
        for p in &config.policies {
            let bytes = std::fs::read(&p.module).with_context(|| format!("policy `{}`: cannot read `{}`", p.id, p.module.display()))?;
            let module = runtime.load(&bytes).with_context(|| format!("policy `{}` (`{}`)", p.id, p.module.display()))?;
            let value = match &p.data {
                Some(path) => serde_json::from_slice(&std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?)
                    .with_context(|| format!("policy `{}`: data `{}` is not JSON", p.id, path.display()))?,
                None => Value::Null,
            };
            let loaded = LoadedPolicy {
                id: p.id.clone(),
                module,
                data: Arc::new(PolicyData::new(value, 1)),
                loaded_at: SystemTime::now(),
                shadow: None,
            };
            policies.insert(p.id.clone(), Arc::new(loaded));
        }
        let mut issuers = HashMap::new();
        for i in &config.issuers {
            issuers.insert(i.issuer.clone(), Arc::new(Issuer::from_config(i)?));
        }
        let routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.clone().unwrap_or_else(|| "/".into()),
                policy: r.policy.clone(),
            })
            .collect();
        let snapshot = Snapshot {
            version: 1,
            policies,
            routes: routes.into(),
            default_policy: config.server.default_policy.clone(),
            keys: Arc::new(KeySets { version: 1, issuers }),
            revocations: Arc::new(Revocations {
                version: 1,
                jtis: config.revocations.jtis.iter().cloned().collect(),
                subjects: config.revocations.subjects.iter().cloned().collect(),
            }),
        };
        let store = Arc::new(SnapshotStore::new(snapshot));
        let metrics = Arc::new(Metrics::default());
        let fetcher = Arc::new(JwksFetcher::new(&config.issuers, store.clone(), metrics.clone())?);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Ok(Arc::new(App {
            store,
            runtime,
            fetcher,
            metrics,
            settings: config.server.clone(),
            ready: AtomicBool::new(false),
            request_ids: AtomicU64::new(0),
            id_prefix: format!("{:08x}", nanos ^ std::process::id()),
            native_baseline: None,
            allowed_digests: config.admin.iter().flat_map(|a| a.allowed_digests.iter().cloned()).collect(),
            recent_modules: Default::default(),
            token_cache: TokenCache::new(config.server.token_cache_size),
            module_writes: tokio::sync::Mutex::new(()),
        }))
    }

    /// The same server with policies evaluated by `native` instead of in Wasm: the load
    /// benchmark's baseline (same HTTP, JWT verification, snapshot and decision log). Never
    /// for production: there is no isolation.
    #[doc(hidden)]
    pub fn new_native_baseline(config: &Config, native: NativePolicy) -> anyhow::Result<Arc<App>> {
        let app = App::new(config)?;
        let mut app = Arc::into_inner(app).context("fresh app")?;
        app.native_baseline = Some(native);
        Ok(Arc::new(app))
    }

    /// Fetch JWKS endpoints (failures are logged and retried later), start periodic refresh,
    /// and become ready.
    pub async fn start(self: &Arc<Self>) {
        if let Err(e) = self.fetcher.fetch_all().await {
            tracing::warn!(error = format!("{e:#}"), "initial JWKS fetch failed; will retry on demand");
        }
        self.fetcher.spawn_refresh();
        if let Some(dir) = &self.settings.policy_dir {
            let every = std::time::Duration::from_millis(self.settings.policy_dir_poll_ms.max(10));
            crate::admin::watch_policy_dir(self.clone(), dir.clone(), every);
        }
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Answer one HTTP request.
    pub async fn handle(self: &Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if path == "/healthz" {
            return text(StatusCode::OK, "ok\n");
        }
        if path == "/readyz" {
            let ready = self.ready.load(Ordering::SeqCst) && !self.store.load().policies.is_empty();
            return if ready { text(StatusCode::OK, "ready\n") } else { text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n") };
        }
        if path == "/metrics" {
            self.metrics.pool_in_use.set(self.runtime.instances_in_use() as i64);
            let mut response = text(StatusCode::OK, &self.metrics.encode());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return response;
        }
        let prefix = self.settings.auth_prefix.trim_end_matches('/');
        let rest = path.strip_prefix(prefix).filter(|rest| rest.is_empty() || rest.starts_with('/'));
        match rest {
            Some(rest) => {
                let rest = rest.to_owned();
                self.check(request, &rest, peer).await
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn check(self: &Arc<Self>, request: Request<Incoming>, rest: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
        let decided = self.decide(OriginalRequest::from_forward_auth(&request, rest, peer, self.settings.proxy)).await;
        http_response(&decided)
    }

    /// Decide on one original request, whatever protocol it came in: pin a snapshot, route,
    /// authenticate, evaluate, then count and log the decision.
    pub async fn decide(self: &Arc<Self>, mut original: OriginalRequest) -> Decided {
        let started = Instant::now();
        let request_id = original
            .header("x-request-id")
            .filter(|id| id.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", self.id_prefix, self.request_ids.fetch_add(1, Ordering::Relaxed)));

        let mut snapshot = self.store.load();
        if original.is_ambiguous_path() {
            let decided = Decided::host_deny(request_id, 400, "ambiguous_path", "the path has dot segments, empty segments or encoded slashes");
            self.record(&original, &decided, None, &snapshot, None, started);
            return decided;
        }
        let Some((policy_id, _)) = snapshot.route(&original.host, &original.path) else {
            let decided = Decided::host_deny(request_id, 403, "no_route", "no route matches this request");
            self.record(&original, &decided, None, &snapshot, None, started);
            return decided;
        };
        let policy_id = policy_id.to_owned();
        let credential = match original.bearer() {
            Bearer::None => Credential::None,
            Bearer::Malformed => Credential::Rejected(crate::bindings::sandgate::policy::types::CredentialError {
                reason: "malformed_authorization".into(),
                message: "the Authorization header is not `Bearer <token>`".into(),
            }),
            Bearer::Token(token) => {
                let (credential, pinned) = self.authenticate(token, snapshot).await;
                snapshot = pinned;
                credential
            }
        };
        // The policy comes from the snapshot the credential was verified against.
        let Some((_, policy)) = snapshot.route(&original.host, &original.path) else {
            let decided = Decided::host_deny(request_id, 403, "no_route", "no route matches this request");
            self.record(&original, &decided, Some(&policy_id), &snapshot, None, started);
            return decided;
        };
        let policy = policy.clone();
        let check = CheckRequest {
            request_id: request_id.clone(),
            method: original.method.clone(),
            scheme: original.scheme.clone(),
            host: original.host.clone(),
            path: original.path.clone(),
            query: original.query.clone(),
            // The log line needs only method, host and path: move the rest.
            headers: std::mem::take(&mut original.headers),
            peer: Some(std::mem::take(&mut original.peer)),
            body: original.body.take(),
            credential,
            now: crate::request::unix_now(),
            versions: snapshot.versions(&policy),
        };
        let context = EvalContext { data: policy.data.clone(), verifier: Some(snapshot.clone()) };
        let evaluation = match &self.native_baseline {
            Some(native) => native_evaluation(native(&check, &policy.data)),
            None => self.runtime.check(&policy.module, &check, &context).await,
        };
        if evaluation.queued {
            self.metrics.queue_waits.inc();
        }
        if let Some(candidate) = &policy.shadow {
            self.shadow_evaluate(candidate.clone(), policy.id.clone(), check.clone(), context, &evaluation);
        }
        let identity = if evaluation.is_allow() { self.identity_headers(&check.credential) } else { Vec::new() };
        let unset_identity = self
            .settings
            .identity_headers
            .keys()
            .filter(|name| evaluation.is_allow() && !identity.iter().any(|(n, _)| n == *name))
            .cloned()
            .collect();
        let decided = Decided { request_id, evaluation, identity, unset_identity };
        self.record(&original, &decided, Some(&policy.id), &snapshot, Some((&policy, &check)), started);
        decided
    }

    /// Verify a bearer token against `snapshot` at `now`, through the verified-token cache:
    /// the signature check is skipped for a token verified before under the same key-set
    /// version and not past its `exp`; revocation is checked every time.
    pub fn verify_token(&self, token: &str, snapshot: &Snapshot, now: u64) -> Result<crate::bindings::sandgate::policy::types::VerifiedCredential, Rejection> {
        let keys = &snapshot.keys;
        let cached = self.token_cache.as_ref().map(|cache| (cache, TokenCache::key(token, keys.version)));
        let credential = match cached.as_ref().and_then(|(cache, key)| cache.get(key, now)) {
            Some(credential) => credential,
            None => {
                let credential = keys.verify_signature(token)?;
                if let Some((cache, key)) = cached {
                    cache.insert(key, now, &credential);
                }
                credential
            }
        };
        crate::keys::check_revocation(&credential, &snapshot.revocations)?;
        Ok(credential)
    }

    /// Evaluate a shadow candidate on the same request, after the answer and off its path:
    /// the candidate never affects it. Disagreements are counted and logged.
    fn shadow_evaluate(self: &Arc<Self>, candidate: crate::PolicyModule, policy: String, check: CheckRequest, context: EvalContext, primary: &Evaluation) {
        let primary = crate::request::outcome(&primary.decision);
        let app = self.clone();
        tokio::spawn(async move {
            // Only on a free instance: a shadow must never make a live check wait.
            let Some(shadow) = app.runtime.try_check(&candidate, &check, &context) else {
                app.metrics.shadow.get_or_create(&crate::metrics::ShadowLabels { policy, result: "skipped" }).inc();
                return;
            };
            let shadow = crate::request::outcome(&shadow.decision);
            let agree = shadow == primary;
            let result = if agree { "agree" } else { "disagree" };
            app.metrics.shadow.get_or_create(&crate::metrics::ShadowLabels { policy: policy.clone(), result }).inc();
            if !agree {
                let line = serde_json::json!({
                    "shadow_disagreement": true,
                    "request_id": check.request_id,
                    "policy": policy,
                    "candidate_digest": candidate.digest(),
                    "primary": primary.to_string(),
                    "candidate": shadow.to_string(),
                });
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        });
    }

    /// Verify a bearer token against `snapshot`; on an unknown `kid` of an issuer with a JWKS
    /// endpoint, fetch (single flight) and verify again against the snapshot that fetch
    /// published. Returns the credential and the snapshot it was decided on.
    async fn authenticate(&self, token: &str, snapshot: Arc<Snapshot>) -> (Credential, Arc<Snapshot>) {
        match self.verify_token(token, &snapshot, crate::request::unix_now()) {
            Ok(verified) => (Credential::Verified(verified), snapshot),
            Err(Rejection::UnknownKid { issuer, kid }) => {
                // A check never waits long on a fetch: a token with a made-up kid must not be
                // able to hold it past a proxy's timeout.
                let resolve = self.fetcher.resolve_unknown_kid(&issuer, &kid);
                if !tokio::time::timeout(UNKNOWN_KID_WAIT, resolve).await.unwrap_or(false) {
                    let rejection = Rejection::UnknownKid { issuer, kid };
                    return (Credential::Rejected(rejection.to_credential_error()), snapshot);
                }
                let snapshot = self.store.load();
                let credential = match self.verify_token(token, &snapshot, crate::request::unix_now()) {
                    Ok(verified) => Credential::Verified(verified),
                    Err(rejection) => Credential::Rejected(rejection.to_credential_error()),
                };
                (credential, snapshot)
            }
            Err(rejection) => (Credential::Rejected(rejection.to_credential_error()), snapshot),
        }
    }

    /// Count the decision and write its decision-log line.
    fn record(
        &self,
        original: &OriginalRequest,
        decided: &Decided,
        policy_id: Option<&str>,
        snapshot: &Snapshot,
        checked: Option<(&LoadedPolicy, &CheckRequest)>,
        started: Instant,
    ) {
        let evaluation = &decided.evaluation;
        let latency = started.elapsed();
        let outcome = if evaluation.is_allow() { "allow" } else { "deny" };
        self.metrics.decisions.get_or_create(&DecisionLabels { outcome, reason: evaluation.reason().to_owned() }).inc();
        self.metrics.latency.observe(latency.as_secs_f64());
        let credential = checked.map(|(_, c)| match &c.credential {
            Credential::None => "none",
            Credential::Verified(_) => "verified",
            Credential::Rejected(e) => e.reason.as_str(),
        });
        let entry = DecisionLogEntry {
            ts: crate::request::unix_now(),
            request_id: &decided.request_id,
            method: &original.method,
            host: &original.host,
            path: &original.path,
            policy: policy_id,
            policy_digest: checked.map(|(p, _)| p.module.digest()),
            snapshot: snapshot.version,
            key_set: snapshot.keys.version,
            revocations: snapshot.revocations.version,
            data: checked.map(|(p, _)| p.data.version),
            credential,
            subject: checked.and_then(|(_, c)| match &c.credential {
                Credential::Verified(v) => Some(v.claims.subject.as_str()),
                _ => None,
            }),
            outcome,
            status: decided.status(),
            reason: evaluation.reason(),
            fault: evaluation.fault.as_ref().map(ToString::to_string),
            policy_logs: &evaluation.logs,
            latency_us: latency.as_micros() as u64,
        };
        write_decision_log(&entry);
    }

    /// The configured identity headers for a verified credential.
    fn identity_headers(&self, credential: &Credential) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        let Credential::Verified(verified) = credential else { return headers };
        if self.settings.identity_headers.is_empty() {
            return headers;
        }
        let Ok(claims) = serde_json::from_str::<serde_json::Map<String, Value>>(&verified.claims_json) else { return headers };
        for (header, claim) in &self.settings.identity_headers {
            let value = match claims.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if crate::runtime::is_header_value(&value) {
                headers.push((header.clone(), value));
            }
        }
        headers
    }
}

/// A decision, ready to be answered in any protocol.
pub struct Decided {
    /// The check's id (the caller's `x-request-id`, or one made up).
    pub request_id: String,
    /// The decision and how it was reached.
    pub evaluation: Evaluation,
    /// Configured identity headers to add to an allow.
    pub identity: Vec<(String, String)>,
    /// Configured identity headers this allow has no value for: a proxy that can remove
    /// upstream headers (Envoy) removes them, so a client cannot supply its own.
    pub unset_identity: Vec<String>,
}

impl Decided {
    fn host_deny(request_id: String, status: u16, reason: &str, message: &str) -> Self {
        Decided { request_id, evaluation: host_deny(status, reason, message), identity: Vec::new(), unset_identity: Vec::new() }
    }

    /// The HTTP status this decision answers: 200 for an allow.
    pub fn status(&self) -> u16 {
        match &self.evaluation.decision {
            Decision::Allow(_) => 200,
            Decision::Deny(d) => d.status,
        }
    }

    /// Headers of the answer: for an allow, the upstream headers (the policy's, then the
    /// identity headers); for a deny, the response headers, with `www-authenticate` on a 401
    /// and `x-sandgate-reason`. Always `x-sandgate-request-id`.
    pub fn headers(&self) -> Vec<(&str, &str)> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        match &self.evaluation.decision {
            Decision::Allow(allow) => {
                headers.extend(allow.set_headers.iter().map(|h| (h.name.as_str(), h.value.as_str())));
                headers.extend(self.identity.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            }
            Decision::Deny(deny) => {
                headers.extend(deny.headers.iter().map(|h| (h.name.as_str(), h.value.as_str())));
                if deny.status == 401 && !deny.headers.iter().any(|h| h.name.eq_ignore_ascii_case("www-authenticate")) {
                    headers.push(("www-authenticate", "Bearer"));
                }
                headers.push(("x-sandgate-reason", &deny.reason));
            }
        }
        headers.push(("x-sandgate-request-id", &self.request_id));
        headers
    }
}

/// The forward-auth answer: 200 with identity headers, or the deny's status, headers and body.
fn http_response(decided: &Decided) -> Response<Full<Bytes>> {
    let mut response = match &decided.evaluation.decision {
        Decision::Allow(_) => Response::new(Full::new(Bytes::new())),
        Decision::Deny(deny) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", deny.message))));
            *response.status_mut() = StatusCode::from_u16(deny.status).unwrap_or(StatusCode::FORBIDDEN);
            put_header(&mut response, "content-type", "text/plain; charset=utf-8");
            response
        }
    };
    for (name, value) in decided.headers() {
        put_header(&mut response, name, value);
    }
    response
}

/// One line of the decision log: everything needed to explain the decision.
#[derive(serde::Serialize)]
struct DecisionLogEntry<'a> {
    ts: u64,
    request_id: &'a str,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    policy: Option<&'a str>,
    policy_digest: Option<&'a str>,
    snapshot: u64,
    key_set: u64,
    revocations: u64,
    data: Option<u64>,
    /// `none`, `verified`, or the reason the credential was rejected.
    credential: Option<&'a str>,
    subject: Option<&'a str>,
    outcome: &'static str,
    status: u16,
    reason: &'a str,
    fault: Option<String>,
    policy_logs: &'a [crate::host_calls::PolicyLog],
    latency_us: u64,
}

/// The decision log is stdout, one JSON object a line, written whole with one `write`. A
/// closed stdout must not stop authorization, so a write error is ignored.
fn write_decision_log(entry: &DecisionLogEntry<'_>) {
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with_borrow_mut(|line| {
        line.clear();
        if serde_json::to_writer(&mut *line, entry).is_ok() {
            line.push(b'\n');
            let _ = std::io::stdout().lock().write_all(line);
        }
    });
}

fn host_deny(status: u16, reason: &str, message: &str) -> Evaluation {
    native_evaluation(Decision::Deny(crate::bindings::sandgate::policy::types::DenyResponse {
        status,
        reason: reason.into(),
        message: message.into(),
        headers: Vec::new(),
    }))
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

enum Bearer<'a> {
    None,
    Malformed,
    Token(&'a str),
}

/// The request the proxy asks about, as any protocol delivers it.
pub struct OriginalRequest {
    /// Method, uppercase.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Host, lowercase.
    pub host: String,
    /// Path, starting with `/`.
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
    /// Headers, lowercase names.
    pub headers: Vec<Header>,
    /// Client address.
    pub peer: String,
    /// Body, if the proxy sent one (already capped).
    pub body: Option<Vec<u8>>,
}

impl OriginalRequest {
    fn from_forward_auth(request: &Request<Incoming>, rest: &str, peer: SocketAddr, proxy: ProxyKind) -> Self {
        let headers: Vec<Header> = request
            .headers()
            .iter()
            .map(|(name, value)| Header { name: name.as_str().to_owned(), value: String::from_utf8_lossy(value.as_bytes()).into_owned() })
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
        let (path, query) = Self::split_target(&uri);
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

    /// Split a request target into its path (always starting with `/`) and query.
    pub(crate) fn split_target(target: &str) -> (String, Option<String>) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
        (path, query)
    }

    /// Whether the path could mean something else to the upstream than to the router: dot
    /// segments, empty segments, or percent-encoded dots and slashes. Such requests are
    /// denied rather than routed by a spelling the upstream will normalise away.
    fn is_ambiguous_path(&self) -> bool {
        let path = self.path.as_bytes();
        self.path.contains("//")
            || self.path.contains('\\')
            || self.path.split('/').any(|segment| segment == "." || segment == "..")
            || path.windows(3).any(|w| [b"%2e", b"%2f", b"%5c"].iter().any(|t| w.eq_ignore_ascii_case(*t)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str())
    }

    fn bearer(&self) -> Bearer<'_> {
        let Some(value) = self.header("authorization") else { return Bearer::None };
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Bearer::Token(token.trim())
            }
            _ => Bearer::Malformed,
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting and give
/// in-flight checks `grace` to finish.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    // Bounded headers: an oversized request is answered 431 by hyper, never buffered.
    builder.http1().max_buf_size(64 << 10);
    builder.http2().max_header_list_size(64 << 10);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = hyper::service::service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(app.handle(request, peer).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no longer accepting, finishing in-flight checks");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over; dropping the remaining connections");
    }
}
