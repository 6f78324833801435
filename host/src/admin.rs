//! Changing what the sidecar serves while it serves: policies, data, revocations, keys.
//!
//! Every change builds a new snapshot from the current one and publishes it atomically; a
//! call returns only once its snapshot is live, so any check that starts afterwards sees it
//! (read-your-writes), while checks in flight finish on the snapshot they pinned. Modules are
//! compiled and probed on the blocking pool, never on a request thread. A rejected module or
//! document leaves the old version serving.
//!
//! The admin HTTP API (JSON; modules as raw bytes) listens on its own loopback address with a
//! bearer token, or on a Unix socket:
//!
//! | call | does |
//! |---|---|
//! | `GET /v1/snapshot` | versions, policies with digests and load times |
//! | `PUT /v1/policies/{id}` (body: `.wasm`) | load or replace a policy module |
//! | `DELETE /v1/policies/{id}` | unload a policy no route uses |
//! | `PUT /v1/policies/{id}/data` (body: JSON) | replace its data document |
//! | `PUT /v1/policies/{id}/shadow` (body: `.wasm`) | attach a candidate to shadow-evaluate |
//! | `DELETE /v1/policies/{id}/shadow` | detach it |
//! | `POST /v1/revocations`, `DELETE /v1/revocations` (`{"jtis": [], "subjects": []}`) | revoke, un-revoke |
//! | `PUT /v1/keys` (`{"issuer": "…", "jwks": {"keys": […]}}`) | replace an issuer's static keys |
//! | `POST /v1/jwks/refresh` (`{"issuer": "…"}`) | fetch an issuer's JWKS now |
//!
//! Answers: `200` with `{"snapshot": N, …}`; `400`/`422` with `{"error": "…"}` for bad input
//! (the old state keeps serving); `401` without the token; `404`/`409` as usual.

use crate::keys::{Key, KeySets, Revocations, keys_from_jwks};
use crate::server::App;
use crate::snapshot::{LoadedPolicy, Snapshot};
use crate::{LoadError, PolicyModule};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest module or document the admin API accepts.
const MAX_BODY: usize = 32 << 20;

/// Why an admin change was refused. The old state keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The module does not load (not Wasm, not a component, wrong imports/exports, …).
    #[error("the module was rejected: {0}")]
    Module(#[from] LoadError),
    /// The module loads but fails its probe check.
    #[error("the module failed its probe check: {0}")]
    Probe(crate::PolicyFault),
    /// The module's digest is not on the configured allow-list.
    #[error("module digest `{0}` is not in the allowed_digests list")]
    DigestNotAllowed(String),
    /// A malformed request body.
    #[error("{0}")]
    BadInput(String),
    /// No such policy or issuer.
    #[error("{0}")]
    NotFound(String),
    /// The change would break the configuration (e.g. unloading a routed policy).
    #[error("{0}")]
    Conflict(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Module(_) | AdminError::Probe(_) | AdminError::DigestNotAllowed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::BadInput(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
        }
    }
}

/// Revocations to add or remove.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationChange {
    /// Token ids.
    #[serde(default)]
    pub jtis: Vec<String>,
    /// Subjects.
    #[serde(default)]
    pub subjects: Vec<String>,
}

impl App {
    /// Compile, validate and probe `bytes` on the compiler thread, unless a module with the
    /// same digest was compiled recently (a rollback is then instant).
    async fn compile(&self, bytes: Bytes) -> Result<PolicyModule, AdminError> {
        let digest = crate::runtime::sha256_hex(&bytes);
        if !self.allowed_digests.is_empty() && !self.allowed_digests.contains(&digest) {
            return Err(AdminError::DigestNotAllowed(digest));
        }
        if let Some(module) = self.recent_modules.get(&digest) {
            return Ok(module);
        }
        let runtime = self.runtime.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        compiler().send(Box::new(move || {
            let compiled = runtime.load(&bytes).map_err(AdminError::from).and_then(|module| {
                runtime.probe(&module).map_err(AdminError::Probe)?;
                Ok(module)
            });
            let _ = done.send(compiled);
        }))
        .map_err(|_| AdminError::BadInput("the compiler thread is gone".into()))?;
        let module = result.await.map_err(|_| AdminError::BadInput("compilation did not finish".into()))??;
        self.recent_modules.insert(digest, module.clone());
        Ok(module)
    }

    /// Load or replace policy `id`; its data document is kept. Returns the live snapshot.
    pub async fn put_policy(&self, id: &str, bytes: Bytes) -> Result<Arc<Snapshot>, AdminError> {
        check_id(id)?;
        let _writes = self.module_writes.lock().await;
        let module = self.compile(bytes).await?;
        Ok(self.store.update(|s| {
            let (data, shadow) = match s.policies.get(id) {
                Some(old) => (old.data.clone(), old.shadow.clone()),
                None => (Arc::new(crate::host_calls::PolicyData::default()), None),
            };
            let loaded = LoadedPolicy { id: id.to_owned(), module, data, loaded_at: SystemTime::now(), shadow };
            s.policies.insert(id.to_owned(), Arc::new(loaded));
        }))
    }

    /// Replace policy `id`'s data document.
    pub fn put_data(&self, id: &str, value: Value) -> Result<Arc<Snapshot>, AdminError> {
        self.change_policy(id, |old| LoadedPolicy {
            data: Arc::new(crate::host_calls::PolicyData::new(value, old.data.version + 1)),
            ..old.clone()
        })
    }

    /// Attach (`Some`) or detach (`None`) a shadow candidate to policy `id`.
    pub async fn set_shadow(&self, id: &str, bytes: Option<Bytes>) -> Result<Arc<Snapshot>, AdminError> {
        let _writes = self.module_writes.lock().await;
        let candidate = match bytes {
            Some(bytes) => Some(self.compile(bytes).await?),
            None => None,
        };
        self.change_policy(id, |old| LoadedPolicy { shadow: candidate, ..old.clone() })
    }

    fn change_policy(&self, id: &str, change: impl FnOnce(&LoadedPolicy) -> LoadedPolicy) -> Result<Arc<Snapshot>, AdminError> {
        let mut missing = false;
        let snapshot = self.store.update(|s| match s.policies.get(id) {
            Some(old) => {
                let new = change(old);
                s.policies.insert(id.to_owned(), Arc::new(new));
            }
            None => missing = true,
        });
        if missing {
            return Err(AdminError::NotFound(format!("no policy `{id}`")));
        }
        Ok(snapshot)
    }

    /// Unload policy `id`. Unless `even_if_routed`, refuse while a route or the default
    /// policy uses it; if it is unloaded anyway, those routes answer 403 `no_route`.
    pub fn remove_policy(&self, id: &str, even_if_routed: bool) -> Result<Arc<Snapshot>, AdminError> {
        let mut outcome = Ok(());
        let snapshot = self.store.update(|s| {
            if !s.policies.contains_key(id) {
                outcome = Err(AdminError::NotFound(format!("no policy `{id}`")));
            } else if !even_if_routed && (s.routes.iter().any(|r| r.policy == id) || s.default_policy.as_deref() == Some(id)) {
                outcome = Err(AdminError::Conflict(format!("policy `{id}` is used by a route; change the routes first")));
            } else {
                s.policies.remove(id);
            }
        });
        outcome.map(|()| snapshot)
    }

    /// Add (`revoke`) or remove revocations.
    pub fn change_revocations(&self, change: &RevocationChange, revoke: bool) -> Arc<Snapshot> {
        self.store.update(|s| {
            let mut next = Revocations::clone(&s.revocations);
            next.version += 1;
            for jti in &change.jtis {
                if revoke { next.jtis.insert(jti.clone()) } else { next.jtis.remove(jti) };
            }
            for subject in &change.subjects {
                if revoke { next.subjects.insert(subject.clone()) } else { next.subjects.remove(subject) };
            }
            s.revocations = Arc::new(next);
        })
    }

    /// Replace `issuer`'s static keys (keys from its JWKS endpoint stay).
    pub fn rotate_keys(&self, issuer: &str, jwks: &jsonwebtoken::jwk::JwkSet) -> Result<Arc<Snapshot>, AdminError> {
        let keys: Vec<Key> = keys_from_jwks(jwks, false).map_err(|e| AdminError::BadInput(format!("{e:#}")))?;
        if keys.is_empty() {
            return Err(AdminError::BadInput("the JWKS has no keys; an issuer without keys would reject every token".into()));
        }
        let mut missing = false;
        let snapshot = self.store.update(|s| {
            let Some(current) = s.keys.issuers.get(issuer) else {
                missing = true;
                return;
            };
            let mut issuers = s.keys.issuers.clone();
            issuers.insert(issuer.to_owned(), Arc::new(current.with_static_keys(keys)));
            s.keys = Arc::new(KeySets { version: s.keys.version + 1, issuers });
        });
        if missing {
            return Err(AdminError::NotFound(format!("no issuer `{issuer}`")));
        }
        Ok(snapshot)
    }
}

/// The most recently compiled modules by digest, so re-uploading a known module (a rollback,
/// a deploy tool re-sending everything) skips compilation.
#[derive(Default)]
pub(crate) struct RecentModules(std::sync::Mutex<std::collections::VecDeque<(String, PolicyModule)>>);

impl RecentModules {
    const CAPACITY: usize = 8;

    fn get(&self, digest: &str) -> Option<PolicyModule> {
        let recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().find(|(d, _)| d == digest).map(|(_, m)| m.clone())
    }

    fn insert(&self, digest: String, module: PolicyModule) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|(d, _)| *d != digest);
        if recent.len() == Self::CAPACITY {
            recent.pop_front();
        }
        recent.push_back((digest, module));
    }
}

type CompileJob = Box<dyn FnOnce() + Send>;

/// The one thread that compiles hot-loaded modules, at a lower scheduling priority than the
/// threads answering checks: compiling a module takes a core for tens of milliseconds, and on
/// a small machine that core is better spent on checks (p99 during continuous reloads).
fn compiler() -> &'static std::sync::mpsc::Sender<CompileJob> {
    static COMPILER: std::sync::OnceLock<std::sync::mpsc::Sender<CompileJob>> = std::sync::OnceLock::new();
    COMPILER.get_or_init(|| {
        let (send, jobs) = std::sync::mpsc::channel::<CompileJob>();
        let spawned = std::thread::Builder::new().name("sandgate-compile".into()).spawn(move || {
            // SAFETY: setpriority with PRIO_PROCESS and id 0 only changes this thread's nice
            // value on Linux; failure leaves the default priority, which is harmless.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            for job in jobs {
                job();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the compiler thread");
        }
        send
    })
}

fn check_id(id: &str) -> Result<(), AdminError> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(AdminError::BadInput(format!("`{id}` is not a policy id: use 1 to 64 of [A-Za-z0-9._-]"))) }
}

/// The live snapshot as JSON.
pub fn snapshot_json(s: &Snapshot) -> Value {
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut policies: Vec<Value> = s
        .policies
        .values()
        .map(|p| {
            json!({
                "id": p.id,
                "digest": p.module.digest(),
                "size": p.module.size(),
                "loaded_at": unix(p.loaded_at),
                "data_version": p.data.version,
                "shadow_digest": p.shadow.as_ref().map(|m| m.digest()),
            })
        })
        .collect();
    policies.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    json!({
        "snapshot": s.version,
        "key_set": s.keys.version,
        "revocations": s.revocations.version,
        "policies": policies,
        "issuers": s.keys.issuers.values().map(|i| json!({
            "issuer": i.issuer,
            "kids": i.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The admin API's request handler.
pub struct AdminApi {
    app: Arc<App>,
    token: Option<String>,
}

impl AdminApi {
    /// An API for `app`; `token` is required on every call when set.
    pub fn new(app: Arc<App>, token: Option<String>) -> Arc<Self> {
        Arc::new(AdminApi { app, token })
    }

    /// Answer one admin request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.token {
            let presented = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
                let mut response = reply(StatusCode::UNAUTHORIZED, json!({ "error": "a valid admin bearer token is required" }));
                response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": format!("cannot read the body (at most {MAX_BODY} bytes): {e}") })),
        };
        let result = match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "snapshot"]) => Ok(self.app.store.load()),
            (&Method::PUT, ["v1", "policies", id]) => self.app.put_policy(id, body).await,
            (&Method::DELETE, ["v1", "policies", id]) => self.app.remove_policy(id, false),
            (&Method::PUT, ["v1", "policies", id, "data"]) => match serde_json::from_slice(&body) {
                Ok(value) => self.app.put_data(id, value),
                Err(e) => Err(AdminError::BadInput(format!("the data document is not JSON: {e}"))),
            },
            (&Method::PUT, ["v1", "policies", id, "shadow"]) => self.app.set_shadow(id, Some(body)).await,
            (&Method::DELETE, ["v1", "policies", id, "shadow"]) => self.app.set_shadow(id, None).await,
            (&Method::POST | &Method::DELETE, ["v1", "revocations"]) => match serde_json::from_slice::<RevocationChange>(&body) {
                Ok(change) => Ok(self.app.change_revocations(&change, method == Method::POST)),
                Err(e) => Err(AdminError::BadInput(format!("expected {{\"jtis\": [..], \"subjects\": [..]}}: {e}"))),
            },
            (&Method::PUT, ["v1", "keys"]) => match serde_json::from_slice::<KeysBody>(&body) {
                Ok(keys) => self.app.rotate_keys(&keys.issuer, &keys.jwks),
                Err(e) => Err(AdminError::BadInput(format!("expected {{\"issuer\": \"..\", \"jwks\": {{\"keys\": [..]}}}}: {e}"))),
            },
            (&Method::POST, ["v1", "jwks", "refresh"]) => match serde_json::from_slice::<IssuerBody>(&body) {
                Ok(b) => match self.app.fetcher.fetch(&b.issuer).await {
                    Ok(()) => Ok(self.app.store.load()),
                    Err(e) => return reply(StatusCode::BAD_GATEWAY, json!({ "error": format!("{e:#}") })),
                },
                Err(e) => Err(AdminError::BadInput(format!("expected {{\"issuer\": \"..\"}}: {e}"))),
            },
            _ => return reply(StatusCode::NOT_FOUND, json!({ "error": format!("no admin call {method} {path}") })),
        };
        match result {
            Ok(snapshot) => reply(StatusCode::OK, snapshot_json(&snapshot)),
            Err(error) => {
                tracing::warn!(%method, path, error = %error, "admin change refused");
                reply(error.status(), json!({ "error": error.to_string() }))
            }
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysBody {
    issuer: String,
    jwks: jsonwebtoken::jwk::JwkSet,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerBody {
    issuer: String,
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Watch `dir`: `ID.wasm` (and `ID.json`, its data) are loaded when they appear or change,
/// and the policy is unloaded when its module disappears (its routes then answer 403). A file is loaded once it has stayed
/// the same size and modification time for one scan, so a half-written copy is not read.
pub fn watch_policy_dir(app: Arc<App>, dir: std::path::PathBuf, every: std::time::Duration) {
    use std::collections::HashMap;
    type Stamp = (u64, SystemTime);
    tokio::spawn(async move {
        let mut seen: HashMap<std::path::PathBuf, Stamp> = HashMap::new();
        let mut loaded: HashMap<std::path::PathBuf, Stamp> = HashMap::new();
        loop {
            let mut present = HashSet::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Some(ext) = path.extension().and_then(|e| e.to_str()) else { continue };
                    if ext != "wasm" && ext != "json" {
                        continue;
                    }
                    let Ok(meta) = entry.metadata() else { continue };
                    let stamp = (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
                    present.insert(path.clone());
                    let stable = seen.insert(path.clone(), stamp) == Some(stamp);
                    if stable && loaded.get(&path) != Some(&stamp) {
                        loaded.insert(path.clone(), stamp);
                        load_from_dir(&app, &path, ext).await;
                    }
                }
            }
            for gone in loaded.keys().filter(|p| !present.contains(*p)).cloned().collect::<Vec<_>>() {
                loaded.remove(&gone);
                seen.remove(&gone);
                if gone.extension().is_some_and(|e| e == "wasm")
                    && let Some(id) = gone.file_stem().and_then(|s| s.to_str())
                    && let Err(e) = app.remove_policy(id, true)
                {
                    tracing::warn!(policy = id, error = %e, "module removed from the policy directory");
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

async fn load_from_dir(app: &App, path: &std::path::Path, ext: &str) {
    let Some(id) = path.file_stem().and_then(|s| s.to_str()) else { return };
    let result = match (ext, std::fs::read(path)) {
        ("wasm", Ok(bytes)) => app.put_policy(id, Bytes::from(bytes)).await.map(|_| ()),
        ("json", Ok(bytes)) if app.store.load().policies.contains_key(id) => match serde_json::from_slice(&bytes) {
            Ok(value) => app.put_data(id, value).map(|_| ()),
            Err(e) => Err(AdminError::BadInput(format!("not JSON: {e}"))),
        },
        (_, Ok(_)) => Ok(()), // data for a module not loaded yet: loaded with it
        (_, Err(e)) => Err(AdminError::BadInput(format!("cannot read: {e}"))),
    };
    match result {
        Ok(()) => tracing::info!(policy = id, file = %path.display(), "loaded from the policy directory"),
        Err(e) => tracing::warn!(policy = id, file = %path.display(), error = %e, "not loaded; the previous version keeps serving"),
    }
    // A module loaded after its data file: give it the data now.
    if ext == "wasm" && app.store.load().policies.get(id).is_some_and(|p| p.data.version == 0) {
        let data_path = path.with_extension("json");
        if let Ok(bytes) = std::fs::read(&data_path)
            && let Ok(value) = serde_json::from_slice::<Value>(&bytes)
        {
            let _ = app.put_data(id, value);
        }
    }
}

/// Start the admin API described by `config`; returns where it listens (and, when it made
/// one up because none was configured on a loopback address, the token).
pub async fn start(app: Arc<App>, config: &crate::config::AdminConfig) -> anyhow::Result<(String, Option<String>)> {
    use anyhow::{Context, bail};
    let configured = match (&config.token, &config.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the admin token file `{}`", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if configured.as_deref() == Some("") {
        bail!("the admin token is empty");
    }
    if let Some(path) = &config.unix_socket {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on `{}`", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let api = AdminApi::new(app, configured);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve_connection(api.clone(), stream);
            }
        });
        return Ok((format!("unix:{}", path.display()), None));
    }
    let address: std::net::SocketAddr =
        config.listen.parse().with_context(|| format!("admin listen address `{}` is not ip:port", config.listen))?;
    let (token, generated) = match configured {
        Some(token) => (token, None),
        None if address.ip().is_loopback() => {
            let mut bytes = [0u8; 24];
            aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness for the admin token"))?;
            let token = hex::encode(bytes);
            (token.clone(), Some(token))
        }
        None => bail!(
            "refusing to start: the admin API would listen on non-loopback `{address}` without a token; set [admin] token or token_file, or use unix_socket"
        ),
    };
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on `{address}`"))?;
    let local = listener.local_addr()?;
    let api = AdminApi::new(app, Some(token));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve_connection(api.clone(), stream);
        }
    });
    Ok((format!("http://{local}"), generated))
}

fn serve_connection<S>(api: Arc<AdminApi>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(api.handle(request).await) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
    });
}
